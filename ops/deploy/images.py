"""Building the docker images of ``docker/Dockerfile``: SuperLink, SuperNode and SuperExec.

Where Flower's official images can be pulled, the bases are ``flwr/superlink|supernode|superexec:1.41.0``
(the Dockerfile's defaults). Where Docker Hub is unreachable (this project's CI), ``offline_base``
builds a stand-in with the same layout from Debian's package mirror: debootstrap a minimal Debian
with Python, ``docker import`` it, then ``docker/base.Dockerfile`` adds Flower from the wheelhouse.

The wheelhouse (``<cache-dir>/wheelhouse``) is filled once with ``pip download`` of the project's
pinned dependencies and reused by every later build. During a build it is served over HTTP on the
docker bridge's gateway address (:class:`WheelhouseServer`, up only while ``docker build`` runs), so
the wheels never enter a build context or an image layer and the builds need no package index.
Docker's layer cache makes an unchanged rebuild take seconds.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import ipaddress
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.config import default_cache_dir
from common.errors import FedA2VError

log = logging.getLogger(__name__)

__all__ = ["ImageSet", "build_images", "docker_ready", "fill_wheelhouse", "image_size", "offline_base"]

REPO = Path(__file__).resolve().parents[2]
FLWR_VERSION = "1.41.0"
ROLES = ("superlink", "supernode", "superexec")
ROOTFS_IMAGE = "feda2v/debian-python:bookworm"
OFFLINE_BASE = f"feda2v/flwr-base:{FLWR_VERSION}"
BUILD_TOOLS = ("setuptools>=68", "wheel")  # the project's build backend, so `pip install /src` works offline


@dataclass
class ImageSet:
    """The three images of one tag, with how long each step took."""

    tag: str
    images: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def sizes_mb(self) -> dict[str, float]:
        return {role: round(image_size(name) / 2**20, 1) for role, name in self.images.items()}


def _run(cmd: Sequence[str], what: str, env: Mapping[str, str] | None = None, timeout: float = 3600,
         stdin: bytes | None = None) -> str:
    log.info("%s: %s", what, " ".join(cmd))
    proc = subprocess.run(list(cmd), input=stdin, capture_output=True, timeout=timeout, check=False,
                          env={**os.environ, **(env or {})})
    out = (proc.stdout or b"").decode(errors="replace") + (proc.stderr or b"").decode(errors="replace")
    if proc.returncode != 0:
        raise FedA2VError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{out[-4000:]}")
    return out


def docker_env() -> dict[str, str]:
    """The classic builder unless the user chose: BuildKit needs the buildx plugin, which may be absent."""
    return {"DOCKER_BUILDKIT": os.environ.get("DOCKER_BUILDKIT", "0")}


def docker_ready() -> str:
    """'' when a Docker engine answers, else why not (a test fails with this reason, it never skips)."""
    if shutil.which("docker") is None:
        return "the docker client is not installed (apt-get install docker.io)"
    proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                          timeout=60, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return f"no Docker engine answers (is dockerd running?): {(proc.stderr or proc.stdout).strip()[-500:]}"
    return ""


def image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True, timeout=60,
                          check=False).returncode == 0


def image_size(name: str) -> int:
    out = _run(["docker", "image", "inspect", "--format", "{{.Size}}", name], f"size of {name}")
    return int(out.strip().splitlines()[-1])


def project_requirements(repo: Path = REPO) -> list[str]:
    """The project's runtime dependencies, read from pyproject.toml (declared once, there)."""
    with open(repo / "pyproject.toml", "rb") as fh:
        return list(tomllib.load(fh)["project"]["dependencies"])


def fill_wheelhouse(repo: Path = REPO, wheelhouse: Path | None = None) -> Path:
    """``pip download`` every pinned dependency (and the build backend) into the wheelhouse, once per
    dependency list: a stamp file remembers what it holds."""
    wheelhouse = Path(wheelhouse or default_cache_dir() / "wheelhouse")
    wheelhouse.mkdir(parents=True, exist_ok=True)
    wanted = [*project_requirements(repo), *BUILD_TOOLS]
    # wheels are for the interpreter and platform that download them: part of what the stamp remembers
    host = [sys.implementation.name, f"{sys.version_info.major}.{sys.version_info.minor}", platform.machine(), sys.platform]
    key = hashlib.sha256(json.dumps([wanted, host]).encode()).hexdigest()[:16]
    stamp = wheelhouse / ".complete"
    if stamp.is_file() and stamp.read_text().strip() == key:
        log.info("wheelhouse %s is complete (%s)", wheelhouse, key)
        return wheelhouse
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--only-binary=:all:",
          "--dest", str(wheelhouse), *wanted], "pip download into the wheelhouse")
    stamp.write_text(key + "\n")
    return wheelhouse


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        log.debug("wheelhouse: " + format, *args)


def bridge_gateway() -> str:
    """The host's address on docker's default bridge (the gateway build containers route through)."""
    out = _run(["docker", "network", "inspect", "bridge", "--format", "{{json .IPAM.Config}}"], "inspect docker's bridge")
    for entry in json.loads(out.strip().splitlines()[-1]) or []:
        if entry.get("Gateway"):
            return str(entry["Gateway"])
        if entry.get("Subnet"):  # older engines leave Gateway out: the bridge takes the subnet's first address
            return str(next(ipaddress.ip_network(entry["Subnet"]).hosts()))
    raise FedA2VError("docker's default bridge has no IPv4 subnet: cannot serve the wheelhouse to builds")


