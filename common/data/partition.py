"""Who sees which clip: a global train/val/test split, then an assignment of each split to federated nodes.

Every node runs this same code on the same clip list with the same seed, so all nodes agree on the split without
talking to each other -- no node can train on a clip that another node evaluates on. The split is made once,
globally, *before* partitioning: a clip's split never depends on the number of nodes or on the partition mode.

Splitting is stratified per class and grouped by *source recording*: ESC-50 cuts several clips ("takes" A, B, ...)
from one freesound recording (``{fold}-{src_file}-{take}-{target}.wav``); putting one take in train and another in
test would leak near-identical audio into evaluation, which is why the official folds never separate takes.

Partitioners live in :data:`PARTITIONERS` (mode name -> function), so a new scheme is one decorated function,
with no change to callers. The non-IID schemes (``dirichlet``, ``pathological``) are flwr-datasets' own
partitioners applied to the *train* clip table; each node then gets val/test clips of the classes it trains on,
dealt among the nodes that hold each class.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .clips import Clip, DatasetError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_ESC50_NAME = re.compile(r"^(?P<fold>\d+)-(?P<src>[^-]+)-(?P<take>[^-]+)-(?P<target>\d+)\.\w+$")


@dataclass
class NodeSplit:
    """The clips one node trains, validates and tests on, and the class names it owns (global label order)."""

    train: list[Clip]
    val: list[Clip]
    test: list[Clip]
    classes: list[str]

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _rng(seed: int, *keys: str) -> np.random.Generator:
    # Keys are hashed with crc32 (stable across processes) so that e.g. one class's split is unaffected by which
    # other classes are selected.
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *(zlib.crc32(k.encode()) for k in keys)])


def source_id(clip: Clip) -> str:
    """The recording a clip was cut from: the reader's ``source`` (a YouTube id), else ESC-50's ``src_file`` when
    the name follows the ESC-50 pattern, else the clip itself."""
    if clip.source:
        return clip.source
    name = clip.rel_path.rsplit("/", 1)[-1]
    match = _ESC50_NAME.match(name)
    return match.group("src") if match else clip.rel_path


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    if n < 3:
        return 0, 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    while n_test + n_val > n - 1:  # keep at least one training clip; shrink the larger (val on ties)
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def split_dataset(clips: Sequence[Clip], val_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, list[Clip]]:
    """Seeded, stratified split into ``{"train", "val", "test"}`` (disjoint, covering, each sorted by rel_path).

    Per class, ``round(n * fraction)`` clips go to test and to val (at least one each when the class has >= 3 clips
    and the fraction is > 0, and always at least one clip left for training). Whole source recordings are moved
    together, so counts can exceed the target by up to one recording's takes; a class with fewer than three
    recordings falls back to clip-level splitting (with a warning, since takes may then leak).

    A dataset with an official split (every clip's ``split`` is "train" or "test", e.g. VGGSound) keeps it:
    test is the official test set, ``test_fraction`` is unused, and val is carved from the official train set.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) "
                         "and sum to less than 1")
    names = [c.rel_path for c in clips]
    if len(set(names)) != len(names):
        raise DatasetError("split_dataset: the clip list contains the same rel_path more than once")
    official = {c.split for c in clips}
    if official != {""}:
        if not official <= {"train", "test"}:
            raise DatasetError(f"clips carry split(s) {sorted(official - {'train', 'test'})}: an official split must "
                               "be 'train' or 'test' on every clip")
        inner = _stratified([c for c in clips if c.split == "train"], val_fraction, 0.0, seed)
        return {"train": inner["train"], "val": inner["val"],
                "test": sorted((c for c in clips if c.split == "test"), key=lambda c: c.rel_path)}
    return _stratified(clips, val_fraction, test_fraction, seed)


