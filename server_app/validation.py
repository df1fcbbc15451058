"""Every reply is checked before anything is aggregated: a bad one is dropped, named and recorded.

A node can be buggy, out of date or hostile; one malformed reply must not crash the server or
poison the global adapters. Checks, each with a reason that names the node and what is wrong:

* partition ids: one reply per partition id per round, and a Flower node keeps the partition id it
  first reported (a second node claiming it while the first is still connected is a spoof; a
  restarted SuperNode, back under a new Flower node id, takes its partition over);
* adapter weights: exactly the global model's array names, shapes and dtypes, all finite;
* metrics: numbers, all finite; ``num-examples`` a positive integer;
* class means: federation classes only, once each, the model's output shapes, finite, counts
  positive and summing to ``num-examples`` minus the clips the node withheld (``withheld_clips``);
* a generator bank that does not parse (bad metadata, weights that do not match their spec).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from server_app.round_state import NodeReply


class ReplyValidator:
    def __init__(self, template_state: dict[str, torch.Tensor], class_names: list[str], clip_dim: int,
                 t5_shape: tuple[int, int]) -> None:
        self.expected = {k: (tuple(v.shape), v.dtype) for k, v in template_state.items()}
        self.class_names = set(class_names)
        self.clip_dim = clip_dim
        self.t5_shape = tuple(t5_shape)
        self.partition_of: dict[int, int] = {}  # Flower node id -> the partition id it reported first

    def check_identity(self, node_id: int, partition_id: int, seen: set[int],
                       connected: set[int] | None = None) -> str | None:
        """``connected``: the Flower nodes online this round. A restarted SuperNode comes back with a new
        Flower node id: it may take over its partition id once the old node is gone, never while it is
        still connected."""
        if partition_id in seen:
            return f"partition id {partition_id} replied twice this round"
        known = self.partition_of.get(node_id)
        if known is not None and known != partition_id:
            return f"Flower node {node_id} reported partition id {known} before, now {partition_id}"
        owner = next((n for n, p in self.partition_of.items() if p == partition_id and n != node_id), None)
        if owner is not None and (connected is None or owner in connected):
            return f"partition id {partition_id} belongs to Flower node {owner}"
        return None  # no owner, or the old node left: a restart, not a spoof (remember() moves it)

    def remember(self, node_id: int, partition_id: int) -> None:
        """Record an accepted reply: ``node_id`` owns ``partition_id`` (a restarted node takes it over)."""
        for other in [n for n, p in self.partition_of.items() if p == partition_id and n != node_id]:
            del self.partition_of[other]
        self.partition_of.setdefault(node_id, partition_id)

    @staticmethod
    def check_metrics(metrics: dict[str, Any], min_examples: int = 1) -> str | None:
        """Numbers, finite; ``num-examples`` an integer >= ``min_examples`` (evaluation may have none)."""
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                return f"metric '{key}' is not a number ({type(value).__name__})"
            if not math.isfinite(float(value)):
                return f"metric '{key}' is not finite ({value})"
        n = metrics.get("num-examples")
        if n is None:
            return "metrics lack 'num-examples'"
        if float(n) != int(n) or int(n) < min_examples:
            return f"num-examples must be an integer >= {min_examples}, got {n}"
        return None

    def check_train(self, reply: NodeReply) -> str | None:
        """The reason to reject ``reply``, or ``None`` when it is sound."""
        reason = self.check_metrics(reply.metrics)
        if reason:
            return reason
        if reply.arrays is None:
            return "no adapter weights ('arrays' record)"
        state = reply.arrays.to_torch_state_dict()
        missing = sorted(set(self.expected) - set(state))
        extra = sorted(set(state) - set(self.expected))
        if missing or extra:
            return f"adapter weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}"
        for key, tensor in state.items():
            shape, dtype = self.expected[key]
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                return f"adapter weight '{key}': {tuple(tensor.shape)} {tensor.dtype}, expected {shape} {dtype}"
            if not torch.isfinite(tensor).all():
                return f"adapter weight '{key}' holds non-finite values"
        return self._check_means(reply)

    def _check_means(self, reply: NodeReply) -> str | None:
        means = reply.means
        if means is None:
            return None  # no means: the node is no teacher and no anchor; its weights still count
        names = list(means.class_names)
        unknown = sorted(set(names) - self.class_names)
        if unknown:
            return f"class means for classes outside the federation: {unknown[:5]}"
        if len(set(names)) != len(names):
            return "class means name a class twice"
        if tuple(means.clip.shape[1:]) != (self.clip_dim,) or tuple(means.t5.shape[1:]) != self.t5_shape:
            return f"class means have shapes {tuple(means.clip.shape)} / {tuple(means.t5.shape)}"
        if not (torch.isfinite(means.clip).all() and torch.isfinite(means.t5).all()):
            return "class means hold non-finite values"
        if means.counts is None:
            return "class means come without counts"
        counts = means.counts.to(torch.int64)
        if bool((counts < 1).any()):
            return "class means with a count below 1"
        withheld = int(reply.metrics.get("withheld_clips", 0))
        n = int(reply.metrics["num-examples"])
        if int(counts.sum()) + withheld != n:
            return f"class-mean counts sum to {int(counts.sum())} (+{withheld} withheld), but num-examples is {n}"
        return None
