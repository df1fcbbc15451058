"""Options that several ``feda2v`` commands share: ``--config-file`` and ``--set key=value``."""

from __future__ import annotations

import argparse

from common.config import FedA2VConfig
from common.config_overrides import load_config_with_overrides


def add_config_options(parser: argparse.ArgumentParser, file_help: str, set_help: str) -> None:
    parser.add_argument("--config-file", default="", help=file_help)
    parser.add_argument("--set", action="append", help=set_help)


def config_from_args(args: argparse.Namespace) -> FedA2VConfig:
    """Defaults + ``--config-file`` + ``--set`` overrides (relative files from the current directory)."""
    return load_config_with_overrides(args.config_file, args.set)
