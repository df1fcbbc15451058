"""What our patches of Flower's internals assume, checked against the installed Flower.

Why: the ServerApp (:mod:`server_app.grid`) and the SuperNode tooling (``ops.deploy``) replace a few of
Flower 1.41's module functions and module globals (``pull_objects``, the SuperNode loop's ``time`` and
``subprocess``, the SuperExec's ``get_executor``) and match literals in Flower's code (its 3-s idle
sleep). None of that is public API, so a Flower upgrade could break a patch silently. Each patch
lists its assumptions with the checks here; a patch whose assumptions do not hold is not applied
(logged as a warning, Flower's own behaviour goes on), and ``tests/test_flower_patches.py`` fails
loudly on the installed Flower.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

TESTED_FLOWER = "1.41."  # the Flower release line the patches were written against


def flower_version_mismatch() -> str | None:
    """Why the installed Flower is not the release line the patches were written for, or ``None``."""
    try:
        version = importlib.metadata.version("flwr")
    except importlib.metadata.PackageNotFoundError:
        return "flwr is not installed"
    if not version.startswith(TESTED_FLOWER):
        return f"Flower {version} is installed; the patches were written against {TESTED_FLOWER}x"
    return None


def keyword_mismatch(fn: Callable[..., Any] | None, name: str, keywords: Iterable[str]) -> str | None:
    """Why ``fn`` does not take every one of ``keywords`` (by keyword), or ``None``."""
    if fn is None:
        return f"{name} is missing"
    try:
        params = inspect.signature(inspect.unwrap(fn)).parameters
    except (TypeError, ValueError):
        return f"{name} has no readable signature"
    missing = [k for k in keywords if k not in params]
    return f"{name} no longer takes {', '.join(missing)}" if missing else None


def source_mismatch(module: ModuleType, literals: Iterable[str]) -> str | None:
    """Why ``module``'s source lacks one of ``literals`` (code a patch matches), or ``None``."""
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return f"the source of {module.__name__} cannot be read"
    missing = [lit for lit in literals if lit not in source]
    return f"{module.__name__} no longer contains {', '.join(repr(m) for m in missing)}" if missing else None


def global_mismatch(module: ModuleType, name: str, expected: ModuleType) -> str | None:
    """Why ``module.<name>`` is not the module ``expected`` (or our own stand-in for it), or ``None``."""
    value = getattr(module, name, None)
    if value is expected or getattr(value, "feda2v_prompt", False) or getattr(value, "feda2v_stand_in", False):
        return None
    return f"{module.__name__}.{name} is not the {expected.__name__} module"


def mismatches(*checks: str | None) -> list[str]:
    """The failed checks among ``checks`` (each a reason or ``None``)."""
    return [c for c in checks if c]
