"""Central differential privacy (user level: one whole site) for the adapter aggregate: DP-FedAvg.

Each site's update (its weights minus the weights the round sent) is clipped to ``privacy.central-clip-norm``;
the global update is their **unweighted** mean plus Gaussian noise of std ``z * C / m`` per coordinate
(``z`` = ``privacy.central-noise-multiplier``, ``C`` the clipping norm, ``m`` the sites that replied), drawn
from a generator seeded from the OS (:func:`common.privacy.secure_generator`). Adding or removing one site
then moves the mean by at most ``C / m``: a Gaussian mechanism of multiplier ``z`` per round, which the
server composes over the rounds (sampling rate ``fraction-train``) and reports as ``central_epsilon``.

Why unweighted: a weight taken from a site's ``num-examples`` would let one site's contribution exceed
``C / m``; this aggregator overrides the sample weighting, and says so in the log. What it protects: whether
any one site took part at all, in the adapters only, against whoever sees the global model (other sites, users
of the checkpoint). What it does not: the server sees every site's update before the noise (that is the
site-level DP of ``privacy.dp``), and the class means are merged as usual. It needs many sites: the noise
std falls as ``1 / m``, while each site's clipped update stays of norm ``C``.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord

from common.config import PrivacyConfig
from common.privacy import Release, epsilon, secure_generator
from server_app.aggregators.base import Aggregator, register
from server_app.clip import update_norm
from server_app.round_state import RoundState
from server_app.run_context import ServerRun

log = logging.getLogger(__name__)


@register
class CentralDPAggregator(Aggregator):
    name: ClassVar[str] = "dp-fedavg"

    def __init__(self, run: ServerRun, *, privacy: PrivacyConfig, fraction_train: float = 1.0, **kwargs: Any) -> None:
        super().__init__(run, **kwargs)
        self.clip_norm, self.noise = privacy.central_clip_norm, privacy.central_noise_multiplier
        self.delta, self.accountant, self.sample_rate = privacy.delta, privacy.accountant, fraction_train
        self.rounds = 0
        log.info("dp-fedavg: site updates clipped to %g, unweighted mean (num-examples is ignored), noise multiplier "
                 "%g", self.clip_norm, self.noise)

    def aggregate(self, state: RoundState) -> ArrayRecord | None:
        if state.sent is None or not state.replies.arrays:
            return None
        sent = {k: v.float() for k, v in state.sent.to_torch_state_dict().items()}
        total = {k: torch.zeros_like(v) for k, v in sent.items()}
        clipped = 0
        for record in state.replies.arrays.values():
            weights = record.to_torch_state_dict()
            norm = update_norm(weights, sent)
            factor = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
            clipped += factor < 1.0
            for k in sent:
                total[k] += (weights[k].float() - sent[k]) * factor
        m = len(state.replies.arrays)
        gen = secure_generator()
        std = self.noise * self.clip_norm / m
        out = {k: sent[k] + total[k] / m + torch.randn(v.shape, generator=gen) * std for k, v in total.items()}
        self.rounds += 1
        state.metrics.update({"central_noise_std": std, "central_clipped_updates": float(clipped),
                              "central_epsilon": epsilon([Release("central", self.noise, self.sample_rate, self.rounds)],
                                                         self.delta, self.accountant)})
        return ArrayRecord(out)
