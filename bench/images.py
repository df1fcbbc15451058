"""Rendering throughput: batched vs one image per pipeline call, at the configured resolution.

Renders ``--images`` images of random adapter-shaped conditioning with the configured backend
(default: the tiny FLUX preset) once with ``render.batch-size`` images per call and once with one
per call, into fresh directories (nothing skipped), after one warm-up call each.

Usage:  python bench/images.py [--images 32] [--batch-size 8] [--run-config 'render.resolution=64 ...']
Last line of output: one JSON object (images_per_s_batched, images_per_s_single, ratio, rss_mb).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
from pathlib import Path

import torch
from record import add_record_argument, emit  # the sibling modules (bench/ is this script's sys.path[0])
from workspace import isolated_cache

from common.config import FedA2VConfig, flatten, load_config
from common.config_overrides import parse_overrides
from common.device import resolve_device
from common.logs import setup_logging
from common.render.backend import Conditioning
from common.render.jobs import RenderContext, render_job


def run(cfg: FedA2VConfig, n: int, out: Path) -> float:
    g = torch.Generator().manual_seed(0)
    cond = Conditioning({"clip_pooled": torch.randn(n, 768, generator=g),
                         "t5_sequence": torch.randn(n, cfg.text_encoder.t5_tokens, 4096, generator=g)})
    classes = [f"class{i:03d}" for i in range(n)]  # one image per class: n distinct files
    device = str(resolve_device(cfg.device))
    render_job(RenderContext.of(cfg), None, cond.rows([0]), classes[:1], ["warmup"], out / "warmup", None, per_class=1, device=device)
    report = render_job(RenderContext.of(cfg), None, cond, classes, ["bench"] * n, out / "timed", None, per_class=1, device=device)
    assert report.written == n, report
    return report.images_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--run-config", default="", help="run-config overrides ('render.resolution=64 render.steps=4')")
    add_record_argument(parser)
    args = parser.parse_args()
    setup_logging()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    flat = flatten(FedA2VConfig().model_dump(by_alias=True))
    flat["render.model"] = "tiny"  # throughput of the pipeline; the trained preset needs a run's targets
    flat.update(parse_overrides(args.run_config))
    isolated_cache(parse_overrides(args.run_config), prefix="feda2v-bench-img")
    batched_cfg = load_config({**flat, "render.batch-size": args.batch_size})
    single_cfg = load_config({**flat, "render.batch-size": 1})
    with tempfile.TemporaryDirectory(prefix="feda2v-bench-img-") as tmp:
        batched = run(batched_cfg, args.images, Path(tmp) / "batched")
        single = run(single_cfg, args.images, Path(tmp) / "single")
    r = batched_cfg.render
    emit({
        "images_per_s_batched": round(batched, 2),
        "images_per_s_single": round(single, 2),
        "ratio": round(batched / single, 3) if single else None,
        "batch_size": args.batch_size,
        "images": args.images,
        "model": r.model,
        "resolution": r.resolution,
        "steps": r.steps,
        "dtype": r.dtype,
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
        "rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }, record=args.record)


if __name__ == "__main__":
    main()
