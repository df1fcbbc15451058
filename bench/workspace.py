"""Where a benchmark writes: folders of its own, never the user's cache or checkpoint folders.

Why: a benchmark's runs fill the cache (datasets, embeddings, text targets, the trained render preset)
and, under the cache, node state and generator checkpoints. In the user's cache they would mix with
the user's own runs (a run that loaded "the latest" generator files once loaded a benchmark's). Every
benchmark calls :func:`isolated_cache` before it builds a configuration or starts a run: ``FEDA2V_CACHE``
then names the benchmark's own folder, for this process and every process it starts, and
:func:`cache_dir_override` puts the same folder in the run config of each ``flwr run`` (a local SuperLink
started earlier by someone else keeps its own environment). A user's ``FEDA2V_CACHE`` is the user's
cache too: it is not used unless the benchmark is told so (``cache-dir`` in its ``--run-config``, or
its own ``--cache``/``--work`` option).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.workspace")

__all__ = ["cache_dir_override", "isolated_cache"]

_CHOSEN: list[Path] = []  # the folder isolated_cache chose in this process


def isolated_cache(overrides: Mapping[str, Any] | None = None, folder: str | Path = "",
                   prefix: str = "feda2v-bench") -> Path:
    """Point ``FEDA2V_CACHE`` at the benchmark's cache and return it: ``cache-dir`` of the parsed
    ``--run-config`` ``overrides`` if given, else ``folder`` (a ``--work``/``--cache`` folder), else a
    temporary folder removed when the benchmark exits."""
    explicit = str((overrides or {}).get("cache-dir") or folder or "")
    if explicit:
        path = Path(explicit).expanduser().resolve()
    else:
        path = Path(tempfile.mkdtemp(prefix=f"{prefix}-cache-"))
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    os.environ["FEDA2V_CACHE"] = str(path)
    _CHOSEN[:] = [path]
    log.info("benchmark cache: %s", path)
    return path


def cache_dir_override(overrides: str) -> str:
    """``cache-dir="<FEDA2V_CACHE>"`` for a ``flwr run`` run config, unless ``overrides`` already sets
    ``cache-dir`` (Flower rejects a key given twice). Empty when :func:`isolated_cache` was not called."""
    if not _CHOSEN or "cache-dir" in overrides:
        return ""
    return f'cache-dir="{_CHOSEN[0]}"'
