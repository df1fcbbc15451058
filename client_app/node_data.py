"""A node's embedded data: its partition of clips, read once, turned into AST embeddings once.

Why a per-process memo: Flower calls the ClientApp function once per message. In simulation the
process (a Ray actor) lives across rounds, so extraction happens on a node's first message and
later rounds reuse the tensors. In deployment, Flower 1.41 starts a fresh ClientApp process per
message, so the memo does not survive and every message re-extracts: cheap with the tiny AST,
costly with the real one. The persistent on-disk embedding cache (shared across messages, runs
and nodes of a host) is the next planned module; it plugs in at ``_embed_split``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.config import FedA2VConfig, NodeRuntimeConfig
from common.data.audio import load_clips
from common.data.esc50 import Clip, read_esc50
from common.data.partition import partition_nodes
from common.factory import dataset_root, prepare_dataset, resolve_classes, resolve_device
from common.models.audio_encoder import AudioEncoder

log = logging.getLogger(__name__)


@dataclass
class EmbeddedSplit:
    """Embeddings ``[N, L, H]`` with labels (federation class indices) and clip ids."""

    embeddings: torch.Tensor
    labels: torch.Tensor
    clip_ids: list[str]

    def __len__(self) -> int:
        return len(self.clip_ids)


@dataclass
class NodeData:
    class_names: list[str]  # the federation's classes, in label order
    node_classes: list[str]  # the classes this node owns
    splits: dict[str, EmbeddedSplit]
    skipped_files: int = 0
    extract_seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)


_MEMO: dict[str, NodeData] = {}


def _memo_key(cfg: FedA2VConfig, node: NodeRuntimeConfig) -> str:
    relevant = {
        "data": cfg.data.model_dump(),
        "nodes": {k: v.model_dump() for k, v in cfg.nodes.items()},
        "audio_encoder": cfg.audio_encoder.model_dump(),
        "seed": cfg.seed,
        "cache_dir": cfg.cache_dir,
        "node": node.model_dump(),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def _embed_split(
    encoder: AudioEncoder, clips: list[Clip], cfg: FedA2VConfig, name: str
) -> tuple[EmbeddedSplit, list[tuple[Clip, str]]]:
    """Load and encode clips chunk by chunk so RAM holds one chunk of waveforms at a time."""
    chunk = max(cfg.audio_encoder.batch_size * 4, 1)
    embs, labels, ids, skipped = [], [], [], []
    for start in range(0, len(clips), chunk):
        loaded = load_clips(clips[start : start + chunk], cfg.data.sample_rate, cfg.data.clip_seconds)
        skipped.extend(loaded.skipped)
        if not loaded.clips:
            continue
        embs.append(encoder.encode(loaded.waveforms, batch_size=cfg.audio_encoder.batch_size))
        labels.extend(c.label for c in loaded.clips)
        ids.extend(c.rel_path for c in loaded.clips)
    if embs:
        emb = torch.cat(embs)
    else:
        emb = torch.empty(0, 1, 1)
    log.info("%s: %d clips embedded (%d skipped) -> %s", name, len(ids), len(skipped), tuple(emb.shape))
    return EmbeddedSplit(emb, torch.tensor(labels, dtype=torch.long), ids), skipped


def load_node_data(cfg: FedA2VConfig, node: NodeRuntimeConfig) -> NodeData:
    """The node's train/val/test embeddings (memoised per process)."""
    key = _memo_key(cfg, node)
    if key in _MEMO:
        return _MEMO[key]
    cache_dir = Path(node.cache_dir).expanduser() if node.cache_dir else cfg.resolved_cache_dir()
    root = prepare_dataset(cfg, dataset_root(cfg, node.data_root, cache_dir))
    class_names = resolve_classes(cfg, root)
    clips, class_names = read_esc50(root, class_names)
    splits = partition_nodes(
        clips,
        class_names,
        num_nodes=node.num_partitions,
        mode=cfg.data.partition,
        seed=cfg.seed,
        val_fraction=cfg.data.val_fraction,
        test_fraction=cfg.data.test_fraction,
        node_classes=cfg.node_classes(node.num_partitions),
        node_samples_per_class=cfg.node_samples_per_class(node.num_partitions),
    )
    mine = splits[node.partition_id]
    log.info(
        "node %d/%d: %d train, %d val, %d test clips of %d classes from %s",
        node.partition_id, node.num_partitions, len(mine.train), len(mine.val), len(mine.test), len(mine.classes), root,
    )
    t0 = time.perf_counter()
    encoder = AudioEncoder.build(
        cfg.audio_encoder.model,
        clip_seconds=cfg.data.clip_seconds,
        sample_rate=cfg.data.sample_rate,
        reduction=cfg.audio_encoder.reduction,
        tokens=cfg.audio_encoder.tokens,
        dtype=cfg.audio_encoder.dtype,
        device=str(resolve_device(cfg)),
        seed=cfg.seed,
    )
    embedded: dict[str, EmbeddedSplit] = {}
    skipped: list[tuple[Clip, str]] = []
    for name, split_clips in (("train", mine.train), ("val", mine.val), ("test", mine.test)):
        embedded[name], bad = _embed_split(encoder, split_clips, cfg, name)
        skipped.extend(bad)
    del encoder
    data = NodeData(
        class_names=list(class_names),
        node_classes=list(mine.classes),
        splits=embedded,
        skipped_files=len(skipped),
        extract_seconds=time.perf_counter() - t0,
        skipped=[c.rel_path for c, _ in skipped],
    )
    _MEMO[key] = data
    return data
