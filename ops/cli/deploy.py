"""``feda2v deploy``: what a secure deployment needs, made once per federation or site.

- ``certs``: a CA and the SuperLink's TLS certificate (on the SuperLink host; only ca.pem leaves it).
- ``node-key``: a SuperNode's key pair (on the site; only the .pub goes to the operator, who registers it
  with ``flwr supernode register``).
- ``secret``: a SuperExec shared secret (one between the SuperLink and the ServerApp's SuperExec, one per
  site between its SuperNode and its ClientApp SuperExec).
- ``images``: the docker images of ``docker/`` (``--offline-base`` where Docker Hub is unreachable).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from common.errors import FedA2VError

log = logging.getLogger(__name__)


def _can_chown(owner: int | None) -> None:
    """Checked before anything is written, so a refused chown never leaves files behind."""
    if owner is not None and os.geteuid() != 0 and owner != os.geteuid():
        raise FedA2VError(f"--owner {owner} needs root (sudo), or run as uid {owner}: the images' user must be "
                          "able to read the files it mounts")


def _chown(paths: list[Path], owner: int | None) -> None:
    """Make files readable inside the images (their user is uid 49999)."""
    if owner is None:
        return
    for path in paths:
        os.chown(path, owner, owner)


def cmd_certs(args: argparse.Namespace) -> int:
    from ops.deploy.pki import make_tls

    _can_chown(args.owner)
    tls = make_tls(Path(args.out), args.name, days=args.days, overwrite=args.force)
    _chown([tls.ca_cert, tls.cert, tls.key], args.owner)  # ca.key stays root's: it never enters a container
    for path in (tls.ca_cert, tls.cert, tls.key, tls.ca_key):
        print(path)
    return 0


def cmd_node_key(args: argparse.Namespace) -> int:
    from ops.deploy.pki import make_node_key

    _can_chown(args.owner)
    key = make_node_key(Path(args.out), args.name, overwrite=args.force)
    _chown([key.private, key.public], args.owner)
    print(key.private)
    print(key.public)
    return 0


def cmd_secret(args: argparse.Namespace) -> int:
    from ops.deploy.pki import make_secret

    _can_chown(args.owner)
    path = make_secret(Path(args.out), args.name, overwrite=args.force)
    _chown([path], args.owner)
    print(path)
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    from ops.deploy.images import build_images

    built = build_images(args.tag, base=args.base or None, offline=args.offline_base)
    print(json.dumps({"images": built.images, "seconds": built.seconds, "size_mb": built.sizes_mb()}))
    return 0


def _named_file_command(sub, command: str, help_text: str, name_help: str, force_note: str, func) -> None:
    """``feda2v deploy <command> OUT NAME [--owner UID] [--force]``."""
    parser = sub.add_parser(command, help=help_text)
    parser.add_argument("out", help="output folder")
    parser.add_argument("name", help=name_help)
    parser.add_argument("--owner", type=int, default=None, help="chown the file(s) to this uid (49999 for the images)")
    parser.add_argument("--force", action="store_true", help=f"replace existing files ({force_note})")
    parser.set_defaults(func=func, user_errors=(OSError,))


def add_parser(sub) -> None:
    deploy = sub.add_parser("deploy", help="TLS certificates, SuperNode keys and docker images for a deployment")
    deploy_sub = deploy.add_subparsers(dest="deploy_command", required=True)

    certs = deploy_sub.add_parser("certs", help="a CA and the SuperLink's TLS certificate")
    certs.add_argument("out", help="output folder (ca.pem, ca.key, server.pem, server.key)")
    certs.add_argument("--name", action="append", required=True,
                       help="a DNS name or IP address clients use to reach the SuperLink (repeat for each)")
    certs.add_argument("--days", type=int, default=365, help="validity in days")
    certs.add_argument("--owner", type=int, default=None, help="chown the files a container reads to this uid (49999)")
    certs.add_argument("--force", action="store_true", help="replace existing files (every site must then get the new ca.pem)")
    certs.set_defaults(func=cmd_certs, user_errors=(OSError,))

    _named_file_command(deploy_sub, "node-key", "a SuperNode's EC P-384 key pair (OpenSSH format)",
                        "file name of the private key; the public key gets .pub", "re-register the node", cmd_node_key)
    _named_file_command(deploy_sub, "secret", "a SuperExec shared secret (--superexec-auth-secret-file)",
                        "file name; '.secret' is appended", "restart both sides", cmd_secret)

    images = deploy_sub.add_parser("images", help="build feda2v/{superlink,supernode,superexec}:TAG from docker/")
    images.add_argument("--tag", default="0.1.0")
    images.add_argument("--base", default="", help="one base image for all three (default: Flower's official images)")
    images.add_argument("--offline-base", action="store_true",
                        help="build the base from Debian's mirror (debootstrap) and forbid the package index")
    images.set_defaults(func=cmd_images, user_errors=(FedA2VError,))
