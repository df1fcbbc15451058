"""Knowledge distillation of this round's node adapters into the global adapters.

The student (this round's FedAvg or the previous global, ``kd.student-init``) learns to reproduce,
on synthetic embeddings of every class, the owner-weighted outputs of the teachers
(:class:`~server_app.teachers.OwnerTeachers`) in **both** branches: CLIP pooled and the T5 sequence
(the earlier system distilled only CLIP and logged zero losses). Per-branch losses are logged every
epoch and returned per epoch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from common.models.adapters import Adapters
from common.training import TrainSettings, fit_adapters, match_loss
from server_app.teachers import OwnerTeachers


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
