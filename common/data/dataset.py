"""A run's dataset from its ``[data]`` section: where it is, which classes, which clips, which node sees which.

Why one module: the ServerApp, every ClientApp, the cache commands and the benches must never disagree
about class order or the split; each reads it from the same section through these functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from common.config import ConfigError, DataConfig, NodeSpec
from common.data.clips import Clip, DatasetError, DatasetIndex
from common.data.partition import NodeSplit, partition_nodes
from common.data.readers import list_classes, reader, scan
from common.data.synth import SYNTH_CLASSES, ensure_synthetic_dataset

__all__ = ["dataset_root", "explicit_nodes", "node_splits", "prepare_dataset", "resolve_classes", "scan_dataset", "synth_classes",
           "synthetic_root"]


def synthetic_root(data: DataConfig, cache_dir: Path) -> Path:
    """Default location of the generated dataset: keyed by its parameters, under the cache dir."""
    count = len(data.classes) if data.classes else data.num_classes
    return Path(cache_dir) / "data" / f"synthetic-esc50-c{count}-n{data.clips_per_class}-s{data.synth_seed}"


def synth_classes(data: DataConfig) -> list[str]:
    """The classes the synthetic generator writes (the requested ones, else the first N recipes)."""
    if data.classes:
        unknown = [c for c in data.classes if c not in SYNTH_CLASSES]
        if unknown:
            raise ConfigError(f"data.classes: {unknown} have no synthetic recipe; available: {', '.join(SYNTH_CLASSES)}")
        return list(data.classes)
    if data.num_classes > len(SYNTH_CLASSES):
        raise ConfigError(f"data.num-classes={data.num_classes} but the synthetic generator has {len(SYNTH_CLASSES)} classes")
    return list(SYNTH_CLASSES[: data.num_classes])


def dataset_root(data: DataConfig, cache_dir: Path, data_root_override: str = "") -> Path:
    """Where this process reads audio from (a node's ``data-root`` wins over ``data.root``)."""
    root = data_root_override or data.root
    if root:
        return Path(root).expanduser()
    if data.dataset == "synthetic":
        return synthetic_root(data, cache_dir)
    raise ConfigError(f"data.dataset='{data.dataset}' needs data.root (or a node-config 'data-root') pointing at "
                      f"the dataset folder ({reader(data.dataset).describe})")


def prepare_dataset(data: DataConfig, root: Path) -> Path:
    """Generate the synthetic dataset on first use; check that a real one exists."""
    if data.dataset == "synthetic":
        return ensure_synthetic_dataset(root, synth_classes(data), data.clips_per_class, data.synth_seed)
    if not root.is_dir():
        raise DatasetError(f"data.root '{root}' does not exist or is not a directory")
    return root


def resolve_classes(data: DataConfig, root: Path | None = None) -> list[str]:
    """The federation's class list, in label order (targets, labels and metrics all use it).

    Without ``data.classes`` the list is read from the dataset (its default order, first
    ``data.num-classes``), which the server may not have: then ``data.classes`` must be given.
    """
    if data.dataset == "synthetic":
        return synth_classes(data)
    if data.classes:
        return list(data.classes)
    if root is None or not root.is_dir():
        where = f"data.root '{root}' is not a directory here" if root is not None else "data.root is not set"
        raise ConfigError(
            f"data.classes is empty and the dataset is not available here ({where}): set data.root, or list the "
            "federation's classes in data.classes (the server needs them to compute text targets)"
        )
    try:
        categories = list_classes(data.dataset, root, data.audio_dir)
    except DatasetError as err:
        raise ConfigError(f"data.classes is empty and the dataset's classes cannot be read: {err} (list the "
                          "federation's classes in data.classes)") from err
    return categories[: data.num_classes]


def scan_dataset(data: DataConfig, root: Path, class_names: list[str] | None) -> DatasetIndex:
    """The dataset's clips of ``class_names`` with the reader ``data.dataset`` names."""
    return scan(data.dataset, root, class_names, data.audio_dir)


def explicit_nodes(data: DataConfig, nodes: Mapping[str, NodeSpec], num_nodes: int
                    ) -> tuple[list[list[str]] | None, list[int | None] | None]:
    """``[nodes.<id>]`` class lists and per-class caps of an explicit partition, checked against the node count."""
    if data.partition != "explicit":
        return None, None
    missing = [str(i) for i in range(num_nodes) if str(i) not in nodes]
    if missing:
        raise ConfigError(f"data.partition='explicit' but no [nodes.<id>] table for node(s) {', '.join(missing)}")
    specs = [nodes[str(i)] for i in range(num_nodes)]
    return [list(s.classes) for s in specs], [s.samples_per_class or None for s in specs]


def node_splits(data: DataConfig, nodes: Mapping[str, NodeSpec], seed: int, clips: list[Clip], class_names: list[str],
                num_nodes: int) -> list[NodeSplit]:
    """Every node's train/val/test clips, as each node derives them from the shared config."""
    node_classes, caps = explicit_nodes(data, nodes, num_nodes)
    return partition_nodes(
        clips,
        class_names,
        num_nodes=num_nodes,
        mode=data.partition,
        seed=seed,
        val_fraction=data.val_fraction,
        test_fraction=data.test_fraction,
        node_classes=node_classes,
        node_samples_per_class=caps,
        dirichlet_alpha=data.dirichlet_alpha,
        classes_per_node=data.classes_per_node,
        min_partition_size=data.min_partition_size,
    )
