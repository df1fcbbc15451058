"""Benchmarks and tests never write into the user's cache: a benchmark's configurations and ``flwr run``
commands name its own cache folder (bench/workspace.py), and a test session has its own (conftest.py)."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from common.config import FedA2VConfig, default_cache_dir

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture()
def bench(monkeypatch, tmp_path):
    """bench/ importable as the scripts see it, a user's FEDA2V_CACHE that must stay untouched, and the
    environment and module state restored afterwards."""
    monkeypatch.syspath_prepend(str(BENCH))
    user = tmp_path / "users-cache"
    monkeypatch.setenv("FEDA2V_CACHE", str(user))
    workspace = importlib.import_module("workspace")
    monkeypatch.setattr(workspace, "_CHOSEN", [])
    return SimpleNamespace(workspace=workspace, user=user)


def test_a_benchmarks_configuration_and_runs_use_its_own_cache(bench, monkeypatch):
    cache = bench.workspace.isolated_cache()
    assert cache.is_dir() and cache != bench.user
    assert FedA2VConfig().resolved_cache_dir() == default_cache_dir() == cache  # what every in-process config uses
    fed_vs_central = importlib.import_module("fed_vs_central")
    seen = {}

    def launch(cmd, **kwargs):
        seen["cmd"] = cmd
        return SimpleNamespace(ok=True, problem="")

    monkeypatch.setattr(fed_vs_central.launcher, "launch", launch)
    fed_vs_central.run_federated("num-rounds=1", 2, cache / "work")
    assert f'cache-dir="{cache}"' in " ".join(seen["cmd"])  # also for a SuperLink started with another env
    fed_vs_central.run_federated(f'num-rounds=1 cache-dir="{bench.user}"', 2, cache / "work")
    assert " ".join(seen["cmd"]).count("cache-dir=") == 1  # an explicit cache-dir wins, never given twice
    assert not bench.user.exists()


def test_an_explicit_cache_dir_is_the_benchmarks_cache(bench, tmp_path):
    chosen = bench.workspace.isolated_cache({"cache-dir": str(tmp_path / "mine")})
    assert chosen == (tmp_path / "mine").resolve() == default_cache_dir()
    assert bench.workspace.isolated_cache(folder=tmp_path / "work" / "cache") == (tmp_path / "work" / "cache").resolve()


def test_a_test_session_has_a_cache_of_its_own():
    from platformdirs import user_cache_dir

    cache = default_cache_dir()
    assert cache.name.startswith("feda2v-test-cache-") and cache != Path(user_cache_dir("feda2v"))
