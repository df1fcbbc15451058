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


def add_pipeline_options(parser: argparse.ArgumentParser) -> None:
    """``--run RUN | --pipeline DIR`` and how to read a run (``imagine``, ``serve``)."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", default="", help="a run folder (outputs/<run>), or a folder of runs (the newest): its pipeline is built in this process")
    src.add_argument("--pipeline", default="", help="a pipeline folder written by `feda2v export`")
    parser.add_argument("--checkpoint", choices=["final", "best", "ema"], default="final",
                        help="with --run: which adapters (default final)")
    parser.add_argument("--node", type=int, default=None, help="with --run of a standalone run (aggregation none): whose adapters")
    parser.add_argument("--device", default="cpu", help="where the AST, adapters and FLUX run (cpu, cuda, cuda:1)")


def pipeline_from_args(args: argparse.Namespace):
    """The pipeline ``--run`` or ``--pipeline`` names, loaded once."""
    from common.imagine.export import pipeline_from_run
    from common.imagine.pipeline import AudioToImagePipeline

    if args.pipeline:
        return AudioToImagePipeline.from_pretrained(args.pipeline, device=args.device)
    return pipeline_from_run(args.run, args.checkpoint, args.node, device=args.device)
