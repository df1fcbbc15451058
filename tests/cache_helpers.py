"""Subprocess entry points for tests/test_embedding_cache.py (separate processes, real concurrency).

``writer``: one of several processes appending to the same embedding store at once.
``rss``: loads a few rows (or all) of a large cached shard and reports the RSS growth it caused.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from common.cache.store import ClipId, EmbeddingStore

FIELDS = {"format": 1, "encoder": {"model": "test"}, "storage_dtype": "float16"}
L, H = 4, 32


def expected(rel_path: str, tokens: int = L, hidden: int = H) -> torch.Tensor:
    """Deterministic content of an entry, so any process can check any other's rows."""
    g = torch.Generator().manual_seed(sum(map(ord, rel_path)) * 7919 + len(rel_path))
    return torch.randn(tokens, hidden, generator=g).half()


def writer(cache_root: str, dataset_root: str, worker: int, puts: int, per_put: int, go_file: str) -> None:
    store = EmbeddingStore.open(Path(cache_root), Path(dataset_root), FIELDS)
    while not Path(go_file).exists():  # start together, after the slow imports
        time.sleep(0.01)
    for p in range(puts):
        rels = [f"w{worker}/c{p}-{j}.wav" for j in range(per_put)] + [f"shared/c{p}.wav"]
        ids = [ClipId(r, 100, 1) for r in rels]
        store.put(ids, torch.stack([expected(r) for r in rels]))


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def rss(cache_root: str, dataset_root: str, rows: str, tokens: int, hidden: int) -> None:
    store = EmbeddingStore.open(Path(cache_root), Path(dataset_root), FIELDS)
    wanted = json.loads(rows)
    ids = [ClipId(f"c{i}.wav", 100, 1) for i in wanted]
    warm = json.loads(rows)[-1] + 1  # a row outside the measured set (and far from it)
    store.lookup([ClipId(f"c{warm}.wav", 100, 1)])  # index parsed, code paths warmed: not part of the delta
    before = _rss_bytes()
    got = store.lookup(ids)
    after = _rss_bytes()
    ok = all(t is not None and torch.equal(t, expected(f"c{i}.wav", tokens, hidden)) for t, i in zip(got, wanted))
    print(json.dumps({"delta": after - before, "ok": ok}))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "writer":
        writer(args[0], args[1], int(args[2]), int(args[3]), int(args[4]), args[5])
    elif cmd == "rss":
        rss(args[0], args[1], args[2], int(args[3]), int(args[4]))
