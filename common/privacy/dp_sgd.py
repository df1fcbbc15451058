"""DP-SGD for the adapters: Poisson-sampled batches, each clip's gradient clipped, Gaussian noise, one step.

What is private here: every step's batch is a Poisson sample of the site's rows (each row independently
with probability ``sample_rate``) drawn from a secure generator, each row's gradient (both branches
together: one clip moves both) is clipped to ``max_grad_norm`` and noise of std ``noise_multiplier *
max_grad_norm`` is added to their sum. That is the subsampled Gaussian mechanism the accountant composes
(:class:`~common.privacy.accounting.Release`). How: Opacus on a twin of the adapters
(:mod:`common.privacy.dp_adapters`), with one AdamW over both branches (their own learning rates as two
parameter groups), in one of two modes chosen by size (:func:`clipping_mode`):

* ``per-sample``: every clip's gradient materialised by Opacus' hooks in the one backward pass, then
  clipped: the faster mode while ``batch x weights`` fits :data:`PER_SAMPLE_BUDGET` (small adapters);
* ``ghost``: ghost clipping, the clipped gradient without materialising per-sample gradients of the
  Linear layers, at the price of a second backward pass: memory that does not grow with the batch, for
  large adapters (the default ``hidden-dim = 512`` has 13.8 M weights).

Both compute the same clipped, noised sum (tested against each other), so the guarantee is the same.

Why the loop is not :func:`common.training.fit_adapters`: that loop shuffles with a generator seeded from the
run seed and takes fixed batches; here the number of steps is fixed in advance (the accountant's ``steps``)
and the batch sizes vary.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import torch
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import Tensor

from common.models.adapters import Adapters
from common.privacy.accounting import Release
from common.privacy.dp_adapters import DPTwin
from common.privacy.secure import secure_generator
from common.seeds import seeded
from common.training import TrainSettings, adapter_losses

__all__ = ["PER_SAMPLE_BUDGET", "DPSGDSettings", "clipping_mode", "train_adapters_dp"]

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


PER_SAMPLE_BUDGET = 64 * 2**20  # per-sample gradient values one step may hold in per-sample mode (256 MiB in float32)


def clipping_mode(num_weights: int, expected_batch: int) -> str:
    """``per-sample`` when twice the expected Poisson batch times the trained weights fits
    :data:`PER_SAMPLE_BUDGET`, else ``ghost``."""
    return "per-sample" if 2 * max(expected_batch, 1) * num_weights <= PER_SAMPLE_BUDGET else "ghost"


def train_adapters_dp(
    adapters: Adapters,
    embeddings: Tensor,
    labels: Tensor,
    targets_clip: Tensor,
    targets_t5: Tensor,
    settings: TrainSettings,
    dp: DPSGDSettings,
    device: torch.device | str = "cpu",
    mode: str = "auto",
) -> dict[str, float]:
    """Train ``adapters`` in place with DP-SGD; returns the mean losses of the last epoch's worth of steps.
    ``mode``: ``per-sample``, ``ghost`` or ``auto`` (:func:`clipping_mode`)."""
    device = torch.device(device)
    adapters.to(device)
    embeddings, labels = embeddings.to(device), labels.to(device)
    targets_clip, targets_t5 = targets_clip.to(device), targets_t5.to(device)
    twin = DPTwin(adapters).to(device).train()
    rows = len(embeddings)
    expected = max(1, round(dp.sample_rate * rows))
    if mode == "auto":
        mode = clipping_mode(sum(p.numel() for p in twin.parameters()), expected)
    if mode not in ("per-sample", "ghost"):
        raise ValueError(f"DP-SGD mode must be 'per-sample', 'ghost' or 'auto', got {mode!r}")
    log.debug("DP-SGD: %s clipping, %d steps, expected batch %d", mode, dp.steps, expected)
    lrs = {"clip": settings.lr_clip, "t5": settings.lr_t5}
    groups = [{"params": params, "lr": lrs[name]} for name, params in twin.branch_parameters().items()]
    base = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    common = dict(noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm, expected_batch_size=expected,
                  generator=secure_generator(device), secure_mode=True, loss_reduction="mean")
    if mode == "ghost":
        model = GradSampleModuleFastGradientClipping(twin, max_grad_norm=dp.max_grad_norm, use_ghost_clipping=True,
                                                     loss_reduction="mean")
        optimizer = DPOptimizerFastGradientClipping(base, **common)
    else:
        model = GradSampleModule(twin, loss_reduction="mean")
        optimizer = DPOptimizer(base, **common)
    sampler = secure_generator("cpu")  # the batches, as secret as the noise
    per_epoch = max(1, math.ceil(1.0 / dp.sample_rate))
    sums = {"loss_clip": 0.0, "loss_t5": 0.0}
    seen = 0
    with seeded(settings.seed, device), warnings.catch_warnings():  # dropout only: its draws need not be secret
        # Opacus' hooks on the first layer fire for its output: the embeddings are data, not trained
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        for step in range(dp.steps):
            idx = (torch.rand(rows, generator=sampler) < dp.sample_rate).nonzero().flatten().to(device)
            optimizer.zero_grad(set_to_none=True)
            if len(idx):
                out_clip, out_t5 = model(embeddings[idx].float())
                loss_clip, loss_t5 = adapter_losses(out_clip, out_t5, labels[idx], targets_clip, targets_t5, settings,
                                                    reduction="none")
                if mode == "ghost":
                    DPTensorFastGradientClipping(model, optimizer, loss_clip + loss_t5, "mean").backward()
                else:
                    (loss_clip + loss_t5).mean().backward()
                if step >= dp.steps - per_epoch:  # the last epoch's worth of steps: the reported losses
                    sums["loss_clip"] += float(loss_clip.detach().sum())
                    sums["loss_t5"] += float(loss_t5.detach().sum())
                    seen += len(idx)
            else:  # an empty Poisson batch is still a step: noise only
                for p in twin.parameters():
                    p.grad = torch.zeros_like(p)
                    if mode == "per-sample":
                        p.grad_sample = torch.zeros(0, *p.shape, device=p.device, dtype=p.dtype)
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
