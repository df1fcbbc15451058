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
from dataclasses import replace

import torch
from flwr.app import ArrayRecord
from torch import Tensor

from common import seeds
from common.config import KDConfig, TrainConfig
from common.models.adapters import Adapters
from common.records import module_to_arrays
from common.training import TrainSettings, fit_adapters, match_loss
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
) -> dict[str, list[float]]:
    """Train ``student`` toward the teachers' outputs on ``(embeddings, labels)``; per-epoch losses."""
    device = torch.device(device)
    teachers.to(device)

    def batch_loss(idx: Tensor) -> tuple[Tensor, Tensor]:
        x = embeddings[idx].to(device).float()
        y = labels[idx].to(device)
        with torch.no_grad():
            t_clip, t_t5 = teachers.outputs(x, y)
        s_clip, s_t5 = student(x)
        return match_loss(s_clip, t_clip, settings.cosine_weight), match_loss(s_t5, t_t5, settings.cosine_weight)

    return fit_adapters(student, len(embeddings), batch_loss, settings, device, log_prefix=log_prefix)


def loss_metrics(history: dict[str, list[float]], prefix: str) -> dict[str, float]:
    """Last-epoch losses of a server training step as round metrics (``kd_loss_clip``, ``kd_loss``, ``kd_epochs``)."""
    out = {f"{prefix}_{k}": float(v[-1]) for k, v in history.items() if v}
    out[f"{prefix}_loss"] = sum(out.values())
    out[f"{prefix}_epochs"] = float(len(next(iter(history.values()), [])))
    return out


class DistillStep:
    """The 'distillation' step: replaces the round's global adapters by the distilled student."""

    name = "distillation"

    def __init__(self, run: ServerRun, kd: KDConfig, train: TrainConfig, seed: int, samples: SampleSource) -> None:
        self.run, self.kd, self.train, self.seed, self.samples = run, kd, train, seed, samples

    def __call__(self, state: RoundState) -> None:
        teachers = state.teachers(self.run)
        if not teachers.node_ids:
            log.warning("round %d: no teacher (no node sent adapters and class means): distillation skipped",
                        state.server_round)
            return
        init = state.arrays if self.kd.student_init == "fedavg" or state.sent is None else state.sent
        if init is None:
            raise RuntimeError(f"round {state.server_round}: no student initialisation (FedAvg produced no weights)")
        seed = seeds.server_round(self.seed, state.server_round)
        x, y = self.samples.draw(state, self.kd.samples_per_class, seed)
        settings = replace(TrainSettings.from_config(self.train, seed), epochs=self.kd.epochs,
                           batch_size=self.kd.batch_size, lr_clip=self.kd.lr, lr_t5=self.kd.lr)
        student = self.run.adapters(init)
        history = distill(student, teachers, x, y, settings, self.run.device, log_prefix=f"round {state.server_round} kd ")
        state.histories["kd"] = history
        state.metrics.update(loss_metrics(history, "kd"))
        state.metrics["kd_samples"] = float(len(y))
        state.arrays = module_to_arrays(student)


@register
class KDAggregator(Aggregator):
    """FedAvg as the student's starting point, then distillation after the server generator step."""

    name = "kd"

    def __init__(self, run: ServerRun, *, kd: KDConfig, train: TrainConfig, seed: int, samples: SampleSource) -> None:
        super().__init__(run)
        self.distill_step = DistillStep(run, kd, train, seed, samples)

    def aggregate(self, state: RoundState) -> ArrayRecord | None:
        return fedavg(state)

    def extra_steps(self) -> list[DistillStep]:
        return [self.distill_step]
