"""The one ``flwr run`` launcher: it stops exactly what its run started (by tag and PID), a run it
cannot confirm as completed is never reported as a success, and every local simulation runs on a
SuperLink of its own (so runs started side by side on one machine never stop each other's)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ops import launcher
from e2e_utils import e2e_cache  # noqa: F401 - fixture

# A stand-in for `flwr run`: starts a detached long-lived child (like Flower's local SuperLink, in a
# session of its own, outliving its parent), prints its PID, exits 0 without a run id.
FAKE_FLWR_RUN = (
    "import subprocess, sys; "
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True); "
    "print('superlink-pid', p.pid, flush=True)"
)


def _child_pid(output: str) -> int:
    return int(next(line.split()[1] for line in output.splitlines() if line.startswith("superlink-pid")))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


def test_launch_stops_the_processes_its_run_started_and_reports_no_success_without_a_verdict():
    result = launcher.launch([sys.executable, "-c", FAKE_FLWR_RUN], quiet=True, timeout=60)
    pid = _child_pid(result.output)
    assert not result.ok and result.exit_code == 1
    assert "run id" in result.problem
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the detached child of the run was left running"
    assert result.leftovers == []


def test_sigterm_to_a_waiting_launch_stops_what_its_run_started(tmp_path: Path) -> None:
    """``kill <feda2v run>`` while the run is going: the run's detached processes go too."""
    import subprocess

    pid_file = tmp_path / "child.pid"
    fake = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(300)")
    script = (f"import sys; from ops import launcher; "
              f"launcher.launch([sys.executable, '-c', {fake!r}], quiet=True, timeout=120)")
    outer = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        child = int(pid_file.read_text())
        assert _alive(child)
        outer.send_signal(signal.SIGTERM)
        assert outer.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the run's detached process outlived a SIGTERM to its launcher"
    finally:
        if outer.poll() is None:
            outer.kill()
            outer.wait()
        if pid_file.is_file() and pid_file.read_text() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)  # only when the launcher failed to


def test_keep_superlink_leaves_them_running_and_other_processes_are_never_touched():
    bystander = __import__("subprocess").Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        result = launcher.launch([sys.executable, "-c", FAKE_FLWR_RUN], quiet=True, timeout=60, keep_superlink=True)
        pid = _child_pid(result.output)
        try:
            assert _alive(pid)
            assert launcher.tagged_pids(result.tag) == [pid]
            assert launcher.stop_tagged(result.tag, term_grace_s=5, kill_grace_s=5) == []
            assert not _alive(pid)
        finally:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        assert bystander.poll() is None, "a process the launcher did not start was stopped"
    finally:
        bystander.kill()
        bystander.wait()


def test_run_env_offline_defaults_path_and_nested_tags():
    env = launcher.run_env({"PATH": "/usr/bin", launcher.RUN_TAG_VAR: "outer"}, tag="inner")
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    assert env[launcher.RUN_TAG_VAR] == "outer,inner"
    assert launcher.run_env({"HF_HUB_OFFLINE": "0"})["HF_HUB_OFFLINE"] == "0"  # an explicit setting wins


def test_parsers():
    assert launcher.parse_run_id("... Successfully started run 1234 ...") == 1234
    assert launcher.parse_run_id("nothing") is None
    status = launcher.parse_run_status('noise {"runs": [{"status": "finished:failed", "status-details": "x"}]}')
    assert status["status"] == "finished:failed"


@pytest.mark.parametrize("overrides, expected", [
    (['num-rounds=2 output-dir="/tmp/mine"'], "/tmp/mine"),  # output-dir after another pair in one -c
    (["num-rounds=2", 'output-dir="/tmp/mine"'], "/tmp/mine"),
    (["num-rounds=2"], None),  # none given: --output-dir (default ./outputs), made absolute
])
def test_feda2v_run_keeps_an_output_dir_given_with_c(monkeypatch, tmp_path, overrides, expected):
    from ops.cli import run as run_cli

    seen = {}

    def fake_launch(cmd, **kwargs):
        seen["cmd"] = cmd
        return launcher.LaunchResult(cmd=list(cmd), returncode=1, output="", seconds=0.0, tag="t", problem="stub")

    monkeypatch.setattr(run_cli.launcher, "launch", fake_launch)
    monkeypatch.chdir(tmp_path)
    args = run_cli.argparse.Namespace(app_dir=str(launcher.APP_DIR), run_config=overrides, num_supernodes=3,
                                      rounds=None, output_dir="outputs", cpus_per_node=1, gpus_per_node=0.0,
                                      no_stream=True, keep_superlink=False)
    assert run_cli.cmd_run(args) != 0
    cmd = seen["cmd"]
    flat = run_cli.flat_overrides([value for flag, value in zip(cmd, cmd[1:]) if flag == "--run-config"])
    assert flat["output-dir"] == (expected or str(tmp_path / "outputs"))


