"""``feda2v data synth``: a synthetic dataset in the ESC-50, VEGAS or VGGSound layout."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_synth(args: argparse.Namespace) -> int:
    from common.data.synth import SYNTH_CLASSES, synthesize_dataset

    classes = [c.strip() for c in args.classes.split(",")] if args.classes else list(SYNTH_CLASSES[: args.num_classes])
    root = synthesize_dataset(
        Path(args.root), classes, clips_per_class=args.clips_per_class, seed=args.seed, clip_seconds=args.clip_seconds,
        layout=args.layout,
    )
    print(root)
    return 0


def add_parser(sub) -> None:
    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write a synthetic dataset in the ESC-50, VEGAS or VGGSound layout")
    synth.add_argument("--layout", choices=("esc50", "vegas", "vggsound"), default="esc50",
                       help="folder layout (read with data.dataset of the same name)")
    synth.add_argument("--root", required=True, help="output directory")
    synth.add_argument("--classes", default="", help="comma-separated class names (default: the first --num-classes)")
    synth.add_argument("--num-classes", type=int, default=10)
    synth.add_argument("--clips-per-class", type=int, default=40)
    synth.add_argument("--clip-seconds", type=float, default=5.0)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_synth)
