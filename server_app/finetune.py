"""Fine-tuning of the global adapters on the server, on synthetic embeddings, with real anchors.

Targets (``finetune.target``): the class text targets (the nodes' own loss: regression, cosine and
class-contrastive terms), the owner-weighted teacher outputs, or both. The anchor term keeps each
class's mean output on the synthetic batch near the count-weighted mean output the clients
reported on their *real* clips, so fitting generated embeddings cannot drift the adapters away from
what real audio produces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord
from torch import Tensor

from common.models.adapters import Adapters
from common.records import ClassTensors
from common.training import TrainSettings, adapter_losses, fit_adapters, match_loss
from server_app.adapter_training import AdapterTrainingStep
from server_app.round_state import RoundState
from server_app.teachers import OwnerTeachers


def anchor_loss(out: Tensor, labels: Tensor, anchors: Tensor, has_anchor: Tensor) -> Tensor:
    """MSE between each anchored class's batch-mean output and its anchor (0 if none in the batch)."""
    classes = labels.unique()
    classes = classes[has_anchor[classes]]
    if not len(classes):
        return out.sum() * 0.0
    means = torch.stack([out[labels == c].mean(0) for c in classes.tolist()])
    return F.mse_loss(means, anchors[classes])


def finetune(
    adapters: Adapters,
    embeddings: Tensor,
    labels: Tensor,
    targets: ClassTensors,
    settings: TrainSettings,
    target: str = "text",
    anchors: ClassTensors | None = None,
    anchor_weight: float = 0.0,
    teachers: OwnerTeachers | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Fine-tune ``adapters`` in place; per-epoch per-branch losses (anchor term included)."""
    if target not in ("text", "teacher", "both"):
        raise ValueError(f"finetune target must be 'text', 'teacher' or 'both', got {target!r}")
    if target != "text" and teachers is None:
        raise ValueError(f"finetune target {target!r} needs teachers (this round's node adapters)")
    device = torch.device(device)
    t_clip, t_t5 = targets.clip.to(device), targets.t5.to(device)
    index = {c: i for i, c in enumerate(targets.class_names)}
    a_clip = torch.zeros_like(t_clip)
    a_t5 = torch.zeros_like(t_t5)
    has = torch.zeros(len(index), dtype=torch.bool, device=device)
    if anchors is not None and anchor_weight > 0:
        for row, name in enumerate(anchors.class_names):
            a_clip[index[name]] = anchors.clip[row].to(device)
            a_t5[index[name]] = anchors.t5[row].to(device)
            has[index[name]] = True
    embeddings, labels = embeddings.to(device).float(), labels.to(device)
    teacher = None
    if target in ("teacher", "both"):
        teacher = teachers.to(device).lookup(embeddings, labels)  # type: ignore[union-attr]

    def batch_loss(idx: Tensor) -> tuple[Tensor, Tensor]:
        idx = idx.to(device)
        x, y = embeddings[idx], labels[idx]
        out_clip, out_t5 = adapters(x)
        loss_clip = out_clip.sum() * 0.0
        loss_t5 = out_t5.sum() * 0.0
        if target in ("text", "both"):
            lc, lt = adapter_losses(out_clip, out_t5, y, t_clip, t_t5, settings)
            loss_clip, loss_t5 = loss_clip + lc, loss_t5 + lt
        if teacher is not None:
            tc, tt = teacher(idx)
            loss_clip = loss_clip + match_loss(out_clip, tc, settings.cosine_weight)
            loss_t5 = loss_t5 + match_loss(out_t5, tt, settings.cosine_weight)
        if anchor_weight > 0 and bool(has.any()):
            loss_clip = loss_clip + anchor_weight * anchor_loss(out_clip, y, a_clip, has)
            loss_t5 = loss_t5 + anchor_weight * anchor_loss(out_t5, y, a_t5, has)
        return loss_clip, loss_t5

    return fit_adapters(adapters, len(embeddings), batch_loss, settings, device, log_prefix="finetune ")


class FinetuneStep(AdapterTrainingStep):
    """The 'fine-tuning' step: the round's global adapters, fine-tuned, replace them."""

    name = "fine-tuning"
    prefix = "finetune"

    def start(self, state: RoundState) -> ArrayRecord | None:
        return state.arrays

    def fit(self, adapters: Adapters, teachers: OwnerTeachers, x: Tensor, y: Tensor, settings: TrainSettings,
            state: RoundState) -> dict[str, list[float]]:
        ft = self.section
        return finetune(adapters, x, y, self.run.targets, settings, target=ft.target, anchors=state.global_means,
                        anchor_weight=ft.anchor_weight, teachers=teachers if ft.target != "text" else None,
                        device=self.run.device)
