"""feda2v-superexec: Flower's SuperExec with ClientApp tasks forked from a preloaded forkserver."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from flwr.supercore.constant import ExecutorType, TaskType
from flwr.supercore.superexec.executor import subprocess_executor
from flwr.supercore.superexec.executor.types import ExecutionSpec

from ops.deploy import warm_superexec
from ops.deploy.warm_superexec import (
    PRELOAD,
    PRELOAD_ENV,
    ForkserverExecutor,
    WarmSuperExecLauncher,
    clientapp_argv,
    preload_from_env,
)


def _spec(**kw) -> ExecutionSpec:
    base = dict(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:9094", token="tok", insecure=True,
                root_certificates_path=None, runtime_dependency_install=False, parent_pid=123, suppress_output=False,
                task_id=7)
    return ExecutionSpec(**{**base, **kw})


def test_the_preload_comes_from_the_environment_or_the_default():
    assert preload_from_env({}) == PRELOAD and "torch" in PRELOAD
    assert preload_from_env({PRELOAD_ENV: " none "}) == ()
    assert preload_from_env({PRELOAD_ENV: "torch, numpy"}) == ("torch", "numpy")
    with pytest.raises(ValueError, match=PRELOAD_ENV):
        preload_from_env({PRELOAD_ENV: "torch;rm -rf"})


@pytest.mark.parametrize("extra", [{}, {"insecure": False, "root_certificates_path": "/ca.pem"},
                                   {"parent_pid": None, "runtime_dependency_install": True}])
def test_a_forked_task_gets_the_arguments_flowers_subprocess_executor_passes(monkeypatch, extra):
    seen = []
    monkeypatch.setattr(subprocess_executor.subprocess, "Popen", lambda args, **kw: seen.append(list(args)))
    spec = _spec(**extra)
    subprocess_executor.SubprocessExecutor().launch(spec)
    assert clientapp_argv(spec) == seen[0]


def test_install_gives_flowers_superexec_the_forkserver_executor(monkeypatch):
    from flwr.supercore.superexec import run_superexec

    monkeypatch.setattr(run_superexec, "get_executor", run_superexec.get_executor)  # restored after the test
    made = []
    monkeypatch.setattr(warm_superexec, "ForkserverExecutor", lambda modules: made.append(modules) or "warm")
    assert warm_superexec.install(("json",)) and warm_superexec.install(("json",))  # idempotent
    assert run_superexec.get_executor(ExecutorType.SUBPROCESS) == "warm" and made == [("json",)]
    assert not warm_superexec.install(())  # FEDA2V_SUPEREXEC_PRELOAD=none: Flower's executor stays


def test_the_supernode_starts_feda2v_superexec_in_place_of_flower_superexec(monkeypatch):
    from flwr.supernode import start_client_internal as loop

    monkeypatch.setattr(loop, "subprocess", subprocess)  # restored after the test
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda args, *a, **kw: started.append(args))
    assert warm_superexec.warm_supernode() and warm_superexec.warm_supernode()
    assert isinstance(loop.subprocess, WarmSuperExecLauncher)
    loop.subprocess.Popen(["flower-superexec", "--runtime-api-address", "127.0.0.1:1"])
    loop.subprocess.Popen(["flwr-clientapp", "--help"])
    assert started == [["feda2v-superexec", "--runtime-api-address", "127.0.0.1:1"], ["flwr-clientapp", "--help"]]
    assert loop.subprocess.DEVNULL == subprocess.DEVNULL


FORK = """
import sys
from ops.deploy.warm_superexec import ForkserverExecutor, run_task
ex = ForkserverExecutor(("json",))
p = ex._ctx.Process(target=run_task, args=(["flwr-clientapp", "--help"], False))
p.start(); p.join()
ex.reconcile()
print("exit", p.exitcode, flush=True)
"""


def test_a_forked_task_runs_flowers_clientapp_entry_point():
    """A real fork from the forkserver: Flower's ``flwr-clientapp`` parses the task's own arguments."""
    out = subprocess.run([sys.executable, "-c", FORK], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--runtime-api-address" in out.stdout and "exit 0" in out.stdout, out.stdout + out.stderr[-3000:]


def test_the_console_script_is_flower_superexec_with_its_arguments():
    out = subprocess.run([sys.executable, "-m", "ops.deploy.warm_superexec", "--help"], capture_output=True,
                         text=True, timeout=120, check=False, env={**os.environ, PRELOAD_ENV: "json"})
    assert out.returncode == 0, out.stderr
    assert "--plugin-type" in out.stdout or "--runtime-api-address" in out.stdout, out.stdout
    assert ForkserverExecutor.__mro__[1] is subprocess_executor.SubprocessExecutor
