"""Differential privacy at every site: what it costs in accuracy and time, what it spends, what it protects.

Federations (in process, ``bench/federation.py``: the real node handlers and the real strategy): the default
3-site synthetic federation, ``--rounds`` rounds, without DP and with ``privacy.dp`` at each ``--epsilons``
value (delta ``--delta``). Per setting:

* ``acc``: the true global test retrieval accuracy after the last round (the sites' own evaluations);
* ``epsilon_spent``: each site's ``dp_epsilon_run`` after the last round (this setting's releases, at delta;
  the settings share the sites' data, so each site's lifetime ``dp_epsilon`` in its ledger adds them up);
* ``train_seconds_per_round``: the sites' mean ``train_seconds`` (their local training, not the round);
* ``noise_multiplier``: the DP-SGD noise the sites calibrated.

Attacks on the class-mean release (site 0, with the last round's released global adapters; the attacker
knows every other clip of the class, as DP's threat model allows, and the canary):

* ``membership_advantage``: ``--trials`` times, a fair coin decides whether a canary clip (an embedding
  unlike the site's, labelled with site 0's first class) is in the class; the site releases that class's
  count and mean as it does at the setting (exact without DP; the Gaussian mechanism with the run's noise
  under DP). The attacker scores the release by its count and by the projection of its mean on the canary's
  direction, each in units of its noise, and thresholds the score at the best cut found on half the trials;
  the advantage (true-positive minus false-positive rate) is measured on the other half, with its 95 %
  interval half-width ``advantage_ci95``.
* ``mean_distance``: a class of one clip (the canary alone): the distance of the mean released for it (what
  the mechanism would release, whether or not the floor then suppresses it) to that clip's own output,
  relative to the output's norm (0: the clip itself is released).

Central DP (``--central-sites`` sites, ``aggregation = "dp-fedavg"`` at ``--central-noise``, no site-level DP):
its ``acc`` and the server's ``central_epsilon`` (site-level neighbours), beside the same federation without it
(``acc_plain``).

Not measured here yet: membership through the adapter weights (it needs a training per trial).

Usage:  python bench/privacy.py [--rounds 5] [--epsilons 1,3,8] [--trials 6400] [--run-config 'k=v'] [--work DIR]
        [--record]
Last line of output: one JSON object {"settings": {"nodp": {...}, "eps=1": {...}, ...}, "acc_nodp", ...}.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from federation import InProcessFederation  # the sibling modules (bench/ is sys.path[0])
from record import add_record_argument, emit
from workspace import isolated_cache

from client_app.node_data import load_node_data
from client_app.site import NodeSite
from common.config import NodeRuntimeConfig
from common.config_overrides import parse_overrides
from common.logs import setup_logging
from common.privacy import noisy_class_means, noisy_counts, secure_generator, target_basis
from common.records import METRICS, arrays_to_module
from common.training import predict

log = logging.getLogger("bench.privacy")
NODES = 3


def run_setting(name: str, overrides: dict, rounds: int, work: Path, nodes: int = NODES
                ) -> tuple[dict, InProcessFederation]:
    fed = InProcessFederation({**overrides, "num-rounds": rounds}, work, name, nodes)
    train_seconds, epsilons, sigmas = [], [0.0] * nodes, []
    acc = float("nan")
    for r in range(1, rounds + 1):
        fed.prepare()
        replies = fed.train_replies(r)
        metrics = [dict(reply.content[METRICS]) for reply in replies]
        train_seconds.append(statistics.mean(m["train_seconds"] for m in metrics))
        epsilons = [float(m.get("dp_epsilon_run", 0.0)) for m in metrics]
        sigmas += [float(m["dp_noise_multiplier"]) for m in metrics if "dp_noise_multiplier" in m]
        fed.aggregate(r, replies)
        central = fed.strategy.state.metrics.get("central_epsilon")
        acc = fed.true_accuracy(fed.evaluate_replies(r))
        log.info("%s round %d: acc %.4f, epsilon per site %s, train %.2fs", name, r, acc,
                 [round(e, 3) for e in epsilons], train_seconds[-1])
    return {"acc": round(acc, 4), "epsilon_spent": [round(e, 4) for e in epsilons],
            **({"central_epsilon": round(float(central), 4)} if central is not None else {}),
            "train_seconds_per_round": round(statistics.mean(train_seconds), 3),
            "noise_multiplier": round(statistics.mean(sigmas), 4) if sigmas else 0.0}, fed


class ClassRelease:
    """Site 0's release of one class's count and mean, exact or through the Gaussian mechanism."""

    def __init__(self, fed: InProcessFederation, sigma: float) -> None:
        cfg = fed.cfg
        adapters = arrays_to_module(fed.arrays, copy.deepcopy(fed.template))
        data = load_node_data(cfg.data, NodeSite.of(cfg, NodeRuntimeConfig(partition_id=0, num_partitions=NODES)))
        train = data.splits["train"]
        self.label = int(train.labels[0])
        own = train.embeddings[train.labels == self.label]
        gen = torch.Generator().manual_seed(7)  # the canary: an embedding unlike the site's clips
        canary = torch.randn(1, *own.shape[1:], generator=gen) * own.std() * 3 + own.mean()
        self.clip, self.t5 = predict(adapters, torch.cat([own, canary]))
        self.n = len(own)
        self.basis = target_basis(fed.targets.clip, fed.targets.t5)
        self.sigma, self.clip_norm = sigma, cfg.privacy.means_clip_norm

    def release(self, rows: list[int], gen: torch.Generator) -> tuple[float, torch.Tensor]:
        """(released count, released mean as one flat vector) of the clips ``rows``."""
        labels = torch.zeros(len(rows), dtype=torch.int64)
        clip, t5 = self.clip[rows], self.t5[rows]
        if not self.sigma:
            return float(len(rows)), torch.cat([clip.mean(0), t5.mean(0).flatten()])
        counts = noisy_counts(labels, 1, self.sigma, gen)
        mean_clip, mean_t5 = noisy_class_means(clip, t5, labels, counts, self.basis, self.clip_norm, self.sigma, gen)
        return float(counts[0]), torch.cat([mean_clip[0], mean_t5[0].flatten()])

    def project(self, rows: list[int]) -> torch.Tensor:
        """The exact mean of ``rows`` as the mechanism sees it (in the targets' span when noisy)."""
        clip, t5 = self.clip[rows].mean(0), self.t5[rows].mean(0).flatten()
        if not self.sigma:
            return torch.cat([clip, t5])
        q_clip, q_t5 = self.basis
        return torch.cat([(clip @ q_clip) @ q_clip.T, (t5 @ q_t5) @ q_t5.T])


def membership(release: ClassRelease, trials: int) -> dict:
    without, with_canary = list(range(release.n)), list(range(release.n + 1))
    m0, m1 = release.project(without), release.project(with_canary)
    direction = (m1 - m0) / (m1 - m0).norm().clamp(min=1e-12)
    mean_noise = release.sigma * release.clip_norm / max(release.n, 1) if release.sigma else 1.0
    count_noise = release.sigma or 1.0
    gen = secure_generator()
    scores, truth = [], []
    for _ in range(trials):
        member = bool(torch.rand(1, generator=gen) < 0.5)
        count, mean = release.release(with_canary if member else without, gen)
        scores.append((count - release.n) / count_noise + float((mean - m0) @ direction) / mean_noise)
        truth.append(member)
    half = trials // 2

    def advantage(cut: float, lo: int, hi: int) -> float:
        pos = [s > cut for s, t in zip(scores[lo:hi], truth[lo:hi]) if t]
        neg = [s > cut for s, t in zip(scores[lo:hi], truth[lo:hi]) if not t]
        return (sum(pos) / max(len(pos), 1)) - (sum(neg) / max(len(neg), 1))

    cut = max(sorted(set(scores[:half])), key=lambda c: advantage(c, 0, half))
    adv = advantage(cut, half, trials)
    return {"membership_advantage": round(adv, 4), "trials": trials - half,
            "advantage_ci95": round(1.96 * math.sqrt(2.0 / max(trials - half, 1)), 4)}


def single_clip_distance(release: ClassRelease) -> float:
    gen = secure_generator()
    _, mean = release.release([release.n], gen)  # the canary alone
    own = torch.cat([release.clip[release.n], release.t5[release.n].flatten()])
    return round(float((mean - own).norm() / own.norm()), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--trials", type=int, default=6400)  # 3200 tested: a 95 % interval under 0.05
    parser.add_argument("--central-sites", type=int, default=10)
    parser.add_argument("--central-noise", type=float, default=1.0)
    parser.add_argument("--run-config", default="", help="run-config overrides for every setting ('k=v k2=v2')")
    parser.add_argument("--work", default="", help="folder for runs and the cache (default: a temporary one)")
    add_record_argument(parser)
    args = parser.parse_args()
    setup_logging()
    work = Path(args.work or tempfile.mkdtemp(prefix="feda2v-bench-privacy-"))
    isolated_cache(folder=work / "cache")
    base = parse_overrides(args.run_config)
    settings = {"nodp": base}
    for eps in [float(e) for e in args.epsilons.split(",") if e]:
        settings[f"eps={eps:g}"] = {**base, "privacy.dp": True, "privacy.epsilon": eps, "privacy.delta": args.delta}
    results = {}
    t0 = time.perf_counter()
    for name, overrides in settings.items():
        result, fed = run_setting(name, overrides, args.rounds, work)
        sigma = result["noise_multiplier"] if fed.cfg.privacy.dp else 0.0
        release = ClassRelease(fed, fed.cfg.privacy.means_noise_multiplier or sigma)
        result.update(membership(release, args.trials))
        result["mean_distance"] = single_clip_distance(release)
        results[name] = result
        log.info("%s: %s", name, result)
    central = {}
    if args.central_sites:
        plain, _ = run_setting("central-plain", base, args.rounds, work, args.central_sites)
        dp, _ = run_setting("central-dp", {**base, "aggregation": "dp-fedavg",
                                           "privacy.central-noise-multiplier": args.central_noise}, args.rounds, work,
                            args.central_sites)
        central = {"sites": args.central_sites, "noise_multiplier": args.central_noise, "acc": dp["acc"],
                   "acc_plain": plain["acc"], "central_epsilon": dp.get("central_epsilon")}
        log.info("central DP: %s", central)
    nodp = results["nodp"]
    out = {"settings": results, "central_dp": central, "acc_nodp": nodp["acc"], "delta": args.delta, "rounds": args.rounds, "nodes": NODES,
           "acc_ratio": {k: round(v["acc"] / nodp["acc"], 4) for k, v in results.items() if k != "nodp"},
           "train_cost_ratio": {k: round(v["train_seconds_per_round"] / nodp["train_seconds_per_round"], 3)
                                for k, v in results.items() if k != "nodp"},
           "seconds": round(time.perf_counter() - t0, 1)}
    emit(out, record=args.record)


if __name__ == "__main__":
    main()
