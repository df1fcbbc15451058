"""This round's node adapters as teachers, each speaking only for the classes it owns.

Why owner-only: a node that never heard a chainsaw maps chainsaw-like embeddings to whatever its
own classes taught it; averaging that in (as the earlier system did) pulls the target away from
the class. Here the teacher output for a sample of class ``y`` is the count-weighted mean of the
outputs of the nodes that reported training clips of ``y`` (their class-mean counts), and nothing
else: a node without ``y`` has exactly zero influence on it (tested).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from common.models.adapters import Adapters
from common.records import ClassTensors

log = logging.getLogger(__name__)

MAX_CACHED_BYTES = 1 << 30  # teacher outputs kept for a whole training step when they fit in this much memory


@dataclass
class OwnerTeachers:
    """Teacher adapters per node and owner weights ``weights[p, c]`` (rows sum over owners to 1)."""

    class_names: list[str]
    node_ids: list[int]
    adapters: list[Adapters]
    weights: Tensor  # [P, C]: count_p(c) / sum_q count_q(c); 0 where p does not own c
    node_means: list[ClassTensors | None]  # each teacher's reported class means (anchors for data-free)

    @classmethod
    def build(
        cls, class_names: list[str], teachers: dict[int, Adapters], node_means: dict[int, ClassTensors]
    ) -> "OwnerTeachers":
        """Teachers that sent both weights and class means; ownership from the reported counts."""
        ids = sorted(pid for pid in teachers if pid in node_means)
        dropped = sorted(set(teachers) - set(ids))
        if dropped:
            log.warning("nodes %s sent adapters but no class means: not used as teachers", dropped)
        counts = torch.zeros(len(ids), len(class_names))
        index = {c: i for i, c in enumerate(class_names)}
        for row, pid in enumerate(ids):
            means = node_means[pid]
            for j, name in enumerate(means.class_names):
                if name in index and means.counts is not None:
                    counts[row, index[name]] = float(means.counts[j])
        total = counts.sum(0, keepdim=True)
        weights = torch.where(total > 0, counts / total.clamp(min=1), torch.zeros_like(counts))
        for model in teachers.values():
            model.eval().requires_grad_(False)
        return cls(list(class_names), ids, [teachers[p] for p in ids], weights, [node_means[p] for p in ids])

    @property
    def covered(self) -> list[int]:
        """Class indices with at least one owner."""
        return (self.weights.sum(0) > 0).nonzero().flatten().tolist()

    def owners(self, class_index: int) -> list[int]:
        return [self.node_ids[r] for r in (self.weights[:, class_index] > 0).nonzero().flatten().tolist()]

    def to(self, device: torch.device | str) -> "OwnerTeachers":
        for model in self.adapters:
            model.to(device)
        self.weights = self.weights.to(device)
        return self

    def outputs(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Owner-weighted teacher outputs ``(clip [B, Dc], t5 [B, n, Dt])`` for samples of ``labels``.

        Gradients flow to ``x`` (data-free generator training), never into the teachers. A sample
        whose class has no owner gets zeros (callers only draw covered classes).
        """
        clip = t5 = None
        for row, model in enumerate(self.adapters):
            w = self.weights[row, labels]  # [B]
            mask = w > 0
            if not bool(mask.any()):
                continue
            out_clip, out_t5 = model(x[mask])
            if clip is None:
                clip = x.new_zeros(len(x), out_clip.shape[1])
                t5 = x.new_zeros(len(x), *out_t5.shape[1:])
            clip = clip.index_add(0, mask.nonzero().flatten(), out_clip * w[mask, None])
            t5 = t5.index_add(0, mask.nonzero().flatten(), out_t5 * w[mask, None, None])
        if clip is None:
            raise ValueError("no teacher owns any of the requested classes")
        return clip, t5

    def lookup(self, x: Tensor, labels: Tensor, chunk: int = 256) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        """``idx -> (clip, t5)`` teacher outputs of the rows ``idx`` of ``(x, labels)``, without gradients.

        Why: the teachers are frozen (eval mode, no dropout) and a server training step draws its
        samples once, so every epoch would recompute exactly the same outputs; they are computed once
        here, in chunks, and indexed per batch (the same numbers, many epochs cheaper). When all rows
        would take more than :data:`MAX_CACHED_BYTES`, outputs are computed per batch instead.
        """
        if not len(x):
            raise ValueError("no samples to compute teacher outputs for")
        with torch.no_grad():
            probe = self.outputs(x[:1], labels[:1])
            per_row = sum(t[0].numel() * t.element_size() for t in probe)
            if per_row * len(x) > MAX_CACHED_BYTES:
                log.info("teacher outputs of %d samples need %.1f GB: computed per batch", len(x), per_row * len(x) / 1e9)

                def per_batch(idx: Tensor) -> tuple[Tensor, Tensor]:
                    with torch.no_grad():
                        return self.outputs(x[idx], labels[idx])

                return per_batch
            parts = [self.outputs(x[i : i + chunk], labels[i : i + chunk]) for i in range(0, len(x), chunk)]
        clip = torch.cat([p[0] for p in parts])
        t5 = torch.cat([p[1] for p in parts])
        return lambda idx: (clip[idx], t5[idx])
