"""Rendering jobs shared by the ClientApp, the ServerApp and ``feda2v generate``.

A job is: an owner (``node_{id}`` or ``server``), one conditioning row per image with its class and
source, an output directory. This module picks the rows (``render.classes``,
``images-per-class``), applies the oracle switch, numbers images per class, and hands everything
to :func:`~common.render.images.render_images`. The backend is built once per process and reused
while its settings stay the same (Flower simulation keeps a node's process across rounds).

Every job reads a :class:`RenderContext`: the ``[render]`` section plus the three things it leaves to
the run (the seed when ``render.seed`` is 0, the cache folder of the trained preset, the prompt
template the zero-shot scorer reads), so nothing here needs the whole run configuration.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from common.config import FedA2VConfig, RenderConfig
from common.records import ClassTensors
from common.render.backend import Conditioning, RenderBackend, RenderSettings
from common.render.conditioning import calibrate, with_oracle
from common.render.images import ImageRequest, RenderReport, owner_name, read_manifest, render_images
from common.render.registry import build_backend
from common.render.scoring import PictureScorer, ZeroShotCLIP, score_images
from common.render.trained_preset import PRESET, Recipe, ensure_preset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RenderContext:
    """What a rendering job reads: the ``[render]`` section and what it leaves to the run."""

    render: RenderConfig
    seed: int  # the run seed: image seeds when render.seed is 0
    cache_dir: Path  # where the tiny-trained preset is kept (a node's own cache dir on a node)
    prompt_template: str  # text-encoder.prompt-template: the zero-shot scorer's prompts

    @classmethod
    def of(cls, cfg: FedA2VConfig, cache_dir: Path | None = None) -> "RenderContext":
        """The run's rendering context; ``cache_dir`` defaults to the run's (a node passes its own)."""
        return cls(cfg.render, cfg.seed, cache_dir or cfg.resolved_cache_dir(), cfg.text_encoder.prompt_template)

    def settings(self, device: str = "cpu", targets: ClassTensors | None = None) -> RenderSettings:
        """The backend settings; ``tiny-trained`` resolves to its trained folder (trained on first use for
        these ``targets``, in :attr:`cache_dir`)."""
        r = self.render
        model = r.model
        if model == PRESET:
            if targets is None:
                raise ValueError(f"render.model='{PRESET}' needs the class text targets (e.g. the run's targets.safetensors)")
            model = str(ensure_preset(self.cache_dir, targets, Recipe(resolution=r.resolution)))
        return RenderSettings(
            model=model, resolution=r.resolution, steps=r.steps, guidance=r.guidance, dtype=r.dtype,
            batch_size=r.batch_size, seed=r.seed or self.seed, offload=r.offload, vae_tiling=r.vae_tiling,
            calibrate=r.calibrate if targets is not None else "none", device=device,
        )

    def prepare(self, targets: ClassTensors) -> None:
        """Train the ``tiny-trained`` preset now if rendering will need it (the ServerApp calls this before
        round 1, so the training runs once with the whole CPU and simulated nodes sharing the cache find it)."""
        if self.render.when != "off" and self.render.model == PRESET:
            self.settings(targets=targets)


@functools.lru_cache(maxsize=1)  # one pipeline per process; the key (name, frozen settings) is complete
def cached_backend(name: str, settings: RenderSettings) -> RenderBackend:
    """The backend ``name`` for ``settings``, reused while both stay the same (a new key replaces it)."""
    return build_backend(name, settings)


def select_rows(row_classes: list[str], wanted: list[str] | None, per_class: int) -> list[int]:
    """The first ``per_class`` rows of every wanted class (all classes present when ``wanted`` is empty)."""
    if wanted:
        unknown = sorted(set(wanted) - set(row_classes))
        if unknown:
            log.warning("render.classes %s: no conditioning rows for these here; skipped", unknown)
    picked: dict[str, list[int]] = {}
    for i, cls in enumerate(row_classes):
        if wanted and cls not in wanted:
            continue
        rows = picked.setdefault(cls, [])
        if len(rows) < per_class:
            rows.append(i)
    return [i for rows in picked.values() for i in rows]


def render_job(
    ctx: RenderContext,
    node_id: int | None,
    cond: Conditioning,
    row_classes: list[str],
    row_sources: list[str],
    out: Path,
    server_round: int | None,
    targets: ClassTensors | None = None,
    device: str = "cpu",
    per_class: int | None = None,
    progress: bool = False,
) -> RenderReport:
    """Render up to ``per_class`` (default ``render.images-per-class``) images per class for ``node_id``
    (``None``: the server) into ``out``; returns what was written and skipped."""
    r = ctx.render
    per_class = per_class or r.images_per_class
    rows = select_rows(row_classes, r.classes or None, per_class)
    if not rows:
        log.warning("%s: nothing to render (no rows for the selected classes)", owner_name(node_id))
        return RenderReport()
    cond = cond.rows(rows)
    classes = [row_classes[i] for i in rows]
    sources = [row_sources[i] for i in rows]
    if r.calibrate != "none":
        if targets is None:
            log.info("%s: render.calibrate=%r needs the class text targets, which this job lacks: the conditioning "
                     "is rendered as it is", owner_name(node_id), r.calibrate)
        else:
            cond = calibrate(cond, targets, r.calibrate, r.calibrate_sigma)
    if r.oracle != "none":
        if targets is None:
            raise ValueError("render.oracle needs the class text targets")
        cond = with_oracle(cond, targets, classes, r.oracle)
        sources = [f"{s}+oracle-{r.oracle}" for s in sources]
    owner = owner_name(node_id)
    counters: dict[str, int] = {}
    requests = []
    for j, (cls, src) in enumerate(zip(classes, sources)):
        counters[cls] = counters.get(cls, 0) + 1
        requests.append(ImageRequest(owner, cls, counters[cls], src, j, server_round))
    settings = ctx.settings(device, targets)
    report = render_images(cached_backend(r.backend, settings), settings, requests, cond, out, progress=progress)
    log.info("%s: %d image(s) rendered, %d already present, in %s", owner, report.written, report.skipped, out / owner)
    return report


def score_owner(ctx: RenderContext, out: Path, owner: str, class_names: list[str], device: str = "cpu",
                server_round: int | None = None) -> dict[str, float]:
    """Image accuracy of ``owner``'s images in ``out`` (of ``server_round`` only, when given).

    ``tiny-trained``: the picture classifier (``image_acc``, ``image_acc_clip`` = colour, ``image_acc_t5`` =
    shape, ``image_acc:<class>``, ``images_scored``); otherwise zero-shot CLIP (``image_zs_acc``, ...) when a
    metric model is configured; else ``{}`` (logged once).
    """
    entries = [e for e in read_manifest(out) if e.get("owner") == owner
               and (server_round is None or e.get("round") == server_round)]
    if ctx.render.model == PRESET:
        scorer, prefix = PictureScorer(len(class_names), ctx.render.resolution), "image_"
    else:
        scorer, prefix = ZeroShotCLIP.maybe(ctx.render.clip_metric_model, device), "image_zs_"
        if scorer is None:
            return {}
    scores = score_images(scorer, out, entries, class_names, ctx.prompt_template).get(owner, {})
    log.info("%s: image accuracy from sound on %d images (%s): %.3f%s", owner, int(scores.get("n", 0)),
             "class pictures" if prefix == "image_" else "zero-shot CLIP", scores.get("acc", float("nan")),
             f" (colour/CLIP {scores['acc_clip']:.3f}, shape/T5 {scores['acc_t5']:.3f})" if "acc_clip" in scores else "")
    metrics = {f"{prefix}{k}": v for k, v in scores.items() if k != "n"}
    if scores:
        metrics["images_scored"] = float(scores.get("n", 0))
    return metrics


def images_dir(r: RenderConfig, run_dir: str | Path | None, override: str = "", server_round: int | None = None) -> Path:
    """node-config ``image-dir`` > ``render.output-dir`` > ``<run dir>/images``; with ``render.when = "every"``
    each rendered round gets its own ``round_{r:03d}/`` below it (its own manifest and contact sheets), so
    a later round never overwrites or skips an earlier round's images."""
    if override:
        base = Path(override).expanduser()
    elif r.output_dir:
        base = Path(r.output_dir).expanduser()
    elif run_dir:
        base = Path(run_dir) / "images"
    else:
        raise ValueError("no image directory: set render.output-dir (or node-config image-dir)")
    if r.when == "every" and server_round is not None:
        return base / f"round_{server_round:03d}"
    return base


def labels_to_classes(labels: torch.Tensor, class_names: list[str]) -> list[str]:
    return [class_names[int(i)] for i in labels.tolist()]
