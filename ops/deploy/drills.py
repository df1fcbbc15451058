"""Fault drills on a local deployment (:class:`ops.deploy.local.LocalFederation`): what a federation
must survive, run as real processes on loopback. Used by ``bench/faults.py`` and the deployment tests.

* :func:`kill_node_mid_run`: ``kill -9`` one SuperNode while round 2 runs; the run must complete on the
  others and the summary must say which node failed in which round, with Flower's error code.
* :func:`kill_serverapp_then_resume`: ``kill -9`` the ServerApp after round 2, then ``resume = true``:
  rounds 3.. run and ``summary.json`` holds every round exactly once.
* :func:`restart_node_between_rounds`: restart a SuperNode after round 1 with ``aggregation = "none"``:
  it reloads its own adapters from disk (``state_restored``) instead of starting over.
* :func:`withheld_reply_objects`: one SuperNode registers its train replies and never uploads their
  objects (:mod:`ops.deploy.faulty_supernode`); each train phase must end at its deadline without
  that node, and the drill reports how many seconds after the deadline each phase ended.

Each returns a JSON-able dict: ``completed``, ``rounds_in_summary``, ``lost_rounds``, ``seconds`` and
what the drill observed.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import time
from pathlib import Path
from typing import Any

from common.metric_keys import TEST_ACC
from ops import launcher
from ops.deploy.local import LocalFederation, wait_until

log = logging.getLogger(__name__)

# Small and fast, on purpose: 12 clips per class, 2 local epochs; every node keeps its class means.
BASE_CONFIG = {"data.num-classes": 4, "data.clips-per-class": 12, "train.local-epochs": 2, "privacy.min-class-count": 1,
               "render.when": "off", "min-replies": 0.5}


def run_config(out: Path, run_name: str, **extra: Any) -> list[str]:
    values = {**BASE_CONFIG, "output-dir": str(out), "run-name": run_name, **extra}
    return [" ".join(f"{k}={json.dumps(v) if isinstance(v, (str, bool)) else v}" for k, v in values.items())]


def summary_of(out: Path, run_name: str) -> dict[str, Any]:
    path = out / run_name / "summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def completed_rounds(out: Path, run_name: str) -> list[int]:
    return [e["round"] for e in summary_of(out, run_name).get("rounds", []) if "evaluate" in e]


def _result(out: Path, run_name: str, num_rounds: int, status: str, t0: float, **extra: Any) -> dict[str, Any]:
    rounds = completed_rounds(out, run_name)
    summary = summary_of(out, run_name)
    return {
        "completed": status == launcher.COMPLETED and rounds == list(range(1, num_rounds + 1)),
        "status": status,
        "rounds_in_summary": len(rounds),
        "lost_rounds": num_rounds - len(set(rounds)),
        "duplicate_rounds": len(rounds) - len(set(rounds)),
        "seconds": round(time.monotonic() - t0, 1),
        "final_acc": summary.get("final", {}).get(TEST_ACC),
        **extra,
    }


def _background_status(fed: LocalFederation, proc, log_name: str, timeout_s: float) -> str:
    try:
        proc.wait(timeout=timeout_s)
    except Exception:  # noqa: BLE001 - a drill must end: stop our flwr run and report what the SuperLink says
        proc.kill()
        proc.wait()
    run_id = launcher.parse_run_id((fed.logs / f"{log_name}.log").read_text(errors="replace"))
    if run_id is None:
        return "no run id"
    try:
        return str(launcher.run_status(run_id, fed.env, fed.root, fed.CONNECTION).get("status"))
    except ValueError as err:
        return f"unknown ({err})"


def kill_node_mid_run(fed: LocalFederation, out: Path, num_rounds: int = 4, victim: int = 2,
                      round_timeout: float = 180, timeout_s: float = 900) -> dict[str, Any]:
    t0 = time.monotonic()
    name = "kill-node"
    proc = fed.submit(run_config(out, name, **{"num-rounds": num_rounds, "min-nodes": fed.num_nodes - 1,
                                               "round-timeout": round_timeout}), name)
    wait_until("round 1 to complete", lambda: 1 in completed_rounds(out, name), timeout_s, poll_s=0.2, alive=[proc])
    fed.kill_node(victim, signal.SIGKILL)
    killed_at = time.monotonic() - t0
    status = _background_status(fed, proc, name, timeout_s)
    failures = {e["round"]: e["train"].get("failures", []) + e["evaluate"].get("failures", [])
                for e in summary_of(out, name).get("rounds", [])}
    return _result(out, name, num_rounds, status, t0, killed_after_s=round(killed_at, 1),
                   failures={str(r): f for r, f in failures.items() if f})


def kill_serverapp_then_resume(fed: LocalFederation, out: Path, num_rounds: int = 4, after_round: int = 2,
                               timeout_s: float = 900, reference: bool = True) -> dict[str, Any]:
    t0 = time.monotonic()
    name = "kill-server"
    config = {"num-rounds": num_rounds, "min-nodes": fed.num_nodes}
    proc = fed.submit(run_config(out, name, **config), name)
    wait_until(f"round {after_round} to complete", lambda: len(completed_rounds(out, name)) >= after_round,
               timeout_s, poll_s=0.2, alive=[proc])
    killed = fed.kill_serverapp()
    rounds_at_kill = completed_rounds(out, name)
    proc.kill()
    proc.wait()
    resumed = fed.run(run_config(out, name, **config, resume=True), timeout=timeout_s)
    extra: dict[str, Any] = {"killed_serverapp_pids": killed, "rounds_before_kill": rounds_at_kill,
                             "resume_problem": resumed.problem}
    if reference:
        ref = fed.run(run_config(out, "uninterrupted", **config), timeout=timeout_s)
        extra["final_acc_reference"] = summary_of(out, "uninterrupted").get("final", {}).get(TEST_ACC)
        extra["reference_problem"] = ref.problem
    status = launcher.COMPLETED if resumed.ok else str((resumed.status or {}).get("status"))
    return _result(out, name, num_rounds, status, t0, **extra)


def restart_node_between_rounds(fed: LocalFederation, out: Path, num_rounds: int = 3, node: int = 1,
                                timeout_s: float = 900) -> dict[str, Any]:
    t0 = time.monotonic()
    name = "restart-node"
    proc = fed.submit(run_config(out, name, **{"num-rounds": num_rounds, "min-nodes": fed.num_nodes - 1,
                                               "aggregation": "none"}), name)
    wait_until("round 1 to complete", lambda: 1 in completed_rounds(out, name), timeout_s, poll_s=0.2, alive=[proc])
    fed.kill_node(node, signal.SIGTERM)
    fed.start_node(node)
    status = _background_status(fed, proc, name, timeout_s)
    rounds = summary_of(out, name).get("rounds", [])
    mine = [(e["round"], phase, e[phase]["nodes"].get(str(node), {})) for e in rounds for phase in ("train", "evaluate")]
    return _result(out, name, num_rounds, status, t0,
                   restored_in=[f"{r}/{ph}" for r, ph, m in mine if m.get("state_restored") == 1],
                   lost_in=[f"{r}/{ph}" for r, ph, m in mine if m.get("state_lost") == 1],
                   node_trained_in_rounds=[r for r, ph, m in mine if m and ph == "train"])


# what server_app.grid logs when a phase ends at its deadline with replies missing
PHASE_OVERRUN = re.compile(r"phase ended (\d+(?:\.\d+)?) s after its deadline without replies from nodes \[([^\]]*)\]")


def phase_overruns(log_text: str) -> list[dict[str, Any]]:
    """Every phase that ended at its deadline: seconds past the deadline and the (Flower) node ids missing."""
    return [{"after_deadline_s": float(m.group(1)), "missing_nodes": [int(n) for n in m.group(2).split(",") if n.strip()]}
            for m in PHASE_OVERRUN.finditer(log_text)]


def withheld_reply_objects(fed: LocalFederation, out: Path, victim: int, num_rounds: int = 2,
                           round_timeout: float = 60, timeout_s: float = 900) -> dict[str, Any]:
    """Run with node ``victim`` started as a faulty node (``LocalFederation(node_programs={victim:
    faulty_supernode.command()})``) that registers its train replies and never uploads their objects."""
    t0 = time.monotonic()
    name = "withheld-objects"
    result = fed.run(run_config(out, name, **{"num-rounds": num_rounds, "min-nodes": fed.num_nodes,
                                              "round-timeout": round_timeout}), timeout=timeout_s)
    status = launcher.COMPLETED if result.ok else str((result.status or {}).get("status"))
    rounds = summary_of(out, name).get("rounds", [])
    return _result(out, name, num_rounds, status, t0, problem=result.problem, round_timeout_s=round_timeout,
                   train_nodes={str(e["round"]): sorted(e["train"]["nodes"]) for e in rounds},
                   evaluate_nodes={str(e["round"]): sorted(e["evaluate"]["nodes"]) for e in rounds},
                   overruns=phase_overruns(result.output),
                   left_out_logged=result.output.count("left out of this phase"))
