"""What a node carries from one round to the next, kept on its own disk so a SuperNode restart loses nothing.

Flower keeps a node's ``Context.state`` in the SuperNode's memory: a restarted SuperNode starts with
an empty one. Two things must survive: the node's own adapters when there is no global model
(``aggregation = "none"``) and its generator bank (generator modes); the server's records it holds
(:mod:`client_app.held`) use the same files, so a restarted node can still complete a message that
names them by hash. Each is written atomically to
``<node cache-dir>/node-state/<run-name>/partition{id}/{key}_round_{r}`` whenever it changes and read back when the
state lacks it. A node that should have carried something and cannot find it says so in its reply
(``state_lost = 1``) instead of silently starting over; ``state_restored = 1`` when it reloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from common.checkpoints import CheckpointError, load_tensors, save_tensors
from common.names import safe_name

log = logging.getLogger(__name__)

LOCAL_ADAPTERS = "local-adapters"  # Context.state key of a node's own adapters (no global model)


def state_dir(cache_dir: Path, run_name: str, partition_id: int) -> Path:
    return Path(cache_dir) / "node-state" / safe_name(run_name or "unnamed") / f"partition{int(partition_id)}"


KEEP = 2  # newest rounds kept per key: a resumed run may restart one round before the newest file


def _files(directory: Path, key: str) -> dict[int, Path]:
    out = {}
    for path in Path(directory).glob(f"{key}_round_*.safetensors"):
        r = path.stem.removeprefix(f"{key}_round_")
        if r.isdigit():
            out[int(r)] = path
    return out


def persist(state: RecordDict, directory: Path, keys: tuple[str, ...], server_round: int) -> None:
    """Write the ``keys`` present in ``state`` (ArrayRecords, with their ``-meta`` ConfigRecord if any) as
    this round's files; files older than the newest :data:`KEEP` rounds are removed."""
    for key in keys:
        if key not in state:
            continue
        meta_key = f"{key}-meta"
        record_meta = dict(state[meta_key]) if meta_key in state else {}
        save_tensors(Path(directory) / f"{key}_round_{int(server_round)}.safetensors",
                     state[key].to_torch_state_dict(),  # type: ignore[union-attr]
                     {"type": "node-state", "key": key, "round": int(server_round), "record-meta": record_meta})
        for r, path in _files(directory, key).items():
            if r <= server_round - KEEP:
                path.unlink(missing_ok=True)


def restore(state: RecordDict, directory: Path, keys: tuple[str, ...], server_round: int) -> list[str]:
    """Load the ``keys`` missing from ``state`` from the newest file of a round before ``server_round`` (never
    from this round or later: a stopped run's unfinished rounds must not leak into its resumed ones).
    Returns the keys restored."""
    restored = []
    for key in keys:
        if key in state:
            continue
        earlier = {r: p for r, p in _files(directory, key).items() if r < server_round}
        if not earlier:
            continue
        path = earlier[max(earlier)]
        try:
            tensors, meta = load_tensors(path)
        except CheckpointError as err:
            log.warning("node state %s is unreadable (%s): not restored", path, err)
            continue
        state[key] = ArrayRecord(tensors)
        if meta.get("record-meta"):
            state[f"{key}-meta"] = ConfigRecord(dict(meta["record-meta"]))
        restored.append(key)
    return restored
