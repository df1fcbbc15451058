"""The memory a process holds now and at its peak, as round metrics (``rss_mb``, ``peak_rss_mb``).

Why in every round's metrics: a federated run that grows by a few hundred MB per round dies at round
5-10 on a site's host, and only a per-round record of each process shows which process grows and
from which round. Read from ``/proc/self/status`` (Linux: the resident set now) and
``getrusage`` (the peak, also where ``/proc`` is absent); no dependency.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


def peak_rss_mb() -> float:
    """The process's peak resident set size so far, in MB (``ru_maxrss``: KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def rss_mb() -> float:
    """The process's resident set size now, in MB (the peak where ``/proc`` cannot be read)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


# A handler's wall-clock entry and exit (``time.time()``), sent in its reply's metrics. The server's Grid
# (server_app.grid) replaces them with ``dispatch_seconds`` (its push -> the handler's entry: polling,
# transfer, process start) and ``return_seconds`` (the handler's exit -> the server has the reply).
ENTRY_UNIX, EXIT_UNIX = "entry_unix", "exit_unix"


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` (``None`` elsewhere: musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS, once per round and per handler.

    Why: a round frees tens of MB of tensors (weights, messages, teacher outputs). glibc serves
    allocations below its mmap threshold from heap arenas, and raises that threshold each time a
    large block is freed, so later rounds' tensors land in arenas whose free pages glibc keeps: the
    resident set then creeps up round after round although nothing is alive (``bench/memory.py``
    shows it). ``malloc_trim(0)`` returns those pages.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def memory_metrics(prefix: str = "") -> dict[str, float]:
    """``{prefix}rss_mb`` and ``{prefix}peak_rss_mb`` of this process, rounded to 0.1 MB."""
    return {f"{prefix}rss_mb": round(rss_mb(), 1), f"{prefix}peak_rss_mb": round(peak_rss_mb(), 1)}


def warm_start() -> int:
    """1 when this process was forked from a preloaded one (``feda2v-superexec``'s forkserver,
    :mod:`ops.deploy.warm_superexec`), 0 for a process started from scratch.

    Why: with it a report tells a warm ClientApp start from a cold one without reading timings."""
    import multiprocessing

    return int(multiprocessing.parent_process() is not None)


def process_age_seconds() -> float:
    """Seconds since this process started (Linux ``/proc``; 0 where it cannot be read).

    Why: a deployed SuperNode starts a fresh ClientApp process for every message, so the age at the
    moment a handler starts is what that message paid for process start and imports (simulation
    reuses its workers: there it is the worker's age).
    """
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0
