"""What a node carries from one round to the next, kept on its own disk so a SuperNode restart loses nothing.

Flower keeps a node's ``Context.state`` in the SuperNode's memory: a restarted SuperNode starts with
an empty one. Two things must survive: the node's own adapters when there is no global model
(``aggregation = "none"``) and its generator bank (generator modes); the server's records it holds
(:mod:`client_app.held`) use the same files, so a restarted node can still complete a message that
names them by hash. Each is written atomically to
``<node cache-dir>/node-state/<run-name>/partition{id}/{key}_round_{r}`` whenever it changes and read back when the
state lacks it. A node that should have carried something and cannot find it says so in its reply
(``state_lost = 1``) instead of silently starting over; ``state_restored = 1`` when it reloaded
after a restart.

Between messages the bulky records live **on disk only** (:class:`DiskState`): ``Context.state`` keeps
their small ``-meta`` records and an ``on-disk`` note. Why: in a deployment Flower moves the whole
Context between the SuperNode and every ClientApp process, in (``pull-task-input``) and out
(``push-task-output``), so a state holding the adapters or a generator bank (tens of MB) cost every
message two large transfers, and Flower gives the final push only 5 s before it ends the exiting
process (``FORCE_EXIT_TIMEOUT_SECONDS`` in ``flwr/supercore/constant.py``). On busy cores a large push
was cut off; the SuperNode then kept the task open until its token expired (60 s) and answered the
node's next message of that run with "ClientApp stopped responding".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
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


def persist(state: RecordDict, directory: Path, keys: tuple[str, ...], server_round: int) -> list[str]:
    """Write the ``keys`` present in ``state`` (ArrayRecords, with their ``-meta`` ConfigRecord if any) as
    this round's files; files older than the newest :data:`KEEP` rounds are removed. Returns the keys
    written."""
    written = []
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
        written.append(key)
    return written


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


ON_DISK = "on-disk"  # Context.state ConfigRecord {key: True}: records this node keeps on its disk only


@dataclass
class DiskState:
    """One message's dealings with the node's state directory, and what the Context may leave behind.

    Every record this message read from or wrote to ``directory`` is on disk (and a pretrained generator
    bank, in its checkpoints, which the app adds to :attr:`on_disk`); :meth:`release` takes
    those ArrayRecords out of the Context state before the reply (their ``-meta`` records and the
    :data:`ON_DISK` note stay) so the Context that travels back to the SuperNode is small. A record
    whose write failed stays in memory: it still serves this SuperNode's life.
    """

    directory: Path
    on_disk: set[str] = field(default_factory=set)

    def restore(self, state: RecordDict, keys: tuple[str, ...], server_round: int) -> list[str]:
        """:func:`restore`; returns the keys reloaded after a restart (a key the Context notes as
        :data:`ON_DISK` was released by an earlier message, not lost)."""
        noted = _noted(state)
        restored = restore(state, self.directory, keys, server_round)
        self.on_disk.update(restored)
        return [k for k in restored if k not in noted]

    def persist(self, state: RecordDict, keys: tuple[str, ...], server_round: int) -> None:
        """:func:`persist`; the keys written may leave the Context."""
        self.on_disk.update(persist(state, self.directory, keys, server_round))

    def release(self, state: RecordDict) -> list[str]:
        """Remove the ArrayRecords that are on disk from ``state`` and note them; returns the keys removed."""
        released = sorted(k for k in self.on_disk if isinstance(state.get(k), ArrayRecord))
        if not released:
            return []
        state[ON_DISK] = ConfigRecord({**_noted(state), **dict.fromkeys(released, True)})
        _drop(state, released)
        return released


def release_noted(state: RecordDict) -> list[str]:
    """After a failed message: remove the ArrayRecords that the :data:`ON_DISK` note says are on disk
    (the failed message's changes to them never reached the server); returns the keys removed. Why:
    the Context goes back to the SuperNode after a failure too, within Flower's 5 s."""
    removed = sorted(k for k in _noted(state) if isinstance(state.get(k), ArrayRecord))
    _drop(state, removed)
    return removed


def _noted(state: RecordDict) -> dict:
    """The :data:`ON_DISK` note of ``state`` ({key: True}; empty without one)."""
    return dict(state[ON_DISK]) if ON_DISK in state else {}  # type: ignore[arg-type]


def _drop(state: RecordDict, keys: list[str]) -> None:
    for key in keys:
        del state[key]
