"""Certificates and keys for a secure federation: a CA, the SuperLink's TLS certificate, SuperNode keys.

What Flower 1.41 expects, and who holds what:

- **TLS** (every connection to the SuperLink's one HTTPS port: SuperNodes, SuperExecs, ``flwr``):
  the SuperLink host keeps ``ca.key`` (offline if possible), ``server.pem`` and ``server.key``
  (``flower-superlink --ssl-ca-certfile ca.pem --ssl-certfile server.pem --ssl-keyfile server.key``);
  every other host receives only ``ca.pem`` (``flower-supernode --root-certificates ca.pem``,
  ``root-certificates`` in ``$FLWR_HOME/config.toml``). The server certificate names every address a
  client dials in its subjectAltName (DNS names and IP addresses): a name missing there fails the TLS
  handshake on that client.
- **SuperNode authentication** (``flower-superlink --enable-supernode-auth``): each site makes its own
  EC P-384 key pair and keeps the private key (``flower-supernode --auth-supernode-private-key``);
  the operator registers the public key (OpenSSH format) with ``flwr supernode register KEY.pub``.
  A node whose key is not registered is refused by the SuperLink.

- **SuperExec shared secrets** (``--superexec-auth-secret-file`` on the SuperLink/SuperNode and the
  SuperExec that takes tasks from it, process isolation): random bytes both sides hold, so a process
  that merely reaches a Runtime API cannot take tasks (the ServerApp's, or a site's ClientApps').

Keys are written with mode 0600, every file atomically; existing files are never overwritten unless
asked (a regenerated CA would silently invalidate every site's trust).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.atomic import atomic_write_bytes
from common.errors import FedA2VError

log = logging.getLogger(__name__)

__all__ = ["NodeKey", "ServerTLS", "make_ca", "make_node_key", "make_secret", "make_server_cert", "make_tls"]

VALID_DAYS = 365
CURVE = ec.SECP384R1()  # the curve Flower's own examples use for SuperNode keys; TLS keys use it too


@dataclass(frozen=True)
class ServerTLS:
    """The files of a SuperLink's TLS setup (``ca_key`` stays with whoever signs certificates)."""

    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path

    def superlink_args(self) -> list[str]:
        return ["--ssl-ca-certfile", str(self.ca_cert), "--ssl-certfile", str(self.cert), "--ssl-keyfile", str(self.key)]


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's key pair: ``private`` stays on the site, ``public`` (OpenSSH) goes to the operator."""

    private: Path
    public: Path


def _write(path: Path, data: bytes, secret: bool, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FedA2VError(f"{path} exists; refusing to overwrite it (pass overwrite/--force to replace it)")
    atomic_write_bytes(path, data, mode=0o600 if secret else 0o644)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "feda2v"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: int) -> x509.CertificateBuilder:
    """A certificate for ``key`` valid from 5 minutes ago (clock skew between hosts) for ``days``."""
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days)))


def _save_pair(out_dir: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate,
               overwrite: bool) -> tuple[Path, Path]:
    """``<stem>.pem`` (public) and ``<stem>.key`` (0600); the key first, so a certificate never lacks its key."""
    cert_path, key_path = out_dir / f"{stem}.pem", out_dir / f"{stem}.key"
    _write(key_path, _private_pem(key), secret=True, overwrite=overwrite)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), secret=False, overwrite=overwrite)
    return cert_path, key_path


def make_ca(out_dir: Path, name: str = "feda2v federation CA", days: int = VALID_DAYS,
            overwrite: bool = False) -> tuple[Path, Path]:
    """A self-signed CA: ``ca.pem`` (give to every host) and ``ca.key`` (keep private)."""
    out_dir = Path(out_dir)
    key = ec.generate_private_key(CURVE)
    subject = _name(name)
    cert = (_builder(subject, subject, key, days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    return _save_pair(out_dir, "ca", key, cert, overwrite)


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_server_cert(ca_cert: Path, ca_key: Path, out_dir: Path, names: Sequence[str], days: int = VALID_DAYS,
                     overwrite: bool = False) -> tuple[Path, Path]:
    """``server.pem``/``server.key`` signed by the CA, valid for every DNS name and IP in ``names``."""
    if not names:
        raise FedA2VError("the server certificate needs at least one name or IP address (--name)")
    out_dir = Path(out_dir)
    try:
        ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
        signer = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
    except (OSError, ValueError) as err:
        raise FedA2VError(f"cannot load the CA from {ca_cert} / {ca_key}: {err}") from err
    key = ec.generate_private_key(CURVE)
    cert = (_builder(_name(names[0]), ca.subject, key, days)
            .add_extension(_san(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False)
            .sign(signer, hashes.SHA384()))
    return _save_pair(out_dir, "server", key, cert, overwrite)


def make_tls(out_dir: Path, names: Sequence[str], days: int = VALID_DAYS, overwrite: bool = False) -> ServerTLS:
    """A new CA plus a server certificate for ``names``, all in ``out_dir``."""
    ca_cert, ca_key = make_ca(out_dir, days=days, overwrite=overwrite)
    cert, key = make_server_cert(ca_cert, ca_key, out_dir, names, days=days, overwrite=overwrite)
    log.info("TLS: CA %s, server certificate %s for %s", ca_cert, cert, ", ".join(names))
    return ServerTLS(ca_cert=ca_cert, ca_key=ca_key, cert=cert, key=key)


def make_node_key(out_dir: Path, name: str, overwrite: bool = False) -> NodeKey:
    """``<name>`` (OpenSSH private key, 0600) and ``<name>.pub`` (for ``flwr supernode register``)."""
    out_dir = Path(out_dir)
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    node = NodeKey(private=out_dir / name, public=out_dir / f"{name}.pub")
    _write(node.private, private, secret=True, overwrite=overwrite)
    _write(node.public, public + f" {name}\n".encode(), secret=False, overwrite=overwrite)
    return node


def make_secret(out_dir: Path, name: str, overwrite: bool = False) -> Path:
    """``<name>.secret``: 32 random bytes (0600) for ``--superexec-auth-secret-file`` on both sides."""
    path = Path(out_dir) / f"{name}.secret"
    _write(path, secrets.token_hex(32).encode(), secret=True, overwrite=overwrite)
    return path
