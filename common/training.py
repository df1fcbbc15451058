"""Adapter training, evaluation and class-mean outputs: one implementation for every caller.

The ClientApp, the centralized baseline (``bench/fed_vs_central.py``), the server's knowledge
distillation and its fine-tuning all train the same adapters, so the loop (:func:`fit_adapters`)
and the losses live here once.

Targets are **per sample**: a batch's targets are ``targets[labels]``, so a mixed-class batch trains
every clip toward its own class (the earlier code base trained all clips of a batch toward the
first clip's class). Nothing that crosses a round keeps an autograd graph: metrics are Python
floats, class means are accumulated under ``torch.no_grad`` (the earlier code leaked memory with every
batch that way).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.config import Precision
from common.seeds import seeded

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    """The subset of the config the loop needs (keeps this module free of config parsing).

    No field has a default: the values come from the ``train`` section (:meth:`from_config`), or,
    for the server's KD and fine-tuning, from their own sections with ``train``'s loss weights.
    """

    epochs: int
    batch_size: int
    lr_clip: float
    lr_t5: float
    weight_decay: float
    cosine_weight: float
    contrastive_weight: float
    temperature: float
    proximal_mu: float  # FedProx; 0 for the server's own training
    seed: int
    precision: str  # "fp32", "bf16" (forward passes under bfloat16 autocast; fp32 weights), "auto" (bf16 where fast)

    @classmethod
    def from_config(cls, train_cfg, seed: int) -> "TrainSettings":
        """From a :class:`~common.config.TrainConfig` section (``local-epochs`` -> ``epochs``)."""
        return cls(
            epochs=train_cfg.local_epochs,
            batch_size=train_cfg.batch_size,
            lr_clip=train_cfg.lr_clip,
            lr_t5=train_cfg.lr_t5,
            weight_decay=train_cfg.weight_decay,
            cosine_weight=train_cfg.cosine_weight,
            contrastive_weight=train_cfg.contrastive_weight,
            temperature=train_cfg.temperature,
            proximal_mu=train_cfg.proximal_mu,
            seed=seed,
            precision=train_cfg.precision,
        )


PRECISIONS = get_args(Precision)


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` has bfloat16 matmul units (a CUDA GPU that supports bf16; a CPU with AVX512-BF16
    or AMX). Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        except AttributeError:  # a torch without these probes: assume none
            return False
    return False


def precision_context(precision: str, device: torch.device) -> torch.autocast:
    """The autocast context of a training forward pass: bfloat16 matmuls for ``"bf16"`` (and for ``"auto"``
    where :func:`fast_bf16`), none for ``"fp32"``.

    Why: the adapters' wide output projections make a training step matmul-bound; on CPUs with
    bfloat16 units and on GPUs bf16 autocast nearly halves a step's time, while weights, gradients
    and optimiser state stay fp32 (``bench/aggregation.py`` measures the accuracy effect).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    bf16 = precision == "bf16" or (precision == "auto" and fast_bf16(device))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def match_loss(pred: Tensor, target: Tensor, cosine_weight: float, reduction: str = "mean") -> Tensor:
    """MSE plus ``cosine_weight * (1 - cos)`` (cosine over the flattened output, as in retrieval); per sample
    with ``reduction="none"`` (DP-SGD clips each clip's gradient), else their mean."""
    flat_pred, flat_target = pred.flatten(1), target.flatten(1)
    loss = (flat_pred - flat_target).pow(2).mean(1)
    if cosine_weight:
        cos = (F.normalize(flat_pred, dim=1) * F.normalize(flat_target, dim=1)).sum(1)
        loss = loss + cosine_weight * (1.0 - cos)
    return loss.mean() if reduction == "mean" else loss


