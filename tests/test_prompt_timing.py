"""feda2v-supernode's timing patch: prompt object pulls and short sleeps in Flower's SuperNode loop."""

from __future__ import annotations

import functools
import inspect

import os
import subprocess
import sys
import time

import pytest

from ops.deploy import prompt_timing
from ops.deploy.prompt_timing import IDLE_POLL, IDLE_POLL_ENV, PromptSleep, idle_poll_from_env, patch_supernode


def test_the_idle_sleep_becomes_the_idle_poll_and_local_checks_are_capped(monkeypatch):
    slept = []
    monkeypatch.setattr(prompt_timing.time, "sleep", slept.append)
    shim = PromptSleep(idle=0.2, local=0.05)
    shim.sleep(3)  # Flower's "no message: wait" sleep
    shim.sleep(0.5)  # its checks for a ClientApp's reply
    shim.sleep(0.01)
    assert slept == [0.2, 0.05, 0.01]
    assert shim.time is time.time and shim.monotonic is time.monotonic  # everything else is the real module


def test_the_idle_poll_comes_from_the_environment_or_the_default():
    assert idle_poll_from_env({}) == IDLE_POLL
    assert idle_poll_from_env({IDLE_POLL_ENV: " 0.25 "}) == 0.25
    for bad in ("soon", "0", "-1"):
        with pytest.raises(ValueError, match=IDLE_POLL_ENV):
            idle_poll_from_env({IDLE_POLL_ENV: bad})
    with pytest.raises(ValueError, match="> 0"):
        PromptSleep(idle=0)


def test_patch_supernode_shortens_flowers_loop_and_its_object_pulls(monkeypatch):
    from flwr.supernode import start_client_internal as loop

    monkeypatch.setattr(loop, "time", time)  # restored after the test
    calls = []
    original = loop.pull_objects

    @functools.wraps(inspect.unwrap(original))  # a spy with Flower's signature (the patch checks it)
    def spy(ids, fn, **kw):
        calls.append(kw)
        return original(ids, fn, **kw)

    monkeypatch.setattr(loop, "pull_objects", spy)
    assert patch_supernode(idle=0.3)
    assert isinstance(loop.time, PromptSleep) and loop.time.idle == 0.3
    assert patch_supernode(idle=0.3)  # a second time wraps nothing twice
    tries = {"n": 0}

    def pull(object_id):
        tries["n"] += 1
        if tries["n"] < 3:
            from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

            raise ObjectUnavailableError(object_id)
        return b"content"

    assert loop.pull_objects(["obj"], pull) == {"obj": b"content"} and tries["n"] == 3
    assert calls == [{"initial_backoff": prompt_timing.PULL_BACKOFF, "backoff_cap": prompt_timing.PULL_BACKOFF_CAP,
                      "max_tries_per_object": None}]


def test_the_console_script_is_flower_supernode_with_its_arguments():
    out = subprocess.run([sys.executable, "-m", "ops.deploy.prompt_timing", "--help"], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "--superlink" in out.stdout and "--node-config" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "ops.deploy.prompt_timing", "--help"], capture_output=True,
                         text=True, timeout=120, check=False, env={**os.environ, IDLE_POLL_ENV: "soon"})
    assert bad.returncode != 0 and IDLE_POLL_ENV in bad.stderr
