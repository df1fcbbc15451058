"""Rendering jobs shared by the ClientApp, the ServerApp and ``feda2v generate``.

A job is: an owner (``node_{id}`` or ``server``), one conditioning row per image with its class and
source, an output directory. This module picks the rows (``render.classes``,
``images-per-class``), applies the oracle switch, numbers images per class, and hands everything
to :func:`~common.render.images.render_images`. The backend is built once per process and reused
while its settings stay the same (Flower simulation keeps a node's process across rounds).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from common.config import FedA2VConfig
from common.records import ClassTensors
from common.render.backend import Conditioning, RenderBackend, RenderSettings
from common.render.conditioning import with_oracle
from common.render.images import ImageRequest, RenderReport, owner_name, render_images
from common.render.registry import build_backend

log = logging.getLogger(__name__)


def render_settings(cfg: FedA2VConfig, device: str = "cpu") -> RenderSettings:
    r = cfg.render
    return RenderSettings(
        model=r.model, resolution=r.resolution, steps=r.steps, guidance=r.guidance, dtype=r.dtype,
        batch_size=r.batch_size, seed=r.seed or cfg.seed, offload=r.offload, vae_tiling=r.vae_tiling, device=device,
    )


@functools.lru_cache(maxsize=1)  # one pipeline per process; the key (name, frozen settings) is complete
def cached_backend(name: str, settings: RenderSettings) -> RenderBackend:
    """The backend ``name`` for ``settings``, reused while both stay the same (a new key replaces it)."""
    return build_backend(name, settings)


def backend_for(cfg: FedA2VConfig, settings: RenderSettings) -> RenderBackend:
    return cached_backend(cfg.render.backend, settings)


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
    cfg: FedA2VConfig,
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
    per_class = per_class or cfg.render.images_per_class
    rows = select_rows(row_classes, cfg.render.classes or None, per_class)
    if not rows:
        log.warning("%s: nothing to render (no rows for the selected classes)", owner_name(node_id))
        return RenderReport()
    cond = cond.rows(rows)
    classes = [row_classes[i] for i in rows]
    sources = [row_sources[i] for i in rows]
    if cfg.render.oracle != "none":
        if targets is None:
            raise ValueError("render.oracle needs the class text targets")
        cond = with_oracle(cond, targets, classes, cfg.render.oracle)
        sources = [f"{s}+oracle-{cfg.render.oracle}" for s in sources]
    owner = owner_name(node_id)
    counters: dict[str, int] = {}
    requests = []
    for j, (cls, src) in enumerate(zip(classes, sources)):
        counters[cls] = counters.get(cls, 0) + 1
        requests.append(ImageRequest(owner, cls, counters[cls], src, j, server_round))
    settings = render_settings(cfg, device)
    report = render_images(backend_for(cfg, settings), settings, requests, cond, out, progress=progress)
    log.info("%s: %d image(s) rendered, %d already present, in %s", owner, report.written, report.skipped, out / owner)
    return report


def score_owner(cfg: FedA2VConfig, out: Path, owner: str, class_names: list[str], device: str = "cpu") -> dict[str, float]:
    """Zero-shot CLIP scores of ``owner``'s images (``image_zs_acc``, ``_balanced_acc``, ``_macro_f1``),
    or ``{}`` when no metric model is configured (logged once)."""
    from common.metrics.images import ZeroShotCLIP, score_images
    from common.render.images import read_manifest

    scorer = ZeroShotCLIP.maybe(cfg.render.clip_metric_model, device)
    if scorer is None:
        return {}
    entries = [e for e in read_manifest(out) if e.get("owner") == owner]
    scores = score_images(scorer, out, entries, class_names, cfg.text_encoder.prompt_template).get(owner, {})
    log.info("%s: zero-shot CLIP on %d images: acc %.3f, balanced acc %.3f, macro-F1 %.3f", owner,
             int(scores.get("n", 0)), scores.get("acc", float("nan")), scores.get("balanced_acc", float("nan")),
             scores.get("macro_f1", float("nan")))
    return {f"image_zs_{k}": v for k, v in scores.items() if k != "n"}


def images_dir(cfg: FedA2VConfig, run_dir: str | Path | None, override: str = "") -> Path:
    """node-config ``image-dir`` > ``render.output-dir`` > ``<run dir>/images``."""
    if override:
        return Path(override).expanduser()
    if cfg.render.output_dir:
        return Path(cfg.render.output_dir).expanduser()
    if run_dir:
        return Path(run_dir) / "images"
    raise ValueError("no image directory: set render.output-dir (or node-config image-dir)")


def labels_to_classes(labels: torch.Tensor, class_names: list[str]) -> list[str]:
    return [class_names[int(i)] for i in labels.tolist()]