def branch_loss(
    pred: Tensor,
    labels: Tensor,
    class_targets: Tensor,
    cosine_weight: float,
    contrastive_weight: float,
    temperature: float,
    reduction: str = "mean",
) -> Tensor:
    """Regression to the own class target plus an optional class-contrastive term.

    * MSE to the sample's own class target (``class_targets[labels]``: per-sample targets);
    * ``cosine_weight * (1 - cos)``, cosine over the flattened output as in retrieval;
    * ``contrastive_weight * CE(cos(pred, every class target) / temperature, label)``.

    Every term is a mean over the batch of per-sample terms: ``reduction="none"`` returns them.

    Why the contrastive term: text embeddings of "a photo of a dog" and "a photo of a siren" share
    most of their structure (mean off-diagonal cosine ~0.86 for the tiny encoders, higher for real
    T5), so plain regression first learns the shared mean and only slowly the class-specific
    part that decides which picture FLUX draws. Contrasting against the other classes' targets,
    which every node receives anyway, puts the gradient on exactly that part.
    """
    loss = match_loss(pred, class_targets[labels], cosine_weight, reduction="none")
    if contrastive_weight:
        flat = F.normalize(pred.flatten(1), dim=1)
        logits = flat @ F.normalize(class_targets.flatten(1), dim=1).T / temperature
        loss = loss + contrastive_weight * F.cross_entropy(logits, labels, reduction="none")
    return loss.mean() if reduction == "mean" else loss


def adapter_losses(
    out_clip: Tensor, out_t5: Tensor, labels: Tensor, targets_clip: Tensor, targets_t5: Tensor, s: "TrainSettings",
    reduction: str = "mean",
) -> tuple[Tensor, Tensor]:
    """Both branches' losses with the configured weights (one definition for train, eval and DP-SGD)."""
    return (
        branch_loss(out_clip, labels, targets_clip, s.cosine_weight, s.contrastive_weight, s.temperature, reduction),
        branch_loss(out_t5, labels, targets_t5, s.cosine_weight, s.contrastive_weight, s.temperature, reduction),
    )


def make_optimizers(adapters: nn.Module, settings: TrainSettings) -> dict[str, torch.optim.Optimizer]:
    """One AdamW per branch so the two output spaces can use different learning rates."""
    lrs = {"clip": settings.lr_clip, "t5": settings.lr_t5}
    return {
        name: torch.optim.AdamW(params, lr=lrs[name], weight_decay=settings.weight_decay)
        for name, params in adapters.branch_parameters().items()
    }


BatchLoss = Callable[[Tensor], tuple[Tensor, Tensor]]  # batch row indices -> (loss_clip, loss_t5)


@dataclass
class EarlyStop:
    """Stop training once the held-out loss stopped improving, and keep the best epoch's weights.

    Why: the server's distillation runs a fixed number of epochs every round, although its student
    starts next to the answer (this round's FedAvg or the previous global) and its loss flattens
    after a few epochs (measured: most of a KD round's seconds bought nothing). ``holdout_loss()``
    scores the model on rows it never trains on; after ``patience`` epochs without a relative
    improvement of ``min_delta`` the loop stops and the best epoch's weights are put back.
    """

    holdout_loss: Callable[[], float]
    patience: int
    min_delta: float = 0.01


def fit_adapters(
    adapters: nn.Module,
    n: int,
    batch_loss: BatchLoss,
    settings: TrainSettings,
    device: torch.device | str = "cpu",
    log_prefix: str = "",
    early_stop: EarlyStop | None = None,
) -> dict[str, list[float]]:
    """The one optimisation loop (local training, KD, fine-tuning): both branches, one AdamW each.

    ``batch_loss(idx)`` returns the two branch losses of the rows ``idx`` of whatever the caller
    trains on; the loop shuffles, batches, steps and records per-epoch mean losses
    (``loss_clip``, ``loss_t5`` lists; with ``early_stop`` also ``holdout`` and at most
    ``settings.epochs`` epochs). With ``log_prefix`` every epoch is logged at INFO.
    """
    if n == 0:
        raise ValueError("no training embeddings: the node has no usable training clips")
    device = torch.device(device)
    adapters.to(device).train()
    # Dropout draws from the global RNG: seed it with settings.seed in a fork, so a run is
    # reproducible on its own and the caller's RNG is left as it was.
    with seeded(settings.seed, device):
        history = _fit_loop(adapters, n, batch_loss, settings, log_prefix, early_stop)
    last = [h[-1] for h in history.values() if h]
    if not all(math.isfinite(v) for v in last):
        raise FloatingPointError(f"adapter training diverged: {dict(zip(history, last))}")
    adapters.eval()
    return history