# A stand-in for `flwr run` that reports where its local SuperLink would live.
FAKE_FLWR_RUN_ENV = (
    "import json, os; "
    "print(json.dumps({k: os.environ.get(k) for k in ('FLWR_HOME', 'FLWR_LOCAL_SUPERLINK_HTTP_API_PORT', "
    "'FLWR_LOCAL_CONTROL_API_PORT')}), flush=True)"
)


def _seen(result: launcher.LaunchResult) -> dict:
    return json.loads(next(line for line in result.output.splitlines() if line.startswith("{")))


def test_every_local_launch_gets_its_own_superlink_ports_and_home_and_removes_the_home():
    results = [launcher.launch([sys.executable, "-c", FAKE_FLWR_RUN_ENV], quiet=True, timeout=60,
                               env={"PATH": os.environ["PATH"]}) for _ in range(2)]
    seen = [_seen(r) for r in results]
    for result, env in zip(results, seen):
        own = result.local_superlink
        assert own is not None and env == own.env()
        assert not own.home.exists(), "the launch's own FLWR_HOME was left behind"
    assert seen[0]["FLWR_HOME"] != seen[1]["FLWR_HOME"]
    ports = {seen[i][var] for i in range(2) for var in (launcher.LOCAL_HTTP_PORT_VAR, launcher.LOCAL_CONTROL_PORT_VAR)}
    assert len(ports) == 4 and "39091" not in ports and "39093" not in ports


def test_a_caller_managed_or_remote_superlink_is_left_to_the_caller():
    managed = {"PATH": os.environ["PATH"], launcher.LOCAL_HTTP_PORT_VAR: "45678", "FLWR_HOME": "/somewhere"}
    result = launcher.launch([sys.executable, "-c", FAKE_FLWR_RUN_ENV], quiet=True, timeout=60, env=managed)
    assert result.local_superlink is None
    assert _seen(result)["FLWR_HOME"] == "/somewhere" and _seen(result)[launcher.LOCAL_HTTP_PORT_VAR] == "45678"
    assert launcher.own_local_superlink({}, superlink="my-deployment") is None


# ------------------------------------------------------------------------------------------ real runs
def _sim_config(out: Path, name: str, rounds: int) -> str:
    values = {"output-dir": str(out), "run-name": name, "num-rounds": rounds, "train.local-epochs": 1,
              "data.num-classes": 4, "data.clips-per-class": 8, "min-nodes": 2, "privacy.min-class-count": 1,
              "render.when": "off"}
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in values.items())


@pytest.mark.slow
def test_two_simulations_side_by_side_both_complete(tmp_path: Path, e2e_cache: Path) -> None:  # noqa: F811
    """The run that ends first stops only its own SuperLink: the other, still running, completes. The short
    one is submitted without ``--stream`` (``flwr run`` returns at once): its verdict waits for the run."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "PYTEST_", launcher.RUN_TAG_VAR))}
    base.update({"FEDA2V_CACHE": str(e2e_cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                 "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"})
    federation = launcher.federation_config(2, 1)

    def run(name: str, rounds: int) -> launcher.LaunchResult:
        cmd = launcher.flwr_run_command(launcher.APP_DIR, federation_config=federation,
                                        run_config=[_sim_config(tmp_path / "out", name, rounds)], stream=rounds > 1)
        return launcher.launch(cmd, env=base, cwd=tmp_path, quiet=True, timeout=1200)

    with ThreadPoolExecutor(max_workers=2) as pool:
        short, long = pool.submit(run, "short", 1), pool.submit(run, "long", 2)
        results = {"short": short.result(), "long": long.result()}
    for name, result in results.items():
        assert result.ok, f"{name}: {result.problem}\n{result.output[-3000:]}"
        assert result.status["status"] == launcher.COMPLETED
        assert result.local_superlink.started_by(result.output), f"{name} reused another SuperLink"
        assert result.leftovers == []
    assert results["short"].local_superlink.http_port != results["long"].local_superlink.http_port
    assert "--stream" not in results["short"].cmd and (tmp_path / "out" / "short" / "summary.json").is_file()
    summary = json.loads((tmp_path / "out" / "long" / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
