"""Reading what the ``flwr`` CLI prints: the run id of ``flwr run`` and a run's final status.

Why: ``flwr run --stream`` exits 0 even when the ServerApp raised (Flower 1.41), so the only
trustworthy verdict is the SuperLink's own (``flwr ls --run-id ID --format json`` must say
``finished:completed``). ``feda2v run`` and the end-to-end tests both use these parsers.
"""

from __future__ import annotations

import json
import re
from typing import Any

RUN_ID = re.compile(r"Successfully started run (\d+)")
COMPLETED = "finished:completed"


def parse_run_id(output: str) -> int | None:
    match = RUN_ID.search(output)
    return int(match.group(1)) if match else None


def parse_run_status(ls_json_output: str) -> dict[str, Any]:
    """The single run in ``flwr ls --run-id ID --format json`` output (keys: status, status-details...)."""
    start = ls_json_output.find("{")
    if start < 0:
        raise ValueError(f"no JSON in flwr ls output: {ls_json_output[-500:]!r}")
    runs = json.loads(ls_json_output[start:]).get("runs", [])
    if len(runs) != 1:
        raise ValueError(f"expected one run in flwr ls output, got {len(runs)}")
    return runs[0]


def ls_command(run_id: int, superlink: str | None = None) -> list[str]:
    return ["flwr", "ls"] + ([superlink] if superlink else []) + ["--run-id", str(run_id), "--format", "json"]
