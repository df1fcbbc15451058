"""Helpers for the end-to-end tests (``test_simulation.py``, ``test_deployment.py``).

What they guarantee, and why:

* **Isolation.** Every test gets its own ``FLWR_HOME`` (connections, installed FABs, the local
  SuperLink's database and log), its own output directory and a neutral working directory, so a
  developer's ``~/.flwr`` is never read or written and the local SuperLink never imports the app
  from the checkout by accident (Flower's local SuperLink keeps the working directory of the first
  ``flwr run``; see :mod:`ops.launcher`).
* **No fixed ports.** ``flwr run`` starts its local SuperLink on 39091/39093 unless
  ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` / ``FLWR_LOCAL_CONTROL_API_PORT`` say otherwise; the tests
  pick free ports so they neither collide with nor silently *reuse* a SuperLink that someone else
  (another session, a developer's demo) is running.
* **Offline.** The launcher's defaults (``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``: otherwise
  Flower installs the app's dependencies with uv into a throw-away env; ``HF_HUB_OFFLINE=1``), plus
  ``TRANSFORMERS_OFFLINE=1`` and ``FLWR_DISABLE_UPDATE_CHECK=1``.
* **Cleanup even on failure.** Every process the tests start runs in its own session, and every
  environment carries a unique run tag (``FEDA2V_RUN_TAG``, :mod:`ops.launcher`). Teardown
  signals the process groups it started, then sweeps ``/proc`` for any process carrying the tag --
  this catches the detached local SuperLink, SuperExec, ``flwr-simulation``/``flwr-serverapp``/
  ``flwr-clientapp`` processes and Ray's workers, which live in sessions of their own -- first with
  SIGTERM, then SIGKILL (:func:`ops.launcher.stop_tagged`).
* **Bounded time.** Every foreground command has a timeout, and a wait on a foreground command
  aborts early when one of the background services it depends on dies.
* **Diagnosable failures.** Output goes to log files under the test's tmp dir; a failing command's
  assertion message carries the tail of its output, and when a test fails the tails of all logs
  (including the local SuperLink's own log file) are printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ops import launcher
from ops.deploy.local import free_port
from ops.launcher import COMPLETED, RUN_TAG_VAR, ls_command, parse_run_id, parse_run_status

REPO_ROOT = Path(__file__).resolve().parents[1]
TAG_VAR = RUN_TAG_VAR

TERM_GRACE_S = launcher.TERM_GRACE_S
KILL_GRACE_S = launcher.KILL_GRACE_S


# ---------------------------------------------------------------------------------------- logs
def tail(path: Path, lines: int = 60) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as err:
        return f"<cannot read {path}: {err}>"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Result:
    name: str
    cmd: list[str]
    returncode: int
    output: str
    seconds: float
    log: Path

    def describe(self, lines: int = 80) -> str:
        return (
            f"`{self.name}` exited {self.returncode} after {self.seconds:.1f}s\n"
            f"$ {shlex.join(self.cmd)}\n--- last {lines} lines of {self.log} ---\n"
            + "\n".join(self.output.splitlines()[-lines:])
        )


@dataclass
class _Started:
    name: str
    cmd: list[str]
    proc: subprocess.Popen
    log: Path
    handle: Any


class E2EEnv:
    """One test's isolated Flower world: FLWR_HOME, env, ports, started processes, logs."""

    def __init__(self, root: Path, cache_dir: Path) -> None:
        self.root = Path(root)
        self.cache_dir = Path(cache_dir)
        self.flwr_home = self.root / "flwr-home"
        self.cwd = self.root / "cwd"  # neutral working directory for every command
        self.logs = self.root / "logs"
        self.out = self.root / "out"
        for d in (self.flwr_home, self.cwd, self.logs, self.out):
            d.mkdir(parents=True, exist_ok=True)
        self.tag = launcher.new_run_tag()
        self.local_superlink_port = free_port()
        self.local_control_port = free_port()
        self._started: list[_Started] = []
        self._log_names: set[str] = set()
        self.env = self._base_env()
        missing = [exe for exe in ("flwr", "flower-superlink", "flower-supernode", "feda2v")
                   if shutil.which(exe, path=self.env["PATH"]) is None]
        if missing:
            pytest.fail(f"{', '.join(missing)} not found next to {sys.executable}: install the project "
                        "(pip install -e '.[dev]') into the interpreter that runs pytest", pytrace=False)

    # ------------------------------------------------------------------ environment
    def _base_env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "PYTEST_", TAG_VAR))}
        base["HF_HUB_OFFLINE"] = "1"  # forced, not just defaulted
        return launcher.run_env(
            base,
            tag=self.tag,
            extra={
                "FLWR_HOME": str(self.flwr_home),
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(self.local_superlink_port),
                "FLWR_LOCAL_CONTROL_API_PORT": str(self.local_control_port),
                "TRANSFORMERS_OFFLINE": "1",
                "FEDA2V_CACHE": str(self.cache_dir),
                "PYTHONUNBUFFERED": "1",
                "COLUMNS": "200",  # keep rich/typer from wrapping error messages mid-word
            },
        )

    def env_with(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(self.env)
        env.update(extra or {})
        env[TAG_VAR] = self.env[TAG_VAR]  # never let a caller drop the cleanup tag
        return env

    def _log_path(self, name: str) -> Path:
        base, i = name, 1
        while name in self._log_names:
            i += 1
            name = f"{base}-{i}"
        self._log_names.add(name)
        return self.logs / f"{name}.log"

    # ------------------------------------------------------------------ processes
    def start(self, name: str, cmd: Sequence[str], env: Mapping[str, str] | None = None) -> subprocess.Popen:
        """Start a background service (own session, output to ``logs/<name>.log``)."""
        log = self._log_path(name)
        handle = open(log, "wb")  # noqa: SIM115 - closed in cleanup()
        proc = subprocess.Popen(
            list(cmd), cwd=self.cwd, env=self.env_with(env), stdin=subprocess.DEVNULL,
            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self._started.append(_Started(name, list(cmd), proc, log, handle))
        return proc

    def _check_alive(self, watch: Iterable[subprocess.Popen]) -> None:
        for s in self._started:
            if any(s.proc is w for w in watch) and s.proc.poll() is not None:
                raise AssertionError(
                    f"background process `{s.name}` exited with {s.proc.returncode}\n"
                    f"$ {shlex.join(s.cmd)}\n--- last lines of {s.log} ---\n{tail(s.log)}"
                )

    def run(
        self,
        name: str,
        cmd: Sequence[str],
        timeout: float,
        env: Mapping[str, str] | None = None,
        watch: Iterable[subprocess.Popen] = (),
    ) -> Result:
        """Run a foreground command to completion (bounded by ``timeout``); never raises on rc != 0."""
        watch = list(watch)
        log = self._log_path(name)
        t0 = time.monotonic()
        with open(log, "wb") as handle:
            proc = subprocess.Popen(
                list(cmd), cwd=self.cwd, env=self.env_with(env), stdin=subprocess.DEVNULL,
                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
            )
            started = _Started(name, list(cmd), proc, log, None)
            self._started.append(started)
            try:
                while proc.poll() is None:
                    if time.monotonic() - t0 > timeout:
                        self._stop([started])
                        raise AssertionError(
                            f"`{name}` did not finish within {timeout:.0f}s\n$ {shlex.join(cmd)}\n"
                            f"--- last lines of {log} ---\n{tail(log)}"
                        )
                    try:
                        self._check_alive(watch)
                    except AssertionError as err:
                        self._stop([started])
                        raise AssertionError(f"while `{name}` was running: {err}\n--- `{name}` ---\n{tail(log, 30)}") from None
                    time.sleep(0.25)
            finally:
                if proc.poll() is None:
                    self._stop([started])
        seconds = time.monotonic() - t0
        return Result(name, list(cmd), proc.returncode, log.read_text(errors="replace"), seconds, log)

    def wait_for(
        self, what: str, predicate: Callable[[], bool], timeout: float, watch: Iterable[subprocess.Popen] = ()
    ) -> float:
        """Poll ``predicate`` until true; fail after ``timeout`` s or when a watched process dies."""
        watch = list(watch)
        t0 = time.monotonic()
        while True:
            self._check_alive(watch)
            if predicate():
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                logs = "\n".join(f"--- {s.log} ---\n{tail(s.log, 30)}" for s in self._started if any(s.proc is w for w in watch))
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")
            time.sleep(0.25)

    # ------------------------------------------------------------------ flower helpers
    def flwr_run(
        self,
        run_config: str,
        superlink: str | None = None,
        federation_config: str | None = None,
        timeout: float = 300,
        name: str = "flwr-run",
        watch: Iterable[subprocess.Popen] = (),
        env: Mapping[str, str] | None = None,
    ) -> Result:
        cmd = launcher.flwr_run_command(REPO_ROOT, superlink=superlink, federation_config=federation_config,
                                        run_config=[run_config])
        return self.run(name, cmd, timeout=timeout, watch=watch, env=env)

    @staticmethod
    def run_id(result: Result) -> int:
        run_id = parse_run_id(result.output)
        assert run_id is not None, "no run id in the output of flwr run\n" + result.describe()
        return run_id

    def run_status(self, run_id: int, superlink: str | None = None, timeout: float = 60) -> dict[str, Any]:
        """The run as the SuperLink reports it (``flwr ls --run-id --format json``).

        Needed because ``flwr run --stream`` exits 0 even when the ServerApp raised.
        """
        result = self.run("flwr-ls", ls_command(run_id, superlink), timeout=timeout)
        assert result.returncode == 0, result.describe()
        return parse_run_status(result.output)

    def assert_run_completed(self, result: Result, superlink: str | None = None) -> dict[str, Any]:
        """Exit code 0 *and* the SuperLink's verdict ``finished:completed`` (the exit code alone is not enough)."""
        assert result.returncode == 0, result.describe()
        status = self.run_status(self.run_id(result), superlink)
        assert status.get("status") == COMPLETED, (
            f"run {status.get('run-id')} ended as {status.get('status')!r}: {status.get('status-details')}\n"
            + result.describe()
        )
        return status

    # ------------------------------------------------------------------ teardown
    def _stop(self, started: list[_Started]) -> None:
        launcher.stop_groups([s.proc for s in started], TERM_GRACE_S, KILL_GRACE_S)

    def cleanup(self) -> list[str]:
        """Stop everything this test started; return descriptions of processes that would not die."""
        # The process groups we started ourselves (SuperLink, SuperNodes, flwr CLI), then everything
        # else carrying our tag: the detached local SuperLink, SuperExecs, app processes, Ray.
        leftovers = launcher.stop_tagged(self.tag, marker=str(self.root), groups=[s.proc for s in self._started],
                                         term_grace_s=TERM_GRACE_S, kill_grace_s=KILL_GRACE_S)
        for s in self._started:
            if s.handle is not None:
                s.handle.close()
        return leftovers

    def log_report(self, lines: int = 60) -> str:
        paths = [s.log for s in self._started]
        local_log = self.flwr_home / "local-superlink" / "superlink.log"
        if local_log.exists():
            paths.append(local_log)
        parts = [f"===== e2e logs of {self.root} ====="]
        for path in paths:
            parts.append(f"----- {path} (last {lines} lines) -----\n{tail(path, lines)}")
        return "\n".join(parts)


# ------------------------------------------------------------------------------------------ fixtures
# Test modules import these two fixtures (``from e2e_utils import e2e, e2e_cache``).


@pytest.fixture(scope="session")
def e2e_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One FEDA2V_CACHE for the whole session: synthetic data and text targets are generated once."""
    return tmp_path_factory.mktemp("feda2v-cache")


@pytest.fixture
def e2e(request: pytest.FixtureRequest, tmp_path: Path, e2e_cache: Path):
    env = E2EEnv(tmp_path, e2e_cache)
    failed_before = request.session.testsfailed
    try:
        yield env
    finally:
        leftovers = env.cleanup()
        # The call phase's report is logged before fixture teardown, so a failed test shows up here.
        if request.session.testsfailed > failed_before:
            capman = request.config.pluginmanager.getplugin("capturemanager")
            ctx = capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()
            with ctx:
                sys.stderr.write("\n" + env.log_report() + "\n")
                sys.stderr.flush()
        if leftovers:
            pytest.fail("processes survived SIGKILL after the test:\n" + "\n".join(leftovers), pytrace=False)


def load_summary(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    assert path.is_file(), f"{path} was not written; run dir holds: {sorted(p.name for p in Path(run_dir).glob('*'))}"
    return json.loads(path.read_text())
