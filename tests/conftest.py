"""Every test session gets a cache of its own: no test writes into the user's cache or checkpoint folders.

Why: code that falls back on the default cache (``cache-dir`` empty: ``$FEDA2V_CACHE``, else the user's
cache directory) would fill the user's cache with test datasets, embeddings, node state and generator
checkpoints, and a user's run could then load them (a run once loaded a benchmark's generators).
``FEDA2V_CACHE`` names a temporary folder for the whole session (removed at its end); tests that need a
particular cache still set ``cache-dir`` or their own ``FEDA2V_CACHE`` (``e2e_utils`` does).

One folder is shared with the user's cache on purpose: the docker tests' package wheelhouse
(``<cache>/wheelhouse``, ``pip download`` results, no run data), linked in when it exists, so the images
still build offline without downloading every dependency again in each session.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_SAVED: dict[str, str | None] = {}


def pytest_configure(config: pytest.Config) -> None:
    from common.config import default_cache_dir

    wheelhouse = default_cache_dir() / "wheelhouse"
    session = Path(tempfile.mkdtemp(prefix="feda2v-test-cache-"))
    if wheelhouse.is_dir():
        (session / "wheelhouse").symlink_to(wheelhouse, target_is_directory=True)
    _SAVED["FEDA2V_CACHE"] = os.environ.get("FEDA2V_CACHE")
    _SAVED["session"] = str(session)
    os.environ["FEDA2V_CACHE"] = str(session)


def pytest_unconfigure(config: pytest.Config) -> None:
    session = _SAVED.pop("session", None)
    if "FEDA2V_CACHE" in _SAVED:
        previous = _SAVED.pop("FEDA2V_CACHE")
        if previous is None:
            os.environ.pop("FEDA2V_CACHE", None)
        else:
            os.environ["FEDA2V_CACHE"] = previous
    if session:
        shutil.rmtree(session, ignore_errors=True)  # the wheelhouse link is removed, never followed
