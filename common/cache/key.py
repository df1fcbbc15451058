"""What an embedding-cache directory is keyed by, and how two keys differ.

A key is the sha256 of a JSON of every field that changes an embedding: the encoder's identity
(computed without building it, see :func:`common.models.audio_encoder.audio_encoder_identity`),
the storage dtype and the cache format. The earlier code base keyed its cache by nothing, so a
changed model, sample rate or clip length silently reused stale embeddings (DESIGN.md, defect 6).

A dataset is identified by its resolved root path, so every node of a host that reads the same
folder shares one cache, while two different folders never mix (their clips' relative paths may
collide: ``audio/1-100032-A-0.wav`` exists in every ESC-50 copy).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from common.config.choices import STORAGE_DTYPES

__all__ = ["CACHE_FORMAT", "STORAGE_DTYPES", "cache_key", "cache_key_fields", "dataset_id", "diff_fields"]

# Bump when the on-disk layout (shard metadata, index schema) changes incompatibly.
CACHE_FORMAT = 1


def cache_key_fields(encoder_identity: dict[str, Any], storage_dtype: str) -> dict[str, Any]:
    """The JSON document hashed into a key (also written, readable, to ``key.json``)."""
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}")
    return {"format": CACHE_FORMAT, "encoder": dict(encoder_identity), "storage_dtype": storage_dtype}


def cache_key(fields: dict[str, Any]) -> str:
    """sha256 (hex) of the sorted-key JSON of ``fields``."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def dataset_id(root: Path) -> str:
    """``<folder name>-<12 hex of sha256(resolved path)>``: readable, and unique per folder on a host."""
    resolved = Path(root).expanduser().resolve()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", resolved.name)[:48] or "root"
    return f"{name}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:12]}"


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def diff_fields(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted field, old value, new value)`` for every leaf that differs (absent = ``None``)."""
    a, b = _flat(old), _flat(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
