"""The server's global images: what the federation as a whole draws for each class.

With a server generator, the global adapters map its samples of each class to conditioning (source
``server-generator#i``); otherwise each class is drawn from the count-weighted mean adapter output
the nodes reported for it (source ``class-mean``; ``images-per-class`` seeds of the same
conditioning). Images go to ``{image dir}/server/`` with the same manifest and contact sheet as the
nodes'.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from common import seeds
from common.generator_bank import GeneratorBank
from common.models.adapters import Adapters
from common.records import ClassTensors, arrays_to_module
from common.render.conditioning import adapter_conditioning, outputs_conditioning
from common.render.jobs import RenderContext, images_dir, labels_to_classes, render_job, score_owner
from server_app.round_state import RoundState
from server_app.summary import RunSummary

log = logging.getLogger(__name__)


class GlobalRenderer:
    """Renders the round's global images when ``render.when`` says so (``render.server`` on)."""

    def __init__(self, ctx: RenderContext, num_rounds: int, targets: ClassTensors, template: Adapters, run_dir: Path,
                 device: str) -> None:
        self.ctx = ctx
        self.num_rounds = num_rounds
        self.targets = targets
        self.template = template
        self.run_dir = Path(run_dir)
        self.device = device

    def due(self, server_round: int) -> bool:
        return self.ctx.render.server and self.ctx.render.due(server_round, self.num_rounds)

    def __call__(
        self, server_round: int, arrays: ArrayRecord | None, class_means: ClassTensors | None, bank: GeneratorBank | None
    ) -> dict[str, Any]:
        per_class = self.ctx.render.images_per_class
        names = self.targets.class_names
        if bank is not None and arrays is not None:
            adapters = arrays_to_module(arrays, copy.deepcopy(self.template))
            x, y = bank.sample_dataset({c: per_class for c in bank.classes}, names, seed=seeds.server_render_samples(self.ctx.seed, server_round))
            cond = adapter_conditioning(adapters, x, device=self.device)
            row_classes = labels_to_classes(y, names)
            sources = [f"server-generator#{i + 1}" for i in range(len(row_classes))]
        elif class_means is not None and len(class_means.class_names):
            reps = torch.arange(len(class_means.class_names)).repeat_interleave(per_class)
            cond = outputs_conditioning(class_means.clip[reps], class_means.t5[reps])
            row_classes = [class_means.class_names[i] for i in reps.tolist()]
            sources = ["class-mean"] * len(row_classes)
        else:
            log.warning("round %d: no class means and no server generator: no global images", server_round)
            return {}
        out = images_dir(self.ctx.render, self.run_dir, server_round=server_round)
        report = render_job(self.ctx, None, cond, row_classes, sources, out, server_round, self.targets, self.device)
        scores = score_owner(self.ctx, out, "server", names, self.device, server_round)
        return {"server_images_rendered": float(report.written), "server_render_seconds": report.seconds,
                **{f"server_{k}": v for k, v in scores.items()}}


class RenderStep:
    """The 'render' step, last of a round: global images once the round is safely on disk."""

    name = "render"

    def __init__(self, renderer: GlobalRenderer, summary: RunSummary) -> None:
        self.renderer = renderer
        self.summary = summary

    def __call__(self, state: RoundState) -> None:
        if not self.renderer.due(state.server_round):
            return
        state.render_metrics = self.renderer(state.server_round, state.arrays, state.global_means, state.server_bank)
        self.summary.set(state.server_round, "render", state.render_metrics)
