"""A server round as a straight pipeline of named steps.

Two pipelines run each round (assembled once from the config by :func:`build_pipelines`):

* the **round** pipeline, inside ``Strategy.aggregate_train``, produces the next global adapters:
  aggregate adapters -> server generator -> distillation -> fine-tuning;
* the **after-round** pipeline, in Flower's per-round ``evaluate_fn`` hook (after the nodes have
  evaluated), does the side effects: checkpoint -> summary -> render.

A step is any object with a ``name`` and ``__call__(state)``; a step that a configuration does not
use is simply not in the list, so no step asks "am I on?" at run time.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from common.config import FedA2VConfig
from common.metrics.resources import memory_metrics, release_memory
from common.models.audio_encoder import embedding_shape
from common.models.generators import GeneratorSpec, GeneratorTrainSettings
from common.render.jobs import RenderContext, images_dir
from common.report.run_data import STEP_SECONDS_PREFIX
from server_app.aggregators import AGGREGATORS, Aggregator
from server_app.aggregators.step import AggregateStep
from server_app.checkpoint import CheckpointStep
from server_app.clip import ClipUpdatesStep
from server_app.finetune import FinetuneStep
from server_app.render import GlobalRenderer, RenderStep
from server_app.round_state import RoundState
from server_app.run_context import ServerRun
from server_app.server_generator import SERVER_GENERATORS, ServerGeneratorStep
from server_app.summary import RunSummary, SummaryStep
from server_app.synthetic import SAMPLE_SOURCES
from server_app.tensorboard import TensorBoardStep

log = logging.getLogger(__name__)


class Step(Protocol):
    name: str

    def __call__(self, state: RoundState) -> None:
        """Read and extend ``state`` (one job)."""
        ...


class Pipeline:
    def __init__(self, name: str, steps: Sequence[Step]) -> None:
        self.name = name
        self.steps = list(steps)

    @property
    def step_names(self) -> list[str]:
        return [s.name for s in self.steps]

    def __call__(self, state: RoundState) -> RoundState:
        """Run the steps in order; each step's seconds go into the round's metrics (``step_seconds_<name>``,
        up to the summary step for the after-round pipeline), and the server's memory after the round
        pipeline (``server_rss_mb``, ``server_peak_rss_mb``)."""
        for step in self.steps:
            t0 = time.perf_counter()
            step(state)
            seconds = time.perf_counter() - t0
            state.metrics[f"{STEP_SECONDS_PREFIX}{step.name}"] = round(seconds, 4)
            log.debug("round %d: %s step '%s' took %.2fs", state.server_round, self.name, step.name, seconds)
        if self.name == "round":
            release_memory()
            state.metrics.update(memory_metrics("server_"))
        return state


@dataclass
class RoundPipelines:
    aggregator: Aggregator
    round: Pipeline  # produces the round's global adapters (inside aggregate_train)
    after_round: Pipeline  # the round's side effects (Flower's evaluate_fn hook)
    server_generator: ServerGeneratorStep | None


def aggregation_method(aggregation: str, generate_only: bool) -> str:
    """The aggregator a run uses: ``aggregation``, or ``keep`` in generate-only runs (nobody trains)."""
    return "keep" if generate_only else aggregation


def build_pipelines(cfg: FedA2VConfig, run: ServerRun, summary: RunSummary) -> RoundPipelines:
    """The one place where the configuration decides which steps a round has, in which order."""
    samples = SAMPLE_SOURCES[cfg.sample_source()](run.class_names)
    method = aggregation_method(cfg.aggregation, cfg.generate_only)
    aggregator = AGGREGATORS[method](run, kd=cfg.kd, train=cfg.train, seed=cfg.seed, samples=samples,
                                     trim_fraction=cfg.robust.trim_fraction, privacy=cfg.privacy,
                                     fraction_train=cfg.fraction_train)
    steps: list[Step] = [AggregateStep(aggregator)]
    if cfg.robust.clip_norm != "off" and aggregator.global_model:
        steps.insert(0, ClipUpdatesStep(cfg.robust.clip_norm))
    server_generator = None
    if cfg.server_generator.mode != "off" and not cfg.generate_only:
        sg = cfg.server_generator
        gen = cfg.generator.model_copy(update={"kind": sg.kind})
        spec = GeneratorSpec.from_config(gen, *embedding_shape(cfg.audio_encoder))
        if sg.mode == "merge":
            merge = gen.model_copy(update={"epochs": sg.epochs, "batch_size": sg.batch_size, "lr": sg.lr, "min_steps": 0})
            server_generator = SERVER_GENERATORS["merge"](
                run, sg, spec, cfg.seed, functools.partial(GeneratorTrainSettings.from_config, merge)
            )
        else:
            server_generator = SERVER_GENERATORS["data-free"](run, sg, spec, cfg.seed, cfg.train.cosine_weight)
        steps.append(server_generator)
    steps += aggregator.extra_steps()
    if cfg.finetune.epochs > 0 and not cfg.generate_only:
        steps.append(FinetuneStep(run, cfg.finetune, cfg.train, cfg.seed, samples))
    after: list[Step] = [
        CheckpointStep(run, method, aggregator.global_model, cfg.checkpoint_every,
                       cfg.generator.checkpoint_base, cfg.server_generator.checkpoint_frequency, cfg.ema_decay),
        SummaryStep(summary),
    ]
    if aggregator.global_model and cfg.render.server and cfg.render.when != "off":
        renderer = GlobalRenderer(RenderContext.of(cfg), cfg.num_rounds, run.targets, run.template, run.run_dir, str(run.device))
        after.append(RenderStep(renderer, summary))
    if cfg.logging.tensorboard:
        after.append(TensorBoardStep(run.run_dir / "tensorboard",
                                     lambda r: images_dir(cfg.render, run.run_dir, server_round=r)))
    pipelines = RoundPipelines(aggregator, Pipeline("round", steps), Pipeline("after-round", after), server_generator)
    log.info("server round: %s; then %s", " -> ".join(pipelines.round.step_names),
             " -> ".join(pipelines.after_round.step_names))
    return pipelines
