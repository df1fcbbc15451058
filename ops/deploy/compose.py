"""The compose federation of ``docker/`` driven from Python: secrets, ``up``, registration, runs, ``down``.

The same steps the docker guide (docs/deployment.md) lists, in order: make the CA, the server certificate and one
key per SuperNode (:mod:`ops.deploy.pki`), start the SuperLink alone, register the nodes' public
keys with ``flwr supernode register`` from the host, start everything else, submit the app with
``flwr run`` from the host, and ``down -v`` at the end. Every compose project gets its own name, so
its containers, network and volumes are its own and ``down -v`` removes exactly them.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ops import launcher
from ops.deploy.local import free_port, http_ok, register_node, wait_until, write_flower_config
from ops.deploy.pki import make_node_key, make_secret, make_tls
from common.errors import FedA2VError

log = logging.getLogger(__name__)

__all__ = ["ComposeFederation", "compose_command"]

DOCKER_DIR = launcher.APP_DIR / "docker"
IMAGE_UID = 49999  # the images' user: mounted secrets must be readable by it
NUM_SITES = 3


def compose_command() -> list[str]:
    """``docker compose`` (v2 plugin) where present, else ``docker-compose`` (v1, Debian's package)."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                 timeout=60, check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise FedA2VError("neither `docker compose` nor `docker-compose` is installed (apt-get install docker-compose)")


class ComposeFederation:
    """``with ComposeFederation(root, tag) as fed: fed.run([...])`` on docker/compose.yml + TLS + auth."""

    CONNECTION = "feda2v-docker"

    def __init__(self, root: Path, tag: str, secure: bool = True, project: str | None = None,
                 startup_timeout_s: float = 180.0) -> None:
        self.root = Path(root).resolve()  # compose resolves relative mounts against docker/, not here
        self.root.mkdir(parents=True, exist_ok=True)
        self.tag = tag
        self.secure = secure
        self.project = project or f"feda2v-{launcher.new_run_tag()[-8:].lower()}"
        self.secrets = self.root / "secrets"
        self.flwr_home = self.root / "flwr-home"
        self.port = free_port()
        self.startup_timeout_s = startup_timeout_s
        files = ["compose.yml", *(["with-tls.yml", "with-auth.yml"] if secure else [])]
        self.files = [DOCKER_DIR / name for name in files]
        self.env = launcher.run_env(None, tag=launcher.new_run_tag(), extra={
            "FLWR_HOME": str(self.flwr_home), "FLWR_DISABLE_UPDATE_CHECK": "1", "COLUMNS": "200",
            "FEDA2V_IMAGE_TAG": tag, "FEDA2V_SECRETS": str(self.secrets), "FEDA2V_SUPERLINK_PORT": str(self.port),
            "FEDA2V_SUPERLINK_BIND": "127.0.0.1"})
        self._compose = compose_command()
        self._up = False

    # ------------------------------------------------------------------ compose
    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [*self._compose, "-p", self.project, *(a for f in self.files for a in ("-f", str(f))), *args]
        proc = subprocess.run(cmd, env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout,
                              check=False)
        if check and proc.returncode != 0:
            raise FedA2VError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
        return proc

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", service, check=False).stdout

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ lifecycle
    def make_secrets(self) -> None:
        """CA + server certificate for every name a client dials, one key pair per SuperNode, the SuperExec
        secrets; all owned by the images' user (uid 49999), who must read them inside the containers."""
        if os.geteuid() not in (0, IMAGE_UID):
            raise FedA2VError(f"the compose federation mounts private keys (mode 0600) that the containers' user "
                              f"(uid {IMAGE_UID}) must read: run as root, or make the secrets as docs/deployment.md shows with "
                              "`--owner 49999` under sudo")
        tls = make_tls(self.secrets, ["superlink", "localhost", "127.0.0.1"], overwrite=True)
        files = [tls.ca_cert, tls.cert, tls.key, make_secret(self.secrets, "superexec", overwrite=True)]
        for site in range(NUM_SITES):
            key = make_node_key(self.secrets, f"supernode-{site}", overwrite=True)
            files += [key.private, key.public, make_secret(self.secrets, f"site-{site}", overwrite=True)]
        for path in files:
            os.chown(path, IMAGE_UID, IMAGE_UID)

    def start(self) -> "ComposeFederation":
        connection: dict[str, Any] = {"address": self.address}
        if self.secure:
            self.make_secrets()
            connection["root-certificates"] = str(self.secrets / "ca.pem")
        else:
            connection["insecure"] = True
        write_flower_config(self.flwr_home, {self.CONNECTION: connection})
        self._up = True
        self.compose("up", "-d", "--no-build", "superlink")
        scheme = "https" if self.secure else "http"
        cafile = self.secrets / "ca.pem" if self.secure else None
        try:
            wait_until(f"the SuperLink container at {self.address}",
                       lambda: http_ok(f"{scheme}://{self.address}/health", cafile), self.startup_timeout_s)
        except TimeoutError as err:
            raise TimeoutError(f"{err}\n--- superlink ---\n{self.logs('superlink')[-2000:]}") from None
        if self.secure:
            for site in range(NUM_SITES):
                register_node(self.secrets / f"supernode-{site}.pub", self.CONNECTION, self.env, self.root)
        self.compose("up", "-d", "--no-build")
        try:
            wait_until(f"{NUM_SITES} SuperNodes to be activated",
                       lambda: self.logs("superlink").count("Activated node_id") >= NUM_SITES, self.startup_timeout_s,
                       poll_s=2.0)
        except TimeoutError as err:
            raise TimeoutError(f"{err}\n{self.status()}\n--- superlink ---\n{self.logs('superlink')[-2000:]}") from None
        return self

    def run(self, run_config: Sequence[str], timeout: float = 900, quiet: bool = True) -> launcher.LaunchResult:
        """``flwr run <app> feda2v-docker`` from the host to the end, with the SuperLink's verdict."""
        cmd = launcher.flwr_run_command(launcher.APP_DIR, superlink=self.CONNECTION, run_config=list(run_config))
        return launcher.launch(cmd, env=self.env, cwd=self.root, superlink=self.CONNECTION, timeout=timeout, quiet=quiet)

    def status(self) -> str:
        return self.compose("ps", check=False).stdout

    def down(self) -> str:
        """``down -v``: containers, network and this project's volumes; returns compose's output."""
        if not self._up:
            return ""
        self._up = False
        proc = self.compose("down", "-v", "--remove-orphans", "--timeout", "20", check=False)
        return proc.stdout + proc.stderr

    def volumes(self) -> list[str]:
        out = subprocess.run(["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={self.project}"],
                             capture_output=True, text=True, timeout=60, check=False).stdout
        return out.split()

    def __enter__(self) -> "ComposeFederation":
        try:
            return self.start()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc: object) -> None:
        self.down()

