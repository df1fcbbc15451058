"""A node's embedding generators: train them on the node's embeddings, checkpoint them, report them.

Run 1 of the seeds' two-run workflow (``generator.mode = "generator-training"`` or
``"generator-only"``): every round the node continues training its generator bank (kept in the
node's Context state between messages), writes checkpoints to this run's folder of its checkpoint
directory (``<checkpoint-dir>/<run-name>/{base}_node{id}...``, the latest plus ``_round_{r}`` copies),
logs per-class quality against its held-out clips, and returns the bank in the train reply so the
server holds every node's generators. Run 2 (``use-pretrained-generators``) loads the checkpoints of
the run ``generator.init-from-run`` names: see :mod:`client_app.pretrained`.

Why a folder per run: a checkpoint directory is shared by every run on a host (by default
``<cache-dir>/generators``), and a run that loaded "the latest files" there once loaded another
benchmark's generators. The checkpoints also carry the run's identity (``run-identity``): files of
an earlier run of the same name are removed when a new one starts training (:func:`clear_other_runs`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import RecordDict

from client_app.node_data import NodeData
from client_app.node_state import run_folder
from client_app.site import NodeSite
from common import seeds
from common.checkpoints import CheckpointError, load_tensors
from common.config import ConfigError, GeneratorConfig
from common.generator_bank import GeneratorBank, bank_from_records, bank_to_records
from common.models.generators import GeneratorSpec, GeneratorTrainSettings
from common.records import GENERATORS

log = logging.getLogger(__name__)

GEN_QUALITY = ("fd_ratio", "precision", "recall", "density", "coverage")  # reported per node, pooled and per class


def checkpoint_dir(site: NodeSite, run_name: str) -> Path:
    """Where the run ``run_name`` keeps this node's generator checkpoints (a folder of
    :attr:`~client_app.site.NodeSite.checkpoint_root`)."""
    return site.checkpoint_root / run_folder(run_name)


def clear_other_runs(directory: Path, base: str, node_id: int, identity: str) -> list[str]:
    """Remove this node's checkpoints in ``directory`` that another run of the same name wrote (their
    ``run-identity`` differs or is missing); returns the names removed. Called when a bank starts from
    scratch, so run 2 never loads a mix of two runs' units (e.g. per-class files of classes this run
    no longer trains)."""
    stale = []
    owner = f"{base}_node{int(node_id)}"
    files = [*Path(directory).glob(f"{owner}.safetensors"), *Path(directory).glob(f"{owner}_*.safetensors")]
    for path in sorted(files):
        try:
            _, meta = load_tensors(path)
        except CheckpointError:
            meta = {}
        if meta.get("run-identity") != identity:
            path.unlink(missing_ok=True)
            stale.append(path.name)
    if stale:
        log.warning("node %d: %s held generator checkpoints of another run of this name: removed %s", node_id,
                    directory, stale)
    return stale


def generator_classes(site: NodeSite, held: list[str], class_names: list[str]) -> tuple[str, list[str]]:
    """This node's generator granularity and the classes it trains / loads generators for.

    ``held``: the classes the node has enough training clips of (:meth:`SitePolicy.shareable_classes`:
    the site's own ``min-class-count`` floor applies wherever the run's does, and the server cannot
    lower it). A node-level ``generator-classes`` list narrows that; a listed class unknown to the
    federation is an error, one the node holds no clips of is skipped with a warning (a generator
    cannot be trained on nothing).
    """
    node = site.node
    granularity = site.generator_granularity
    selected = list(site.generator_classes) if site.generator_classes is not None else None
    if selected is None:
        return granularity, list(held)
    unknown = [c for c in selected if c not in class_names]
    if unknown:
        raise ConfigError(
            f"nodes.{node.partition_id}.generator-classes: unknown class(es) {unknown}; the federation's classes are {class_names}"
        )
    absent = [c for c in selected if c not in held]
    if absent:
        log.warning("node %d: nodes.%d.generator-classes lists %s, of which this node holds no training clips: skipped",
                    node.partition_id, node.partition_id, absent)
    chosen = [c for c in held if c in selected]
    if not chosen:
        raise ConfigError(f"nodes.{node.partition_id}.generator-classes: none of {selected} is held by node {node.partition_id} (it holds {held})")
    return granularity, chosen


def train_node_generators(
    gcfg: GeneratorConfig, site: NodeSite, data: NodeData, state: RecordDict, server_round: int,
    run_name: str = "", run_identity: str = "",
) -> tuple[GeneratorBank, dict[str, Any]]:
    """One round of generator training on the node's training embeddings (continuing across rounds);
    checkpoints go to the run's folder (:func:`checkpoint_dir`), tagged with ``run_identity``."""
    node = site.node
    train = data.splits["train"]
    tokens, dim = int(train.embeddings.shape[1]), int(train.embeddings.shape[2])
    counts = torch.bincount(train.labels, minlength=len(data.class_names)).tolist()
    held = site.policy.shareable_classes(dict(zip(data.class_names, counts)))
    granularity, present = generator_classes(site, held, data.class_names)
    if len(present) < len(held):  # train only on the selected classes
        keep = torch.isin(train.labels, torch.tensor([data.class_names.index(c) for c in present]))
        train = dataclasses.replace(train, embeddings=train.embeddings[keep], labels=train.labels[keep],
                                    clip_ids=[i for i, k in zip(train.clip_ids, keep.tolist()) if k])
    directory = checkpoint_dir(site, run_name)
    if GENERATORS in state:
        bank, _ = bank_from_records(state, source=f"node {node.partition_id} state", expected_shape=(tokens, dim))
    else:
        clear_other_runs(directory, gcfg.checkpoint_base, node.partition_id, run_identity)
        bank = GeneratorBank.create(
            GeneratorSpec.from_config(gcfg, tokens, dim), granularity, present, gcfg.class_groups or None,
            known_classes=data.class_names, seed=seeds.node_bank_init(site.seed, node.partition_id),
        )
    t0 = time.perf_counter()
    settings = GeneratorTrainSettings.from_config(gcfg, seed=seeds.node_generator_train(site.seed, server_round))
    bank.train(train.embeddings, train.labels, data.class_names, settings)
    seconds = time.perf_counter() - t0
    key = site.encoder_key
    paths = bank.save_pretrained(
        directory, base=gcfg.checkpoint_base, node_id=node.partition_id, round=server_round,
        checkpoint_every=gcfg.checkpoint_frequency, encoder_key=key, extra={"run-name": run_name, "run-identity": run_identity},
    )
    bank_to_records(bank, state, key, node.partition_id, server_round)  # continue from here next round
    heldout = data.splits["test"] if len(data.splits["test"]) else data.splits["val"]
    quality = bank.evaluate(heldout.embeddings, heldout.labels, data.class_names, train.embeddings, train.labels,
                            seed=site.seed) if len(heldout) else {}
    for name, q in quality.items():
        log.info(
            "node %d round %d generator[%s] fd_ratio %.2f precision %.2f recall %.2f coverage %.2f",
            node.partition_id, server_round, name, q.get("fd_ratio", float("nan")), q.get("precision", float("nan")),
            q.get("recall", float("nan")), q.get("coverage", float("nan")),
        )
    pooled = quality.get("all", {})
    metrics = {
        "gen_train_seconds": seconds,
        "gen_checkpoints": len(paths),
        **{f"gen_{k}": float(pooled[k]) for k in GEN_QUALITY if k in pooled and math.isfinite(float(pooled[k]))},
        # per class too (the report's table): 'gen_class_<class>:<metric>'
        **{f"gen_class_{cls}:{k}": float(q[k]) for cls, q in quality.items() if cls != "all"
           for k in GEN_QUALITY if k in q and math.isfinite(float(q[k]))},
    }
    log.info("node %d round %d: generators (%s, %s) trained in %.1fs, saved %s",
             node.partition_id, server_round, gcfg.kind, granularity, seconds, [p.name for p in paths])
    return bank, metrics