def _stratified(clips: Sequence[Clip], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[Clip]]:
    by_class: dict[str, list[Clip]] = {}
    for clip in clips:
        by_class.setdefault(clip.category, []).append(clip)

    out: dict[str, list[Clip]] = {name: [] for name in SPLITS}
    for category in sorted(by_class):
        members = sorted(by_class[category], key=lambda c: c.rel_path)
        n = len(members)
        n_val, n_test = _split_counts(n, val_fraction, test_fraction)
        if n < 3 and (val_fraction > 0 or test_fraction > 0):
            logger.warning("class %r has only %d clip(s): all of them go to the training split", category, n)
        groups: dict[str, list[Clip]] = {}
        for clip in members:
            groups.setdefault(source_id(clip), []).append(clip)
        units = [groups[key] for key in sorted(groups)]
        needed = (n_val > 0) + (n_test > 0) + 1
        if len(units) < needed:
            logger.warning("class %r: only %d source recording(s); splitting by clip, so takes of one recording "
                           "may appear in different splits", category, len(units))
            units = [[clip] for clip in members]
        order = _rng(seed, "split", category).permutation(len(units))
        counts = {"test": 0, "val": 0}
        targets = {"test": n_test, "val": n_val}
        for position, unit_index in enumerate(order):
            unit = units[unit_index]
            left_after = len(order) - position - 1
            destination = "train"
            for split in ("test", "val"):
                # Fill test first, then val, but never take the last unit(s) that train (and val) still need.
                reserve = 1 + (1 if split == "test" and counts["val"] < targets["val"] else 0)
                if counts[split] < targets[split] and left_after >= reserve:
                    destination = split
                    break
            if destination != "train":
                counts[destination] += len(unit)
            out[destination].extend(unit)
    for name in SPLITS:
        out[name].sort(key=lambda c: c.rel_path)
    return out


# ------------------------------------------------------------------------------------------------ partitioners
Partitioner = Callable[..., list[NodeSplit]]
PARTITIONERS: dict[str, Partitioner] = {}


def register_partitioner(mode: str) -> Callable[[Partitioner], Partitioner]:
    """Register ``fn(splits, class_names, num_nodes, seed, **options) -> list[NodeSplit]`` under `mode`."""

    def decorator(fn: Partitioner) -> Partitioner:
        PARTITIONERS[mode] = fn
        return fn

    return decorator


def _deal(items: list[Clip], owners: Sequence[int], rng: np.random.Generator, start: int,
          shares: dict[int, list[Clip]]) -> int:
    """Shuffle `items` and deal them round-robin to `owners`, beginning at owner `start`; returns the next start."""
    for i, idx in enumerate(rng.permutation(len(items))):
        shares[owners[(start + i) % len(owners)]].append(items[idx])
    return (start + len(items)) % len(owners) if owners else 0


def _assign(splits: dict[str, list[Clip]], class_names: Sequence[str], owners_of: dict[str, list[int]],
            num_nodes: int, seed: int) -> list[dict[str, list[Clip]]]:
    """For every split and class, deal that class's clips among the nodes that own the class.

    The round-robin start carries over from class to class (and split to split), so the extra clip of an uneven
    class does not always land on the same node, and per-split totals of nodes sharing the same classes differ by
    at most one clip.
    """
    per_node: list[dict[str, list[Clip]]] = [{s: [] for s in SPLITS} for _ in range(num_nodes)]
    starts: dict[tuple[int, ...], int] = {}
    for split in SPLITS:
        by_class: dict[str, list[Clip]] = {}
        for clip in splits[split]:
            by_class.setdefault(clip.category, []).append(clip)
        for category in class_names:
            owners = owners_of.get(category, [])
            items = sorted(by_class.get(category, []), key=lambda c: c.rel_path)
            if not owners or not items:
                continue
            shares: dict[int, list[Clip]] = {node: [] for node in owners}
            key = tuple(owners)
            starts[key] = _deal(items, owners, _rng(seed, "deal", split, category), starts.get(key, 0), shares)
            for node, got in shares.items():
                per_node[node][split].extend(got)
    return per_node


def _node_splits(per_node: list[dict[str, list[Clip]]], classes_of: list[list[str]]) -> list[NodeSplit]:
    result = []
    for node, parts in enumerate(per_node):
        split = NodeSplit(**{s: sorted(parts[s], key=lambda c: c.rel_path) for s in SPLITS},
                          classes=list(classes_of[node]))
        if not split.train:
            logger.warning("node %d has no training clips (classes %s)", node, ", ".join(split.classes))
        result.append(split)
    return result


@register_partitioner("iid")
def partition_iid(splits: dict[str, list[Clip]], class_names: Sequence[str], num_nodes: int, seed: int,
                  **_: Any) -> list[NodeSplit]:
    """Every node owns every class and gets a near-equal, stratified share of each split."""
    owners_of = {name: list(range(num_nodes)) for name in class_names}
    per_node = _assign(splits, class_names, owners_of, num_nodes, seed)
    return _node_splits(per_node, [list(class_names)] * num_nodes)


