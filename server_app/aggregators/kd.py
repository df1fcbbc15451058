"""Knowledge distillation: this round's node adapters teach the global adapters on synthetic embeddings.

The student (this round's FedAvg or the previous global, ``kd.student-init``) learns to reproduce,
on synthetic embeddings of every class, the owner-weighted outputs of the teachers
(:class:`~server_app.teachers.OwnerTeachers`) in **both** branches: CLIP pooled and the T5 sequence
(the earlier system distilled only CLIP and logged zero losses). The embeddings come from the
nodes' uploaded generators or the server generator (``kd.samples-from``), so distillation runs after
the server generator step. Per-branch losses are logged every epoch and kept per round.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import Tensor

from common.config import KDConfig, TrainConfig
from common.models.adapters import Adapters
from common.training import EarlyStop, TrainSettings, fit_adapters, match_loss
from server_app.adapter_training import AdapterTrainingStep
from server_app.aggregators.base import Aggregator, register
from server_app.aggregators.fedavg import fedavg
from server_app.round_state import RoundState
from server_app.run_context import ServerRun
from server_app.synthetic import SampleSource
from server_app.teachers import OwnerTeachers

log = logging.getLogger(__name__)


def distill(
    student: Adapters,
    teachers: OwnerTeachers,
    embeddings: Tensor,
    labels: Tensor,
    settings: TrainSettings,
    device: torch.device | str = "cpu",
    log_prefix: str = "kd ",
    patience: int = 0,
    holdout: float = 0.0,
) -> dict[str, list[float]]:
    """Train ``student`` toward the teachers' outputs on ``(embeddings, labels)``; per-epoch losses.

    With ``patience > 0`` a seeded ``holdout`` fraction of the samples is never trained on: training
    stops once the student's loss on it has not improved for ``patience`` epochs, and keeps the best
    epoch's weights (:class:`~common.training.EarlyStop`).
    """
    device = torch.device(device)
    teachers.to(device)
    embeddings, labels = embeddings.to(device).float(), labels.to(device)
    teacher = teachers.lookup(embeddings, labels)  # once per round: frozen teachers, fixed samples
    train_rows, held_rows = holdout_split(len(embeddings), holdout if patience > 0 else 0.0, settings.seed)

    def rows_loss(rows: Tensor) -> tuple[Tensor, Tensor]:
        rows = rows.to(device)
        t_clip, t_t5 = teacher(rows)
        s_clip, s_t5 = student(embeddings[rows])
        return match_loss(s_clip, t_clip, settings.cosine_weight), match_loss(s_t5, t_t5, settings.cosine_weight)

    def held_loss() -> float:
        batches = held_rows.split(settings.batch_size)
        return sum(float(sum(rows_loss(rows))) * len(rows) for rows in batches) / len(held_rows)

    stop = EarlyStop(held_loss, patience) if len(held_rows) else None
    return fit_adapters(student, len(train_rows), lambda idx: rows_loss(train_rows[idx]), settings, device,
                        log_prefix=log_prefix, early_stop=stop)


def holdout_split(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """``(train rows, held-out rows)`` of ``n`` rows: a seeded ``fraction`` held out (none when it would
    leave fewer than 2 rows on either side)."""
    k = int(round(n * fraction))
    if k < 2 or n - k < 2:
        return torch.arange(n), torch.arange(0)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[k:].sort().values, order[:k].sort().values


class DistillStep(AdapterTrainingStep):
    """The 'distillation' step: the round's global adapters become the distilled student."""

    name = "distillation"
    prefix = "kd"

    def start(self, state: RoundState) -> ArrayRecord | None:
        if self.section.student_init == "fedavg" or state.sent is None:
            if state.arrays is None:
                raise RuntimeError(f"round {state.server_round}: no student initialisation (FedAvg produced no weights)")
            return state.arrays
        return state.sent

    def fit(self, adapters: Adapters, teachers: OwnerTeachers, x: Tensor, y: Tensor, settings: TrainSettings,
            state: RoundState) -> dict[str, list[float]]:
        return distill(adapters, teachers, x, y, settings, self.run.device, log_prefix=f"round {state.server_round} kd ",
                       patience=self.section.patience, holdout=self.section.holdout)


@register
class KDAggregator(Aggregator):
    """FedAvg as the student's starting point, then distillation after the server generator step."""

    name = "kd"

    def __init__(self, run: ServerRun, *, kd: KDConfig, train: TrainConfig, seed: int, samples: SampleSource,
                 **_: Any) -> None:
        super().__init__(run)
        self.distill_step = DistillStep(run, kd, train, seed, samples)

    def aggregate(self, state: RoundState) -> ArrayRecord | None:
        return fedavg(state)

    def extra_steps(self) -> list[DistillStep]:
        return [self.distill_step]
