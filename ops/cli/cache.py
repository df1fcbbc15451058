"""``feda2v cache build|info|verify|clear``: the AST embedding cache (:mod:`common.cache.commands` does the work)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ops.cli.options import add_config_options, config_from_args
from common.logs import report_error

HELPS = {
    "build": "precompute embeddings of a dataset for a config (incremental: only missing clips are extracted)",
    "info": "list caches: key fields, entries, shards, bytes",
    "verify": "check index and per-row checksums; exit 1 and name bad shards/entries",
    "clear": "delete one key's cache (--key) or all (--all)",
}


def cmd_cache(args: argparse.Namespace) -> int:
    from common.cache import ExtractionSettings, commands

    cfg = config_from_args(args)
    base = Path(args.cache_dir).expanduser() if args.cache_dir else cfg.resolved_cache_dir()  # --cache-dir wins
    root = base / "embeddings"
    action = args.cache_command
    if action == "build":
        summary = commands.build(cfg, base, args.data_root, args.num_nodes, args.all_classes, progress=True)
        print(commands.to_json(summary))
        return 0
    if action == "info":
        current = commands.current_key(cfg.data, ExtractionSettings.of(cfg.audio_encoder, cfg.data, cfg.seed), base)
        summaries = commands.info(root, current, args.key)
        if args.json:
            print(commands.to_json(summaries))
        elif not summaries:
            print(f"no embedding cache under {root}")
        else:
            print("\n".join(commands.format_info(s) for s in summaries))
        return 0
    if action == "verify":
        results = commands.verify(root, args.key, repair=args.repair)
        if not results:
            print(f"no embedding cache under {root}")
        bad = False
        for found, after in results:
            print(commands.format_report(found))
            if after is not None:
                print(f"  after repair: {'OK' if after.ok else 'still BAD'} (entries {after.entries}, shards {after.shards})")
            bad |= not (after or found).ok
        return 1 if bad else 0
    if action == "clear":
        if not (args.key or args.all):
            report_error("give --key PREFIX (see `feda2v cache info`) or --all")
            return 2
        removed = commands.clear(root, "" if args.all else args.key)
        for path in removed:
            print(f"removed {path}")
        if not removed:
            print("nothing to remove")
        return 0
    raise AssertionError(action)


def add_parser(sub) -> None:
    cache = sub.add_parser("cache", help="the AST embedding cache (<cache-dir>/embeddings): build, info, verify, clear")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    for name, text in HELPS.items():
        p = cache_sub.add_parser(name, help=text, description=text)
        add_config_options(p, "TOML config file (as the run's config-file)",
                           "key=value config override (dotted key), repeatable")
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
        p.set_defaults(func=cmd_cache)
