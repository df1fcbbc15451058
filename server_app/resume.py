"""Where a run's directory comes from: a new run, or the continuation of a crashed or stopped one.

Flower never restarts or resumes a ServerApp. Here ``resume = true`` with the same ``run-name``
continues from the last round that completed (its summary entry is written only after the round's
checkpoint, so an entry in ``summary.json`` means the round is on disk): the global adapters of that
round (``checkpoints/resume.safetensors``, written every round), the round counter, the summary so
far (later, incomplete rounds dropped) and the server generator (``generators/{base}_server``).
Every seed derives from (run seed, round), so rounds r+1..N draw what an uninterrupted run draws.
Reusing a ``run-name`` without ``resume`` is an error, never an overwrite.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from common.checkpoints import CheckpointError, load_tensors, save_tensors
from common.config import ConfigError, FedA2VConfig, config_hash
from common.generator_bank import GeneratorBank, discover_bank

log = logging.getLogger(__name__)

RESUME_FILE = "resume.safetensors"  # under checkpoints/: the latest completed round's global adapters


def run_directory(cfg: FedA2VConfig, run_id: int) -> Path:
    name = cfg.run_name or time.strftime("%Y%m%d-%H%M%S") + f"-{run_id}"
    return (Path(cfg.output_dir).expanduser() / name).resolve()


@dataclass
class ResumePoint:
    """What a resumed run starts from."""

    last_round: int
    summary: dict[str, Any]
    arrays: ArrayRecord | None = None  # None: nodes keep their own adapters (no global model)
    server_bank: GeneratorBank | None = None
    notes: list[str] = field(default_factory=list)


def save_resume_arrays(run_dir: Path, arrays: ArrayRecord, server_round: int, run_hash: str) -> Path:
    return save_tensors(run_dir / "checkpoints" / RESUME_FILE, arrays.to_torch_state_dict(),
                        {"type": "resume-arrays", "round": server_round, "config-hash": run_hash})


def open_run(cfg: FedA2VConfig, run_dir: Path, generator_base: str, expected_shape: tuple[int, int] | None) -> ResumePoint | None:
    """``None`` for a new run; the resume point of an existing one (``resume = true``); errors name the key."""
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        if cfg.resume:
            log.warning("resume=true but %s holds no run yet: starting from round 1", run_dir)
        return None
    if not cfg.resume:
        raise ConfigError(f"run-name '{run_dir.name}': {run_dir} already holds a run; set resume=true to continue "
                          "it, or choose another run-name (a run is never overwritten)")
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"resume: {summary_path} is not valid JSON ({err})") from None
    saved_hash = summary.get("run", {}).get("config_hash")
    if saved_hash and saved_hash != config_hash(cfg):
        raise ConfigError(f"resume: the configuration differs from the one {run_dir.name} was started with "
                          f"(config hash {config_hash(cfg)} vs {saved_hash}); only num-rounds, timeouts, quorum and "
                          "paths may change when resuming")
    done = sorted(e["round"] for e in summary.get("rounds", []) if "evaluate" in e)
    last = done[-1] if done else 0
    summary["rounds"] = [e for e in summary.get("rounds", []) if e["round"] <= last]
    point = ResumePoint(last, summary)
    if last == 0:
        return point
    resume_file = run_dir / "checkpoints" / RESUME_FILE
    if resume_file.is_file():
        tensors, meta = load_tensors(resume_file)
        if meta.get("round") != last:
            raise CheckpointError(f"resume: {resume_file} is from round {meta.get('round')}, the summary's last "
                                  f"completed round is {last}")
        point.arrays = ArrayRecord(tensors)
    server_files = list((run_dir / "generators").glob(f"{generator_base}_server*.safetensors"))
    if server_files:
        point.server_bank = discover_bank(run_dir / "generators", generator_base, None, expected_shape=expected_shape)
    log.info("resuming %s after round %d (global adapters: %s, server generator: %s)", run_dir.name, last,
             "yes" if point.arrays is not None else "no", "yes" if point.server_bank is not None else "no")
    return point
