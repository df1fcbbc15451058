"""``feda2v generate``: images from checkpoints, without a federation (the seeds' "generation only" run).

Inputs: an adapters checkpoint (its metadata names the classes), and a conditioning source:

* ``generator``: a node's (or the server's) generator checkpoints; N samples per class go through
  the adapters;
* ``class-means``: a run's ``class_means.safetensors`` (the federation's mean adapter outputs);
* ``text``: the class text targets themselves (the oracle baseline, no adapters involved).

``--oracle clip|t5|both`` swaps a branch for the class text target in the first two sources. The
text targets default to the run's ``targets.safetensors`` next to ``checkpoints/``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from common.checkpoints import CheckpointError, load_adapters, load_tensors
from common.config import ConfigError
from common.generator_bank import discover_bank
from common.records import ClassTensors
from common.render.conditioning import adapter_conditioning, outputs_conditioning
from common.render.jobs import labels_to_classes, render_job

log = logging.getLogger(__name__)


def _targets(path: Path) -> ClassTensors:
    tensors, meta = load_tensors(path)
    if meta.get("type") != "class-targets" or "clip" not in tensors or "t5" not in tensors:
        raise CheckpointError(f"'{path}' is not a class-targets file (type {meta.get('type')!r})")
    return ClassTensors(list(meta["class-names"]), tensors["clip"].float(), tensors["t5"].float())


def generate(args: argparse.Namespace) -> int:
    from common.cli import config_from_args  # the one --config-file / --set parser

    cfg = config_from_args(args)
    if args.n:
        cfg.render.images_per_class = args.n
    if args.oracle:
        cfg.render.oracle = args.oracle
    if args.classes:
        cfg.render.classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    adapters_path = Path(args.adapters)
    adapters, meta = load_adapters(adapters_path)
    class_names = list(meta["class-names"])
    unknown = [c for c in cfg.render.classes if c not in class_names]
    if unknown:
        raise ConfigError(f"--classes {unknown}: not classes of '{adapters_path}' ({class_names})")
    targets_path = Path(args.targets) if args.targets else adapters_path.resolve().parent.parent / "targets.safetensors"
    need_targets = args.source == "text" or cfg.render.oracle != "none"
    targets = _targets(targets_path) if need_targets or targets_path.is_file() else None
    if targets is not None and targets.class_names != class_names:
        raise CheckpointError(f"'{targets_path}': classes {targets.class_names} differ from the adapters' {class_names}")
    wanted = cfg.render.classes or class_names
    n = cfg.render.images_per_class
    node_id = None if args.node in (None, "server") else int(args.node)
    if args.source == "generator":
        if not args.generators:
            raise ConfigError("--source generator needs --generators DIR (a node's or the run's generators/ folder)")
        acfg = adapters.cfg
        bank = discover_bank(args.generators, cfg.generator.checkpoint_base, node_id,
                             classes=[c for c in wanted if c in class_names] if args.classes else None,
                             expected_shape=(acfg.in_tokens, acfg.in_dim))
        counts = {c: n for c in bank.classes if c in wanted}
        x, y = bank.sample_dataset(counts, class_names, seed=cfg.seed)
        cond = adapter_conditioning(adapters, x)
        rows = labels_to_classes(y, class_names)
        sources = [f"generator:{'server' if node_id is None else f'node{node_id}'}#{i + 1}" for i in range(len(rows))]
    elif args.source == "class-means":
        path = Path(args.class_means) if args.class_means else adapters_path.resolve().parent.parent / "class_means.safetensors"
        tensors, mmeta = load_tensors(path)
        names = list(mmeta["class-names"])
        reps = torch.tensor([i for i, c in enumerate(names) if c in wanted]).repeat_interleave(n)
        cond = outputs_conditioning(tensors["clip"][reps], tensors["t5"][reps])
        rows = [names[i] for i in reps.tolist()]
        sources = ["class-mean"] * len(rows)
    else:  # text: the class text targets for both branches
        assert targets is not None
        reps = torch.tensor([class_names.index(c) for c in wanted]).repeat_interleave(n)
        cond = outputs_conditioning(targets.clip[reps], targets.t5[reps])
        rows = [class_names[i] for i in reps.tolist()]
        sources = ["text"] * len(rows)
    report = render_job(cfg, node_id, cond, rows, sources, Path(args.out), None, targets, per_class=n, progress=True)
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
    p.add_argument("--config-file", default="", help="TOML config (render.* settings: model, resolution, steps, ...)")
    p.add_argument("--set", action="append", help="key=value override, e.g. --set render.steps=8")

    def run(args: argparse.Namespace) -> int:
        try:
            return generate(args)
        except (CheckpointError, ConfigError, ValueError) as err:
            log.error("%s", err)
            return 2

    p.set_defaults(func=run)