class _Best:
    """The lowest held-out loss so far and its weights (a CPU copy); the epochs since the loss last
    improved by ``min_delta`` (relative) decide when to stop."""

    def __init__(self, stop: EarlyStop) -> None:
        self.stop, self.loss, self.ref, self.state, self.waited, self.epoch = stop, math.inf, math.inf, None, 0, 0

    def update(self, model: nn.Module, epoch: int) -> tuple[float, bool]:
        """Score ``model``; returns (held-out loss, whether to stop)."""
        model.eval()
        with torch.no_grad():
            loss = float(self.stop.holdout_loss())
        model.train()
        if loss < self.loss or self.state is None:
            self.loss, self.epoch = loss, epoch
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if loss < self.ref * (1.0 - self.stop.min_delta):
            self.ref, self.waited = loss, 0
        else:
            self.waited += 1
        return loss, self.waited >= self.stop.patience


def _fit_loop(
    adapters: nn.Module, n: int, batch_loss: BatchLoss, settings: TrainSettings, log_prefix: str,
    early_stop: EarlyStop | None = None,
) -> dict[str, list[float]]:
    optimizers = make_optimizers(adapters, settings)
    generator = torch.Generator().manual_seed(settings.seed)
    history: dict[str, list[float]] = {"loss_clip": [], "loss_t5": []}
    best = _Best(early_stop) if early_stop is not None and early_stop.patience > 0 else None
    if best is not None:
        history["holdout"] = []
    level = logging.INFO if log_prefix else logging.DEBUG
    autocast = precision_context(settings.precision, next(adapters.parameters()).device)
    for epoch in range(settings.epochs):
        order = torch.randperm(n, generator=generator)
        sums = {"loss_clip": 0.0, "loss_t5": 0.0}
        for start in range(0, n, settings.batch_size):
            idx = order[start : start + settings.batch_size]
            with autocast:
                loss_clip, loss_t5 = batch_loss(idx)
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            (loss_clip + loss_t5).backward()
            for opt in optimizers.values():
                opt.step()
            sums["loss_clip"] += loss_clip.item() * len(idx)
            sums["loss_t5"] += loss_t5.item() * len(idx)
        for key, value in sums.items():
            history[key].append(value / n)
        log.log(level, "%sepoch %d/%d: loss clip %.4f t5 %.4f", log_prefix, epoch + 1, settings.epochs,
                history["loss_clip"][-1], history["loss_t5"][-1])
        if best is not None:
            held, stop = best.update(adapters, epoch)
            history["holdout"].append(held)
            if stop:
                log.log(level, "%sheld-out loss %.4f: no gain for %d epochs, stopped after epoch %d (best: epoch %d)",
                        log_prefix, held, best.stop.patience, epoch + 1, best.epoch + 1)
                break
    if best is not None and best.state is not None and best.epoch != len(history["loss_clip"]) - 1:
        adapters.load_state_dict(best.state)
    return history


