"""Where a result came from: package versions and the git commit, recorded in ``summary.json``.

Why recorded at run time: the report can be written much later, on another machine, by another
environment; what counts is what the ServerApp ran with.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

PACKAGES = ("feda2v", "flwr", "flwr-datasets", "torch", "torchaudio", "transformers", "diffusers", "safetensors",
            "pydantic", "numpy", "matplotlib")


def versions() -> dict[str, str]:
    """Installed versions of the packages that shape results, plus Python's."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit(path: str | Path) -> str:
    """The commit of the git checkout holding ``path`` (``""`` when it is not one, e.g. an installed FAB)."""
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""
