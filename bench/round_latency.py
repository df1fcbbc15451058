"""Where a deployment round's time goes: a loopback SuperLink and 2 SuperNodes (real processes).

Runs the same small federation (4 classes, 12 clips each, 2 local epochs, ``render.when = "off"``)
once per variant after an untimed warm-up run that fills the embedding cache:

* "before": Flower's timing (``flower-supernode``, which sleeps 3 s when it finds no message and
  retries objects after 1-10 s, and the server polling for replies every 3 s,
  ``reply-poll-interval = 3``, as Flower's deployment Grid does);
* "flower": ``flower-supernode`` with the default reply polling of :mod:`server_app.grid` (what a
  site running Flower's own binaries gets);
* "after": ``feda2v-supernode`` (:mod:`ops.deploy.prompt_timing`: prompt polling, and warm
  ClientApp processes forked by ``feda2v-superexec``, :mod:`ops.deploy.warm_superexec`) with the
  default reply polling.
* "memory": "after" with the SuperLink's state in memory (no ``--database`` file): Flower 1.41 then
  keeps the objects (the weights) in a Python dict instead of SQLite, and nothing survives a
  SuperLink restart.

Every variant but "memory" runs the SuperLink with a ``--database`` file, as the deployment guide
(docs/deployment.md) does.

Every run's ServerApp retries in-flight reply objects promptly. Per round, from ``summary.json``:

* ``wall_s``: the round's wall time (``elapsed_seconds`` differences; round 1 is left out of the
  means, it also holds the run's start);
Per phase (train, evaluate) the node whose reply came last is followed (nodes work in parallel):

* ``node_s``: its handler (``call_seconds``), both phases;
* ``process_start_s``: what the message paid before its handler ran, for a fresh ClientApp process
  (start and imports: ``process_age_seconds`` at handler entry);
* ``wait_s``: from the server's push to the process start (``dispatch_seconds`` minus the above):
  the SuperLink -> SuperNode pull (Flower's SuperNode sleeps 3 s when it found nothing), the
  SuperExec's poll for new messages, and the message's transfer;
* ``return_s``: from the handler's exit until the server pulled the reply (``return_seconds``):
  encoding, ClientApp -> SuperNode -> SuperLink, the server's reply polling;
* ``server_s``: the server's own steps (``step_seconds_*``);
* ``rest_s`` = wall - all of the above: building and pushing messages, process exits, the round's
  bookkeeping; ``overhead_s`` = ``wait_s`` + ``return_s`` + ``rest_s``.

Usage:  python bench/round_latency.py [--rounds 4] [--work DIR] [--variants before,flower,after,memory]
Last line of output: one JSON object {"before": {...}, "flower": {...}, "after": {...}, "memory": {...}}.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from record import add_record_argument, emit  # the sibling module (bench/ is sys.path[0])

from common.data.synth import SYNTH_CLASSES, synthesize_dataset
from common.logs import setup_logging
from common.report.run_data import server_step_seconds
from ops.deploy import drills
from ops.deploy.local import LocalFederation

log = logging.getLogger("bench.round_latency")


# name: (feda2v-supernode instead of flower-supernode, the server's reply-poll-interval (None = the default),
#        the SuperLink's --database file)
VARIANTS = {"before": (False, 3.0, True), "flower": (False, None, True), "after": (True, None, True),
            "memory": (True, None, False)}
PARTS = ("wall_s", "node_s", "process_start_s", "wait_s", "return_s", "server_s", "rest_s", "overhead_s")


def _last_reply(entry: dict, phase: str) -> dict:
    """The metrics of the node whose reply completed the phase (largest dispatch + handler + return)."""
    nodes = list(entry.get(phase, {}).get("nodes", {}).values())
    trip = lambda m: sum(float(m.get(k, 0.0)) for k in ("dispatch_seconds", "call_seconds", "return_seconds"))  # noqa: E731
    return max(nodes, key=trip, default={})


def breakdown(summary: dict) -> dict:
    rows, previous = [], 0.0
    for entry in summary["rounds"]:
        wall = float(entry["elapsed_seconds"]) - previous
        previous = float(entry["elapsed_seconds"])
        part = dict.fromkeys(("node_s", "process_start_s", "wait_s", "return_s"), 0.0)
        for phase in ("train", "evaluate"):
            m = _last_reply(entry, phase)
            age, dispatch = float(m.get("process_age_seconds", 0.0)), float(m.get("dispatch_seconds", 0.0))
            fresh = age <= dispatch  # deployment: the process was started for this message
            part["node_s"] += float(m.get("call_seconds", 0.0))
            part["process_start_s"] += age if fresh else 0.0
            part["wait_s"] += dispatch - age if fresh else dispatch
            part["return_s"] += float(m.get("return_seconds", 0.0))
        server = server_step_seconds(entry)
        row = {"round": entry["round"], "wall_s": wall, **part, "server_s": server,
               "rest_s": wall - sum(part.values()) - server}
        row["overhead_s"] = row["wait_s"] + row["return_s"] + row["rest_s"]
        rows.append({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
    steady = rows[1:] or rows
    mean = {k: round(statistics.mean(r[k] for r in steady), 2) for k in PARTS}
    mean["beyond_compute_s"] = round(mean["wall_s"] - mean["node_s"] - mean["server_s"], 2)
    return {"rounds": rows, "steady": mean, "final_acc": summary.get("final", {}).get("test_retrieval_acc")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--work", default="", help="work folder (default: a temporary one)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    add_record_argument(parser)
    args = parser.parse_args()
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not chosen or any(v not in VARIANTS for v in chosen):
        parser.error(f"--variants: choose from {list(VARIANTS)}, got {args.variants!r}")
    setup_logging()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="feda2v-latency-"))
    data = synthesize_dataset(work / "data", list(SYNTH_CLASSES[: drills.BASE_CONFIG["data.num-classes"]]),
                              clips_per_class=drills.BASE_CONFIG["data.clips-per-class"], seed=0)
    out = work / "out"
    results: dict[str, dict] = {}
    for name in chosen:
        prompt_supernodes, interval, database = VARIANTS[name]
        with LocalFederation(work / f"fed-{name}", 2, data, cache_dir=work / "cache",
                             prompt_supernodes=prompt_supernodes, superlink_database=database) as fed:
            if not results:
                fed.run(drills.run_config(out, "warm", **{"num-rounds": 1, "min-nodes": 2}))  # fills the embedding cache
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
    emit(results, record=args.record)


if __name__ == "__main__":
    main()
