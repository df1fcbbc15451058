"""Fault drills on a real loopback deployment (1 SuperLink + 3 SuperNodes) plus a round with malformed replies.

Scenarios (:mod:`ops.deploy.drills`): kill -9 a SuperNode during round 2 of 4; kill -9 the ServerApp after
round 2 and resume (compared with an uninterrupted run of the same config); restart a SuperNode after
round 1 with ``aggregation = "none"``; a SuperNode that registers its train replies and never uploads
their objects (``overruns``: how many seconds after its deadline each such phase ended). Then one round
through the real strategy with two malformed replies (NaN weights, wrong shapes) among four. Prints one
JSON object as its last line.

    python bench/faults.py [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import Message, MessageType, Metadata, MetricRecord, RecordDict
from record import add_record_argument, emit  # the sibling module (bench/ is sys.path[0])

from common.config import load_config
from common.data.synth import SYNTH_CLASSES, synthesize_dataset
from common.logs import setup_logging
from common.models.adapters import AdapterConfig, Adapters
from common.records import CLASS_MEANS, CLASS_MEANS_META, ClassTensors, module_to_arrays
from ops.deploy import drills, faulty_supernode
from ops.deploy.local import LocalFederation
from server_app.pipeline import build_pipelines
from server_app.run_context import ServerRun
from server_app.strategy import FedA2VStrategy
from server_app.summary import RunSummary
from server_app.validation import ReplyValidator

log = logging.getLogger("bench.faults")


def malformed_round(work: Path) -> dict:
    """One round through the strategy: 2 good replies, one with NaN weights, one with wrong shapes."""
    t0 = time.monotonic()
    acfg = AdapterConfig(in_dim=8, in_tokens=2, clip_dim=6, t5_dim=5, t5_tokens=2, hidden_dim=16, heads=2, dropout=0.0)
    names = ["dog", "siren"]
    targets = ClassTensors(names, torch.randn(2, 6), torch.randn(2, 2, 5))
    run = ServerRun(run_dir=work, targets=targets, template=Adapters(acfg), adapter_config=acfg.to_dict(),
                    config_hash="bench", num_rounds=1, device=torch.device("cpu"))
    summary = RunSummary(work / "summary.json", {})
    pipes = build_pipelines(load_config({"num-rounds": 1, "render.when": "off"}), run, summary)
    strategy = FedA2VStrategy(targets=targets, round_pipeline=pipes.round, after_round=pipes.after_round,
                              validator=ReplyValidator(run.template.state_dict(), names, 6, (2, 5)), min_replies=0.5)
    nan = Adapters(acfg)
    with torch.no_grad():
        next(nan.parameters()).fill_(float("nan"))
    wrong = Adapters(AdapterConfig(**{**acfg.to_dict(), "hidden_dim": 32}))
    replies = []
    for pid, model in enumerate([Adapters(acfg), Adapters(acfg), nan, wrong]):
        content = RecordDict({"arrays": module_to_arrays(model), "metrics": MetricRecord({"num-examples": 4, "partition_id": pid})})
        ClassTensors(names, torch.ones(2, 6), torch.ones(2, 2, 5), torch.tensor([2, 2])).to_records(content, CLASS_MEANS, CLASS_MEANS_META)
        meta = Metadata(run_id=1, message_id=str(pid), src_node_id=10 + pid, dst_node_id=0, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=60, message_type=MessageType.TRAIN)
        replies.append(Message(content=content, metadata=meta))
    strategy.asked["train"] = len(replies)
    arrays, _ = strategy.aggregate_train(1, replies)
    strategy.after_round(1, arrays)
    saved = json.loads((work / "summary.json").read_text())
    return {"completed": arrays is not None, "rounds_in_summary": len(saved["rounds"]), "lost_rounds": 0,
            "seconds": round(time.monotonic() - t0, 2), "replies": len(replies),
            "aggregated": len(strategy.state.replies.nodes), "rejected": saved["rounds"][0]["train"].get("rejected", [])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="", help="work folder (default: a temporary one)")
    parser.add_argument("--nodes", type=int, default=3)
    add_record_argument(parser)
    args = parser.parse_args()
    setup_logging()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="feda2v-faults-"))
    data = synthesize_dataset(work / "data", list(SYNTH_CLASSES[: drills.BASE_CONFIG["data.num-classes"]]),
                              clips_per_class=drills.BASE_CONFIG["data.clips-per-class"], seed=0)
    results: dict[str, dict] = {}
    scenarios = {
        "kill_node": drills.kill_node_mid_run,
        "kill_serverapp_resume": drills.kill_serverapp_then_resume,
        "restart_node": drills.restart_node_between_rounds,
    }
    for name, drill in scenarios.items():
        root = work / name
        with LocalFederation(root, args.nodes, data, cache_dir=work / "cache") as fed:
            log.info("drill %s ...", name)
            results[name] = drill(fed, root / "out")
            log.info("drill %s: %s", name, results[name])
    victim = args.nodes - 1
    with LocalFederation(work / "withheld", args.nodes, data, cache_dir=work / "cache",
                         node_programs={victim: faulty_supernode.command(["train"])}) as fed:
        log.info("drill withheld_objects ...")
        results["withheld_objects"] = drills.withheld_reply_objects(fed, work / "withheld" / "out", victim)
        log.info("drill withheld_objects: %s", results["withheld_objects"])
    results["malformed_replies"] = malformed_round(work / "malformed")
    emit(results, record=args.record)


if __name__ == "__main__":
    main()