class WheelhouseServer:
    """The wheelhouse over HTTP on the docker bridge's gateway (what build containers reach), only for
    the duration of a ``with`` block.

    Builds see it as ``http://feda2v-wheelhouse:PORT/`` (``--add-host``): a build argument that changes
    between builds would miss docker's layer cache, so the name is fixed and so is the port unless it
    is taken (then the dependency layers rebuild once, and the log says why)."""

    HOSTNAME = "feda2v-wheelhouse"
    PORT = 39179

    def __init__(self, wheelhouse: Path) -> None:
        self.host = bridge_gateway()
        handler = functools.partial(_QuietHandler, directory=str(wheelhouse))
        try:
            self.server = http.server.ThreadingHTTPServer((self.host, self.PORT), handler)
        except OSError as err:
            log.warning("port %d is taken (%s): serving the wheelhouse on another port; docker's cache of the "
                        "dependency layers will miss once", self.PORT, err)
            self.server = http.server.ThreadingHTTPServer((self.host, 0), handler)
        self.url = f"http://{self.HOSTNAME}:{self.server.server_address[1]}/"
        self.build_args = ["--add-host", f"{self.HOSTNAME}:{self.host}", "--build-arg", f"WHEELHOUSE_URL={self.url}"]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "WheelhouseServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def rootfs_image(name: str = ROOTFS_IMAGE, suite: str = "bookworm") -> str:
    """A minimal Debian with python3/venv/ca-certificates as a docker image (debootstrap + import)."""
    if image_exists(name):
        return name
    if shutil.which("debootstrap") is None:
        raise FedA2VError("debootstrap is not installed (apt-get install debootstrap): it builds the offline base")
    with tempfile.TemporaryDirectory(prefix="feda2v-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        _run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", suite, str(rootfs)],
             "debootstrap", timeout=1800)
        tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True, check=False, timeout=600)
        if tar.returncode != 0:
            raise FedA2VError(f"packing {rootfs} failed: {tar.stderr.decode(errors='replace')[-2000:]}")
        _run(["docker", "import", "-", name], "docker import", stdin=tar.stdout)
    return name


def offline_base(wheels: WheelhouseServer, repo: Path = REPO, name: str = OFFLINE_BASE) -> str:
    """The stand-in for Flower's official base images (``docker/base.Dockerfile``)."""
    rootfs = rootfs_image()
    with tempfile.TemporaryDirectory(prefix="feda2v-base-") as tmp:  # an empty build context
        _run(["docker", "build", "-f", str(repo / "docker" / "base.Dockerfile"), "--build-arg", f"ROOTFS_IMAGE={rootfs}",
              "--build-arg", f"FLWR_VERSION={FLWR_VERSION}", *wheels.build_args, "-t", name, tmp], "docker build (offline base)", env=docker_env())
    return name


def build_images(tag: str, repo: Path = REPO, base: str | None = None, offline: bool = False) -> ImageSet:
    """``feda2v/{superlink,supernode,superexec}:tag`` from ``docker/Dockerfile``.

    ``base`` replaces all three official bases; ``offline`` builds the offline base here (and uses it)."""
    reason = docker_ready()
    if reason:
        raise FedA2VError(f"cannot build images: {reason}")
    if offline and (sys.version_info[:2] != (3, 11) or platform.machine() != "x86_64" or sys.platform != "linux"):
        raise FedA2VError(f"the offline base runs Debian bookworm's Python 3.11 on x86_64, but the wheelhouse is "
                          f"filled by this Python {sys.version_info.major}.{sys.version_info.minor} on "
                          f"{sys.platform}/{platform.machine()}: build from a Linux x86_64 host with Python 3.11, "
                          "or use Flower's official bases (no --offline-base)")
    result = ImageSet(tag)
    t0 = time.monotonic()
    wheelhouse = fill_wheelhouse(repo)
    result.seconds["wheelhouse"] = round(time.monotonic() - t0, 1)
    with WheelhouseServer(wheelhouse) as wheels:
        if offline:
            t0 = time.monotonic()
            base = offline_base(wheels, repo)
            result.seconds["offline-base"] = round(time.monotonic() - t0, 1)
        args: list[str] = ["--build-arg", f"FLWR_VERSION={FLWR_VERSION}", *wheels.build_args,
                           "--build-arg", f"DEPENDENCIES={' '.join(project_requirements(repo))}"]
        if base:
            args += [arg for role in ROLES for arg in ("--build-arg", f"{role.upper()}_BASE={base}")]
        for role in ROLES:
            name = f"feda2v/{role}:{tag}"
            t0 = time.monotonic()
            _run(["docker", "build", "-f", str(repo / "docker" / "Dockerfile"), "--target", role, *args, "-t", name,
                  str(repo)], f"docker build ({role})", env=docker_env())
            result.seconds[role] = round(time.monotonic() - t0, 1)
            result.images[role] = name
            log.info("built %s in %.0f s", name, result.seconds[role])
    return result
