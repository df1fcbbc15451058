"""Bytes on the wire against accuracy: the same federation once per weight codec.

Runs the embedded default federation (3 simulated nodes, 5 rounds, ``render.when = "off"``) once per
``--codecs`` value of ``wire-codec`` and reads, per round, what ``summary.json`` recorded for every
node: ``wire_bytes_train_down`` / ``_train_up`` / ``_evaluate_down`` and their sum
``wire_bytes_per_node`` (counted the way Flower counts records), and the global test retrieval
accuracy. Round 1 also carries the class targets; from round 2 on the nodes hold them.

Usage:  python bench/wire.py [--codecs float32,int8] [--run-config 'k=v ...']
Last line of output: one JSON object, per codec: bytes per node per round (MB), accuracy per round,
final accuracy, number of test clips; plus the steady-state ratio of the first codec to each other.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from fed_vs_central import run_federated  # the sibling script (bench/ is this script's sys.path[0])
from record import add_record_argument, emit  # the sibling module (bench/ is sys.path[0])
from workspace import isolated_cache

from common.logs import setup_logging

log = logging.getLogger("bench.wire")
PARTS = ("wire_bytes_train_down", "wire_bytes_train_up", "wire_bytes_evaluate_down", "wire_bytes_per_node")


def codec_run(codec: str, extra: str, num_nodes: int) -> dict:
    """One federation with ``wire-codec = codec``: bytes (MB per node) and accuracy per round."""
    with tempfile.TemporaryDirectory(prefix=f"feda2v-bench-wire-{codec}-") as tmp:
        overrides = f'render.when="off" wire-codec="{codec}" {extra}'.strip()
        summary = json.loads(run_federated(overrides, num_nodes, Path(tmp), run_name=codec).read_text())
    if summary["run"].get("status") != "completed":
        raise RuntimeError(f"wire-codec={codec}: the run did not complete: {summary['run'].get('error')}")
    rounds = summary["rounds"]
    mb = {k: [round(float(r["train"]["global"].get(k, 0.0)) / 1e6, 3) for r in rounds] for k in PARTS}
    return {"mb_per_node": mb,
            "acc_per_round": [round(float(r["evaluate"]["global"].get("test_retrieval_acc", float("nan"))), 4)
                              for r in rounds],
            "final_acc": summary["final"].get("test_retrieval_acc"),
            "test_clips": summary["final"].get("num-examples")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codecs", default="float32,int8")
    parser.add_argument("--num-nodes", type=int, default=3)
    parser.add_argument("--run-config", default="", help="extra run-config overrides ('k=v k2=v2')")
    add_record_argument(parser)
    args = parser.parse_args()
    setup_logging()
    isolated_cache(prefix="feda2v-bench-wire")  # one cache for every codec's run, the benchmark's own
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    result: dict = {}
    for codec in codecs:
        result[codec] = codec_run(codec, args.run_config, args.num_nodes)
        log.info("%s: %s", codec, result[codec])
    first = result[codecs[0]]["mb_per_node"]["wire_bytes_per_node"][-1]
    result["steady_ratio_vs_" + codecs[0]] = {
        c: round(first / result[c]["mb_per_node"]["wire_bytes_per_node"][-1], 2) for c in codecs[1:]}
    emit(result, record=args.record)


if __name__ == "__main__":
    main()
