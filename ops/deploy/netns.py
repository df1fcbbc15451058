"""Separate hosts on one machine: Linux network namespaces on a private LAN, for multi-host tests.

Each host is a network namespace with its own loopback and one address on a private /24; a further
"switch" namespace holds the bridge they all plug into, and this machine's own namespace gets an
address on the same LAN (the operator's laptop, where ``flwr run`` is typed). The bridge sits in its
own namespace so the host's firewall (docker, for one, drops forwarded traffic by default) never
sees the LAN's traffic. Nothing is routed beyond the LAN.

Processes run inside a host with ``ip netns exec NS ...`` (:meth:`Host.command`); ``ip`` execs the
command, so the PID of the started process is the PID to stop. Needs root and iproute2; every link
and namespace made here is deleted by :meth:`NetnsLan.close`.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.errors import FedA2VError

log = logging.getLogger(__name__)

__all__ = ["LOOPBACK", "Host", "NetnsLan"]


@dataclass(frozen=True)
class Host:
    """Where a process runs (``wrap`` prefixes its command) and the address other hosts dial."""

    name: str
    address: str
    wrap: tuple[str, ...] = field(default=())

    def command(self, cmd: Sequence[str]) -> list[str]:
        return [*self.wrap, *cmd]


LOOPBACK = Host("loopback", "127.0.0.1")


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise FedA2VError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")


class NetnsLan:
    """``with NetnsLan(["superlink", "site0", "site1"]) as lan: lan.hosts["site0"].command([...])``."""

    def __init__(self, names: Sequence[str]) -> None:
        if os.geteuid() != 0:
            raise FedA2VError("network namespaces need root (ip netns add); run the multi-host test as root")
        if len(set(names)) != len(names) or not 0 < len(names) < 250:
            raise FedA2VError(f"host names must be unique, 1-249 of them: {list(names)}")
        self.names = list(names)
        self.token = secrets.token_hex(3)
        self.subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}"
        self.switch = f"fa2v-{self.token}-sw"
        self.hosts: dict[str, Host] = {}
        self.operator_address = f"{self.subnet}.254"
        self._namespaces: list[str] = []
        self._links: list[str] = []

    def _namespace(self, name: str) -> str:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def _plug(self, index: int, namespace: str | None, address: str) -> None:
        """A veth pair from ``namespace`` (None: this machine's) to the switch's bridge."""
        outer, inner = f"fa2v{self.token}s{index}", f"fa2v{self.token}h{index}"
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        self._links.append(inner)  # in this machine's namespace until moved: close() deletes it if still here
        _ip("link", "set", outer, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", outer, "master", "br0")
        _ip("-n", self.switch, "link", "set", outer, "up")
        prefix = [] if namespace is None else ["-n", namespace]
        if namespace is not None:
            _ip("link", "set", inner, "netns", namespace)
        _ip(*prefix, "addr", "add", f"{address}/24", "dev", inner)
        _ip(*prefix, "link", "set", inner, "up")

    def start(self) -> "NetnsLan":
        self._namespace(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for index, name in enumerate(self.names):
            namespace = self._namespace(f"fa2v-{self.token}-{index}")
            address = f"{self.subnet}.{index + 1}"
            self._plug(index, namespace, address)
            self.hosts[name] = Host(name, address, ("ip", "netns", "exec", namespace))
        self._plug(len(self.names), None, self.operator_address)
        log.info("LAN %s.0/24: %s; this machine is %s", self.subnet,
                 ", ".join(f"{h.name}={h.address}" for h in self.hosts.values()), self.operator_address)
        return self

    def close(self) -> None:
        """Delete every namespace made here (their veth ends go with them), then any veth end still in this
        machine's namespace (the operator's, or one a failed start left behind)."""
        for namespace in reversed(self._namespaces):
            try:
                _ip("netns", "del", namespace)
            except FedA2VError as err:
                log.warning("%s", err)
        self._namespaces.clear()
        for link in self._links:
            if subprocess.run(["ip", "link", "show", link], capture_output=True, timeout=30, check=False).returncode == 0:
                try:
                    _ip("link", "del", link)
                except FedA2VError as err:
                    log.warning("%s", err)
        self._links.clear()

    def __enter__(self) -> "NetnsLan":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
