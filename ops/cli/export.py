"""``feda2v export``: a run's portable audio-to-image pipeline, in one folder.

The folder holds the AST, the adapters, the class targets, the calibration and the render model;
``feda2v imagine --pipeline`` and ``AudioToImagePipeline.from_pretrained`` load it on any machine.

Parses the arguments and calls :func:`common.imagine.export.export_pipeline` (which adapters, standalone
runs) and :meth:`common.imagine.pipeline.AudioToImagePipeline.save_pretrained` (the folder's layout).
"""

from __future__ import annotations

import argparse


def cmd_export(args: argparse.Namespace) -> int:
    from common.imagine.export import export_pipeline

    print(export_pipeline(args.run, args.out, args.checkpoint, args.node, args.cache_dir or None))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a run's portable audio-to-image pipeline into a folder",
                       description=__doc__.splitlines()[0])
    p.add_argument("run", metavar="RUN", help="a run folder (outputs/<run>), or a folder of runs (the newest)")
    p.add_argument("out", metavar="DIR", help="the pipeline folder to write (replaced if it holds a pipeline)")
    p.add_argument("--checkpoint", choices=["final", "best", "ema"], default="final", help="which adapters (default final)")
    p.add_argument("--node", type=int, default=None, help="a standalone run (aggregation none): whose adapters")
    p.add_argument("--cache-dir", default="", help="where the run's render preset is cached (default: the run's cache-dir)")
    p.set_defaults(func=cmd_export)