@register_partitioner("explicit")
def partition_explicit(splits: dict[str, list[Clip]], class_names: Sequence[str], num_nodes: int, seed: int,
                       node_classes: Sequence[Sequence[str]] | None = None,
                       node_samples_per_class: Sequence[int | None] | None = None, **_: Any) -> list[NodeSplit]:
    """Node i owns ``node_classes[i]``; a class owned by several nodes has its clips dealt among them.

    ``node_samples_per_class[i]`` (when not None) caps node i's *training* clips per class -- a way to simulate
    sites with little data. Clips above the cap are left unused rather than given to another node, so the other
    nodes' data do not depend on one node's cap.
    """
    if node_classes is None:
        raise DatasetError("partition mode 'explicit' needs node_classes (one list of class names per node)")
    if isinstance(node_classes, str) or len(node_classes) != num_nodes:
        raise DatasetError(f"node_classes must have one entry per node: {num_nodes} node(s), "
                           f"got {1 if isinstance(node_classes, str) else len(node_classes)}")
    known = set(class_names)
    classes_of: list[list[str]] = []
    for node, names in enumerate(node_classes):
        if isinstance(names, str):
            raise DatasetError(f"node {node}: classes must be a list of names, got the string {names!r}")
        names = [str(n) for n in names]
        if not names:
            raise DatasetError(f"node {node}: node_classes is empty; every node needs at least one class")
        unknown = [n for n in names if n not in known]
        if unknown:
            raise DatasetError(f"node {node}: class(es) {', '.join(repr(n) for n in unknown)} are not among the "
                               f"selected classes ({', '.join(class_names)})")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise DatasetError(f"node {node}: class(es) listed more than once: {', '.join(duplicates)}")
        classes_of.append([c for c in class_names if c in names])  # global label order

    caps: list[int | None] = [None] * num_nodes
    if node_samples_per_class is not None:
        if len(node_samples_per_class) != num_nodes:
            raise DatasetError(f"node_samples_per_class must have one entry per node: {num_nodes} node(s), "
                               f"got {len(node_samples_per_class)}")
        for node, cap in enumerate(node_samples_per_class):
            if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
                raise DatasetError(f"node {node}: samples per class must be a positive integer or None, got {cap!r}")
        caps = list(node_samples_per_class)

    owners_of: dict[str, list[int]] = {}
    for node, names in enumerate(classes_of):
        for name in names:
            owners_of.setdefault(name, []).append(node)
    unowned = [c for c in class_names if c not in owners_of]
    if unowned:
        logger.info("classes owned by no node (their clips are unused): %s", ", ".join(unowned))

    per_node = _assign(splits, class_names, owners_of, num_nodes, seed)
    for node, cap in enumerate(caps):
        if cap is None:
            continue
        kept: list[Clip] = []
        for name in classes_of[node]:
            mine = [c for c in per_node[node]["train"] if c.category == name]
            if len(mine) > cap:
                logger.info("node %d: class %r capped at %d of its %d training clips", node, name, cap, len(mine))
            elif len(mine) < cap:
                logger.info("node %d: class %r has only %d training clips (cap %d)", node, name, len(mine), cap)
            kept.extend(mine[:cap])  # `mine` is in dealt (seeded, shuffled) order: the kept clips are a random draw
        per_node[node]["train"] = kept
    return _node_splits(per_node, classes_of)


def _flwr_partition(partitioner: Any, train: list[Clip], class_names: Sequence[str], num_nodes: int) -> list[list[Clip]]:
    """Run a flwr-datasets partitioner over the train clip table (label + row index); each node's clips."""
    from datasets import Dataset

    labels = {name: i for i, name in enumerate(class_names)}
    partitioner.dataset = Dataset.from_dict({"label": [labels[c.category] for c in train],
                                             "row": list(range(len(train)))})
    return [[train[row] for row in partitioner.load_partition(node)["row"]] for node in range(num_nodes)]


