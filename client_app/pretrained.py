"""Run 2 of the two-run workflow: train adapters on embeddings sampled from pretrained generators.

``generator.mode = "use-pretrained-generators"``: the node loads the generator checkpoints that run 1
wrote to its checkpoint directory, in the folder of the run ``generator.init-from-run`` names
(``<checkpoint-dir>/<run-name>/``; never "the latest files" of a folder every run shares), validated
against this run's config (granularity, classes, embedding shape, encoder cache key), and samples
``synthetic-samples-per-class`` embeddings per class (``auto`` = its real training count, read from
the dataset's metadata, not its audio).

Why the AST is never built here: that is the point of the mode (the AST's memory and extraction
time are most of a node's cost). With ``real-mix-ratio = 0`` the node's training set is purely
synthetic, so this module touches only the dataset's csv/listing and the generator files; the AST
and its feature extractor are not constructed and no audio file is opened (a test enforces it).
Evaluation reads held-out embeddings from the embedding cache only (see
:func:`client_app.node_data.load_node_data` ``cache_only``). With ``real-mix-ratio > 0`` the real
share comes through the normal path (cache first, AST for misses).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ConfigRecord, RecordDict

from client_app.generators import checkpoint_dir, generator_classes
from client_app.node_data import NodeDataMemo, NodeIndex, load_node_data, node_index
from client_app.site import NodeSite
from common import seeds
from common.config import ConfigError, DataConfig, GeneratorConfig
from common.data.dataset import resolve_classes
from common.data.partition import NodeSplit
from common.generator_bank import GeneratorBank, bank_from_records, bank_to_records, checkpoint_class_counts
from common.models.audio_encoder import embedding_shape
from common.records import GENERATORS

log = logging.getLogger(__name__)

NO_AST_LOGGED = "pretrained-no-ast-logged"  # Context.state key: this node has said "no AST in this mode"


@dataclass
class SyntheticTrainSet:
    """The adapters' training set in pretrained mode and where its rows came from."""

    embeddings: torch.Tensor  # [N, L, H]
    labels: torch.Tensor  # [N], indices into class_names
    class_names: list[str]
    synthetic: int
    real: int
    counts: dict[str, int]  # synthetic samples per class

    def __len__(self) -> int:
        return int(self.labels.numel())


def pretrained_dir(gcfg: GeneratorConfig, site: NodeSite) -> Path:
    """The folder of the run ``generator.init-from-run`` in this node's checkpoint directory; a run this node
    has no folder of is an error naming the runs it has."""
    directory = checkpoint_dir(site, gcfg.init_from_run)
    if not directory.is_dir():
        root = site.checkpoint_root
        runs = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise ConfigError(f"generator.init-from-run='{gcfg.init_from_run}': node {site.partition_id} has no "
                          f"generator checkpoints of that run in {root} (runs there: {runs or 'none'})")
    return directory


def audio_free_index(data: DataConfig, gcfg: GeneratorConfig, site: NodeSite) -> NodeIndex:
    """The index of a node that holds no audio (``nodes.<id>.audio = false``): no dataset, no clips; its
    classes and counts are what its generator checkpoints recorded."""
    node = site.node
    directory = pretrained_dir(gcfg, site)
    counts = checkpoint_class_counts(directory, gcfg.checkpoint_base, node.partition_id, gcfg.pretrained_round or None)
    class_names = resolve_classes(data, None)
    held = [c for c in class_names if counts.get(c)]
    if not held:
        raise ConfigError(f"node {node.partition_id} holds no audio and no generator checkpoint under "
                          f"{directory} records any of the classes {class_names}")
    log.info("node %d holds no audio: classes and counts from its generator checkpoints: %s", node.partition_id,
             {c: counts[c] for c in held})
    return NodeIndex(Path(), site.cache_dir, class_names, NodeSplit([], [], [], held), recorded_counts=counts)


def pretrained_index(data: DataConfig, gcfg: GeneratorConfig, site: NodeSite) -> NodeIndex:
    return node_index(data, site) if site.holds_audio else audio_free_index(data, gcfg, site)


