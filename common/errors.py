"""The one base class of every error this project raises on purpose.

Why one base: a command-line entry point (``feda2v ...``) and the apps can tell "the user's input,
config or files are wrong" (a clear message, exit code 2) from a bug (a traceback) with a single
``except FedA2VError``. Subclasses keep ``ValueError`` where callers already catch that.
"""

from __future__ import annotations

__all__ = ["FedA2VError"]


class FedA2VError(Exception):
    """A problem with the user's configuration, data, checkpoints or messages; the message says what."""
