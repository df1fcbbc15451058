"""A real Flower deployment on this host's loopback: one SuperLink and N SuperNodes as processes.

For fault drills (``bench/faults.py``), the deployment tests and trying a deployment by hand: the
same commands a site runs (``flower-superlink``, ``flower-supernode``, ``flwr run``), each process in
its own session with its own log, every one tagged (:mod:`common.launcher`) so :meth:`close` stops
exactly what was started here, by PID. Nodes can be killed and restarted mid-run; the ServerApp
process can be killed. Ports are free loopback ports; nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common import launcher

log = logging.getLogger(__name__)

__all__ = ["LocalFederation", "free_port", "write_flower_config"]

# Ports Flower uses by default: never hand them out, so a default-configured SuperLink or SuperNode
# running on this machine does not collide with (or get reused by) a drill.
_RESERVED_PORTS = {8000, 9091, 9092, 9093, 9094, 9095, 39091, 39092, 39093, 39094}
_HANDED_OUT: set[int] = set()
NODE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # co-located SuperNodes must not oversubscribe


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


def write_flower_config(flwr_home: Path, connections: Mapping[str, Mapping[str, Any]], default: str = "local") -> Path:
    """``$FLWR_HOME/config.toml`` in the format Flower 1.41 creates, plus named SuperLink connections."""
    lines = ["[superlink]", f'default = "{default}"', "", "[superlink.local]", 'address = ":local:"', ""]
    for name, values in connections.items():
        lines.append(f"[superlink.{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]  # JSON literals are TOML
        lines.append("")
    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:  # noqa: S310 - loopback only
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_until(what: str, check: Callable[[], bool], timeout_s: float, poll_s: float = 0.5,
               alive: Sequence[subprocess.Popen] = ()) -> None:
    """Poll ``check`` until true; ``TimeoutError`` naming ``what`` after ``timeout_s`` or when a process of
    ``alive`` exits first."""
    deadline = time.monotonic() + timeout_s
    while not check():
        dead = [p.args for p in alive if p.poll() is not None]
        if dead:
            raise RuntimeError(f"waiting for {what}: {dead[0]} exited")
        if time.monotonic() > deadline:
            raise TimeoutError(f"waiting for {what}: not within {timeout_s:g}s")
        time.sleep(poll_s)


class LocalFederation:
    """``with LocalFederation(root, num_nodes, data_root) as fed: fed.run(...)``."""

    CONNECTION = "local-deploy"

    def __init__(self, root: Path, num_nodes: int, data_root: Path, cache_dir: Path | None = None,
                 base_env: Mapping[str, str] | None = None, startup_timeout_s: float = 90.0) -> None:
        self.root = Path(root)
        self.num_nodes = num_nodes
        self.data_root = Path(data_root)
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.root / "flwr-home"
        self.tag = launcher.new_run_tag()
        extra = {"FLWR_HOME": str(self.flwr_home), "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
                 "COLUMNS": "200"}
        if cache_dir is not None:
            extra["FEDA2V_CACHE"] = str(cache_dir)
        self.env = launcher.run_env(base_env, tag=self.tag, extra=extra)
        self.startup_timeout_s = startup_timeout_s
        self.port = 0
        self.superlink: subprocess.Popen | None = None
        self.nodes: dict[int, subprocess.Popen] = {}
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ processes
    def _start(self, name: str, cmd: list[str], env: Mapping[str, str] | None = None) -> subprocess.Popen:
        handle = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed in close()
        self._handles.append(handle)
        return subprocess.Popen(cmd, cwd=self.root, env={**self.env, **(env or {})}, stdin=subprocess.DEVNULL,
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)

    def superlink_log(self) -> str:
        path = self.logs / "superlink.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def start(self) -> "LocalFederation":
        self.port = free_port()
        self.superlink = self._start("superlink", [
            "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
            "--database", str(self.root / "superlink-state.db"), "--disable-runtime-dependency-installation"])
        wait_until(f"the SuperLink on port {self.port}", lambda: http_ok(f"http://127.0.0.1:{self.port}/health"),
                   self.startup_timeout_s, alive=[self.superlink])
        for pid in range(self.num_nodes):
            self.start_node(pid)
        write_flower_config(self.flwr_home, {self.CONNECTION: {"address": f"127.0.0.1:{self.port}", "insecure": True}})
        return self

    def start_node(self, pid: int, wait: bool = True) -> subprocess.Popen:
        """Start (or restart) SuperNode ``pid`` with its own FLWR_HOME and one torch thread."""
        before = self.superlink_log().count("Activated node_id")
        home = self.root / f"supernode{pid}-home"
        home.mkdir(parents=True, exist_ok=True)
        node_config = f'partition-id={pid} num-partitions={self.num_nodes} data-root="{self.data_root}" num-threads=1'
        self.nodes[pid] = self._start(f"supernode{pid}", [
            "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
            "--node-config", node_config], env={"FLWR_HOME": str(home), **NODE_ENV})
        if wait:
            wait_until(f"SuperNode {pid} to register", lambda: self.superlink_log().count("Activated node_id") > before,
                       self.startup_timeout_s, alive=[self.nodes[pid]])
        return self.nodes[pid]

    def kill_node(self, pid: int, sig: int = signal.SIGKILL) -> None:
        """Kill SuperNode ``pid`` and its ClientApp processes (its process group)."""
        proc = self.nodes[pid]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def serverapp_pids(self) -> list[int]:
        """The ServerApp processes the SuperLink started for runs (``flwr-serverapp``)."""
        return [pid for pid in launcher.tagged_pids(self.tag) if "flwr-serverapp" in launcher.cmdline(pid)]

    def kill_serverapp(self) -> list[int]:
        pids = self.serverapp_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    # ------------------------------------------------------------------ runs
    def run_command(self, run_config: Sequence[str]) -> list[str]:
        return launcher.flwr_run_command(launcher.APP_DIR, superlink=self.CONNECTION, run_config=list(run_config))

    def run(self, run_config: Sequence[str], timeout: float = 900, quiet: bool = True) -> launcher.LaunchResult:
        """``flwr run`` against this SuperLink to the end, with the SuperLink's verdict."""
        return launcher.launch(self.run_command(run_config), env=self.env, cwd=self.root, superlink=self.CONNECTION,
                               timeout=timeout, quiet=quiet)

    def submit(self, run_config: Sequence[str], name: str = "flwr-run") -> subprocess.Popen:
        """Start ``flwr run`` in the background (for drills that act while it runs)."""
        return self._start(name, self.run_command(run_config))

    # ------------------------------------------------------------------ teardown
    def close(self) -> list[str]:
        """Stop every process started here (by tag and PID); returns any that survived SIGKILL."""
        groups = [p for p in [self.superlink, *self.nodes.values()] if p is not None]
        leftovers = launcher.stop_tagged(self.tag, groups=groups)
        for handle in self._handles:
            handle.close()
        return leftovers

    def __enter__(self) -> "LocalFederation":
        try:
            return self.start()
        except BaseException:
            self.close()  # a SuperLink or SuperNode that did start must not outlive a failed start
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
