"""DP-SGD for the adapters: Poisson-sampled batches, each clip's gradient clipped, Gaussian noise, one step.

What is private here: every step's batch is a Poisson sample of the site's rows (each row independently
with probability ``sample_rate``) drawn from a secure generator, each row's gradient (both branches
together: one clip moves both) is clipped to ``max_grad_norm`` and noise of std ``noise_multiplier *
max_grad_norm`` is added to their sum. That is the subsampled Gaussian mechanism the accountant composes
(:class:`~common.privacy.accounting.Release`). How: Opacus' ghost clipping (the clipped gradient without
materialising per-sample gradients of the Linear layers, two backward passes) on a twin of the adapters
(:mod:`common.privacy.dp_adapters`), with one AdamW over both branches (their own learning rates as two
parameter groups).

Why the loop is not :func:`common.training.fit_adapters`: that loop shuffles with a generator seeded from the
run seed and takes fixed batches; here the number of steps is fixed in advance (the accountant's ``steps``)
and the batch sizes vary.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import Tensor

from common.models.adapters import Adapters
from common.privacy.accounting import Release
from common.privacy.dp_adapters import DPTwin
from common.privacy.secure import secure_generator
from common.seeds import seeded
from common.training import TrainSettings, adapter_losses

__all__ = ["DPSGDSettings", "train_adapters_dp"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPSGDSettings:
    """One round's DP-SGD: noise, clipping, and the sampling schedule the accountant is told about."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float  # Poisson rate q: the expected batch is q * rows
    steps: int

    @classmethod
    def schedule(cls, rows: int, batch_size: int, epochs: int, noise_multiplier: float, max_grad_norm: float
                 ) -> "DPSGDSettings":
        """``epochs`` passes of expected batches of ``batch_size`` over ``rows``: q = batch / rows (at most 1) and
        ``epochs * ceil(1 / q)`` steps."""
        if rows < 1:
            raise ValueError("no training embeddings: the node has no usable training clips")
        q = min(1.0, batch_size / rows)
        return cls(noise_multiplier, max_grad_norm, q, max(1, epochs * math.ceil(1.0 / q)))

    def release(self) -> Release:
        return Release("dp-sgd", self.noise_multiplier, self.sample_rate, self.steps)


def train_adapters_dp(
    adapters: Adapters,
    embeddings: Tensor,
    labels: Tensor,
    targets_clip: Tensor,
    targets_t5: Tensor,
    settings: TrainSettings,
    dp: DPSGDSettings,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Train ``adapters`` in place with DP-SGD; returns the mean losses of the last epoch's worth of steps."""
    device = torch.device(device)
    adapters.to(device)
    embeddings, labels = embeddings.to(device), labels.to(device)
    targets_clip, targets_t5 = targets_clip.to(device), targets_t5.to(device)
    twin = DPTwin(adapters).to(device).train()
    model = GradSampleModuleFastGradientClipping(twin, max_grad_norm=dp.max_grad_norm, use_ghost_clipping=True,
                                                 loss_reduction="mean")
    lrs = {"clip": settings.lr_clip, "t5": settings.lr_t5}
    groups = [{"params": params, "lr": lrs[name]} for name, params in twin.branch_parameters().items()]
    rows = len(embeddings)
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.AdamW(groups, weight_decay=settings.weight_decay), noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm, expected_batch_size=max(1, round(dp.sample_rate * rows)),
        generator=secure_generator(device), secure_mode=True, loss_reduction="mean")
    sampler = secure_generator("cpu")  # the batches, as secret as the noise
    per_epoch = max(1, math.ceil(1.0 / dp.sample_rate))
    sums = {"loss_clip": 0.0, "loss_t5": 0.0}
    seen = 0
    with seeded(settings.seed, device):  # dropout only: its draws need not be secret
        for step in range(dp.steps):
            idx = (torch.rand(rows, generator=sampler) < dp.sample_rate).nonzero().flatten().to(device)
            optimizer.zero_grad(set_to_none=True)
            if len(idx):
                out_clip, out_t5 = model(embeddings[idx].float())
                loss_clip, loss_t5 = adapter_losses(out_clip, out_t5, labels[idx], targets_clip, targets_t5, settings,
                                                    reduction="none")
                DPTensorFastGradientClipping(model, optimizer, loss_clip + loss_t5, "mean").backward()
                if step >= dp.steps - per_epoch:  # the last epoch's worth of steps: the reported losses
                    sums["loss_clip"] += float(loss_clip.detach().sum())
                    sums["loss_t5"] += float(loss_t5.detach().sum())
                    seen += len(idx)
            else:  # an empty Poisson batch is still a step: noise only
                for p in twin.parameters():
                    p.grad = torch.zeros_like(p)
            optimizer.step()
    model.remove_hooks()  # the twin shares its layers with the adapters: leave them as they were
    for p in twin.parameters():
        for attr in ("grad_sample", "_norm_sample", "summed_grad"):
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None
    twin.copy_to(adapters)
    adapters.eval()
    metrics = {k: v / max(seen, 1) for k, v in sums.items()}
    if not all(math.isfinite(v) for v in metrics.values()):
        raise FloatingPointError(f"DP adapter training diverged: {metrics}")
    metrics["loss"] = metrics["loss_clip"] + metrics["loss_t5"]
    return metrics
