"""Memory over a long run: does any process grow from round to round?

Runs the embedded default federation (3 simulated nodes) for ``--rounds`` rounds (default 30) with
``render.when = "off"`` and reads, per round, the resident memory every process reported in
``summary.json``: the ServerApp process (``server_rss_mb``, after the round's server steps; in
simulation it also hosts Flower's simulation engine) and each node's ClientApp worker (``rss_mb``
at the end of its train and of its evaluate handler). Growth is measured from round ``--after``
(default 3, once caches, allocator pools and the first checkpoints exist) to the last round:
``(last - at_after) / at_after`` and the largest value after it, per process.

Usage:  python bench/memory.py [--rounds 30] [--after 3] [--run-config 'k=v ...']
Last line of output: one JSON object: per-round series, growth per process, the worst growth.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from fed_vs_central import run_federated  # the sibling script (bench/ is this script's sys.path[0])
from record import add_record_argument, emit  # the sibling module (bench/ is sys.path[0])
from workspace import isolated_cache

from common.logs import setup_logging

log = logging.getLogger("bench.memory")


def growth(series: list[float], after: int) -> dict[str, float]:
    """Growth of a per-round series (index 0 = round 1) from round ``after`` on."""
    base = series[after - 1]
    later = series[after - 1:]
    return {"at_round_after_mb": round(base, 1), "last_mb": round(series[-1], 1), "max_after_mb": round(max(later), 1),
            "growth_last": round((series[-1] - base) / base, 4), "growth_max": round((max(later) - base) / base, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--after", type=int, default=3)
    parser.add_argument("--num-nodes", type=int, default=3)
    parser.add_argument("--run-config", default="", help="extra run-config overrides ('k=v k2=v2')")
    add_record_argument(parser)
    args = parser.parse_args()
    setup_logging()
    isolated_cache(prefix="feda2v-bench-memory")
    with tempfile.TemporaryDirectory(prefix="feda2v-bench-memory-") as tmp:
        t0 = time.perf_counter()
        summary_path = run_federated(f'num-rounds={args.rounds} render.when="off" {args.run_config}'.strip(),
                                     args.num_nodes, Path(tmp), run_name="memory")
        seconds = time.perf_counter() - t0
        summary = json.loads(summary_path.read_text())
    if summary["run"].get("status") != "completed":
        raise RuntimeError(f"the run did not complete: {summary['run'].get('error')}")
    rounds = summary["rounds"]
    series: dict[str, list[float]] = {"server": [float(r["train"]["global"]["server_rss_mb"]) for r in rounds]}
    for phase in ("train", "evaluate"):
        for pid in sorted({p for r in rounds for p in r[phase].get("nodes", {})}, key=int):
            series[f"node{pid}_{phase}"] = [float(r[phase]["nodes"][pid]["rss_mb"]) for r in rounds
                                            if pid in r[phase].get("nodes", {})]
    result = {name: growth(values, args.after) for name, values in series.items() if len(values) >= args.after}
    worst = max(result, key=lambda k: result[k]["growth_max"])
    out = {"rounds": len(rounds), "after_round": args.after, "run_seconds": round(seconds, 1),
           "worst_process": worst, "worst_growth_max": result[worst]["growth_max"], "per_process": result,
           "series_mb": {k: [round(v, 1) for v in vals] for k, vals in series.items()},
           "final_test_retrieval_acc": summary["final"].get("test_retrieval_acc")}
    log.info("worst growth after round %d: %s %.2f%%", args.after, worst, 100 * result[worst]["growth_max"])
    emit(out, record=args.record)


if __name__ == "__main__":
    main()
