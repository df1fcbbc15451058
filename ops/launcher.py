"""The one ``flwr run`` launcher: command, environment, completion check, cleanup of what it started.

Used by ``feda2v run``, the benchmarks and the end-to-end tests. Flower 1.41 facts it encodes:

* ``flwr run --stream`` exits 0 even when the ServerApp raised, so the only trustworthy verdict is
  the SuperLink's own: ``flwr ls --run-id ID --format json`` must say ``finished:completed``.
* Without a running SuperLink, ``flwr run`` starts a *detached* local SuperLink (its own session;
  it outlives ``flwr run``) that keeps the working directory of the first ``flwr run``: commands
  run from a neutral directory so it never imports the app from a checkout by accident.
* That SuperLink listens on fixed ports (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``, default 39091) and
  ``flwr run`` silently reuses any SuperLink already answering there, so two launches on one machine
  would share one SuperLink, and the first to end would stop it under the other's run. Therefore
  every launch of a local simulation gets **its own SuperLink** (:class:`LocalSuperLink`): free
  ports and its own ``FLWR_HOME`` (database, log, installed app) in the temp directory, stopped and
  removed when the launch ends. A caller that sets ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` itself
  (the tests' isolated environments) manages its SuperLink as before.
* ``flwr run`` starts ``flower-superlink`` by name: this interpreter's scripts directory goes first
  on ``PATH``, so no activated virtual environment is needed.
* Offline by default: ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` (otherwise Flower installs
  the app's dependencies into a throw-away environment) and ``HF_HUB_OFFLINE=1``; a caller's own
  value wins.

Cleanup by tag, never by name: every launch adds a fresh random tag to the ``FEDA2V_RUN_TAG``
environment variable of ``flwr run``. Processes inherit it -- the detached local SuperLink, its
SuperExec, the ``flwr-simulation`` / app processes, Ray's workers -- so :func:`stop_tagged` finds
exactly what one launch started (sweeping ``/proc/<pid>/environ``) and stops it by PID (SIGTERM,
then SIGKILL after a grace period), leaving anyone else's Flower processes alone. Tags nest: a
launch inside an already tagged environment appends its own (``outer,inner``), so an outer sweep
still finds everything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import FedA2VError

log = logging.getLogger(__name__)

__all__ = [
    "APP_DIR",
    "AppDirError",
    "COMPLETED",
    "RUN_TAG_VAR",
    "LaunchResult",
    "LocalSuperLink",
    "federation_config",
    "flwr_run_command",
    "free_port",
    "launch",
    "ls_command",
    "new_run_tag",
    "parse_run_id",
    "parse_run_status",
    "resolve_app_dir",
    "run_env",
    "run_status",
    "stop_groups",
    "stop_tagged",
    "tagged_pids",
]

APP_DIR = Path(__file__).resolve().parent.parent  # this project's Flower app (holds pyproject.toml)
RUN_TAG_VAR = "FEDA2V_RUN_TAG"
RUN_ID = re.compile(r"Successfully started run (\d+)")
COMPLETED = "finished:completed"

TERM_GRACE_S = 15.0
KILL_GRACE_S = 5.0
LS_TIMEOUT_S = 120.0
STATUS_POLL_S = 2.0  # between two status questions while a run submitted without --stream is still going
UNBOUNDED_WAIT_S = 7 * 24 * 3600.0  # the most a launch without a timeout waits for its run to finish

OFFLINE_DEFAULTS = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1"}

# Where ``flwr run`` looks for (and starts) its local SuperLink: flwr/cli/constant.py
LOCAL_HTTP_PORT_VAR = "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"
LOCAL_CONTROL_PORT_VAR = "FLWR_LOCAL_CONTROL_API_PORT"
# Ports Flower uses by default: never hand them out, so a default-configured SuperLink or SuperNode
# running on this machine does not collide with (or get reused by) ours.
_RESERVED_PORTS = {8000, 9091, 9092, 9093, 9094, 9095, 39091, 39092, 39093, 39094}
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and was not handed out before by this process."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _RESERVED_PORTS and port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("could not find a free TCP port")


# ------------------------------------------------------------------------------- reading flwr output
def parse_run_id(output: str) -> int | None:
    """The run id in the output of ``flwr run`` (``Successfully started run N``), or None."""
    match = RUN_ID.search(output)
    return int(match.group(1)) if match else None


def parse_run_status(ls_json_output: str) -> dict[str, Any]:
    """The single run in ``flwr ls --run-id ID --format json`` output (keys: status, status-details...)."""
    start = ls_json_output.find("{")
    if start < 0:
        raise ValueError(f"no JSON in flwr ls output: {ls_json_output[-500:]!r}")
    runs = json.loads(ls_json_output[start:]).get("runs", [])
    if len(runs) != 1:
        raise ValueError(f"expected one run in flwr ls output, got {len(runs)}")
    return runs[0]


def ls_command(run_id: int, superlink: str | None = None) -> list[str]:
    return ["flwr", "ls"] + ([superlink] if superlink else []) + ["--run-id", str(run_id), "--format", "json"]


# ------------------------------------------------------------------------------- command and env
class AppDirError(FedA2VError):
    """The directory given as the Flower app is not one."""


def resolve_app_dir(app_dir: str | Path) -> Path:
    """``app_dir`` as an absolute path; :class:`AppDirError` unless it holds a ``pyproject.toml``."""
    path = Path(app_dir).resolve()
    if not (path / "pyproject.toml").is_file():
        raise AppDirError(f"{path} is not a Flower app directory (no pyproject.toml)")
    return path


def federation_config(num_supernodes: int, cpus_per_node: float = 1, gpus_per_node: float | None = None) -> str:
    """``--federation-config`` text of a local simulation (GPUs only when given)."""
    text = f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_node}"
    if gpus_per_node is not None:
        text += f" client-resources-num-gpus={gpus_per_node}"
    return text


def flwr_run_command(
    app_dir: str | Path = APP_DIR,
    *,
    superlink: str | None = None,
    federation_config: str | None = None,
    run_config: Iterable[str] = (),
    stream: bool = True,
) -> list[str]:
    """``flwr run APP [SUPERLINK] [--federation-config ...] [--run-config ...]... [--stream]``."""
    cmd = ["flwr", "run", str(app_dir)]
    if superlink:
        cmd.append(superlink)
    if federation_config:
        cmd += ["--federation-config", federation_config]
    for item in run_config:
        cmd += ["--run-config", item]
    if stream:
        cmd.append("--stream")
    return cmd


def new_run_tag() -> str:
    return uuid.uuid4().hex


def run_env(
    base: Mapping[str, str] | None = None, *, tag: str | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``base`` (default ``os.environ``) + offline defaults (unless set) + this interpreter's scripts
    first on ``PATH`` + ``extra`` + ``tag`` appended to ``FEDA2V_RUN_TAG``."""
    env = dict(os.environ if base is None else base)
    for key, value in OFFLINE_DEFAULTS.items():
        env.setdefault(key, value)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    if tag:
        tags = [t for t in env.get(RUN_TAG_VAR, "").split(",") if t]
        env[RUN_TAG_VAR] = ",".join(tags + ([tag] if tag not in tags else []))
    return env


