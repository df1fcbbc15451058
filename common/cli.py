"""``feda2v`` command line: run the federation, make data, manage the embedding cache, render images from
checkpoints (``generate``), inspect the configuration.

``feda2v run`` is a thin wrapper around ``flwr run`` that sets what a local simulation needs on
this kind of machine (no run-time dependency installation, 1 CPU per simulated node, log
streaming) and runs from a neutral directory (Flower's local SuperLink keeps the working
directory of the first ``flwr run``). Plain ``flwr run .`` works too; see README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from common.logs import setup_logging

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent.parent


def _cmd_run(args: argparse.Namespace) -> int:
    app_dir = Path(args.app_dir).resolve()
    if not (app_dir / "pyproject.toml").is_file():
        print(f"error: {app_dir} is not a Flower app directory (no pyproject.toml)", file=sys.stderr)
        return 2
    overrides = list(args.run_config or [])
    if args.rounds is not None:
        overrides.append(f"num-rounds={args.rounds}")
    if not any(o.strip().startswith("output-dir") for o in overrides):
        overrides.append(f'output-dir="{Path(args.output_dir).resolve()}"')
    federation = f"num-supernodes={args.num_supernodes} client-resources-num-cpus={args.cpus_per_node}"
    federation += f" client-resources-num-gpus={args.gpus_per_node}"
    cmd = ["flwr", "run", str(app_dir), "--federation-config", federation]
    for override in overrides:
        cmd += ["--run-config", override]
    if not args.no_stream:
        cmd.append("--stream")
    env = dict(os.environ)
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    # flwr starts `flower-superlink` by name: make this interpreter's scripts findable without an activated venv
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    print("+ " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr)
    cwd = tempfile.gettempdir()
    output: list[str] = []
    with subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            output.append(line)
    if proc.returncode != 0:
        return proc.returncode
    return _check_run_completed("".join(output), env, cwd)


def _check_run_completed(output: str, env: dict[str, str], cwd: str) -> int:
    """`flwr run` exits 0 even when the ServerApp failed: ask the SuperLink for the verdict."""
    from common.flwr_cli import COMPLETED, ls_command, parse_run_id, parse_run_status

    run_id = parse_run_id(output)
    if run_id is None:
        print("error: could not find the run id in the output of flwr run", file=sys.stderr)
        return 1
    ls = subprocess.run(ls_command(run_id), env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    try:
        status = parse_run_status(ls.stdout)
    except ValueError as err:
        print(f"error: could not read the status of run {run_id}: {err}", file=sys.stderr)
        return 1
    if status.get("status") != COMPLETED:
        print(f"error: run {run_id} ended as {status.get('status')}: {status.get('status-details')}", file=sys.stderr)
        return 1
    print(f"run {run_id}: {COMPLETED}", file=sys.stderr)
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from common.data.synth import SYNTH_CLASSES, synthesize_dataset

    classes = [c.strip() for c in args.classes.split(",")] if args.classes else list(SYNTH_CLASSES[: args.num_classes])
    root = synthesize_dataset(
        Path(args.root), classes, clips_per_class=args.clips_per_class, seed=args.seed, clip_seconds=args.clip_seconds
    )
    print(root)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from common import config as config_mod

    if args.action == "schema":
        print(json.dumps(config_mod.json_schema(), indent=2))
    elif args.action == "reference":
        print(config_mod.markdown_reference())
    elif args.action == "show":
        try:
            cfg = config_from_args(args)
        except config_mod.ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(json.dumps(cfg.model_dump(by_alias=True), indent=2))
    return 0


def config_from_args(args: argparse.Namespace):
    """Defaults + ``--config-file`` + ``--set key=value`` overrides, validated like a run config."""
    from common import config as config_mod

    run_config = config_mod.flatten(config_mod.FedA2VConfig().model_dump(by_alias=True))
    for item in args.set or []:
        key, _, value = item.partition("=")
        run_config[key.strip()] = _parse_value(value)
    if args.config_file:
        run_config["config-file"] = args.config_file
    return config_mod.load_config(run_config, search_dirs=(Path.cwd(),))


def _cmd_cache(args: argparse.Namespace) -> int:
    from common.cache import commands
    from common.config import ConfigError

    try:
        cfg = config_from_args(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    action = args.cache_command
    if action == "build":
        summary = commands.build(cfg, args.cache_dir, args.data_root, args.num_nodes, args.all_classes, progress=True)
        print(commands.to_json(summary))
        return 0
    if action == "info":
        summaries = commands.info(cfg, args.cache_dir, args.key)
        if args.json:
            print(commands.to_json(summaries))
        elif not summaries:
            print(f"no embedding cache under {commands.embeddings_root(cfg, args.cache_dir)}")
        else:
            print("\n".join(commands.format_info(s) for s in summaries))
        return 0
    if action == "verify":
        results = commands.verify(cfg, args.cache_dir, args.key, repair=args.repair)
        if not results:
            print(f"no embedding cache under {commands.embeddings_root(cfg, args.cache_dir)}")
        bad = False
        for found, after in results:
            print(commands.format_report(found))
            if after is not None:
                print(f"  after repair: {'OK' if after.ok else 'still BAD'} (entries {after.entries}, shards {after.shards})")
            bad |= not (after or found).ok
        return 1 if bad else 0
    if action == "clear":
        if not (args.key or args.all):
            print("error: give --key PREFIX (see `feda2v cache info`) or --all", file=sys.stderr)
            return 2
        removed = commands.clear(cfg, args.cache_dir, "" if args.all else args.key)
        for path in removed:
            print(f"removed {path}")
        if not removed:
            print("nothing to remove")
        return 0
    raise AssertionError(action)


def _parse_value(text: str):
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feda2v", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a local Flower simulation of the app (wraps `flwr run`)")
    run.add_argument("app_dir", nargs="?", default=str(APP_DIR), help="Flower app directory (default: this project)")
    run.add_argument("--num-supernodes", type=int, default=3, help="simulated SuperNodes (default 3)")
    run.add_argument("--cpus-per-node", type=float, default=1, help="CPUs per simulated node (default 1)")
    run.add_argument("--gpus-per-node", type=float, default=0.0, help="GPUs per simulated node (default 0)")
    run.add_argument("--rounds", type=int, default=None, help="shortcut for --run-config num-rounds=N")
    run.add_argument("--output-dir", default="outputs", help="where run directories go (default ./outputs)")
    run.add_argument("-c", "--run-config", action="append", help="run-config override(s), as for `flwr run`")
    run.add_argument("--no-stream", action="store_true", help="do not stream the run's logs")
    run.set_defaults(func=_cmd_run)

    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write a synthetic dataset in the official ESC-50 layout")
    synth.add_argument("--root", required=True, help="output directory")
    synth.add_argument("--classes", default="", help="comma-separated class names (default: the first --num-classes)")
    synth.add_argument("--num-classes", type=int, default=10)
    synth.add_argument("--clips-per-class", type=int, default=40)
    synth.add_argument("--clip-seconds", type=float, default=5.0)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_cmd_synth)

    cache = sub.add_parser("cache", help="the AST embedding cache (<cache-dir>/embeddings): build, info, verify, clear")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    helps = {
        "build": "precompute embeddings of a dataset for a config (incremental: only missing clips are extracted)",
        "info": "list caches: key fields, entries, shards, bytes",
        "verify": "check index and per-row checksums; exit 1 and name bad shards/entries",
        "clear": "delete one key's cache (--key) or all (--all)",
    }
    for name, text in helps.items():
        p = cache_sub.add_parser(name, help=text, description=text)
        p.add_argument("--config-file", default="", help="TOML config file (as the run's config-file)")
        p.add_argument("--set", action="append", help="key=value config override (dotted key), repeatable")
        p.add_argument("--cache-dir", default="", help="cache dir (default: config cache-dir, $FEDA2V_CACHE, user cache)")
        if name == "build":
            p.add_argument("--num-nodes", type=int, default=None,
                           help="only the clips that N nodes use (their train/val/test splits); default: every clip")
            p.add_argument("--all-classes", action="store_true", help="every class of the dataset, not just the configured ones")
            p.add_argument("--data-root", default="", help="dataset folder on this host (overrides data.root)")
        if name in ("info", "verify", "clear"):
            p.add_argument("--key", default="", help="only the key whose hash starts with this prefix")
        if name == "info":
            p.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "verify":
            p.add_argument("--repair", action="store_true",
                           help="drop bad entries/shards, adopt orphan shards, delete shards without live rows")
        if name == "clear":
            p.add_argument("--all", action="store_true", help="every key of every dataset")
        p.set_defaults(func=_cmd_cache)

    from common.render.generate import add_parser as add_generate

    add_generate(sub)

    cfg = sub.add_parser("config", help="configuration: JSON schema, key reference, resolved values")
    cfg.add_argument("action", choices=["schema", "reference", "show"])
    cfg.add_argument("--config-file", default="", help="for 'show': a TOML config file")
    cfg.add_argument("--set", action="append", help="for 'show': key=value override (dotted key)")
    cfg.set_defaults(func=_cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
