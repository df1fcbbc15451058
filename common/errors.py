"""The one base class of every error this project raises on purpose.

Why one base: a command-line entry point (``feda2v ...``) and the apps can tell "the user's input,
config or files are wrong" (a clear message, exit code 2) from a bug (a traceback) with a single
``except FedA2VError``. Subclasses keep ``ValueError`` where callers already catch that.
"""

from __future__ import annotations

import re

__all__ = ["FedA2VError", "redact_paths"]


class FedA2VError(Exception):
    """A problem with the user's configuration, data, checkpoints or messages; the message says what."""


_ABS_PATH = re.compile(r"(?<![\w.~-])(?:/[^\s/'\"():,;]+)+/?")


def redact_paths(text: str) -> str:
    """``text`` with every absolute path cut to ``…/<last part>``: what leaves a host (an error reply
    to the server) must not reveal its directory layout; the full message stays in the host's log."""
    return _ABS_PATH.sub(lambda m: "…/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)
