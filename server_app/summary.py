"""``summary.json``: the run's per-round, per-node and global metrics, rewritten after every round.

Rewritten atomically each round (by the 'summary' step, after the nodes evaluated and the
checkpoints were written) so a crashed or stopped run still leaves a valid file with every
completed round.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_json
from server_app.round_state import RoundState

log = logging.getLogger(__name__)


class RunSummary:
    def __init__(self, path: Path, run_info: dict[str, Any], resumed: dict[str, Any] | None = None) -> None:
        """``resumed``: the summary of the run being continued (its completed rounds are kept)."""
        self.path = Path(path)
        self.data: dict[str, Any] = {"run": run_info, "rounds": [], "final": {}}
        if resumed is not None:
            self.data["rounds"] = list(resumed.get("rounds", []))
            self.data["run"]["resumed"] = list(resumed.get("run", {}).get("resumed", [])) + [
                {"after_round": max((e["round"] for e in self.data["rounds"]), default=0), "at": run_info.get("started")}
            ]
        self._t0 = time.time()
        self._recorded = 0

    def round_entry(self, server_round: int) -> dict[str, Any]:
        for entry in self.data["rounds"]:
            if entry["round"] == server_round:
                return entry
        entry = {"round": server_round}
        self.data["rounds"].append(entry)
        return entry

    def set(self, server_round: int, key: str, value: Any) -> None:
        self.round_entry(server_round)[key] = value
        self.write()

    def record_round(self, state: RoundState) -> None:
        """Everything one round produced, written once."""
        entry = self.round_entry(state.server_round)
        entry["train"] = {"global": dict(state.metrics), "nodes": state.replies.metrics}
        if state.replies.failures:
            entry["train"]["failures"] = list(state.replies.failures)
        if state.replies.rejected:
            entry["train"]["rejected"] = list(state.replies.rejected)
        if state.histories:
            entry["server_training"] = state.histories
        if state.global_means is not None:
            means = state.global_means
            entry["class_counts"] = dict(zip(means.class_names, means.counts.tolist()))
        # each node's class histogram (train clips per class it shared a mean for: classes under the
        # privacy floor are withheld by the node and absent here)
        entry["node_class_counts"] = {str(p): {c: int(n) for c, n in zip(m.class_names, m.counts.tolist()) if n > 0}
                                      for p, m in sorted(state.replies.means.items()) if m.counts is not None}
        entry["evaluate"] = {"global": dict(state.evaluate_metrics), "median": dict(state.evaluate_median),
                             "nodes": dict(state.evaluate_nodes)}
        if state.evaluate_failures:
            entry["evaluate"]["failures"] = list(state.evaluate_failures)
        entry["elapsed_seconds"] = round(time.time() - self._t0, 3)
        self.write()
        self._log_progress(state.server_round)

    def _log_progress(self, server_round: int) -> None:
        """'round r/N done': the CLI's view of how far the run is and how long the rest will take."""
        total = int(self.data["run"].get("num_rounds") or 0)
        self._recorded += 1  # rounds of this process (a resumed run's earlier rounds took their own time)
        elapsed = time.time() - self._t0
        per_round = elapsed / self._recorded
        log.info("round %d/%d done: %.0fs elapsed in this run, about %.0fs left", server_round, total or server_round,
                 elapsed, per_round * max(total - server_round, 0))

    def fail(self, reason: str) -> None:
        """The run stopped: say why, keep every completed round."""
        self.data["run"]["status"] = "failed"
        self.data["run"]["error"] = reason
        self.data["run"]["total_seconds"] = round(time.time() - self._t0, 3)
        self.write()

    def finish(self, final: dict[str, Any]) -> None:
        self.data["run"]["status"] = "completed"
        self.data["run"].pop("error", None)
        self.data["final"] = final
        self.data["run"]["total_seconds"] = round(time.time() - self._t0, 3)
        self.write()

    def write(self) -> None:
        atomic_write_json(self.path, self.data)


class SummaryStep:
    """The 'summary' step: the round's train, server-training and evaluation results into summary.json."""

    name = "summary"

    def __init__(self, summary: RunSummary) -> None:
        self.summary = summary

    def __call__(self, state: RoundState) -> None:
        self.summary.record_round(state)
