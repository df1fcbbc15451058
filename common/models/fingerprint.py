"""Fingerprints of model files, computed without loading the model.

Why: caches keyed by a model (text targets, AST embeddings) must be checked *before* the model is
built, or a cache hit would still pay for loading gigabytes of weights. A fingerprint reads the
small files (configs, tokenizers) completely and, for large weight files, only their size plus the
first and last MiB: cheap (milliseconds for a 350 MB AST checkpoint), and any re-export, re-download
of another revision or truncation changes it. An in-place edit of the middle of a weight file that
keeps its size would not; nobody edits weight files that way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

__all__ = ["file_fingerprint", "files_fingerprint"]


def file_fingerprint(path: Path, full_limit: int = 16 << 20, chunk: int = 1 << 20) -> str:
    """Full sha256 for small files (configs, tokenizers); size + first/last MiB for weight shards."""
    size = path.stat().st_size
    h = hashlib.sha256(f"{size}|".encode())
    with open(path, "rb") as fh:
        if size <= full_limit:
            h.update(fh.read())
        else:
            h.update(fh.read(chunk))
            fh.seek(size - chunk)
            h.update(fh.read(chunk))
    return h.hexdigest()


def files_fingerprint(root: Path, files: Iterable[Path]) -> str:
    """One sha256 over ``relative path | file_fingerprint`` lines of ``files``, in the order given."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}|{file_fingerprint(f)}\n".encode())
    return h.hexdigest()
