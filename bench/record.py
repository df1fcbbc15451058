"""A benchmark's result on record: ``bench/results/<bench>.json``, with its command, commit, machine and date.

Why: the docs' benchmark pages (``docs/benchmarks.md``, written by ``tools/bench_pages.py``) are generated
from these files, never copied by hand, so every figure a reader sees names the command that made it,
the commit it ran on, the machine and the day. Recording is opt-in (``--record``): a quick run with
other options, or a test that drives a bench, never replaces the result on record. A figure that needs
a GPU or several hosts keeps its last file, with its date, until someone reruns it there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_json
from common.provenance import git_commit, versions

RESULTS = Path(__file__).resolve().parent / "results"  # what tools/bench_pages.py reads

__all__ = ["RESULTS", "add_record_argument", "emit", "machine"]


def add_record_argument(parser: argparse.ArgumentParser) -> None:
    """``--record``: also keep the result as ``bench/results/<bench>.json`` for the docs."""
    parser.add_argument("--record", action="store_true",
                        help="also write bench/results/<bench>.json (what docs/benchmarks.md is generated from)")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> str:
    try:
        import torch  # the benches import torch anyway; asked only when a result is recorded
    except ImportError:
        return ""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU model and count, memory, GPU (``""`` without one), OS."""
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (OSError, ValueError):
        mem_gb = 0.0
    return {"cpu": _cpu_model(), "cores": os.cpu_count() or 0, "memory_gb": mem_gb, "gpu": _gpu(),
            "os": f"{platform.system()} {platform.release()}"}


def _commit(root: Path) -> str:
    commit = git_commit(root)
    if not commit:
        return ""
    try:
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return commit + ("+uncommitted changes" if dirty else "")


def emit(result: dict[str, Any], *, record: bool, bench: str | None = None) -> None:
    """Print ``result`` as the bench's last line (one JSON object); with ``record``, also keep it on record."""
    if record:
        name = bench or Path(sys.argv[0]).stem
        argv = [a for a in sys.argv[1:] if a != "--record"]
        entry = {
            "bench": name,
            "command": shlex.join(["python", f"bench/{name}.py", *argv]),
            "commit": _commit(RESULTS.parent.parent),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "versions": {k: v for k, v in versions().items() if k in ("python", "flwr", "torch", "diffusers")},
            "result": result,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        atomic_write_json(RESULTS / f"{name}.json", entry)
    print(json.dumps(result), flush=True)
