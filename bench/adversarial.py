"""One hostile site of five: what it can do to the default aggregation and to the robust one, and a long
fuzz of the server's reply parser.

``fuzz``: ``--fuzz-cases`` hostile replies (every record type: packed and plain weights, class means,
generator banks, metrics, configs; ``tests/hostile_replies.py``) go through the server's parser and
through ``aggregate_train`` / ``aggregate_evaluate``; ``escaped`` counts anything but an accepted reply,
a rejection with a reason, or the quorum error; ``rss_growth_mb`` is the process's growth over the fuzz.

``attacks``: an in-process federation of 5 nodes on the default synthetic data. The nodes are the real
ClientApp handlers (``client_app.app.train`` / ``evaluate``) and the server is the real strategy and
round pipeline; node 4 trains honestly and then tampers with its reply:

* ``inflated_examples``: claims 10^6 times its clips (counts scaled to match) and sends untrained weights;
* ``scaled_update``: its update (weights minus the weights sent) x100;
* ``sign_flip``: its update x-1;
* ``poisoned_means``: its class means shifted by +100 in every coordinate (scored by the distance of the
  global class means from the honest run's, against the honest nodes' own spread around them);
* ``inflated_eval`` / ``deflated_eval``: reports accuracy 1.0 / 0.0 on ``robust.max-examples`` test clips;
* ``partition_squatting``: replies first, in train and evaluate, claiming partition 0 (Flower node 100's)
  for its own training. Node ids stand for registered keys here: with SuperNode authentication a Flower
  node id is the key the operator registered (the real authenticated drill is
  ``tests/test_deployment.py::test_secure_loopback_deployment``); the robust configuration assigns the
  partitions to their nodes (``[robust.partition-owners]``, what ``feda2v owners`` records).

Each attack runs with the default configuration and with the robust one the docs recommend
(``ROBUST``: trimmed mean, updates clipped to the round's median norm, trimmed evaluation). Per attack:
``honest_acc`` (the true global test accuracy of an honest federation), ``attacked_acc_default`` and
``attacked_acc_robust`` (the true accuracy of the attacked federation's global adapters: every node's own
evaluation before node 4 lies), and the reported global figure of each against the honest one.

Usage:  python bench/adversarial.py [--rounds 5] [--fuzz-cases 20000] [--attacks all] [--work DIR] [--jobs 8]
Last line of output: one JSON object {"fuzz": {...}, "attacks": {...}, "robust_seconds_per_round", ...}.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the hostile replies live with the tests

from flwr.app import Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from record import add_record_argument, emit  # the sibling module (bench/ is sys.path[0])
from federation import InProcessFederation  # noqa: E402
from workspace import isolated_cache  # noqa: E402

from client_app.app import evaluate as node_evaluate  # noqa: E402
from common.config import load_config  # noqa: E402
from common.logs import setup_logging  # noqa: E402
from common.metrics.resources import rss_mb  # noqa: E402
from common.models.adapters import AdapterConfig, Adapters
from common.records import ARRAYS, CLASS_MEANS, CLASS_MEANS_META, METRICS, ClassTensors  # noqa: E402
from common.wire import decode, encode  # noqa: E402
from server_app.validation import Rejected  # noqa: E402

log = logging.getLogger("bench.adversarial")
NODES, HOSTILE = 5, 4
ROBUST = {"aggregation": "trimmed-mean", "robust.clip-norm": "median", "robust.evaluate": "trimmed",
          **{f"robust.partition-owners.{p}": 100 + p for p in range(NODES)}}
SQUATTED = 0  # the partition node 4 claims in partition_squatting
WEIGHT_ATTACKS = ("inflated_examples", "scaled_update", "sign_flip", "partition_squatting")
SIDE_ATTACKS = ("poisoned_means", "inflated_eval", "deflated_eval")  # replayed beside each honest round
ATTACKS = WEIGHT_ATTACKS + SIDE_ATTACKS


# ---------------------------------------------------------------------------- fuzz
def fuzz(cases: int, tmp: Path) -> dict:
    """``cases`` hostile replies through the parser and the aggregation; what escaped, and memory."""
    from hostile_replies import as_reply, honest_content, reply_contents, server
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    from server_app.identity import PartitionOwners
    from server_app.quorum import QuorumError
    from server_app.round_state import parse_train_reply
    from server_app.validation import Rejected

    strategy = server(tmp / "fuzz")
    counts = {"cases": 0, "accepted": 0, "rejected": 0, "escaped": 0, "quorum": 0}
    escapes: list[str] = []
    logging.getLogger("server_app").setLevel(logging.CRITICAL)  # thousands of rejections are the point

    def one(content: RecordDict, with_round: bool) -> None:
        counts["cases"] += 1
        strategy.validator.owners = PartitionOwners()
        try:
            parse_train_reply(as_reply(content, 100), strategy.validator, set(), None, strategy._decode_reply)
            counts["accepted"] += 1
        except Rejected:
            counts["rejected"] += 1
        except Exception as err:  # noqa: BLE001 - what the bench counts
            counts["escaped"] += 1
            escapes.append(f"{type(err).__name__}: {str(err)[:200]}")
        if with_round:  # the whole round: only the quorum error may stop it
            try:
                strategy.aggregate_train(1, [as_reply(honest_content(9), 200), as_reply(content, 100)])
                strategy.asked["evaluate"] = 1
                strategy.aggregate_evaluate(1, [as_reply(RecordDict({METRICS: content[METRICS]}), 100,
                                                         MessageType.EVALUATE)] if METRICS in content else [])
            except QuorumError:
                counts["quorum"] += 1
            except Exception as err:  # noqa: BLE001
                counts["escaped"] += 1
                escapes.append(f"round: {type(err).__name__}: {str(err)[:200]}")

    rss0 = rss_mb()
    t0 = time.perf_counter()

    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(content=reply_contents(), with_round=st.integers(0, 19))
    def run(content: RecordDict, with_round: int) -> None:
        one(content, with_round == 0)  # one case in 20 also runs a whole round (it costs ~20 parses)

    run()
    logging.getLogger("server_app").setLevel(logging.NOTSET)
    return {**counts, "seconds": round(time.perf_counter() - t0, 1),
            "rss_growth_mb": round(rss_mb() - rss0, 1), "escapes": escapes[:10]}


# ---------------------------------------------------------------------------- in-process federation
class Federation(InProcessFederation):
    """The real strategy and pipelines and 5 real node handlers in one process, one round at a time."""

    def __init__(self, overrides: dict, work: Path, name: str) -> None:
        super().__init__(overrides, work, name, NODES)

    def round(self, server_round: int, attack: str | None) -> dict:
        """One round; node 4 tampers with its train reply for a weight attack. The attacks that do not
        change training (:data:`SIDE_ATTACKS`: class means, evaluation metrics) are replayed beside the
        honest replies of the same round, through the same validator, aggregator and evaluation."""
        self.prepare()
        replies = self.train_replies(server_round)
        if attack:
            tamper_train(replies[HOSTILE], attack, self.strategy.sent_base, self.cfg)
        if attack == "partition_squatting":
            replies.insert(0, replies.pop(HOSTILE))  # the squatter replies first
        self.aggregate(server_round, replies)
        out: dict = {"means": self.strategy.state.global_means, "node_means": dict(self.strategy.state.replies.means)}
        if attack is None:  # poisoned class means: the same round with node 4's means shifted
            poisoned = replies[HOSTILE]
            tamper_train(poisoned, "poisoned_means", self.strategy.sent_base, self.cfg)
            try:
                means = self.strategy.validator.parse_means(poisoned.content, dict(poisoned.content[METRICS]))
                node_means = {**out["node_means"], HOSTILE: means}
                out["poisoned_means"] = self.aggregator.merge_means(self.class_names, node_means)
            except Rejected as err:
                log.info("poisoned class means rejected: %s", err)
                out["poisoned_means"] = out["means"]
        true, evaluations, messages = [], [], []
        for node in range(NODES):
            msg = self.message(server_round, node, MessageType.EVALUATE)
            reply = node_evaluate(msg, self.contexts[node])
            true.append(dict(reply.content[METRICS]))
            if node == HOSTILE and attack == "partition_squatting":
                reply.content[METRICS]["partition_id"] = SQUATTED
            evaluations.append(reply)
            messages.append(msg)
        if attack == "partition_squatting":
            evaluations.insert(0, evaluations.pop(HOSTILE))
        if attack is None:
            for side in ("inflated_eval", "deflated_eval"):
                lying = Message(content=RecordDict({METRICS: MetricRecord(true[HOSTILE])}), reply_to=messages[HOSTILE])
                tamper_evaluate(lying, side, self.cfg)
                reported = self.strategy.aggregate_evaluate(server_round, evaluations[:HOSTILE] + [lying]) or {}
                out[f"reported_{side}"] = dict(reported).get("test_retrieval_acc", float("nan"))
        reported = dict(self.strategy.aggregate_evaluate(server_round, evaluations) or {})
        n = sum(m["num-examples"] for m in true)
        out["true_acc"] = sum(m["test_retrieval_acc"] * m["num-examples"] for m in true) / n
        out["reported_acc"] = reported.get("test_retrieval_acc", float("nan"))
        return out


def update_of(reply: Message, base: dict) -> dict[str, torch.Tensor]:
    got = decode(reply.content[ARRAYS], base)
    return {k: got[k] - base[k] for k in base}


def tamper_train(reply: Message, attack: str, base: dict, cfg) -> None:
    """Node 4's lie in its train reply (see the module docstring)."""
    content = reply.content
    codec = cfg.wire_codec
    if attack == "inflated_examples":
        metrics = content[METRICS]
        factor = 10**6
        for key in ("num-examples", "withheld_clips"):
            metrics[key] = int(metrics.get(key, 0)) * factor
        means = ClassTensors.from_records(content, CLASS_MEANS, CLASS_MEANS_META)
        means.counts = means.counts * factor
        means.to_records(content, CLASS_MEANS, CLASS_MEANS_META, half=codec != "float32")
        targets = ClassTensors.from_records(content, CLASS_MEANS, CLASS_MEANS_META)  # dims of the outputs
        untrained = Adapters.seeded(AdapterConfig.from_sections(cfg.adapter, cfg.audio_encoder, cfg.text_encoder, clip_dim=targets.clip.shape[1], t5_dim=targets.t5.shape[2]), cfg.seed)
        content[ARRAYS] = encode(untrained.state_dict(), codec, base=base)
    elif attack in ("scaled_update", "sign_flip"):
        factor = 100.0 if attack == "scaled_update" else -1.0
        update = update_of(reply, base)
        content[ARRAYS] = encode({k: base[k] + factor * update[k] for k in base}, codec, base=base)
    elif attack == "poisoned_means":
        means = ClassTensors.from_records(content, CLASS_MEANS, CLASS_MEANS_META)
        means.clip, means.t5 = means.clip + 100.0, means.t5 + 100.0
        means.to_records(content, CLASS_MEANS, CLASS_MEANS_META, half=codec != "float32")
    elif attack == "partition_squatting":
        content[METRICS]["partition_id"] = SQUATTED


