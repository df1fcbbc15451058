"""What a node carries from one round to the next, kept on its own disk so a SuperNode restart loses nothing.

Flower keeps a node's ``Context.state`` in the SuperNode's memory: a restarted SuperNode starts with
an empty one. Two things must survive: the node's own adapters when there is no global model
(``aggregation = "none"``) and its generator bank (generator modes). Each is written atomically to
``<node cache-dir>/node-state/<run-name>/partition{id}/`` whenever it changes and read back when the
state lacks it. A node that should have carried something and cannot find it says so in its reply
(``state_lost = 1``) instead of silently starting over; ``state_restored = 1`` when it reloaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from common.checkpoints import CheckpointError, load_tensors, save_tensors
from common.names import safe_name

log = logging.getLogger(__name__)

LOCAL_ADAPTERS = "local-adapters"  # Context.state key of a node's own adapters (no global model)


def state_dir(cache_dir: Path, run_name: str, partition_id: int) -> Path:
    return Path(cache_dir) / "node-state" / safe_name(run_name or "unnamed") / f"partition{int(partition_id)}"


def persist(state: RecordDict, directory: Path, keys: tuple[str, ...]) -> None:
    """Write the ``keys`` present in ``state`` (ArrayRecords, with their ``-meta`` ConfigRecord if any)."""
    for key in keys:
        if key not in state:
            continue
        meta_key = f"{key}-meta"
        meta = json.dumps(dict(state[meta_key])) if meta_key in state else "{}"
        save_tensors(directory / f"{key}.safetensors", state[key].to_torch_state_dict(),  # type: ignore[union-attr]
                     {"type": "node-state", "key": key, "record-meta": meta})


def restore(state: RecordDict, directory: Path, keys: tuple[str, ...]) -> list[str]:
    """Load the ``keys`` missing from ``state`` from ``directory``; returns the keys restored."""
    restored = []
    for key in keys:
        path = directory / f"{key}.safetensors"
        if key in state or not path.is_file():
            continue
        try:
            tensors, meta = load_tensors(path)
            record_meta = json.loads(meta.get("record-meta") or "{}")
        except (CheckpointError, json.JSONDecodeError) as err:
            log.warning("node state %s is unreadable (%s): not restored", path, err)
            continue
        state[key] = ArrayRecord(tensors)
        if record_meta:
            state[f"{key}-meta"] = ConfigRecord(record_meta)
        restored.append(key)
    return restored
