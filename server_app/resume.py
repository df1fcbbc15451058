"""Where a run's directory comes from: a new run, or the continuation of a crashed or stopped one.

Flower never restarts or resumes a ServerApp. Here ``resume = true`` with the same ``run-name``
continues from the last round that completed (its summary entry is written only after the round's
checkpoint, so an entry in ``summary.json`` means the round is on disk): the global adapters of that
round (``checkpoints/resume_round_{r}.safetensors``, written every round), the round counter, the summary so
far (later, incomplete rounds dropped) and the server generator (``generators/{base}_server``).
Every seed derives from (run seed, round), so rounds r+1..N draw what an uninterrupted run draws.
Reusing a ``run-name`` without ``resume`` is an error, never an overwrite.

A run's **identity** (:func:`run_identity`) is random, made with a new run and kept in
``summary.json`` (``run.run_identity``), so a resumed run has the same one while a new run of the same
name (after ``outputs`` was deleted) has another; nodes tag their carried state with it
(:mod:`client_app.node_state`). Flower's run id is no substitute: every ``flwr run`` gets a new one.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from common.checkpoints import CheckpointError, load_tensors, save_tensors
from common.config import ConfigError
from common.generator_bank import GeneratorBank

log = logging.getLogger(__name__)

KEEP_RESUME_FILES = 2  # checkpoints/resume_round_{r}.safetensors of the newest rounds (a kill may fall between
# a round's checkpoint and its summary entry: the round before must still be there)


def run_directory(output_dir: str, run_name: str, run_id: int) -> Path:
    """``<output-dir>/<run-name>``; without a run name, a timestamp and Flower's run id."""
    name = run_name or time.strftime("%Y%m%d-%H%M%S") + f"-{run_id}"
    return (Path(output_dir).expanduser() / name).resolve()


@dataclass
class ResumePoint:
    """What a resumed run starts from."""

    last_round: int
    summary: dict[str, Any]
    arrays: ArrayRecord | None = None  # None: nodes keep their own adapters (no global model)
    server_bank: GeneratorBank | None = None
    notes: list[str] = field(default_factory=list)


def run_identity(point: ResumePoint | None) -> str:
    """The identity of the run: the resumed run's own, else a new random one."""
    saved = point.summary.get("run", {}).get("run_identity") if point is not None else None
    if isinstance(saved, str) and saved:
        return saved
    if point is not None:
        log.warning("resume: summary.json has no run identity (written by an older version): nodes will not "
                    "restore their carried state and start it over")
    return secrets.token_hex(8)


def resume_file(run_dir: Path, server_round: int) -> Path:
    return run_dir / "checkpoints" / f"resume_round_{server_round}.safetensors"


def save_resume_arrays(run_dir: Path, arrays: ArrayRecord, server_round: int, run_hash: str) -> Path:
    """The round's global adapters; older resume files beyond the newest :data:`KEEP_RESUME_FILES` are removed."""
    path = save_tensors(resume_file(run_dir, server_round), arrays.to_torch_state_dict(),
                        {"type": "resume-arrays", "round": server_round, "config-hash": run_hash})
    for old in path.parent.glob("resume_round_*.safetensors"):
        r = old.stem.removeprefix("resume_round_")
        if r.isdigit() and int(r) <= server_round - KEEP_RESUME_FILES:
            old.unlink(missing_ok=True)
    return path


def open_run(run_dir: Path, resume: bool, run_hash: str, generator_base: str,
             expected_shape: tuple[int, int] | None) -> ResumePoint | None:
    """``None`` for a new run; the resume point of an existing one (``resume = true``); errors name the key.
    ``run_hash``: :func:`~common.config.config_hash` of this run's config, which a resumed run must share."""
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        if resume:
            log.warning("resume=true but %s holds no run yet: starting from round 1", run_dir)
        return None
    if not resume:
        raise ConfigError(f"run-name '{run_dir.name}': {run_dir} already holds a run; set resume=true to continue "
                          "it, or choose another run-name (a run is never overwritten)")
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"resume: {summary_path} is not valid JSON ({err})") from None
    saved_hash = summary.get("run", {}).get("config_hash")
    if saved_hash and saved_hash != run_hash:
        raise ConfigError(f"resume: the configuration differs from the one {run_dir.name} was started with "
                          f"(config hash {run_hash} vs {saved_hash}); only num-rounds, timeouts, quorum and "
                          "paths may change when resuming")
    done = sorted(e["round"] for e in summary.get("rounds", []) if "evaluate" in e)
    last = done[-1] if done else 0
    summary["rounds"] = [e for e in summary.get("rounds", []) if e["round"] <= last]
    point = ResumePoint(last, summary)
    if last == 0:
        return point
    path = resume_file(run_dir, last)
    if path.is_file():
        tensors, meta = load_tensors(path)
        if meta.get("round") != last:
            raise CheckpointError(f"resume: {path} is from round {meta.get('round')}, expected round {last}")
        point.arrays = ArrayRecord(tensors)
    elif (run_dir / "checkpoints" / "adapters.safetensors").is_file():  # the run had a global model: never restart it
        raise CheckpointError(f"resume: {path} (the global adapters after round {last}) is missing; cannot continue "
                              f"{run_dir.name} without them")
    server_files = list((run_dir / "generators").glob(f"{generator_base}_server*.safetensors"))
    if server_files:
        point.server_bank = GeneratorBank.from_pretrained(run_dir / "generators", base=generator_base, node_id=None,
                                                           expected_shape=expected_shape)
    log.info("resuming %s after round %d (global adapters: %s, server generator: %s)", run_dir.name, last,
             "yes" if point.arrays is not None else "no", "yes" if point.server_bank is not None else "no")
    return point
