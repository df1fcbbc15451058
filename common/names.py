"""File-name pieces shared by checkpoints, images and run folders: one rule for each kind of name."""

from __future__ import annotations

import re
from pathlib import PureWindowsPath

__all__ = ["MAX_FOLDER_NAME_CHARS", "folder_name_problem", "safe_name"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")

MAX_FOLDER_NAME_CHARS = 128  # far below every file system's 255-byte name limit, with room for suffixes


def safe_name(name: str) -> str:
    """A class or group name as it appears in a file name: runs of other characters become '_'."""
    return _UNSAFE.sub("_", str(name).strip()) or "_"


def folder_name_problem(name: str) -> str | None:
    """Why ``name`` is not one plain folder name (``None`` when it is; the empty name is the caller's
    business).

    Why one rule: a run name becomes ``<output-dir>/<run-name>`` on the server and on every node, so a
    name such as ``..``, ``/etc`` or ``a/../../b`` sent by a server would make a node write outside the
    directories its operator gave it. The server checks its own config and each node checks what it
    receives with this same function.
    """
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if name in (".", ".."):
        return f"{name!r} is not a folder name"
    separators = sorted({c for c in name if c in "/\\"})
    if separators:
        return f"contains {', '.join(repr(c) for c in separators)}: it must be one folder name, not a path"
    unprintable = sorted({c for c in name if not c.isprintable()})  # NUL, newlines, escapes
    if unprintable:
        return f"contains the unprintable character(s) {', '.join(repr(c) for c in unprintable)}"
    if PureWindowsPath(name).drive:  # 'C:x' joined to a Windows path leaves the output directory
        return f"starts with a drive ({PureWindowsPath(name).drive!r}): it must be one folder name, not a path"
    if name != name.strip():
        return "has leading or trailing whitespace"
    if len(name) > MAX_FOLDER_NAME_CHARS:
        return f"is {len(name)} characters long, more than {MAX_FOLDER_NAME_CHARS}"
    return None
