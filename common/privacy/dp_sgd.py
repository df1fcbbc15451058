"""DP-SGD for the adapters: Poisson-sampled batches, each clip's gradient clipped, Gaussian noise, one step.

What is private here: every step's batch is a Poisson sample of the site's rows (each row independently
with probability ``sample_rate``) drawn from a secure generator, each row's gradient (both branches
together: one clip moves both) is clipped to ``max_grad_norm`` and noise of std ``noise_multiplier *
max_grad_norm`` is added to their sum. That is the subsampled Gaussian mechanism the accountant composes
(:class:`~common.privacy.accounting.Release`). How, in one of three modes that compute the same clipped,
noised sum (tested against each other), so the guarantee is the same:

* ``book-keeping`` (the default): :mod:`common.privacy.clipping`, one backward pass to the layers' outputs,
  each clip's gradient norm from the layers' inputs and output gradients, the clipped sum as one matmul per
  layer. About the cost of a plain step plus the norms, memory as in plain training;
* ``per-sample``: Opacus' ``GradSampleModule`` + ``DPOptimizer`` (every clip's gradient materialised, then
  clipped): ``batch x weights`` values per step;
* ``ghost``: Opacus' ghost clipping (no per-sample gradients of the Linear layers, a second backward pass).

The Opacus modes are kept as the independent reference the book-keeping mode is tested against. All three
run on a twin of the adapters (:mod:`common.privacy.dp_adapters`, the attention as four Linear layers), with
one AdamW over both branches (their own learning rates as two parameter groups), and draw the noise with
Opacus' ``_generate_noise`` in secure mode from the secure generator.

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
from opacus.optimizers.optimizer import _generate_noise
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import Tensor

from common.models.adapters import Adapters
from common.privacy.accounting import Release
from common.privacy.clipping import PerClipClipping
from common.privacy.dp_adapters import DPTwin
from common.privacy.secure import secure_generator
from common.seeds import seeded
from common.training import TrainSettings, adapter_losses

__all__ = ["MODES", "DPSGDSettings", "train_adapters_dp"]

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


MODES = ("book-keeping", "per-sample", "ghost")


def train_adapters_dp(
    adapters: Adapters,
    embeddings: Tensor,
    labels: Tensor,
    targets_clip: Tensor,
    targets_t5: Tensor,
    settings: TrainSettings,
    dp: DPSGDSettings,
    device: torch.device | str = "cpu",
    mode: str = "book-keeping",
) -> dict[str, float]:
    """Train ``adapters`` in place with DP-SGD; returns the mean losses of the last epoch's worth of steps.
    ``mode``: one of :data:`MODES` (module docstring)."""
    if mode not in MODES:
        raise ValueError(f"DP-SGD mode must be one of {', '.join(MODES)}, got {mode!r}")
    device = torch.device(device)
    adapters.to(device)
    embeddings, labels = embeddings.to(device), labels.to(device)
    targets_clip, targets_t5 = targets_clip.to(device), targets_t5.to(device)
    twin = DPTwin(adapters).to(device).train()
    rows = len(embeddings)
    expected = max(1, round(dp.sample_rate * rows))
    log.debug("DP-SGD: %s clipping, %d steps, expected batch %d", mode, dp.steps, expected)
    lrs = {"clip": settings.lr_clip, "t5": settings.lr_t5}
    groups = [{"params": params, "lr": lrs[name]} for name, params in twin.branch_parameters().items()]
    base = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    noise = secure_generator(device)
    step_fn = (_BookKeeping(twin, base, dp, expected, noise) if mode == "book-keeping"
               else _Opacus(twin, base, dp, expected, noise, ghost=mode == "ghost"))
    sampler = secure_generator("cpu")  # the batches, as secret as the noise
    per_epoch = max(1, math.ceil(1.0 / dp.sample_rate))
    sums = {"loss_clip": 0.0, "loss_t5": 0.0}
    seen = 0
    try:
        with seeded(settings.seed, device), warnings.catch_warnings():  # dropout only: its draws need not be secret
            # Opacus' hooks on the first layer fire for its output: the embeddings are data, not trained
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            for step in range(dp.steps):
                idx = (torch.rand(rows, generator=sampler) < dp.sample_rate).nonzero().flatten().to(device)
                losses = None
                if len(idx):
                    out_clip, out_t5 = step_fn.forward(embeddings[idx].float())
                    losses = adapter_losses(out_clip, out_t5, labels[idx], targets_clip, targets_t5, settings,
                                            reduction="none")
                    if step >= dp.steps - per_epoch:  # the last epoch's worth of steps: the reported losses
                        sums["loss_clip"] += float(losses[0].detach().sum())
                        sums["loss_t5"] += float(losses[1].detach().sum())
                        seen += len(idx)
                step_fn.step(None if losses is None else losses[0] + losses[1])  # an empty batch: noise only
    finally:
        step_fn.close()
    twin.copy_to(adapters)
    adapters.eval()
    metrics = {k: v / max(seen, 1) for k, v in sums.items()}
    if not all(math.isfinite(v) for v in metrics.values()):
        raise FloatingPointError(f"DP adapter training diverged: {metrics}")
    metrics["loss"] = metrics["loss_clip"] + metrics["loss_t5"]
    return metrics


class _BookKeeping:
    """One DP-SGD step with :class:`~common.privacy.clipping.PerClipClipping`: clipped sum + noise of std
    ``noise_multiplier * max_grad_norm``, divided by the expected batch, into ``base``."""

    def __init__(self, twin: DPTwin, base: torch.optim.Optimizer, dp: DPSGDSettings, expected: int,
                 generator: torch.Generator) -> None:
        self.twin, self.base, self.dp, self.expected, self.generator = twin, base, dp, expected, generator
        self.clipping = PerClipClipping(twin)
        self.forward = twin

    def step(self, losses: Tensor | None) -> None:
        clipped = {} if losses is None else self.clipping.clipped_sums(losses, self.dp.max_grad_norm)[0]
        std = self.dp.noise_multiplier * self.dp.max_grad_norm
        for p in self.twin.parameters():
            total = clipped.get(p)
            if total is None:
                total = torch.zeros_like(p)
            if std > 0:
                total = total + _generate_noise(std, p, self.generator, secure_mode=True)
            p.grad = total / self.expected
        self.base.step()

    def close(self) -> None:
        self.clipping.remove()
        for p in self.twin.parameters():
            p.grad = None


class _Opacus:
    """One DP-SGD step with Opacus: per-sample gradients (``GradSampleModule``) or ghost clipping."""

    def __init__(self, twin: DPTwin, base: torch.optim.Optimizer, dp: DPSGDSettings, expected: int,
                 generator: torch.Generator, ghost: bool) -> None:
        self.twin, self.ghost = twin, ghost
        common = dict(noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                      expected_batch_size=expected, generator=generator, secure_mode=True, loss_reduction="mean")
        if ghost:
            self.model = GradSampleModuleFastGradientClipping(twin, max_grad_norm=dp.max_grad_norm,
                                                              use_ghost_clipping=True, loss_reduction="mean")
            self.optimizer = DPOptimizerFastGradientClipping(base, **common)
        else:
            self.model = GradSampleModule(twin, loss_reduction="mean")
            self.optimizer = DPOptimizer(base, **common)
        self.forward = self.model

    def step(self, losses: Tensor | None) -> None:
        if losses is None:
            for p in self.twin.parameters():
                p.grad = torch.zeros_like(p)
                if not self.ghost:
                    p.grad_sample = torch.zeros(0, *p.shape, device=p.device, dtype=p.dtype)
        elif self.ghost:
            DPTensorFastGradientClipping(self.model, self.optimizer, losses, "mean").backward()
        else:
            losses.mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self.model.remove_hooks()  # the twin shares its layers with the adapters: leave them as they were
        for p in self.twin.parameters():
            for attr in ("grad_sample", "_norm_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)
            p.grad = None
