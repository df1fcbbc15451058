"""What the server's adapter-training steps (distillation, fine-tuning) share: one round of training
the global adapters on synthetic embeddings against this round's teachers.

Each such step says where its model starts (:meth:`AdapterTrainingStep.start`) and how it trains
(:meth:`AdapterTrainingStep.fit`); this base draws the synthetic samples, builds the settings from
the step's own section (epochs, batch size, learning rate) and ``train``'s loss weights, stores the
per-epoch losses and puts the trained weights back on the round state.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from flwr.app import ArrayRecord
from torch import Tensor

from common import seeds
from common.config import TrainConfig
from common.models.adapters import Adapters
from common.records import module_to_arrays
from common.training import TrainSettings
from server_app.round_state import RoundState
from server_app.run_context import ServerRun
from server_app.synthetic import SampleSource
from server_app.teachers import OwnerTeachers

log = logging.getLogger(__name__)


def loss_metrics(history: dict[str, list[float]], prefix: str) -> dict[str, float]:
    """Last-epoch losses of a server training step as round metrics (``kd_loss_clip``, ``kd_loss``, ``kd_epochs``,
    and ``kd_holdout`` when it stopped early on held-out samples)."""
    out = {f"{prefix}_{k}": float(v[-1]) for k, v in history.items() if v}
    out[f"{prefix}_loss"] = sum(out.get(f"{prefix}_{k}", 0.0) for k in ("loss_clip", "loss_t5"))
    out[f"{prefix}_epochs"] = float(len(history.get("loss_clip", [])))
    return out


class AdapterTrainingStep:
    name = ""
    prefix = ""  # of its metrics and its key in the round's histories

    def __init__(self, run: ServerRun, section, train: TrainConfig, seed: int, samples: SampleSource) -> None:
        """``section``: the step's config section (``epochs``, ``batch_size``, ``lr``, ``samples_per_class``,
        ``precision``)."""
        self.run, self.section, self.train, self.seed, self.samples = run, section, train, seed, samples

    def start(self, state: RoundState) -> ArrayRecord | None:
        """The weights training starts from (``None``: skip the step this round)."""
        raise NotImplementedError

    def fit(self, adapters: Adapters, teachers: OwnerTeachers, x: Tensor, y: Tensor, settings: TrainSettings,
            state: RoundState) -> dict[str, list[float]]:
        raise NotImplementedError

    def __call__(self, state: RoundState) -> None:
        teachers = state.teachers(self.run)
        if not teachers.node_ids:
            log.warning("round %d: no teacher (no node sent adapters and class means): %s skipped",
                        state.server_round, self.name)
            return
        init = self.start(state)
        if init is None:
            log.warning("round %d: no global adapters to start from: %s skipped", state.server_round, self.name)
            return
        seed = seeds.server_round(self.seed, state.server_round)
        x, y = self.samples.draw(state, self.section.samples_per_class, seed)
        s = self.section
        settings = replace(TrainSettings.from_config(self.train, seed), epochs=s.epochs, batch_size=s.batch_size,
                           lr_clip=s.lr, lr_t5=s.lr, proximal_mu=0.0, precision=s.precision)  # FedProx is a node-side term
        adapters = self.run.adapters(init)
        t0 = time.perf_counter()
        history = self.fit(adapters, teachers, x, y, settings, state)
        state.metrics[f"{self.prefix}_seconds"] = time.perf_counter() - t0
        state.histories[self.prefix] = history
        state.metrics.update(loss_metrics(history, self.prefix))
        state.metrics[f"{self.prefix}_samples"] = float(len(y))
        state.arrays = module_to_arrays(adapters)
