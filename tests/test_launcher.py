"""The one ``flwr run`` launcher: it stops exactly what its run started (by tag and PID), and a run
it cannot confirm as completed is never reported as a success."""

from __future__ import annotations

import os
import signal
import sys
import time

from common import launcher

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