# ------------------------------------------------------------------------------- a launch's own SuperLink
@dataclass(frozen=True)
class LocalSuperLink:
    """The local SuperLink one launch owns: its ports and its ``FLWR_HOME``.

    Why: ``flwr run`` reuses whatever answers on its local ports; fresh ports make it start one for
    this launch alone, and a fresh ``FLWR_HOME`` keeps that SuperLink's SQLite state and log apart
    from any other SuperLink's (two SuperLinks on one database file would see each other's runs).
    """

    home: Path
    http_port: int
    control_port: int

    @classmethod
    def create(cls) -> "LocalSuperLink":
        return cls(Path(tempfile.mkdtemp(prefix="feda2v-superlink-")), free_port(), free_port())

    def env(self) -> dict[str, str]:
        """What ``flwr run`` / ``flwr ls`` need to start and find this SuperLink."""
        return {"FLWR_HOME": str(self.home), LOCAL_HTTP_PORT_VAR: str(self.http_port),
                LOCAL_CONTROL_PORT_VAR: str(self.control_port)}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def log_file(self) -> Path:
        """Where Flower's local SuperLink writes its log (flwr/cli/local_superlink.py)."""
        return self.home / "local-superlink" / "superlink.log"

    def started_by(self, output: str) -> bool:
        """``flwr run`` said it started this SuperLink (rather than reusing one that answered on its port)."""
        return f"Starting local SuperLink on {self.address}" in output

    def discard(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)


def own_local_superlink(env: Mapping[str, str], superlink: str | None) -> LocalSuperLink | None:
    """A fresh :class:`LocalSuperLink` for a launch that targets the local SuperLink, or None.

    None when the launch names a SuperLink connection (a deployment: not ours to start) or when the
    environment already chooses the local SuperLink's port (the caller manages that SuperLink).
    """
    if superlink is not None or env.get(LOCAL_HTTP_PORT_VAR):
        return None
    return LocalSuperLink.create()


# ------------------------------------------------------------------------------- processes
def _carries(environ: bytes, tag: str) -> bool:
    prefix = f"{RUN_TAG_VAR}=".encode()
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix) and tag.encode() in entry[len(prefix):].split(b","):
            return True
    return False


