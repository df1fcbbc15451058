"""A site's differentially private round: DP-SGD adapters, Gaussian class counts and means, and its budget.

What the site releases under DP, and how each is covered (``docs/privacy.md`` has the whole list):

* adapter weights: DP-SGD (:mod:`common.privacy.dp_sgd`); int8 encoding is post-processing;
* class counts: the Gaussian mechanism, drawn once per run and kept in the ledger (a resumed run reuses
  them); ``num-examples``, ``withheld_classes`` and ``withheld_clips`` are computed from them;
* class means: noisy sums over those counts in the span of the class text targets, in the rounds
  ``privacy.means`` names; classes whose noisy count is under the floor (or under three noise standard
  deviations) are suppressed, which is post-processing;
* training losses, cache and file counts are not reported (they are exact functions of the clips).

The budget: before anything is trained, the releases of this round and of the rounds still planned are
composed with what the ledger holds (:mod:`client_app.ledger`). The noise multiplier is calibrated so that
the run's releases stay within ``privacy.epsilon`` and the site's lifetime within node-config
``privacy-epsilon`` (or set with ``privacy.noise-multiplier``); a round that would exceed either is refused
with :class:`PrivacyBudgetExhausted`, which the server counts as a failed node. The ledger is written when
the reply is built, before it leaves.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from client_app.ledger import PrivacyLedger
from client_app.local_training import LocalTraining
from client_app.session import NodeSession
from client_app.sources import TrainingSet
from common.cache.key import dataset_id
from common.data.dataset import dataset_root
from common.errors import FedA2VError
from common.metric_keys import NUM_EXAMPLES
from common.models.adapters import Adapters
from common.privacy import (
    Release,
    calibrate_noise,
    epsilon,
    gaussian_release,
    noisy_class_means,
    noisy_counts,
    secure_generator,
    target_basis,
)
from common.privacy.dp_sgd import DPSGDSettings, train_adapters_dp
from common.records import ClassTensors
from common.training import TrainSettings, predict

__all__ = ["DP_WITHHELD_METRICS", "PrivacyBudgetExhausted", "PrivateTraining"]

log = logging.getLogger(__name__)

# exact functions of the site's training clips: not reported under DP
DP_WITHHELD_METRICS = ("train_loss", "train_loss_clip", "train_loss_t5", "cache_hits", "cache_misses",
                       "skipped_files", "missing_files", "augmented_samples", "extract_seconds", "load_seconds")
TOLERANCE = 1e-9  # relative slack on a budget comparison (floating point of the accountant)


class PrivacyBudgetExhausted(FedA2VError):
    """This round's releases would exceed the site's or the run's privacy budget: the site answers nothing."""


