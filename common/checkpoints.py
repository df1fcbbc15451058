"""Self-describing checkpoints: safetensors tensors + JSON metadata, never pickles, written atomically.

Every write goes through :mod:`common.atomic` (temp file, fsync, rename, directory fsync), so a run
killed mid-write leaves either the previous file or the new one, never a truncated file that a
resumed run would trip over. ``save_tensors`` / ``load_tensors`` are the one pair every artifact's
own save/load is built on (adapters below, generator banks, class targets and means, cache shards).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.atomic import atomic_path, atomic_write_bytes, atomic_write_json
from common.errors import FedA2VError
from common.models.adapters import AdapterConfig, Adapters

__all__ = [
    "CheckpointError",
    "atomic_write_bytes",
    "atomic_write_json",
    "load_adapters",
    "load_tensors",
    "save_adapters",
    "save_tensors",
]

FORMAT_VERSION = "1"


class CheckpointError(FedA2VError, ValueError):
    """A checkpoint is missing, unreadable or does not match what the caller expects."""


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> Path:
    """Save tensors with JSON-encoded metadata (safetensors metadata is str -> str)."""
    path = Path(path)
    meta = {"format-version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    meta.update({k: json.dumps(v) for k, v in metadata.items()})
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return path


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load tensors and decoded metadata; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint '{path}' is not a readable safetensors file: {err}") from None
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    return tensors, meta


# ------------------------------------------------------------------------- adapters
def save_adapters(
    path: Path,
    adapters: torch.nn.Module,
    adapter_config: Mapping[str, Any],
    class_names: list[str],
    server_round: int,
    config_hash: str,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Global (or per-node) adapters with everything needed to rebuild and check them."""
    meta = {
        "type": "adapters",
        "adapter-config": dict(adapter_config),
        "class-names": list(class_names),
        "round": server_round,
        "config-hash": config_hash,
    }
    meta.update(extra or {})
    return save_tensors(path, adapters.state_dict(), meta)


def load_adapters(path: Path, expected_adapter_config: Mapping[str, Any] | None = None):
    """Rebuild adapters from a checkpoint; a dims mismatch names the field, found vs expected."""
    tensors, meta = load_tensors(path)
    if meta.get("type") != "adapters":
        raise CheckpointError(f"checkpoint '{path}': type is {meta.get('type')!r}, expected 'adapters'")
    found = meta["adapter-config"]
    if expected_adapter_config is not None:
        for key, value in expected_adapter_config.items():
            if found.get(key) != value:
                raise CheckpointError(f"checkpoint '{path}': adapter-config.{key} is {found.get(key)!r}, expected {value!r}")
    adapters = Adapters(AdapterConfig.from_dict(found))
    adapters.load_state_dict(tensors)
    return adapters, meta