def tagged_pids(tag: str, marker: str | None = None) -> list[int]:
    """PIDs of live processes (not this one) whose environment carries ``tag`` in ``FEDA2V_RUN_TAG``.

    Without /proc (macOS), falls back to processes whose command line contains ``marker`` (e.g. a
    directory that the local SuperLink's ``--log-file``/``--database`` arguments name); none without.
    """
    me = os.getpid()
    if not Path("/proc/self/environ").exists():
        if not marker:
            return []
        ps = subprocess.run(["ps", "-axo", "pid=,command="], capture_output=True, text=True, check=False)
        pids = []
        for line in ps.stdout.splitlines():
            head = line.split(None, 1)
            if len(head) == 2 and head[0].isdigit() and marker in head[1] and int(head[0]) != me:
                pids.append(int(head[0]))
        return pids
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes()  # empty for zombies
        except OSError:  # gone, or not ours
            continue
        if _carries(environ, tag):
            pids.append(int(entry.name))
    return pids


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _signal_pid(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    # Only for processes started with start_new_session=True: their process group id is their pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_groups(procs: Sequence[subprocess.Popen], term_grace_s: float = TERM_GRACE_S,
                kill_grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM the process groups of ``procs`` (each started in its own session), SIGKILL after the grace."""
    for proc in procs:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + term_grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=kill_grace_s)


def _exiting_or_running(pid: int) -> bool:
    """A process still exists and is not a zombie. (An exiting process loses its environment before it
    is gone, so :func:`tagged_pids` alone would call it stopped a moment too early.)"""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _signal_and_wait(tag: str, marker: str | None, groups: Sequence[subprocess.Popen], sig: int, grace_s: float) -> bool:
    """Send ``sig`` to ``groups`` and the tagged processes; True once all are gone (within ``grace_s``)."""
    for proc in groups:
        if proc.poll() is None:
            _signal_group(proc, sig)
    signalled = tagged_pids(tag, marker)
    for pid in signalled:
        _signal_pid(pid, sig)
    deadline = time.monotonic() + grace_s
    while True:
        for proc in groups:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.05)  # reap our own children
        if (all(p.returncode is not None for p in groups) and not tagged_pids(tag, marker)
                and not any(_exiting_or_running(pid) for pid in signalled)):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def stop_tagged(
    tag: str,
    *,
    marker: str | None = None,
    groups: Sequence[subprocess.Popen] = (),
    term_grace_s: float = TERM_GRACE_S,
    kill_grace_s: float = KILL_GRACE_S,
) -> list[str]:
    """Stop every process carrying ``tag`` (and the process groups of ``groups``, our own children
    started in their own sessions): SIGTERM, SIGKILL after ``term_grace_s``. Returns ``"PID: command"``
    of the processes still alive ``kill_grace_s`` after SIGKILL (normally none)."""
    # SIGTERM first, SIGKILL whatever is left after the grace; each time our own children's groups,
    # then every other process carrying the tag.
    for sig, grace in ((signal.SIGTERM, term_grace_s), (signal.SIGKILL, kill_grace_s)):
        if _signal_and_wait(tag, marker, groups, sig, grace):
            return []
    return [f"{pid}: {cmdline(pid)}" for pid in tagged_pids(tag, marker)]


# ------------------------------------------------------------------------------- run and verdict
def run_status(
    run_id: int, env: Mapping[str, str], cwd: str | Path, superlink: str | None = None, timeout: float = LS_TIMEOUT_S
) -> dict[str, Any]:
    """The run as the SuperLink reports it; ``ValueError`` when ``flwr ls`` gives no readable answer."""
    try:
        ls = subprocess.run(ls_command(run_id, superlink), env=dict(env), cwd=cwd, capture_output=True, text=True,
                            timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ValueError(f"flwr ls did not answer within {timeout:.0f}s") from None
    return parse_run_status(ls.stdout)


@dataclass
class LaunchResult:
    """What one ``flwr run`` did. ``problem`` is None only for a run the SuperLink calls completed."""

    cmd: list[str]
    returncode: int
    output: str
    seconds: float
    tag: str
    run_id: int | None = None
    status: dict[str, Any] | None = None
    problem: str | None = None
    leftovers: list[str] | None = None  # processes that survived the cleanup
    local_superlink: LocalSuperLink | None = None  # the SuperLink this launch started for itself

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def exit_code(self) -> int:
        """``flwr run``'s own exit code when it failed, 1 when the run did not complete, else 0."""
        return self.returncode if self.returncode != 0 else (0 if self.ok else 1)


def _verdict(result: LaunchResult, env: Mapping[str, str], cwd: str | Path, superlink: str | None,
             deadline: float) -> None:
    """The run's final status. Without ``--stream`` ``flwr run`` returns once the run is submitted, so the
    SuperLink is asked again every :data:`STATUS_POLL_S` until the run has finished or ``deadline``
    (``time.monotonic()``) has passed."""
    result.run_id = parse_run_id(result.output)
    if result.run_id is None:
        result.problem = "could not find the run id in the output of flwr run"
        return
    while True:
        try:
            result.status = run_status(result.run_id, env, cwd, superlink)
        except ValueError as err:
            result.problem = f"could not read the status of run {result.run_id}: {err}"
            return
        if str(result.status.get("status", "")).startswith("finished") or time.monotonic() >= deadline:
            break
        time.sleep(STATUS_POLL_S)
    if result.status.get("status") != COMPLETED:
        result.problem = (f"run {result.run_id} ended as {result.status.get('status')}: "
                          f"{result.status.get('status-details')}")


def launch(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    superlink: str | None = None,
    timeout: float | None = None,
    quiet: bool = False,
    keep_superlink: bool = False,
) -> LaunchResult:
    """Run a ``flwr run`` command (see :func:`flwr_run_command`) to the end and ask the SuperLink for the verdict.

    ``env``: the base environment (default ``os.environ``), completed by :func:`run_env` with
    ``extra_env`` and a fresh tag. ``cwd``: default the temp directory (neutral). Output is copied to
    ``sys.stdout`` line by line unless ``quiet`` and kept in the result. ``timeout`` (s) bounds the
    run. A local simulation (no ``superlink``) runs on a SuperLink of its own
    (:func:`own_local_superlink`; its ``FLWR_HOME`` replaces any the caller set), so concurrent
    launches never share one. Afterwards the processes
    the launch started (that SuperLink, ...) are stopped by tag and its ``FLWR_HOME`` removed, unless
    ``keep_superlink`` (then ``result.local_superlink`` says where it listens); the home stays when
    the run did not complete, for its log. Never raises for a failed run: check ``result.ok``.
    """
    tag = new_run_tag()
    full_env = run_env(env, tag=tag, extra=extra_env)
    own = own_local_superlink(full_env, superlink)
    if own is not None:
        full_env.update(own.env())
    workdir = str(cwd) if cwd is not None else tempfile.gettempdir()
    lines: list[str] = []
    t0 = time.monotonic()
    result = LaunchResult(list(cmd), 0, "", 0.0, tag, local_superlink=own)
    previous = _sigterm_as_exit()
    try:
        proc = subprocess.Popen(list(cmd), env=full_env, cwd=workdir, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        reader = threading.Thread(target=_pump, args=(proc, lines, quiet), daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            result.problem = f"flwr run did not finish within {timeout:.0f}s"
        except BaseException:  # Ctrl-C: flwr run got SIGINT too (same process group); do not leave it behind
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
            raise
        finally:
            # flwr run's output is all in the pipe once it exited; a detached child that kept the pipe
            # open must not hold us up (the reader is a daemon thread)
            reader.join(timeout=2)
        result.returncode = proc.returncode
        result.output = "".join(lines)
        result.seconds = time.monotonic() - t0
        if own is not None and not own.started_by(result.output):
            log.warning("flwr run did not start its own local SuperLink on %s: another one answered there",
                        own.address)
        if result.problem is None:
            if proc.returncode != 0:
                result.problem = f"flwr run exited with {proc.returncode}"
            else:
                _verdict(result, full_env, workdir, superlink,
                         t0 + (timeout if timeout is not None else UNBOUNDED_WAIT_S))
    finally:
        if not keep_superlink:
            result.leftovers = stop_tagged(tag)
            if result.leftovers:
                log.warning("processes of run tag %s survived SIGKILL: %s", tag, "; ".join(result.leftovers))
            _tidy(own, result)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return result


def _sigterm_as_exit():
    """While a launch waits, SIGTERM (``kill PID``, a service manager stopping ``feda2v run``) ends it like
    Ctrl-C: ``flwr run`` is stopped and everything the run started is swept, instead of Python dying on the
    spot and leaving the run's SuperLink and simulation behind. Returns the handler to restore (``None``
    off the main thread, where Python allows no handler)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, stop)


def _tidy(own: LocalSuperLink | None, result: LaunchResult) -> None:
    """Remove a stopped own SuperLink's home; keep it (and say where) when its log explains a failure."""
    if own is None:
        return
    if result.problem is not None and own.log_file.is_file():
        result.problem += f" (local SuperLink log: {own.log_file})"
        return
    own.discard()


def _pump(proc: subprocess.Popen, lines: list[str], quiet: bool) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if not quiet:
            sys.stdout.write(line)
            sys.stdout.flush()
