"""``feda2v`` command line: run the federation, turn your own audio into pictures, and the tools around them.

Commands: ``run`` (the federation), ``imagine`` (pictures from your audio files), ``export`` (a run's
portable pipeline), ``serve`` (a local page), ``report`` (run reports), ``data``, ``cache`` (the
embedding cache), ``generate`` (images from checkpoints), ``config``, ``deploy``, ``owners``.

``feda2v run`` is a thin wrapper around ``flwr run`` (see :mod:`ops.launcher`) that sets what a
local simulation needs on this kind of machine (no run-time dependency installation, 1 CPU per
simulated node, log streaming) and runs from a neutral directory (Flower's local SuperLink keeps the
working directory of the first ``flwr run``). Plain ``flwr run .`` works too; see docs/index.md.

Each command group is one module of this package with ``add_parser(subparsers)``; the commands only
parse arguments and call library functions. Errors: a :class:`~common.errors.FedA2VError` (wrong
input, config, files) from any command is reported here, once, as ``error: <message>`` on stderr
with exit code 2; a command may name more exception types that mean the same (``user_errors``).
"""

from __future__ import annotations

import argparse

from ops.cli import cache, config, data, deploy, export, generate, imagine, owners, report, run, serve
from common.errors import FedA2VError
from common.logs import report_error, setup_logging

__all__ = ["build_parser", "main"]

COMMANDS = (run, imagine, export, serve, report, data, cache, generate, config, deploy, owners)  # the order of `feda2v --help`


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feda2v", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FedA2VError, *getattr(args, "user_errors", ())) as err:
        report_error(err)
        return 2