class PrivateTraining(LocalTraining):
    """One train message under DP (see the module docstring)."""

    def __init__(self, session: NodeSession, data: TrainingSet) -> None:
        super().__init__(session, data)
        cfg, site, msg = session.cfg, session.site, session.message
        self.privacy, self.policy = cfg.privacy, site.policy
        self.rows = int(data.labels.numel())
        root = dataset_root(cfg.data, site.cache_dir, site.node.data_root)
        self.ledger = PrivacyLedger.for_data(site.cache_dir, dataset_id(root), site.partition_id)
        self.run_identity = msg.run_identity or f"unnamed-run:{msg.run_name}"
        self.counts = self._recorded_counts(data.class_names)
        self.shared_clips = 0  # clips behind the class means released this round
        self.means_now = self.privacy.means == "every-round" or msg.server_round >= cfg.num_rounds
        self.trains, self.train_cfg = session.source.trains_adapters, cfg.train
        self.remaining = max(0, cfg.num_rounds - msg.server_round)  # rounds after this one
        self.sigma = self._noise()
        self.sigma_means = self.privacy.means_noise_multiplier or self.sigma
        self.dpsgd = self._schedule(self.sigma)
        self.now = self._releases(self.dpsgd, self.sigma_means, counts=self.counts is None, means=self.means_now)
        self.committed = False
        self._check_budgets()

    # ------------------------------------------------------------------ the budget
    def _recorded_counts(self, class_names: list[str]) -> Tensor | None:
        """The noisy counts this run released already (a resumed run, or a later round), if any."""
        record = self.ledger.runs.get(self.run_identity) or {}
        if record.get("class_names") == list(class_names) and len(record.get("counts", ())) == len(class_names):
            return torch.tensor([int(c) for c in record["counts"]], dtype=torch.int64)
        return None

    def _releases(self, dpsgd: DPSGDSettings | None, sigma_means: float, counts: bool, means: bool) -> list[Release]:
        """One round's releases: its DP-SGD steps, the run's noisy counts (once), the noisy class sums."""
        gaussian = gaussian_release(sigma_means)
        return [*([dpsgd.release()] if dpsgd is not None else []), *([gaussian] if counts else []),
                *([gaussian] if means else [])]

    def _schedule(self, sigma: float) -> DPSGDSettings | None:
        """This round's DP-SGD at noise ``sigma`` (``None`` when the source does not train the adapters)."""
        if not self.trains:
            return None
        return DPSGDSettings.schedule(self.rows, self.train_cfg.batch_size, self.train_cfg.local_epochs, sigma,
                                      self.privacy.max_grad_norm)

    def _plan(self, sigma: float) -> list[Release]:
        """This round's releases and those of the rounds after it, at noise ``sigma`` (later rounds reuse this
        run's counts and release sums as ``privacy.means`` says)."""
        dpsgd, sigma_means = self._schedule(sigma), self.privacy.means_noise_multiplier or sigma
        releases = self._releases(dpsgd, sigma_means, counts=self.counts is None, means=self.means_now)
        every = self.privacy.means == "every-round"
        for later in range(1, self.remaining + 1):
            releases += self._releases(dpsgd, sigma_means, counts=False, means=every or later == self.remaining)
        return releases

    def _spent(self, lifetime: bool) -> list[Release]:
        return self.ledger.releases(None if lifetime else self.run_identity)

    def _noise(self) -> float:
        """The noise multiplier: set, or the smallest that keeps the planned rounds within every cap."""
        if self.privacy.noise_multiplier > 0:
            return self.privacy.noise_multiplier
        sigma = 0.0
        for name, cap, lifetime in self.policy.budgets():
            try:
                sigma = max(sigma, calibrate_noise(cap, self.policy.delta, self._spent(lifetime), self._plan,
                                                   self.privacy.accountant))
            except ValueError as err:
                raise PrivacyBudgetExhausted(f"node {self.policy.partition_id}: {name}={cap:g}: {err} "
                                             f"(ledger {self.ledger.path.name})") from None
        return sigma

    def _check_budgets(self) -> None:
        for name, cap, lifetime in self.policy.budgets():
            after = epsilon([*self._spent(lifetime), *self.now], self.policy.delta, self.privacy.accountant)
            if after > cap * (1 + TOLERANCE):
                before = epsilon(self._spent(lifetime), self.policy.delta, self.privacy.accountant)
                raise PrivacyBudgetExhausted(
                    f"node {self.policy.partition_id}: this round's releases would bring epsilon to {after:.3f} at "
                    f"delta {self.policy.delta:g}, over {name}={cap:g} (spent so far: {before:.3f}, ledger "
                    f"{self.ledger.path.name}); the site answers nothing")

    # ------------------------------------------------------------------ the releases
    def augment_to(self, requested: int) -> int:
        if requested:
            log.warning("node %d: DP: train.augment-to ignored (the samples a class gets reveal its count)",
                        self.policy.partition_id)
        return 0

    def train(self, adapters: Adapters, x: Tensor, y: Tensor, targets: ClassTensors, settings: TrainSettings
              ) -> dict[str, float]:
        assert self.dpsgd is not None  # the handler trains only when the source trains
        log.info("node %d: DP-SGD noise multiplier %.3f, clipping %.3g, %d steps at sampling rate %.3f",
                 self.policy.partition_id, self.dpsgd.noise_multiplier, self.dpsgd.max_grad_norm, self.dpsgd.steps,
                 self.dpsgd.sample_rate)
        return train_adapters_dp(adapters, x, y, targets.clip, targets.t5, settings, self.dpsgd,
                                 self.session.site.device)

    def class_means(self, adapters: Adapters) -> tuple[ClassTensors, dict[str, int]]:
        data, names = self.data, self.data.class_names
        gen = secure_generator()
        if self.counts is None:
            self.counts = noisy_counts(data.labels, len(names), self.sigma_means, gen)
        counts = self.counts
        floor = max(self.policy.min_class_count, math.ceil(3 * self.sigma_means))
        shared = [i for i, n in enumerate(counts.tolist()) if n >= floor] if self.means_now else []
        if shared:
            targets = self.session.targets
            out_clip, out_t5 = predict(adapters, data.embeddings, device=self.session.site.device)
            clip, t5 = noisy_class_means(out_clip, out_t5, data.labels, counts, target_basis(targets.clip, targets.t5),
                                         self.privacy.means_clip_norm, self.sigma_means, gen)
            means = ClassTensors([names[i] for i in shared], clip[shared], t5[shared], counts[shared])
        else:
            dim_clip, t5_shape = self.session.targets.clip.shape[1], tuple(self.session.targets.t5.shape[1:])
            means = ClassTensors([], torch.zeros(0, dim_clip), torch.zeros(0, *t5_shape), torch.zeros(0, dtype=torch.int64))
        withheld = [i for i, n in enumerate(counts.tolist()) if n > 0 and i not in shared]
        self.shared_clips = int(counts[shared].sum()) if shared else 0
        return means, {"withheld_classes": len(withheld), "withheld_clips": int(counts[withheld].sum()) if withheld else 0}

    def reported(self, metrics: dict) -> dict:
        """``num-examples`` from the noisy counts; what the clips decide exactly is left out; the privacy spent."""
        kept = {k: v for k, v in metrics.items() if k not in DP_WITHHELD_METRICS}
        total = max(1, int(self.counts.sum()) if self.counts is not None else 0)
        kept["withheld_clips"] = total - self.shared_clips  # what the server checks adds up
        now = [] if self.committed else self.now  # once committed, the ledger holds this round's releases
        lifetime = epsilon([*self._spent(True), *now], self.policy.delta, self.privacy.accountant)
        run = epsilon([*self._spent(False), *now], self.policy.delta, self.privacy.accountant)
        return {NUM_EXAMPLES: total, **kept, "dp": 1, "dp_epsilon": lifetime, "dp_epsilon_run": run,
                "dp_delta": self.policy.delta, "dp_noise_multiplier": self.sigma,
                "dp_means_noise_multiplier": self.sigma_means}

    def commit(self) -> None:
        """The round's releases into the ledger (with this run's noisy counts), before the reply is built; the
        budget is checked again under the ledger's lock (another run on this host may have spent since
        :meth:`__init__` checked it) and a refusal records nothing."""
        msg = self.session.message
        record = {"class_names": list(self.data.class_names), "counts": [int(c) for c in self.counts.tolist()]}
        self.ledger.append(self.run_identity, msg.run_name, msg.server_round, self.now, run_record=record,
                           check=self._check_budgets)
        self.committed = True
