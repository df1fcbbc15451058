"""``feda2v cache build|info|verify|clear``: the cache's maintenance commands (argparse lives in ops.cli).

``build`` precomputes what the nodes will ask for, e.g. on a GPU host before a CPU-only run, or
once per host before starting SuperNodes. It goes through the same :func:`embed_clips` path as a
node, so what it writes is exactly what a node reads. It is resumable for free: each chunk of
extracted clips is committed as a shard, and a rerun only extracts what is still missing.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from common.cache.embed import ExtractionSettings, embed_clips
from common.cache.key import cache_key, dataset_id
from common.cache.store import EmbeddingStore, VerifyReport, list_stores
from common.config import DataConfig, FedA2VConfig, NodeSpec
from common.data.clips import Clip
from common.data.dataset import dataset_root, node_splits, prepare_dataset, resolve_classes, scan_dataset
from common.device import resolve_device

log = logging.getLogger(__name__)

__all__ = ["build", "clear", "current_key", "info", "select_stores", "verify"]


def _clips_to_build(data: DataConfig, nodes: Mapping[str, NodeSpec], seed: int, root: Path, num_nodes: int | None,
                    all_classes: bool) -> list[Clip]:
    if all_classes:
        return scan_dataset(data, root, None).clips
    index = scan_dataset(data, root, resolve_classes(data, root))
    clips, class_names = index.clips, index.class_names
    if not num_nodes:
        return clips
    used: dict[str, Clip] = {}
    for split in node_splits(data, nodes, seed, clips, class_names, num_nodes):
        for clip in (*split.train, *split.val, *split.test):
            used[clip.rel_path] = clip
    return [used[k] for k in sorted(used)]


def build(
    cfg: FedA2VConfig,
    base: Path,
    data_root: str = "",
    num_nodes: int | None = None,
    all_classes: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed the dataset's clips into the cache under ``base`` (only the missing ones); returns a summary."""
    root = prepare_dataset(cfg.data, dataset_root(cfg.data, base, data_root))
    clips = _clips_to_build(cfg.data, cfg.nodes, cfg.seed, root, num_nodes, all_classes)
    settings = ExtractionSettings.of(cfg.audio_encoder, cfg.data, cfg.seed, device=str(resolve_device(cfg.device)))
    store = EmbeddingStore.open(base / "embeddings", root, settings.key_fields())
    t0 = time.perf_counter()
    res = embed_clips(clips, settings, store, progress=progress)
    return {
        "dataset": str(root),
        "key": store.key,
        "dir": str(store.dir),
        "clips": len(clips),
        "hits": res.stats.hits,
        "extracted": res.stats.misses - len(res.skipped),
        "skipped": [c.rel_path for c, _ in res.skipped],
        "extract_seconds": round(res.stats.extract_seconds, 3),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def current_key(data: DataConfig, settings: ExtractionSettings, base: Path, data_root: str = "") -> tuple[str, str] | None:
    """(dataset dir name, key) a run of these settings would use under ``base``, if computable without side effects."""
    try:
        root = dataset_root(data, base, data_root)
        return dataset_id(root), cache_key(settings.key_fields())
    except Exception as err:  # e.g. esc50 without data.root, a model folder absent on this host
        log.debug("no current key: %s", err)
        return None


def select_stores(root: Path, key: str = "") -> list[EmbeddingStore]:
    """Stores under ``root`` whose key (or directory name) starts with ``key`` (all if empty)."""
    return [s for s in list_stores(root) if not key or s.key.startswith(key) or s.dir.name.startswith(key)]


def info(root: Path, current: tuple[str, str] | None = None, key: str = "") -> list[dict[str, Any]]:
    """One summary per key directory under ``root`` (``<cache-dir>/embeddings``); ``current`` marks the
    key the given config would use (:func:`current_key`)."""
    out = []
    for store in select_stores(root, key):
        summary = store.summary()
        summary["current"] = current == (store.dir.parent.name, store.key)
        out.append(summary)
    return out


def format_info(summary: dict[str, Any]) -> str:
    """Human-readable block for one key (the CLI's default output)."""
    fields = summary.get("fields") or {}
    enc = fields.get("encoder", {})
    shown = {k: enc.get(k) for k in ("model", "sample_rate", "clip_seconds", "max_length", "reduction", "tokens", "dtype", "seed", "files_sha256") if k in enc}
    shown["storage_dtype"] = fields.get("storage_dtype")
    head = (
        f"key {summary['key'][:16]}{'  [current config]' if summary.get('current') else ''}\n"
        f"  dataset   {summary.get('dataset_root') or '?'}\n"
        f"  dir       {summary['dir']}\n"
        f"  entries   {summary['entries']}  shards {summary['shards']}  size {summary['bytes'] / 2**20:.2f} MiB "
        f"({summary['bytes_per_entry']} B/entry)  dead rows {summary['dead_rows']}  index {summary['index']}\n"
        f"  fields    " + (" ".join(f"{k}={v}" for k, v in shown.items()) if fields else "(key.json unreadable)")
    )
    return head


def verify(root: Path, key: str = "", repair: bool = False) -> list[tuple[VerifyReport, VerifyReport | None]]:
    """``(what was found, state after repair or None)`` for every selected store under ``root``."""
    out: list[tuple[VerifyReport, VerifyReport | None]] = []
    for store in select_stores(root, key):
        found = store.verify(repair=repair)
        out.append((found, store.verify() if found.repaired else None))
    return out


def format_report(report: VerifyReport) -> str:
    lines = [f"{'OK ' if report.ok else 'BAD'} {report.key_dir}  entries {report.entries}  shards {report.shards}"]
    if report.index_problem:
        lines.append(f"  index: {report.index_problem}")
    lines += [f"  bad shard {name}: {why}" for name, why in sorted(report.bad_shards.items())]
    lines += [f"  bad entry {name}: {why}" for name, why in sorted(report.bad_entries.items())]
    if report.orphan_shards:
        lines.append(f"  {len(report.orphan_shards)} orphan shard(s) not in the index (adopted by --repair): "
                     + ", ".join(report.orphan_shards[:5]))
    if report.dead_shards:
        lines.append(f"  {len(report.dead_shards)} shard(s) without live rows (removed by --repair)")
    return "\n".join(lines)


def clear(root: Path, key: str = "") -> list[Path]:
    """Delete the selected key directories under ``root`` (all of them when ``key`` is empty)."""
    removed = []
    for store in select_stores(root, key):
        store.clear()
        removed.append(store.dir)
    return removed


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
