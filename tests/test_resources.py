"""A process's memory figures and the per-round release of freed heap memory (common.metrics.resources)."""

from __future__ import annotations

import subprocess
import sys
import time

from common.metrics.resources import memory_metrics, process_age_seconds, release_memory

# After a large freed block has raised glibc's mmap threshold, 200 MB of 1-MB tensors come from the heap;
# freed, they stay resident until trimmed (the pattern of a round's weights and messages).
FRAGMENTED = """
import torch
from common.metrics.resources import release_memory, rss_mb
big = torch.empty(8_000_000); big.fill_(1); del big
blocks, keep = [], []
for _ in range(200):
    t = torch.empty(250_000); t.fill_(1); blocks.append(t)
    keep.append(torch.ones(10))
del blocks
before = rss_mb(); release_memory(); print(before, rss_mb())
"""


def test_release_memory_hands_freed_heap_pages_back():
    out = subprocess.run([sys.executable, "-c", FRAGMENTED], capture_output=True, text=True, timeout=120, check=True)
    before, after = (float(v) for v in out.stdout.split())
    assert before - after > 100, (before, after)


def test_memory_metrics_and_process_age_describe_this_process():
    release_memory()
    m = memory_metrics("server_")
    assert set(m) == {"server_rss_mb", "server_peak_rss_mb"}
    assert 0 < m["server_rss_mb"] <= m["server_peak_rss_mb"] + 1  # the kernel updates the peak lazily
    age = process_age_seconds()
    time.sleep(0.05)
    assert 0 < age < process_age_seconds()
