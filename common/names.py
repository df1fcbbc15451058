"""File-name pieces shared by checkpoints and images: one rule for class names and owners."""

from __future__ import annotations

import re

__all__ = ["safe_name"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(name: str) -> str:
    """A class or group name as it appears in a file name: runs of other characters become '_'."""
    return _UNSAFE.sub("_", str(name).strip()) or "_"
