"""``feda2v config schema|reference|show``: the configuration's JSON schema, key reference, resolved values."""

from __future__ import annotations

import argparse
import json

from ops.cli.options import add_config_options, config_from_args


def cmd_config(args: argparse.Namespace) -> int:
    from common import config as config_mod

    if args.action == "schema":
        print(json.dumps(config_mod.json_schema(), indent=2))
    elif args.action == "reference":
        print(config_mod.markdown_reference())
    elif args.action == "show":
        print(json.dumps(config_from_args(args).model_dump(by_alias=True), indent=2))
    return 0


def add_parser(sub) -> None:
    cfg = sub.add_parser("config", help="configuration: JSON schema, key reference, resolved values")
    cfg.add_argument("action", choices=["schema", "reference", "show"])
    add_config_options(cfg, "for 'show': a TOML config file", "for 'show': key=value override (dotted key)")
    cfg.set_defaults(func=cmd_config)
