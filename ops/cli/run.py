"""``feda2v run``: a local Flower simulation of the app through the one launcher (:mod:`ops.launcher`)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ops import launcher
from common.config import ConfigError, load_config
from common.config_overrides import parse_toml_value
from common.logs import report_error


def flat_overrides(overrides: list[str]) -> dict:
    """The ``-c`` strings (each ``'k=v k2="a b"'``) as one flat run config; later pairs win."""
    flat = {}
    for text in overrides:
        for item in shlex.split(text):
            key, _, value = item.partition("=")
            flat[key.strip()] = parse_toml_value(value)
    return flat


def check_federation(app_dir: Path, overrides: list[str], num_supernodes: int) -> None:
    """Fail before starting anything when the configuration cannot run on this many simulated nodes."""
    cfg = load_config(flat_overrides(overrides), search_dirs=(app_dir,))
    if cfg.data.dataset != "synthetic":  # simulated nodes have no node-config data-root: data.root is theirs
        if not cfg.data.root:
            raise ConfigError(f"data.dataset='{cfg.data.dataset}' needs data.root: the dataset folder every simulated "
                              "node reads (a deployed site may set its own node-config 'data-root' instead)")
        if not Path(cfg.data.root).expanduser().is_dir():
            raise ConfigError(f"data.root '{cfg.data.root}' does not exist or is not a directory")
    if cfg.min_nodes > num_supernodes:
        raise ConfigError(f"min-nodes={cfg.min_nodes} but --num-supernodes={num_supernodes}: the run would wait for "
                          "nodes that never connect; lower min-nodes or simulate more nodes")


def cmd_run(args: argparse.Namespace) -> int:
    app_dir = launcher.resolve_app_dir(args.app_dir)
    overrides = list(args.run_config or [])
    check_federation(app_dir, overrides, args.num_supernodes)
    if args.rounds is not None:
        overrides.append(f"num-rounds={args.rounds}")
    if "output-dir" not in flat_overrides(overrides):  # a -c output-dir=... wins over --output-dir's default
        overrides.append(f'output-dir="{Path(args.output_dir).resolve()}"')
    federation = launcher.federation_config(args.num_supernodes, args.cpus_per_node, args.gpus_per_node)
    cmd = launcher.flwr_run_command(app_dir, federation_config=federation, run_config=overrides,
                                    stream=not args.no_stream)
    print("+ " + shlex.join(cmd), file=sys.stderr)
    result = launcher.launch(cmd, keep_superlink=args.keep_superlink)
    kept = result.local_superlink if args.keep_superlink else None
    if kept is not None:  # how to reach it afterwards (flwr ls, flwr log ...): its own home and port
        print(f"local SuperLink left running on {kept.address}; reach it with: "
              + " ".join(f"{k}={v}" for k, v in kept.env().items()), file=sys.stderr)
    if not result.ok:
        report_error(result.problem)
        return result.exit_code
    print(f"run {result.run_id}: {launcher.COMPLETED}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    run = sub.add_parser("run", help="run a local Flower simulation of the app (wraps `flwr run`)")
    run.add_argument("app_dir", nargs="?", default=str(launcher.APP_DIR), help="Flower app directory (default: this project)")
    run.add_argument("--num-supernodes", type=int, default=3, help="simulated SuperNodes (default 3)")
    run.add_argument("--cpus-per-node", type=float, default=1, help="CPUs per simulated node (default 1)")
    run.add_argument("--gpus-per-node", type=float, default=0.0, help="GPUs per simulated node (default 0)")
    run.add_argument("--rounds", type=int, default=None, help="shortcut for --run-config num-rounds=N")
    run.add_argument("--output-dir", default="outputs", help="where run directories go (default ./outputs)")
    run.add_argument("-c", "--run-config", action="append", help="run-config override(s), as for `flwr run`")
    run.add_argument("--no-stream", action="store_true", help="do not stream the run's logs")
    run.add_argument("--keep-superlink", action="store_true",
                     help="leave the local SuperLink that this run started running (default: stop it afterwards); "
                          "every run starts its own, on free ports")
    run.set_defaults(func=cmd_run)