def train_adapters(
    adapters: nn.Module,
    embeddings: Tensor,
    labels: Tensor,
    targets_clip: Tensor,
    targets_t5: Tensor,
    settings: TrainSettings,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Train both branches toward the class text targets; returns last-epoch mean losses.

    With ``settings.proximal_mu > 0`` (FedProx) each branch's loss also has ``mu/2 * ||w - w_0||^2``,
    ``w_0`` being the weights training started from (the round's global adapters)."""
    device = torch.device(device)
    targets_clip, targets_t5 = targets_clip.to(device), targets_t5.to(device)
    adapters.to(device)
    branches = adapters.branch_parameters()
    anchor = ({name: [p.detach().clone() for p in params] for name, params in branches.items()}
              if settings.proximal_mu > 0 else None)

    def proximal(name: str) -> Tensor:
        return 0.5 * settings.proximal_mu * sum((p - a).pow(2).sum() for p, a in zip(branches[name], anchor[name]))

    def batch_loss(idx: Tensor) -> tuple[Tensor, Tensor]:
        out_clip, out_t5 = adapters(embeddings[idx].to(device, non_blocking=True).float())
        loss_clip, loss_t5 = adapter_losses(out_clip, out_t5, labels[idx].to(device), targets_clip, targets_t5, settings)
        if anchor is None:
            return loss_clip, loss_t5
        return loss_clip + proximal("clip"), loss_t5 + proximal("t5")

    history = fit_adapters(adapters, len(embeddings), batch_loss, settings, device)
    metrics = {k: v[-1] for k, v in history.items()}
    metrics["loss"] = metrics["loss_clip"] + metrics["loss_t5"]
    return metrics


@torch.no_grad()
def predict(adapters: nn.Module, embeddings: Tensor, batch_size: int = 256, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Adapter outputs for all embeddings (CPU tensors, no graph)."""
    device = torch.device(device)
    adapters.to(device).eval()
    clips, t5s = [], []
    for start in range(0, len(embeddings), batch_size):
        out_clip, out_t5 = adapters(embeddings[start : start + batch_size].to(device).float())
        clips.append(out_clip.float().cpu())
        t5s.append(out_t5.float().cpu())
    if not clips:
        return torch.empty(0), torch.empty(0)
    return torch.cat(clips), torch.cat(t5s)


def cosine_to_targets(outputs: Tensor, class_targets: Tensor) -> Tensor:
    """``[N, C]`` cosine of each output to each class's target, both flattened (a T5 row is its whole sequence)."""
    out = F.normalize(outputs.flatten(1).float(), dim=1)
    tgt = F.normalize(class_targets.flatten(1).float(), dim=1)
    return out @ tgt.T


def retrieval_correct(outputs: Tensor, class_targets: Tensor, labels: Tensor) -> Tensor:
    """Per-sample top-1 hits: is the own class's target the most cosine-similar one?"""
    return cosine_to_targets(outputs, class_targets).argmax(dim=1) == labels


def class_similarity(out_clip: Tensor, out_t5: Tensor, targets_clip: Tensor, targets_t5: Tensor) -> Tensor:
    """``[N, C]`` similarity of each clip to each class over both branches: the mean of the two cosines.

    The one definition of a clip's *nearest class* (``feda2v imagine``, the pipeline, the local page) and of
    the joint retrieval accuracy ``retrieval_acc_joint``: one class per clip, chosen by both branches
    together (the per-branch accuracies let each branch pick its own)."""
    return (cosine_to_targets(out_clip, targets_clip) + cosine_to_targets(out_t5, targets_t5)) / 2


@torch.no_grad()
def evaluate_adapters(
    adapters: nn.Module,
    embeddings: Tensor,
    labels: Tensor,
    targets_clip: Tensor,
    targets_t5: Tensor,
    settings: TrainSettings,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Losses and class-retrieval accuracy (per branch and their mean) over all federation classes."""
    if len(embeddings) == 0:
        return {}
    out_clip, out_t5 = predict(adapters, embeddings, batch_size, device)
    loss_clip_t, loss_t5_t = adapter_losses(out_clip, out_t5, labels, targets_clip, targets_t5, settings)
    loss_clip, loss_t5 = loss_clip_t.item(), loss_t5_t.item()
    acc_clip = retrieval_correct(out_clip, targets_clip, labels).float().mean().item()
    acc_t5 = retrieval_correct(out_t5, targets_t5, labels).float().mean().item()
    joint = class_similarity(out_clip, out_t5, targets_clip, targets_t5).argmax(dim=1) == labels
    return {
        "loss": loss_clip + loss_t5,
        "loss_clip": loss_clip,
        "loss_t5": loss_t5,
        "retrieval_acc_clip": acc_clip,
        "retrieval_acc_t5": acc_t5,
        "retrieval_acc": (acc_clip + acc_t5) / 2,
        "retrieval_acc_joint": joint.float().mean().item(),
    }


@torch.no_grad()
def class_mean_outputs(
    adapters: nn.Module,
    embeddings: Tensor,
    labels: Tensor,
    num_classes: int,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class mean adapter outputs and counts: ``clip [C, Dc]``, ``t5 [C, n, Dt]``, ``counts [C]``.

    Only means and counts leave a node: never per-clip outputs.
    """
    out_clip, out_t5 = predict(adapters, embeddings, device=device)
    counts = torch.bincount(labels, minlength=num_classes)
    clip_sum = torch.zeros(num_classes, out_clip.shape[1]).index_add_(0, labels, out_clip)
    t5_sum = torch.zeros(num_classes, *out_t5.shape[1:]).index_add_(0, labels, out_t5)
    denom = counts.clamp(min=1).float()
    return clip_sum / denom[:, None], t5_sum / denom[:, None, None], counts
