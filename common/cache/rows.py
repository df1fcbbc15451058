"""What a cached row is keyed by and checked with: a clip's identity, a row's checksum, row ranges.

Why apart from the store: the embedding path stats clips into :class:`ClipId` without opening the
store, and the checksum and range helpers are pure functions the store's reads and checks share.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = ["ClipId", "row_crc32", "row_ranges"]


class ClipId(NamedTuple):
    """A clip's identity in the cache: dataset-relative path + file size + mtime (ns)."""

    rel_path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path, rel_path: str) -> "ClipId | None":
        """Stat the file (no open); ``None`` when it cannot be stat'ed (then it is a miss)."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(rel_path, int(st.st_size), int(st.st_mtime_ns))


def row_crc32(row: torch.Tensor) -> int:
    """crc32 of a row's raw bytes (any dtype, bf16 included: hashed as bytes)."""
    return zlib.crc32(row.contiguous().view(torch.uint8).numpy())


def row_ranges(rows: list[int]) -> Iterator[tuple[int, int]]:
    """Sorted unique rows -> half-open ranges of consecutive rows (one slice read per range)."""
    start = prev = rows[0]
    for r in rows[1:]:
        if r != prev + 1:
            yield start, prev + 1
            start = r
        prev = r
    yield start, prev + 1