def _label_skew(partitioner: Any, splits: dict[str, list[Clip]], class_names: Sequence[str],
                num_nodes: int, seed: int) -> list[NodeSplit]:
    """Train clips by ``partitioner``; a node's classes are the ones it got train clips of, and each class's
    val/test clips are dealt among the nodes holding that class (so every node evaluates what it learned)."""
    train = sorted(splits["train"], key=lambda c: c.rel_path)
    try:
        train_of = _flwr_partition(partitioner, train, class_names, num_nodes)
    except ValueError as err:  # e.g. Dirichlet could not meet min_partition_size in its attempts
        raise DatasetError(f"{type(partitioner).__name__} failed on {len(train)} train clips, {num_nodes} nodes: {err} "
                           "(lower data.min-partition-size, raise data.dirichlet-alpha, or use more clips)") from err
    classes_of = [[c for c in class_names if any(x.category == c for x in mine)] for mine in train_of]
    owners_of: dict[str, list[int]] = {}
    for node, names in enumerate(classes_of):
        for name in names:
            owners_of.setdefault(name, []).append(node)
    held_out = {"train": [], "val": splits["val"], "test": splits["test"]}
    per_node = _assign(held_out, class_names, owners_of, num_nodes, seed)
    for node in range(num_nodes):
        per_node[node]["train"] = train_of[node]
    return _node_splits(per_node, classes_of)


@register_partitioner("dirichlet")
def partition_dirichlet(splits: dict[str, list[Clip]], class_names: Sequence[str], num_nodes: int, seed: int,
                        dirichlet_alpha: float = 0.5, min_partition_size: int = 0, **_: Any) -> list[NodeSplit]:
    """Label skew: each class's train clips are split across nodes by Dirichlet(alpha) proportions
    (flwr-datasets' ``DirichletPartitioner``); small alpha = few classes per node."""
    from flwr_datasets.partitioner import DirichletPartitioner

    partitioner = DirichletPartitioner(num_partitions=num_nodes, partition_by="label", alpha=float(dirichlet_alpha),
                                       min_partition_size=int(min_partition_size), self_balancing=False, shuffle=True,
                                       seed=int(seed) & 0xFFFFFFFF)
    return _label_skew(partitioner, splits, class_names, num_nodes, seed)


@register_partitioner("pathological")
def partition_pathological(splits: dict[str, list[Clip]], class_names: Sequence[str], num_nodes: int, seed: int,
                           classes_per_node: int = 2, **_: Any) -> list[NodeSplit]:
    """Each node holds ``classes_per_node`` classes (flwr-datasets' ``PathologicalPartitioner``: node i's first
    class is class i, the others a seeded draw, so every class is used when nodes x classes_per_node covers
    them); a class held by several nodes has its train clips split among them."""
    from flwr_datasets.partitioner import PathologicalPartitioner

    if not 1 <= classes_per_node <= len(class_names):
        raise DatasetError(f"data.classes-per-node must be between 1 and the {len(class_names)} classes, "
                           f"got {classes_per_node}")
    partitioner = PathologicalPartitioner(num_partitions=num_nodes, partition_by="label",
                                          num_classes_per_partition=int(classes_per_node),
                                          class_assignment_mode="first-deterministic", shuffle=True,
                                          seed=int(seed) & 0xFFFFFFFF)
    return _label_skew(partitioner, splits, class_names, num_nodes, seed)


def partition_nodes(clips: Sequence[Clip], class_names: Sequence[str], num_nodes: int, mode: str, seed: int,
                    val_fraction: float, test_fraction: float,
                    node_classes: Sequence[Sequence[str]] | None = None,
                    node_samples_per_class: Sequence[int | None] | None = None,
                    **options: Any) -> list[NodeSplit]:
    """Split `clips` globally (:func:`split_dataset`) and assign each split to `num_nodes` nodes by `mode`.

    Guarantees: a clip is in at most one node's train set; val/test clips are never in any train set; a node's
    clips are all of its classes; the result depends only on the arguments (same seed, same result everywhere).
    """
    if mode not in PARTITIONERS:
        raise ValueError(f"unknown partition mode {mode!r}; available: {', '.join(sorted(PARTITIONERS))}")
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be at least 1, got {num_nodes}")
    names = list(class_names)
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise DatasetError(f"class_names contains duplicates: {', '.join(duplicates)}")
    stray = sorted({c.category for c in clips} - set(names))
    if stray:
        raise DatasetError(f"clips of class(es) {', '.join(stray)} are not in class_names ({', '.join(names)})")
    splits = split_dataset(clips, val_fraction, test_fraction, seed)
    result = PARTITIONERS[mode](splits, names, num_nodes, seed, node_classes=node_classes,
                                node_samples_per_class=node_samples_per_class, **options)
    for node, part in enumerate(result):
        logger.info("node %d (%s): %d train / %d val / %d test clips, %d classes", node, mode, len(part.train),
                    len(part.val), len(part.test), len(part.classes))
    return result
