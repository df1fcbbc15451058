"""A node renders images of its own classes from its adapters; the images stay on the node.

Source ``clips``: the node's held-out test clips (cache-only in the pretrained-generator mode, so
still no AST there); ``generator``: samples of the node's generator bank (trained this run or
pretrained). The first ``render.images-per-class`` (``nodes.<id>.images-per-class`` wins) of each class are
rendered into
``{image dir}/node_{id}/{class}_{0001}.png`` with a manifest and a contact sheet.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import RecordDict

from client_app.node_data import NodeDataMemo, load_node_data
from client_app.site import NodeSite
from common import seeds
from common.config import DataConfig
from common.generator_bank import bank_from_records
from common.models.adapters import Adapters
from common.records import GENERATORS, ClassTensors
from common.render.conditioning import adapter_conditioning
from common.render.images import owner_name
from common.render.jobs import RenderContext, images_dir, labels_to_classes, render_job, score_owner

log = logging.getLogger(__name__)


def render_node_images(
    ctx: RenderContext,
    data: DataConfig,
    site: NodeSite,
    adapters: Adapters,
    targets: ClassTensors,
    state: RecordDict,
    run_dir: str,
    server_round: int,
    cache_only: bool = False,
    memo: NodeDataMemo | None = None,
) -> dict[str, Any]:
    """Render this node's images; returns metrics (``images_rendered``, ``render_seconds``).

    ``ctx``: the run's rendering settings with this node's cache dir (its trained preset lives there).
    ``run_dir``: the run directory as this node resolves it (see :func:`client_app.app.node_run_dir`);
    images go to ``images_dir(ctx.render, run_dir, node.image_dir)``: node-config ``image-dir`` >
    ``render.output-dir`` > ``<run_dir>/images``. ``memo``: the ClientApp's node-data memo.
    """
    r, node, device = ctx.render, site.node, str(site.device)
    wanted = site.images_per_class
    if r.source == "generator":
        if GENERATORS not in state:
            log.warning("node %d: render.source='generator' but this node has no generators (generator.mode='off'); "
                        "no images rendered", node.partition_id)
            return {"images_rendered": 0}
        bank, _ = bank_from_records(state, source=f"node {node.partition_id} state")
        counts = {c: wanted for c in bank.classes if not r.classes or c in r.classes}
        x, y = bank.sample_dataset(counts, targets.class_names, seed=seeds.node_render_samples(site.seed, node.partition_id))
        row_classes = labels_to_classes(y, targets.class_names)
        per_class: dict[str, int] = {}
        sources = []
        for c in row_classes:
            per_class[c] = per_class.get(c, 0) + 1
            sources.append(f"generator:node{node.partition_id}#{per_class[c]}")
    elif not site.holds_audio:
        log.warning("node %d holds no audio: render.source='clips' has nothing to draw from (use 'generator'); no "
                    "images rendered", node.partition_id)
        return {"images_rendered": 0}
    else:
        test = load_node_data(data, site, cache_only=cache_only, memo=memo).splits["test"]
        x, y = test.embeddings, test.labels
        row_classes = labels_to_classes(y, targets.class_names)
        sources = [f"clip:{cid}" for cid in test.clip_ids]
    if not len(row_classes):
        log.warning("node %d: no embeddings to render from (source %s)", node.partition_id, r.source)
        return {"images_rendered": 0}
    cond = adapter_conditioning(adapters, x, device=device)
    out = images_dir(r, run_dir, node.image_dir, server_round)
    report = render_job(ctx, node.partition_id, cond, row_classes, sources, out, server_round, targets, device,
                        per_class=wanted)
    scores = score_owner(ctx, out, owner_name(node.partition_id), targets.class_names, device, server_round)
    return {"images_rendered": report.written, "images_skipped": report.skipped,
            "render_seconds": report.seconds, "render_images_per_s": report.images_per_s, **scores}