def load_node_bank(gcfg: GeneratorConfig, site: NodeSite, index: NodeIndex, state: RecordDict) -> GeneratorBank:
    """The node's pretrained bank: from Context state after the first message, else its checkpoints."""
    node = site.node
    shape = embedding_shape(site.audio_encoder)
    if GENERATORS in state:
        bank, _ = bank_from_records(state, source=f"node {node.partition_id} state", expected_shape=shape)
        return bank
    held = site.policy.shareable_classes(index.train_counts())
    granularity, classes = generator_classes(site, held, index.class_names)
    directory = pretrained_dir(gcfg, site)
    key = site.encoder_key
    bank = GeneratorBank.from_pretrained(
        directory, base=gcfg.checkpoint_base, node_id=node.partition_id, granularity=granularity, classes=classes,
        expected_shape=shape, encoder_key=key, class_groups=gcfg.class_groups or None, kind=gcfg.kind,
        round=gcfg.pretrained_round or None,
    )
    log.info(
        "node %d: loaded %s generators (%s, %d unit(s), classes %s) from %s%s",
        node.partition_id, bank.kind, granularity, len(bank.units), bank.classes, directory,
        f" (round {gcfg.pretrained_round})" if gcfg.pretrained_round else "",
    )
    bank_to_records(bank, state, key, node.partition_id, gcfg.pretrained_round)  # later messages skip the disk
    return bank


def sample_counts(gcfg: GeneratorConfig, index: NodeIndex, bank: GeneratorBank) -> dict[str, int]:
    """Synthetic samples per class: a fixed number, or ``auto`` = the node's real training count."""
    per_class = gcfg.synthetic_samples_per_class
    real = index.train_counts()
    if per_class == "auto":
        return {c: real.get(c) or bank.class_counts.get(c, 0) for c in bank.classes}
    return {c: int(per_class) for c in bank.classes}


def synthetic_train_set(
    data: DataConfig,
    gcfg: GeneratorConfig,
    site: NodeSite,
    state: RecordDict,
    server_round: int,
    memo: NodeDataMemo | None = None,
) -> tuple[SyntheticTrainSet, GeneratorBank]:
    """Sample this round's synthetic training set (plus the configured share of real embeddings).

    ``memo``: the ClientApp's node-data memo, used for the real share (``real-mix-ratio > 0``).
    """
    node = site.node
    index = pretrained_index(data, gcfg, site)
    bank = load_node_bank(gcfg, site, index, state)
    counts = sample_counts(gcfg, index, bank)
    seed = seeds.node_train(site.seed, server_round, node.partition_id)  # fresh samples every round
    x, y = bank.sample_dataset(counts, index.class_names, seed)
    synthetic = len(y)
    real = 0
    ratio = gcfg.real_mix_ratio
    if ratio > 0:
        train = load_node_data(data, site, memo=memo).splits["train"]
        keep = _real_subset(train.labels, ratio, seed)
        x, y = torch.cat([x, train.embeddings[keep]]), torch.cat([y, train.labels[keep]])
        real = int(keep.numel())
    elif NO_AST_LOGGED not in state:  # say it once per node: the flag lives in the node's Context state
        state[NO_AST_LOGGED] = ConfigRecord({"logged": True})
        log.info("node %d: use-pretrained-generators with real-mix-ratio 0: the AST is not loaded and no audio "
                 "file is read on this node", node.partition_id)
    log.info("node %d round %d: %d synthetic + %d real embeddings for adapter training", node.partition_id,
             server_round, synthetic, real)
    return SyntheticTrainSet(x, y, index.class_names, synthetic, real, counts), bank


def _real_subset(labels: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    """A per-class ``ratio`` share (at least one clip per class) of the real rows, seeded."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for cls in labels.unique().tolist():
        rows = (labels == cls).nonzero().flatten()
        n = max(1, round(ratio * len(rows)))
        picks.append(rows[torch.randperm(len(rows), generator=gen)[:n]])
    return torch.cat(picks).sort().values if picks else torch.empty(0, dtype=torch.long)
