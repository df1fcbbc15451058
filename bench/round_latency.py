"""Where a deployment round's time goes: a loopback SuperLink and 2 SuperNodes (real processes).

Runs the same small federation (4 classes, 12 clips each, 2 local epochs, ``render.when = "off"``)
twice after an untimed warm-up run that fills the embedding cache: once with the server polling for
replies every 3 s as Flower's deployment Grid does (``reply-poll-interval = 3``, "before") and once
with the default (:mod:`server_app.grid`, "after"). Per round, from ``summary.json``:

* ``wall_s``: the round's wall time (``elapsed_seconds`` differences; round 1 is left out of the
  means, it also holds the run's start);
* ``node_s``: the node compute on the critical path: the slowest node's train handler plus the
  slowest node's evaluate handler (``call_seconds``; nodes work in parallel);
* ``process_start_s``: what each message paid before its handler ran, for a fresh ClientApp process
  (start and imports: ``process_age_seconds`` at handler entry), slowest node per phase;
* ``server_s``: the server's own steps (``step_seconds_*``);
* ``overhead_s`` = wall - node - process_start - server: polling waits (server and SuperNode),
  message transfer and (de)serialisation.

Usage:  python bench/round_latency.py [--rounds 4] [--work DIR]
Last line of output: one JSON object {"before": {...}, "after": {...}}.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from common.data.synth import SYNTH_CLASSES, synthesize_dataset
from common.deploy import drills
from common.deploy.local import LocalFederation
from common.logs import setup_logging
from common.report.run_data import server_step_seconds

log = logging.getLogger("bench.round_latency")


def _slowest(entry: dict, phase: str, key: str) -> float:
    return max((float(m.get(key, 0.0)) for m in entry.get(phase, {}).get("nodes", {}).values()), default=0.0)


def breakdown(summary: dict) -> dict:
    rows, previous = [], 0.0
    for entry in summary["rounds"]:
        wall = float(entry["elapsed_seconds"]) - previous
        previous = float(entry["elapsed_seconds"])
        node = _slowest(entry, "train", "call_seconds") + _slowest(entry, "evaluate", "call_seconds")
        start = _slowest(entry, "train", "process_age_seconds") + _slowest(entry, "evaluate", "process_age_seconds")
        server = server_step_seconds(entry)
        rows.append({"round": entry["round"], "wall_s": round(wall, 2), "node_s": round(node, 2),
                     "process_start_s": round(start, 2), "server_s": round(server, 2),
                     "overhead_s": round(wall - node - start - server, 2)})
    steady = rows[1:] or rows
    mean = {k: round(statistics.mean(r[k] for r in steady), 2) for k in ("wall_s", "node_s", "process_start_s",
                                                                          "server_s", "overhead_s")}
    mean["beyond_compute_s"] = round(mean["wall_s"] - mean["node_s"] - mean["server_s"], 2)
    return {"rounds": rows, "steady": mean, "final_acc": summary.get("final", {}).get("test_retrieval_acc")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--work", default="", help="work folder (default: a temporary one)")
    args = parser.parse_args()
    setup_logging()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="feda2v-latency-"))
    data = synthesize_dataset(work / "data", list(SYNTH_CLASSES[: drills.BASE_CONFIG["data.num-classes"]]),
                              clips_per_class=drills.BASE_CONFIG["data.clips-per-class"], seed=0)
    out = work / "out"
    results: dict[str, dict] = {}
    with LocalFederation(work / "fed", 2, data, cache_dir=work / "cache") as fed:
        fed.run(drills.run_config(out, "warm", **{"num-rounds": 1, "min-nodes": 2}))  # fills the embedding cache
        for name, interval in (("before", 3.0), ("after", None)):
            extra = {"num-rounds": args.rounds, "min-nodes": 2}
            if interval is not None:
                extra["reply-poll-interval"] = interval
            t0 = time.monotonic()
            result = fed.run(drills.run_config(out, name, **extra))
            if not result.ok:
                raise RuntimeError(f"run {name!r}: {result.problem}")
            results[name] = {"run_seconds": round(time.monotonic() - t0, 1),
                             **breakdown(json.loads((out / name / "summary.json").read_text()))}
            log.info("%s: %s", name, results[name]["steady"])
    print(json.dumps(results))


if __name__ == "__main__":
    main()
