"""A node's embedded data: its partition of clips, read once, turned into AST embeddings once.

Two layers of reuse:

* the persistent embedding cache (:mod:`common.cache`, under ``<cache-dir>/embeddings``), shared by
  messages, runs and all nodes of a host that read the same dataset folder. ``_embed_split`` asks it
  first and extracts only misses; the AST is built only if there is a miss, so a fully cached node
  opens no audio file and never constructs the model.
* an explicit, bounded memo (:class:`NodeDataMemo`) that the ClientApp owns and passes in.
  Flower calls the ClientApp function once per message. In simulation the process (a Ray actor)
  lives across rounds, so later rounds reuse the tensors without touching the disk. In
  deployment, Flower 1.41 starts a fresh ClientApp process per message, so every message reads
  the cache (fast: memory-mapped shards) instead of re-extracting. Without a memo
  (``memo=None``) every call reads the cache.

``NodeData.stats`` describes what *this* call cost (cache hits/misses, extraction and load
seconds); a memo hit reports zeros, so per-round metrics show where time was actually spent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from client_app.site import NodeSite
from common.cache import EmbeddingStore, EmbedStats, ExtractionSettings, LazyEncoder, embed_clips, open_store
from common.config import DataConfig
from common.data.clips import Clip
from common.data.dataset import dataset_root, node_splits, prepare_dataset, resolve_classes, scan_dataset
from common.data.partition import NodeSplit

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
    skipped_files: int = 0  # this node's clips that could not be used (unreadable, truncated, too short)
    missing_files: int = 0  # csv rows of the dataset whose file does not exist on this host
    skipped: list[str] = field(default_factory=list)
    stats: EmbedStats = field(default_factory=EmbedStats)  # cost of this call (zeros on a memo hit)
    from_memo: bool = False

    @property
    def extract_seconds(self) -> float:
        return self.stats.extract_seconds


class NodeDataMemo:
    """The last ``max_entries`` :class:`NodeData` a process loaded, least recently used dropped first.

    Why bounded: a simulation actor may serve several nodes over a long run; the memo must not
    grow with them. Two entries hold one node's full data and its cache-only view (pretrained
    mode). A hit returns the data with zero ``stats`` and ``from_memo=True``.
    """

    def __init__(self, max_entries: int = 2) -> None:
        if max_entries < 1:
            raise ValueError(f"NodeDataMemo needs max_entries >= 1, got {max_entries}")
        self.max_entries = int(max_entries)
        self._entries: OrderedDict[str, NodeData] = OrderedDict()

    def get(self, key: str) -> NodeData | None:
        data = self._entries.get(key)
        if data is None:
            return None
        self._entries.move_to_end(key)
        return dataclasses.replace(data, stats=EmbedStats(), from_memo=True)

    def put(self, key: str, data: NodeData) -> None:
        self._entries[key] = data
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget everything (what a new process would start with)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _memo_key(data: DataConfig, site: NodeSite) -> str:
    """Everything that decides the node's embeddings (not the device: it changes no embedding)."""
    relevant = {
        "data": data.model_dump(),
        "nodes": {k: v.model_dump() for k, v in site.node_specs.items()},
        "audio_encoder": site.audio_encoder.model_dump(),
        "seed": site.seed,
        "cache_dir": str(site.cache_dir),
        "node": site.node.model_dump(),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def _embed_split(
    clips: list[Clip],
    settings: ExtractionSettings,
    store: EmbeddingStore | None,
    encoder: LazyEncoder,
    name: str,
    extract: bool = True,
) -> tuple[EmbeddedSplit, list[tuple[Clip, str]], EmbedStats]:
    """Cache hits first, then extraction of the misses only (written back to the cache)."""
    res = embed_clips(clips, settings, store, encoder, extract=extract)
    s = res.stats
    log.info(
        "%s: %d clips embedded (%d skipped) -> %s; cache %d hits, %d misses; extract %.1fs, load %.2fs",
        name, len(res.clips), len(res.skipped), tuple(res.embeddings.shape), s.hits, s.misses,
        s.extract_seconds, s.load_seconds,
    )
    labels = torch.tensor([c.label for c in res.clips], dtype=torch.long)
    return EmbeddedSplit(res.embeddings, labels, [c.rel_path for c in res.clips]), res.skipped, s


@dataclass
class NodeIndex:
    """What a node knows without opening any audio: the dataset root, classes and its clip lists."""

    root: Path
    cache_dir: Path
    class_names: list[str]
    split: NodeSplit
    missing: list[str] = field(default_factory=list)  # csv rows of the dataset whose file is absent here
    recorded_counts: dict[str, int] | None = None  # a node without audio: its generator checkpoints' counts

    def train_counts(self) -> dict[str, int]:
        """Real training clips per class this node holds (the 'auto' synthetic sample count); for a node
        without audio, the counts its generator checkpoints recorded when they were trained."""
        if self.recorded_counts is not None:
            return {c: self.recorded_counts[c] for c in self.class_names if self.recorded_counts.get(c)}
        counts: dict[str, int] = {}
        for clip in self.split.train:
            name = self.class_names[clip.label]
            counts[name] = counts.get(name, 0) + 1
        return {c: counts[c] for c in self.class_names if c in counts}


def node_index(data: DataConfig, site: NodeSite) -> NodeIndex:
    """The node's share of the dataset from its metadata alone (csv + directory listing)."""
    node = site.node
    root = prepare_dataset(data, dataset_root(data, site.cache_dir, node.data_root))
    class_names = resolve_classes(data, root)
    scan = scan_dataset(data, root, class_names)
    clips, class_names = scan.clips, scan.class_names
    mine = node_splits(data, site.node_specs, site.seed, clips, class_names, node.num_partitions)[node.partition_id]
    return NodeIndex(root, site.cache_dir, list(class_names), mine, [*scan.missing, *scan.skipped])


def load_node_data(data: DataConfig, site: NodeSite, cache_only: bool = False, memo: NodeDataMemo | None = None
                   ) -> NodeData:
    """The node's train/val/test embeddings (persisted in the embedding cache, memoised in ``memo``).

    ``cache_only``: serve what the embedding cache holds and skip (count, log) the rest, so that
    neither the AST nor any audio file is touched (the pretrained-generator mode's evaluation).
    ``memo``: the caller's memo (the ClientApp's); ``None`` loads without memoisation.
    """
    node = site.node
    key = _memo_key(data, site) + (":cache-only" if cache_only else "")
    if memo is not None:
        hit = memo.get(key)
        if hit is not None:
            return hit
    index = node_index(data, site)
    mine = index.split
    log.info(
        "node %d/%d: %d train, %d val, %d test clips of %d classes from %s",
        node.partition_id, node.num_partitions, len(mine.train), len(mine.val), len(mine.test), len(mine.classes),
        index.root,
    )
    settings = site.extraction
    store = open_store(index.cache_dir, index.root, settings) if site.audio_encoder.cache else None
    encoder = LazyEncoder(settings)  # built only if some clip misses the cache
    embedded: dict[str, EmbeddedSplit] = {}
    skipped: list[tuple[Clip, str]] = []
    stats = EmbedStats()
    for name, split_clips in (("train", mine.train), ("val", mine.val), ("test", mine.test)):
        embedded[name], bad, split_stats = _embed_split(
            split_clips, settings, store, encoder, name, extract=not cache_only
        )
        skipped.extend(bad)
        stats += split_stats
    if cache_only and skipped:
        log.warning(
            "node %d: cache-only lookup: %d clip(s) not in the embedding cache were left out (no AST, no audio "
            "in this mode); build the cache with 'feda2v cache build' to evaluate on them",
            node.partition_id, len(skipped),
        )
    del encoder
    loaded = NodeData(
        class_names=index.class_names,
        node_classes=list(mine.classes),
        splits=embedded,
        skipped_files=len(skipped),
        missing_files=len(index.missing),
        skipped=[c.rel_path for c, _ in skipped],
        stats=stats,
    )
    if memo is not None:
        memo.put(key, loaded)
    return loaded
