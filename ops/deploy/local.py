"""A real Flower deployment as processes: one SuperLink and N SuperNodes, on loopback or on hosts.

For fault drills (``bench/faults.py``), the deployment tests and trying a deployment by hand: the
same commands a site runs (``flower-superlink``, ``flower-supernode``, ``flwr supernode register``,
``flwr run``), each process in its own session with its own log, every one tagged
(:mod:`ops.launcher`) so :meth:`close` stops exactly what was started here, by PID. Nodes can be
killed and restarted mid-run; the ServerApp process can be killed.

By default everything listens on 127.0.0.1 without TLS (a loopback demo). ``secure=True`` runs the
production setup of the deployment guide (docs/deployment.md): a CA and server certificate made here
(:mod:`ops.deploy.pki`), the SuperLink on HTTPS with ``--enable-supernode-auth``, every node's
key registered with ``flwr supernode register`` before the node starts. ``superlink_host`` /
``node_hosts`` (:class:`ops.deploy.netns.Host`) put the processes on separate hosts.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ops import launcher
from ops.deploy.netns import LOOPBACK, Host
from ops.deploy.pki import NodeKey, ServerTLS, make_node_key, make_tls
from common.errors import FedA2VError
from ops.launcher import free_port

log = logging.getLogger(__name__)

__all__ = ["LocalFederation", "free_port", "http_ok", "register_node", "wait_until", "write_flower_config"]

# Co-located SuperNodes must not oversubscribe the cores; the SuperExec a SuperNode starts looks for a
# new message every FLWR_SUPEREXEC_TASK_POLL_INTERVAL seconds (Flower's default 1 s, twice per round).
NODE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}


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


def http_ok(url: str, cafile: Path | None = None) -> bool:
    """``GET url`` answers 2xx (an ``https`` URL is verified against ``cafile``)."""
    context = ssl.create_default_context(cafile=str(cafile)) if cafile is not None else None
    try:
        with urllib.request.urlopen(url, timeout=1.0, context=context) as response:  # noqa: S310 - own hosts only
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


def register_node(public_key: Path, connection: str, env: Mapping[str, str], cwd: Path) -> int:
    """``flwr supernode register KEY.pub CONNECTION``; returns the node id the SuperLink gave it."""
    proc = subprocess.run(["flwr", "supernode", "register", str(public_key), connection, "--format", "json"],
                          env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    try:
        reply = json.loads(proc.stdout)
    except json.JSONDecodeError:
        reply = {}
    if not reply.get("success"):  # `--format json` exits 0 on failure: only the reply tells
        raise FedA2VError(f"registering {public_key} failed: {proc.stdout.strip() or proc.stderr.strip()}")
    return int(reply["node-id"])


class LocalFederation:
    """``with LocalFederation(root, num_nodes, data_root) as fed: fed.run(...)``."""

    CONNECTION = "local-deploy"

    def __init__(self, root: Path, num_nodes: int, data_root: Path, cache_dir: Path | None = None,
                 base_env: Mapping[str, str] | None = None, startup_timeout_s: float = 90.0, secure: bool = False,
                 superlink_host: Host = LOOPBACK, node_hosts: Sequence[Host] | None = None,
                 prompt_supernodes: bool = False, superlink_database: bool = True,
                 node_programs: Mapping[int, Sequence[str]] | None = None,
                 node_configs: Mapping[int, str] | None = None) -> None:
        self.root = Path(root)
        # per node, more of its --node-config (a site's own settings, e.g. 'privacy-dp=true privacy-epsilon=20')
        self.node_configs = dict(node_configs or {})
        # feda2v-supernode: flower-supernode with prompt hand-offs and warm ClientApps (ops.deploy.prompt_timing)
        self.node_program = "feda2v-supernode" if prompt_supernodes else "flower-supernode"
        # per node, a program that replaces it (drills: a faulty node, ops.deploy.faulty_supernode)
        self.node_programs = {pid: list(program) for pid, program in (node_programs or {}).items()}
        # the SuperLink's --database file (the deployment guide's production setup). Without it Flower keeps its state and
        # every object in memory: nothing survives a SuperLink restart, but weights skip SQLite (faster rounds)
        self.superlink_database = superlink_database
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
        self.secure = secure
        self.superlink_host = superlink_host
        self.node_hosts = list(node_hosts) if node_hosts is not None else [LOOPBACK] * num_nodes
        if len(self.node_hosts) != num_nodes:
            raise FedA2VError(f"{num_nodes} nodes but {len(self.node_hosts)} node hosts")
        self.pki = self.root / "pki"
        self.tls: ServerTLS | None = None
        self.node_keys: dict[int, NodeKey] = {}
        self.node_ids: dict[int, int] = {}  # secure: the Flower node id each partition's registered key got
        self.port = 0
        self.superlink: subprocess.Popen | None = None
        self.nodes: dict[int, subprocess.Popen] = {}
        self._handles: list[Any] = []
        self._extra: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ processes
    def _start(self, name: str, cmd: list[str], env: Mapping[str, str] | None = None,
               host: Host = LOOPBACK) -> subprocess.Popen:
        handle = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed in close()
        self._handles.append(handle)
        return subprocess.Popen(host.command(cmd), cwd=self.root, env={**self.env, **(env or {})},
                                stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)

    def superlink_log(self) -> str:
        return self.log("superlink")

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    @property
    def address(self) -> str:
        """``host:port`` of the SuperLink, as every client dials it."""
        return f"{self.superlink_host.address}:{self.port}"

    @property
    def health_url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.address}/health"

    def start(self) -> "LocalFederation":
        self.port = free_port()
        security = ["--insecure"]
        if self.secure:
            names = list(dict.fromkeys(["127.0.0.1", "localhost", self.superlink_host.address]))
            self.tls = make_tls(self.pki, names, overwrite=True)
            security = [*self.tls.superlink_args(), "--enable-supernode-auth"]
        database = ["--database", str(self.root / "superlink-state.db")] if self.superlink_database else []
        self.superlink = self._start("superlink", [
            "flower-superlink", *security, "--host", self.superlink_host.address, "--port", str(self.port),
            *database, "--disable-runtime-dependency-installation"], host=self.superlink_host)
        cafile = self.tls.ca_cert if self.tls is not None else None
        wait_until(f"the SuperLink at {self.address}", lambda: http_ok(self.health_url, cafile),
                   self.startup_timeout_s, alive=[self.superlink])
        connection: dict[str, Any] = {"address": self.address}
        connection.update({"root-certificates": str(cafile)} if cafile is not None else {"insecure": True})
        write_flower_config(self.flwr_home, {self.CONNECTION: connection})
        for pid in range(self.num_nodes):
            if self.secure:
                self.node_keys[pid] = make_node_key(self.pki / "nodes", f"supernode{pid}", overwrite=True)
                self.node_ids[pid] = self.register(self.node_keys[pid])
            self.start_node(pid)
        return self

    def register(self, key: NodeKey) -> int:
        return register_node(key.public, self.CONNECTION, self.env, self.root)

    def node_command(self, pid: int, auth_key: Path | None = None, root_certificates: Path | None = None) -> list[str]:
        """The SuperNode command of node ``pid``: ``flower-supernode``, or ``feda2v-supernode`` with
        ``prompt_supernodes`` (:mod:`ops.deploy.prompt_timing`); ``auth_key``/``root_certificates``
        override the federation's (a secure federation uses the node's registered key and the CA)."""
        if self.secure:
            ca = root_certificates or (self.tls.ca_cert if self.tls else None)
            security = ["--root-certificates", str(ca)] if ca else []
            key = auth_key or self.node_keys[pid].private
            security += ["--auth-supernode-private-key", str(key)]
        else:
            security = ["--insecure"]
        node_config = f'partition-id={pid} num-partitions={self.num_nodes} data-root="{self.data_root}" num-threads=1'
        node_config += f" {self.node_configs[pid]}" if pid in self.node_configs else ""
        program = self.node_programs.get(pid, [self.node_program])
        return [*program, *security, "--superlink", self.address, "--port", str(free_port()),
                "--node-config", node_config]

    def start_node(self, pid: int, wait: bool = True, name: str | None = None,
                   cmd: list[str] | None = None) -> subprocess.Popen:
        """Start (or restart) SuperNode ``pid`` with its own FLWR_HOME and one torch thread; ``wait`` for the
        SuperLink to activate it. ``name``/``cmd`` start a variant (another log, e.g. a node with an
        unregistered key) that is not tracked as node ``pid``."""
        before = self.superlink_log().count("Activated node_id")
        name = name or f"supernode{pid}"
        home = self.root / f"{name}-home"
        home.mkdir(parents=True, exist_ok=True)
        proc = self._start(name, cmd or self.node_command(pid), env={"FLWR_HOME": str(home), **NODE_ENV},
                           host=self.node_hosts[pid])
        if cmd is None:
            self.nodes[pid] = proc
        else:
            self._extra.append(proc)
        if wait:
            wait_until(f"SuperNode {name} to register", lambda: self.superlink_log().count("Activated node_id") > before,
                       self.startup_timeout_s, alive=[proc])
        return proc

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
        groups = [p for p in [self.superlink, *self.nodes.values(), *self._extra] if p is not None]
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
