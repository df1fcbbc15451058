"""Robust aggregation: the coordinate-wise median or trimmed mean over nodes (Flower's FedMedian and
FedTrimmedAvg math), for the adapters and, per class, for the class means.

Why: FedAvg weighs every node by the ``num-examples`` it claims and averages every value it sends, so
one hostile node can pull the global adapters anywhere (an update scaled x100, a flipped sign, a
claim of a million clips). A median or a trimmed mean over nodes ignores the claimed counts and
cuts the extreme values of each coordinate: with m nodes, the trimmed mean cuts
``int(robust.trim-fraction * m)`` from each end (0.2 of 5 nodes: one), the median every value but the
middle one. Both need more honest nodes than hostile ones among those that hold a class: a class
held by one or two sites has no majority to protect it. There the median of two owners is their mean
and the trimmed mean cuts nothing, so these classes get exactly FedAvg's unweighted mean of owners;
``robust.clip-norm`` (:mod:`server_app.clip`) still bounds how far any one node moves them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from common.records import ClassTensors
from server_app.aggregators.base import Aggregator, register
from server_app.round_state import RoundState
from server_app.run_context import ServerRun


class CoordinateAggregator(Aggregator):
    """Reduces the nodes' values of each coordinate to one (unweighted: claimed counts do not count)."""

    def reduce(self, stacked: np.ndarray) -> np.ndarray:
        """``stacked``: one row per node; the aggregate along axis 0."""
        raise NotImplementedError

    def _reduce(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack([t.detach().float() for t in tensors]).numpy()
        return torch.from_numpy(np.ascontiguousarray(self.reduce(stacked), dtype=np.float32))

    def aggregate(self, state: RoundState) -> ArrayRecord | None:
        states = [a.to_torch_state_dict() for a in state.replies.arrays.values()]
        if not states:
            return None
        return ArrayRecord({key: self._reduce([s[key] for s in states]) for key in states[0]})

    def merge_means(self, class_names: list[str], node_means: dict[int, ClassTensors]) -> ClassTensors:
        """Per class, the reduction over the nodes that reported it; counts summed."""
        rows: dict[str, list[tuple[torch.Tensor, torch.Tensor, int]]] = {}
        for means in node_means.values():
            for row, name in enumerate(means.class_names):
                count = int(means.counts[row]) if means.counts is not None else 0
                rows.setdefault(name, []).append((means.clip[row], means.t5[row], count))
        kept = [name for name in class_names if name in rows]
        if not kept:
            first = next(iter(node_means.values()))
            return ClassTensors([], first.clip[:0], first.t5[:0], torch.zeros(0, dtype=torch.int64))
        clip = torch.stack([self._reduce([r[0] for r in rows[n]]) for n in kept])
        t5 = torch.stack([self._reduce([r[1] for r in rows[n]]) for n in kept])
        counts = torch.tensor([sum(r[2] for r in rows[n]) for n in kept], dtype=torch.int64)
        return ClassTensors(kept, clip, t5, counts)


@register
class MedianAggregator(CoordinateAggregator):
    name: ClassVar[str] = "median"

    def reduce(self, stacked: np.ndarray) -> np.ndarray:
        return np.median(stacked, axis=0)


@register
class TrimmedMeanAggregator(CoordinateAggregator):
    name: ClassVar[str] = "trimmed-mean"

    def __init__(self, run: ServerRun, *, trim_fraction: float, **kwargs: Any) -> None:
        super().__init__(run, **kwargs)
        self.trim_fraction = float(trim_fraction)

    def reduce(self, stacked: np.ndarray) -> np.ndarray:
        return trim_mean(stacked, self.trim_fraction)