def tamper_evaluate(reply: Message, attack: str, cfg) -> None:
    metrics = reply.content[METRICS]
    value = 1.0 if attack == "inflated_eval" else 0.0
    for key in list(metrics):
        if "acc" in key.split("_"):
            metrics[key] = value
    metrics["num-examples"] = cfg.robust.max_examples


def run_federation(overrides: dict, rounds: int, work: Path, name: str, attack: str | None) -> dict:
    fed = Federation({**overrides, "num-rounds": rounds}, work, name)
    t0 = time.perf_counter()
    last = {}
    for r in range(1, rounds + 1):
        last = fed.round(r, attack)
        log.info("%s round %d: true acc %.4f, reported %.4f", name, r, last["true_acc"], last["reported_acc"])
    return {**last, "seconds": time.perf_counter() - t0,
            "squatted_owner": fed.strategy.validator.owners.owner_of.get(SQUATTED),
            "server_seconds_per_round": statistics.mean(fed.server_seconds)}


def means_distance(a: ClassTensors, b: ClassTensors) -> float:
    """Largest per-class L2 distance between two sets of global class means (both branches)."""
    index = {n: i for i, n in enumerate(b.class_names)}
    return max(float(torch.cat([a.clip[i] - b.clip[index[n]], (a.t5[i] - b.t5[index[n]]).flatten()]).norm())
               for i, n in enumerate(a.class_names) if n in index)


