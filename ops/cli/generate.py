"""``feda2v generate``: images from checkpoints, without a federation (the seeds' "generation only" run).

Parses the arguments and calls :func:`common.render.generate.generate_images`, which documents the
sources (``generator``, ``class-means``, ``text``) and the ``--oracle`` switch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ops.cli.options import add_config_options, config_from_args


def cmd_generate(args: argparse.Namespace) -> int:
    from common.render.generate import generate_images

    cfg = config_from_args(args)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    node_id = None if args.node in (None, "server") else int(args.node)
    report = generate_images(
        cfg, args.adapters, args.out, source=args.source, generators=args.generators, node_id=node_id,
        class_means=args.class_means, targets=args.targets, classes=classes, n=args.n, oracle=args.oracle,
        progress=True,
    )
    print(f"{report.written} image(s) written, {report.skipped} already present, under {Path(args.out)} "
          f"({report.images_per_s:.2f} img/s)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="render images from adapter (and generator) checkpoints, no federation",
                       description=__doc__.splitlines()[0])
    p.add_argument("--adapters", required=True, help="adapters checkpoint (e.g. <run>/checkpoints/adapters.safetensors)")
    p.add_argument("--out", required=True, help="output directory ({out}/node_{id}/{class}_{0001}.png, manifest.jsonl)")
    p.add_argument("--source", choices=["generator", "class-means", "text"], default="generator")
    p.add_argument("--generators", default="", help="folder with generator checkpoints (node's or <run>/generators)")
    p.add_argument("--node", default="server", help="whose generators: a node id or 'server' (also names the output folder)")
    p.add_argument("--class-means", default="", help="class_means.safetensors (default: the run's)")
    p.add_argument("--targets", default="", help="targets.safetensors (default: the run's, next to checkpoints/)")
    p.add_argument("--classes", default="", help="comma-separated classes (default: all)")
    p.add_argument("--n", type=int, default=0, help="images per class (default render.images-per-class)")
    p.add_argument("--oracle", choices=["none", "clip", "t5", "both"], default="", help="use the class text target for this branch")
    add_config_options(p, "TOML config (render.* settings: model, resolution, steps, ...)",
                       "key=value override, e.g. --set render.steps=8")
    p.set_defaults(func=cmd_generate, user_errors=(ValueError,))  # as before: a bad --node etc. is exit 2
