"""The 'clip updates' step: no node's update moves the global adapters further than a norm bound.

A node's update is its weights minus the global weights the round sent. Clipping each update's L2
norm to ``robust.clip-norm`` (a number, or ``median``: the median of the round's update norms, which
honest nodes set when they are the majority) bounds what one node can do to any aggregate, FedAvg's
included: an update scaled x100 arrives with the norm of an honest one. Updates within the bound pass
unchanged, so honest rounds are not altered.
"""

from __future__ import annotations

import logging
import statistics

import torch
from flwr.app import ArrayRecord

from server_app.round_state import RoundState

log = logging.getLogger(__name__)


def update_norm(weights: dict[str, torch.Tensor], sent: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum(((weights[k].float() - sent[k].float()) ** 2).sum() for k in sent)))


class ClipUpdatesStep:
    name = "clip updates"

    def __init__(self, clip_norm: float | str) -> None:
        self.clip_norm = clip_norm

    def __call__(self, state: RoundState) -> None:
        if state.sent is None or not state.replies.arrays:
            return
        sent = state.sent.to_torch_state_dict()
        weights = {pid: a.to_torch_state_dict() for pid, a in state.replies.arrays.items()}
        norms = {pid: update_norm(w, sent) for pid, w in weights.items()}
        bound = statistics.median(norms.values()) if self.clip_norm == "median" else float(self.clip_norm)
        clipped = 0
        for pid, norm in norms.items():
            if norm > bound > 0 or (bound == 0 and norm > 0):
                factor = bound / norm
                state.replies.nodes[pid].arrays = ArrayRecord(
                    {k: sent[k] + (weights[pid][k].float() - sent[k].float()) * factor for k in sent})
                clipped += 1
        state.metrics["clip_bound"] = bound
        state.metrics["clipped_updates"] = clipped
        if clipped:
            log.info("round %d: %d of %d updates clipped to norm %.4g (largest %.4g)", state.server_round, clipped,
                     len(norms), bound, max(norms.values()))
