"""``feda2v owners RUN_DIR [--set PID=NODE ...] [--release PID ...]``: who owns which partition of a run.

With ``robust.pin-partitions`` a partition belongs to one Flower node (its registered key) for the whole
run, resume included (:mod:`common.owners`). This is the operator's step that moves or releases one:
``--set 0=1234`` assigns partition 0 to node 1234 (before the run, or when a site re-registers under a
new key), ``--release 0`` lets the next node that claims it own it. Without options it lists them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import FedA2VError
from common.owners import OWNERS_FILE, load_owners, save_owners


def _pair(text: str) -> tuple[int, int]:
    try:
        pid, node = text.split("=", 1)
        return int(pid), int(node)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PARTITION=NODE_ID, got {text!r}") from None


def cmd_owners(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise FedA2VError(f"'{run_dir}' is not a run directory")
    path = run_dir / OWNERS_FILE
    owners = load_owners(path)
    if args.set or args.release:
        for pid in args.release:
            owners.pop(pid, None)
        for pid, node in args.set:
            other = [p for p, n in owners.items() if n == node and p != pid]
            if other:
                raise FedA2VError(f"Flower node {node} already owns partition {other[0]}: release it first")
            owners[pid] = node
        save_owners(path, owners)
    for pid, node in sorted(owners.items()):
        print(f"partition {pid}: Flower node {node}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("owners", help="list, assign or release the partitions of a run (robust.pin-partitions)",
                       description=__doc__.splitlines()[0])
    p.add_argument("run", metavar="RUN_DIR", help="run directory (outputs/<run>)")
    p.add_argument("--set", action="append", type=_pair, default=[], metavar="PID=NODE",
                   help="assign partition PID to Flower node NODE (repeatable)")
    p.add_argument("--release", action="append", type=int, default=[], metavar="PID",
                   help="release partition PID: the next node that claims it owns it (repeatable)")
    p.set_defaults(func=cmd_owners)