def honest_spread(honest: dict) -> float:
    """How far honest nodes' own class means lie from the honest global ones (largest per class)."""
    return max(means_distance(m, honest["means"]) for p, m in honest["node_means"].items() if p != HOSTILE)


def _federation_job(job: tuple[dict, int, str, str, str | None]) -> tuple[str, dict]:
    """One federation in a worker process (``--jobs``): its label and its result."""
    overrides, rounds, work, name, attack = job
    torch.set_num_threads(1)
    setup_logging()
    isolated_cache(folder=Path(work) / "cache")
    return name, run_federation(overrides, rounds, Path(work), name, attack)


def warm_cache(work: Path) -> None:
    from client_app.node_data import load_node_data
    from client_app.site import NodeSite
    from common.config import NodeRuntimeConfig

    cfg = load_config({"cache-dir": str(work / "cache"), "device": "cpu"})
    for pid in range(NODES):
        load_node_data(cfg.data, NodeSite.of(cfg, NodeRuntimeConfig(partition_id=pid, num_partitions=NODES)))


def attacks(names: list[str], rounds: int, work: Path, jobs: int = 1) -> dict:
    """The honest federations (default and robust), then each weight attack under both configurations;
    with ``jobs`` > 1 the federations run side by side in worker processes (one torch thread each)."""
    plan = [({}, rounds, str(work), "honest", None), (ROBUST, rounds, str(work), "honest-robust", None)]
    plan += [(overrides, rounds, str(work), f"{attack}-{label}", attack)
             for attack in names if attack in WEIGHT_ATTACKS
             for label, overrides in (("default", {}), ("robust", ROBUST))]
    if jobs > 1:
        import multiprocessing

        warm_cache(work)  # the dataset and its embeddings once, before the workers read them side by side
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = dict(pool.map(_federation_job, plan))
    else:
        results = dict(_federation_job(job) for job in plan)
    honest = {"default": results["honest"], "robust": results["honest-robust"]}
    spread = honest_spread(honest["default"])
    out: dict = {"honest_acc": round(honest["default"]["true_acc"], 4),
                 "honest_acc_robust": round(honest["robust"]["true_acc"], 4),
                 "honest_reported": round(honest["default"]["reported_acc"], 4),
                 "honest_reported_robust": round(honest["robust"]["reported_acc"], 4),
                 "honest_means_spread": round(spread, 4)}
    for attack in names:
        row: dict = {"honest_acc": out["honest_acc"], "honest_reported": out["honest_reported"]}
        for label in ("default", "robust"):
            if attack in WEIGHT_ATTACKS:
                result = results[f"{attack}-{label}"]
                row[f"attacked_acc_{label}"] = round(result["true_acc"], 4)
                row[f"reported_acc_{label}"] = round(result["reported_acc"], 4)
            else:  # training is the honest run's: the lie only reaches the class means or the reported figure
                result = honest[label]
                row[f"attacked_acc_{label}"] = round(result["true_acc"], 4)
                row[f"reported_acc_{label}"] = round(result.get(f"reported_{attack}", result["reported_acc"]), 4)
            means = result["poisoned_means"] if attack == "poisoned_means" else result["means"]
            row[f"means_distance_{label}"] = round(means_distance(means, honest["default"]["means"]), 4)
            if attack == "partition_squatting":  # who holds partition 0 at the end: its node (100) or the squatter
                row[f"partition_{SQUATTED}_owner_{label}"] = result["squatted_owner"]
        row["honest_reported_robust"] = out["honest_reported_robust"]
        row["robust_within_0.05"] = abs(row["attacked_acc_robust"] - out["honest_acc"]) <= 0.05
        # the reported figure against the same configuration's honest one, and against the truth of this run
        row["robust_reported_within_0.05"] = abs(row["reported_acc_robust"] - out["honest_reported_robust"]) <= 0.05
        row["robust_reported_vs_true"] = round(row["reported_acc_robust"] - row["attacked_acc_robust"], 4)
        row["robust_means_within_spread"] = row["means_distance_robust"] <= spread
        out[attack] = row
        log.info("%s: %s", attack, row)
    out["robust_seconds_per_round"] = round(honest["robust"]["server_seconds_per_round"], 4)
    out["fedavg_seconds_per_round"] = round(honest["default"]["server_seconds_per_round"], 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fuzz-cases", type=int, default=20000)
    parser.add_argument("--attacks", default="all", help=f"comma list of {', '.join(ATTACKS)}, 'all' or 'none'")
    parser.add_argument("--work", default="", help="folder for caches and runs (default: a temporary one)")
    parser.add_argument("--jobs", type=int, default=1, help="federations run side by side (one torch thread each)")
    add_record_argument(parser)
    args = parser.parse_args()
    setup_logging()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(args.work or tempfile.mkdtemp(prefix="feda2v-adversarial-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    isolated_cache(folder=work / "cache")
    names = list(ATTACKS) if args.attacks == "all" else [a for a in args.attacks.split(",") if a and a != "none"]
    unknown = sorted(set(names) - set(ATTACKS))
    if unknown:
        parser.error(f"unknown attacks {unknown}; choose from {ATTACKS}")
    result: dict = {"nodes": NODES, "hostile": 1, "rounds": args.rounds, "robust_config": ROBUST}
    if args.fuzz_cases:
        result["fuzz"] = fuzz(args.fuzz_cases, work)
        log.info("fuzz: %s", result["fuzz"])
    if names:
        result["attacks"] = attacks(names, args.rounds, work, args.jobs)
    emit(result, record=args.record)


if __name__ == "__main__":
    main()
