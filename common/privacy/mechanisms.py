"""The Gaussian mechanism for what a site releases besides its weights: per-class counts and sums.

Counts: adding or removing one clip changes one class count by 1, so noise of std ``sigma`` on every count
is a Gaussian mechanism of noise multiplier ``sigma``. A run draws them once (:func:`noisy_counts`) and
reuses them: its ``num-examples``, its class-mean denominators and the floor all read the same noisy
counts. Sums: each clip's adapter output (the CLIP and T5 branches as one vector, in the span of the class
text targets: :func:`target_basis`) is first scaled down to at most ``clip_norm``, so one clip moves one
class sum by at most ``clip_norm``; noise of std ``sigma *
clip_norm`` on every coordinate makes it a Gaussian mechanism of multiplier ``sigma``. Every class of the
federation gets a noisy count and sum, held or not: which classes a site holds is itself data, and
suppressing the classes whose *noisy* count is below the floor is post-processing, free of privacy cost.
"""

from __future__ import annotations

import torch
from torch import Tensor

from common.privacy.accounting import Release

__all__ = ["gaussian_release", "noisy_class_means", "noisy_counts", "target_basis"]


def gaussian_release(noise_multiplier: float) -> Release:
    """What one use of either mechanism costs (sensitivity 1 in its units, the whole data set: q = 1)."""
    return Release("gaussian", noise_multiplier, 1.0, 1)


def noisy_counts(labels: Tensor, num_classes: int, noise_multiplier: float, generator: torch.Generator) -> Tensor:
    """Clips per class plus Gaussian noise, rounded to whole clips and at least 0: ``[C]`` int64."""
    counts = torch.bincount(labels.cpu(), minlength=num_classes).float()
    counts += torch.randn(counts.shape, generator=generator) * noise_multiplier
    return counts.round().clamp(min=0).to(torch.int64)


def target_basis(targets_clip: Tensor, targets_t5: Tensor) -> tuple[Tensor, Tensor]:
    """Orthonormal bases ``[Dc, r]``, ``[n*Dt, r']`` of the spans of the (public) class text targets.

    Why: a noisy mean in the full output space (768 + n x 4096 coordinates) carries noise of norm
    ``sigma * clip_norm * sqrt(d) / count``, far above any class's signal at a site's few clips; in the span of
    the C class targets of each branch it is ``sqrt(2C)`` coordinates, and that span is what retrieval and the
    renderer's calibration read of a mean. The part of an output outside the span is not released."""
    q_clip = torch.linalg.qr(targets_clip.float().reshape(targets_clip.shape[0], -1).T).Q
    q_t5 = torch.linalg.qr(targets_t5.float().reshape(targets_t5.shape[0], -1).T).Q
    return q_clip, q_t5


def noisy_class_means(out_clip: Tensor, out_t5: Tensor, labels: Tensor, counts: Tensor, basis: tuple[Tensor, Tensor],
                      clip_norm: float, noise_multiplier: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per-clip outputs ``out_clip [N, Dc]``, ``out_t5 [N, n, Dt]`` with ``labels [N]`` -> noisy class sums over
    the (noisy) ``counts [C]``, in the span of ``basis`` (:func:`target_basis`): ``clip [C, Dc]``,
    ``t5 [C, n, Dt]``; noise drawn from ``generator``."""
    q_clip, q_t5 = (b.cpu() for b in basis)
    n, num_classes = out_clip.shape[0], counts.shape[0]
    coords = torch.cat([out_clip.reshape(n, -1).float().cpu() @ q_clip, out_t5.reshape(n, -1).float().cpu() @ q_t5], 1)
    scale = (clip_norm / coords.norm(dim=1).clamp(min=1e-12)).clamp(max=1.0)
    sums = torch.zeros(num_classes, coords.shape[1]).index_add_(0, labels.cpu(), coords * scale[:, None])
    sums += torch.randn(sums.shape, generator=generator) * (noise_multiplier * clip_norm)
    means = sums / counts.clamp(min=1).float()[:, None]
    split = q_clip.shape[1]
    clip = means[:, :split] @ q_clip.T
    t5 = (means[:, split:] @ q_t5.T).reshape(num_classes, *out_t5.shape[1:])
    return clip, t5
