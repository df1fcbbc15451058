"""Cost at scale: how a round's time and memory grow with the number of SuperNodes.

For each N (default 3, 10, 30, 100) one real ``flwr run`` simulation (N SuperNodes, one CPU each,
tiny models: ``adapter.hidden-dim`` 32, 4 T5 tokens; the synthetic data, 10 classes; FedAvg;
``render.when = "off"``) runs ``--rounds`` rounds on a cache warmed beforehand (one untimed run over
the same clips), so no round extracts audio. The dataset is the same for every N, so the node
compute summed over nodes stays about the same and what grows with N is the framework's and the
server's per-node work.

Per round, from ``summary.json``:

* ``wall_s``: the round's wall time (``elapsed_seconds`` differences; round 1 also holds the run's start);
* ``server_s``: the server's own steps (``step_seconds_*``: aggregation, checkpoint, summary, ...);
* ``slowest_node_s``: the slowest node's train + evaluate handler time (``call_seconds``);
* ``node_sum_s``: every node's train + evaluate handler time, and ``node_parallel_s`` = that sum over
  the workers that run nodes at once (min(N, CPUs));
* ``overhead_s`` = wall - server - node_parallel (message passing, scheduling, (de)serialisation);
  ``overhead_share`` = overhead / wall;
* ``server_rss_mb`` / ``server_peak_rss_mb``: the ServerApp process (in simulation also Flower's
  simulation engine), ``worker_peak_rss_mb``: the largest ClientApp worker process;
* ``wire_bytes_per_node``: what one node's messages of the round held (train down and up, evaluate down).

Usage:  python bench/scale.py [--nodes 3,10,30,100] [--rounds 3] [--run-config 'k=v ...']
Output: one JSON line per N as it finishes; the last line is one JSON object with every N.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from fed_vs_central import run_federated  # the sibling script (bench/ is this script's sys.path[0])
from record import add_record_argument, emit  # the sibling module (bench/ is sys.path[0])
from workspace import isolated_cache

from common.logs import setup_logging
from common.report.run_data import server_step_seconds

log = logging.getLogger("bench.scale")

TINY = ('adapter.hidden-dim=32 adapter.heads=4 text-encoder.t5-tokens=4 data.num-classes=10 data.clips-per-class=60 '
        'train.local-epochs=1 aggregation="fedavg" render.when="off" privacy.min-class-count=1 ema-decay=0.0')


def _round_rows(summary: dict, workers: int) -> list[dict]:
    rows, previous = [], 0.0
    for entry in summary["rounds"]:
        wall = float(entry["elapsed_seconds"]) - previous
        previous = float(entry["elapsed_seconds"])
        server = server_step_seconds(entry)
        calls: dict[str, float] = {}
        for phase in ("train", "evaluate"):
            for pid, m in entry[phase].get("nodes", {}).items():
                calls[pid] = calls.get(pid, 0.0) + float(m.get("call_seconds", 0.0))
        node_sum = sum(calls.values())
        parallel = node_sum / max(1, min(workers, len(calls) or 1))
        overhead = wall - server - parallel
        peaks = [float(m["peak_rss_mb"]) for phase in ("train", "evaluate")
                 for m in entry[phase].get("nodes", {}).values() if "peak_rss_mb" in m]
        g = entry["train"]["global"]
        rows.append({
            "round": entry["round"], "nodes_replied": len(calls), "wall_s": round(wall, 2), "server_s": round(server, 3),
            "slowest_node_s": round(max(calls.values(), default=0.0), 3), "node_sum_s": round(node_sum, 2),
            "node_parallel_s": round(parallel, 2), "overhead_s": round(overhead, 2),
            "overhead_share": round(overhead / wall, 3) if wall > 0 else None,
            "server_rss_mb": g.get("server_rss_mb"), "server_peak_rss_mb": g.get("server_peak_rss_mb"),
            "worker_peak_rss_mb": max(peaks, default=None),
            "wire_bytes_per_node": g.get("wire_bytes_per_node"),
        })
    return rows


def measure(n: int, rounds: int, overrides: str, workers: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"feda2v-bench-scale-{n}-") as tmp:
        t0 = time.perf_counter()
        summary_path = run_federated(f"{TINY} num-rounds={rounds} min-nodes={n} {overrides}".strip(), n, Path(tmp),
                                     run_name=f"scale-{n}")
        total = time.perf_counter() - t0
        summary = json.loads(summary_path.read_text())
    if summary["run"].get("status") != "completed":
        raise RuntimeError(f"N={n}: the run did not complete ({summary['run'].get('error')})")
    rows = _round_rows(summary, workers)
    steady = rows[1:] or rows  # round 1 also holds the run's start
    return {
        "nodes": n, "rounds": rows, "run_seconds": round(total, 1),
        "steady_wall_s": round(statistics.mean(r["wall_s"] for r in steady), 2),
        "steady_server_s": round(statistics.mean(r["server_s"] for r in steady), 3),
        "steady_overhead_s": round(statistics.mean(r["overhead_s"] for r in steady), 2),
        "steady_overhead_share": round(statistics.mean(r["overhead_share"] or 0 for r in steady), 3),
        "server_peak_rss_mb": max(r["server_peak_rss_mb"] or 0 for r in rows),
        "worker_peak_rss_mb": max(r["worker_peak_rss_mb"] or 0 for r in rows),
        "test_retrieval_acc": summary["final"].get("test_retrieval_acc"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="3,10,30,100")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--run-config", default="", help="extra run-config overrides for every run ('k=v k2=v2')")
    parser.add_argument("--cache", default="", help="cache dir (default: a fresh one, warmed by an untimed run)")
    add_record_argument(parser)
    args = parser.parse_args()
    setup_logging()
    counts = [int(v) for v in args.nodes.split(",") if v.strip()]
    workers = os.cpu_count() or 1  # one CPU per SuperNode: this many ClientApps run at once
    with tempfile.TemporaryDirectory(prefix="feda2v-bench-scale-cache-") as cache_tmp:
        isolated_cache(folder=args.cache or cache_tmp)
        log.info("warming the embedding cache (untimed run, 3 nodes, 1 round)")
        with tempfile.TemporaryDirectory(prefix="feda2v-bench-scale-warm-") as tmp:
            run_federated(f"{TINY} num-rounds=1 min-nodes=3 {args.run_config}".strip(), 3, Path(tmp), run_name="warm")
        results = {}
        for n in counts:
            result = measure(n, args.rounds, args.run_config, workers)
            log.info("N=%d: %s", n, {k: v for k, v in result.items() if k != "rounds"})
            print(json.dumps(result), flush=True)
            results[str(n)] = result
    emit({"workers": workers, "per_n": results}, record=args.record)


if __name__ == "__main__":
    main()
