"""Our patches of Flower's internals hold for the installed Flower, and refuse (Flower's own behaviour
goes on) when what they assume is no longer so: a Flower upgrade fails here, not silently in a run."""

from __future__ import annotations

import logging
import time

import pytest
from flwr.supernode import start_client_internal as loop

from common import flower_compat
from ops.deploy import prompt_timing, warm_superexec
from server_app import grid

PATCHES = {"server grid pulls": grid.flower_mismatches, "supernode timing": prompt_timing.flower_mismatches,
           "warm superexec": warm_superexec.flower_mismatches}


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_the_installed_flower_is_what_each_patch_assumes(name):
    assert PATCHES[name]() == [], f"{name}: Flower changed under the patch; re-check it against the new release"


def test_another_flower_release_turns_every_patch_off_with_a_reason(monkeypatch, caplog):
    monkeypatch.setattr(flower_compat, "TESTED_FLOWER", "0.1.")
    before_time, before_subprocess = loop.time, loop.subprocess
    with caplog.at_level(logging.WARNING):
        assert not prompt_timing.patch_supernode(0.5)
        assert not warm_superexec.warm_supernode()
        assert not grid.prompt_object_pulls()
        assert not warm_superexec.install(("json",))
    assert loop.time is before_time and loop.subprocess is before_subprocess
    for reasons in PATCHES.values():
        assert any("written against 0.1.x" in r for r in reasons())
    assert caplog.text.count("written against 0.1.x") == 4


def test_a_changed_literal_or_signature_is_named(monkeypatch):
    monkeypatch.setattr(prompt_timing, "_FLOWER_IDLE_SLEEP", 7)
    assert any("time.sleep(7)" in r for r in prompt_timing.flower_mismatches())
    monkeypatch.setattr(grid, "PULL_KEYWORDS", ("initial_backoff", "retry_budget"))
    assert grid.flower_mismatches() == ["flwr.superlink.grid.http_grid.pull_objects no longer takes retry_budget"]


def test_a_loop_whose_time_is_not_the_time_module_is_left_alone(monkeypatch):
    monkeypatch.setattr(loop, "time", object())
    assert any("is not the time module" in r for r in prompt_timing.flower_mismatches())
    assert not prompt_timing.patch_supernode(0.5)
    monkeypatch.setattr(loop, "time", time)
    assert prompt_timing.flower_mismatches() == []
