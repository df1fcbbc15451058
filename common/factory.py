"""Build the run's objects from the validated config: one place shared by server, clients, benches.

Keeping these small constructors together means the ServerApp, the ClientApp and the centralized
baseline can never disagree about class order, embedding shape, adapter dims or dataset location.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from common.config import ConfigError, FedA2VConfig
from common.data.clips import Clip, DatasetError, DatasetIndex
from common.data.partition import NodeSplit, partition_nodes
from common.data.readers import list_classes, reader, scan
from common.data.synth import SYNTH_CLASSES, ensure_synthetic_dataset
from common.models.adapters import AdapterConfig, Adapters
from common.models.audio_encoder import TINY_AST, ModelLoadError
from common.models.text_encoders import FLUX_CLIP_DIM, FLUX_T5_DIM
from common.seeds import seeded

log = logging.getLogger(__name__)


def resolve_device(cfg: FedA2VConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def synthetic_root(cfg: FedA2VConfig, cache_dir: Path | None = None) -> Path:
    """Default location of the generated dataset: keyed by its parameters, under the cache dir."""
    cache_dir = cache_dir or cfg.resolved_cache_dir()
    d = cfg.data
    return cache_dir / "data" / f"synthetic-esc50-c{_synth_class_count(cfg)}-n{d.clips_per_class}-s{d.synth_seed}"


def _synth_class_count(cfg: FedA2VConfig) -> int:
    return len(cfg.data.classes) if cfg.data.classes else cfg.data.num_classes


def synth_classes(cfg: FedA2VConfig) -> list[str]:
    """The classes the synthetic generator writes (the requested ones, else the first N recipes)."""
    if cfg.data.classes:
        unknown = [c for c in cfg.data.classes if c not in SYNTH_CLASSES]
        if unknown:
            raise ConfigError(
                f"data.classes: {unknown} have no synthetic recipe; available: {', '.join(SYNTH_CLASSES)}"
            )
        return list(cfg.data.classes)
    if cfg.data.num_classes > len(SYNTH_CLASSES):
        raise ConfigError(f"data.num-classes={cfg.data.num_classes} but the synthetic generator has {len(SYNTH_CLASSES)} classes")
    return list(SYNTH_CLASSES[: cfg.data.num_classes])


def dataset_root(cfg: FedA2VConfig, data_root_override: str = "", cache_dir: Path | None = None) -> Path:
    """Where this process reads audio from (a node's ``data-root`` wins over ``data.root``)."""
    root = data_root_override or cfg.data.root
    if root:
        return Path(root).expanduser()
    if cfg.data.dataset == "synthetic":
        return synthetic_root(cfg, cache_dir)
    raise ConfigError(f"data.dataset='{cfg.data.dataset}' needs data.root (or a node-config 'data-root') pointing at "
                      f"the dataset folder ({reader(cfg.data.dataset).describe})")


def prepare_dataset(cfg: FedA2VConfig, root: Path) -> Path:
    """Generate the synthetic dataset on first use; check that a real one exists."""
    if cfg.data.dataset == "synthetic":
        return ensure_synthetic_dataset(
            root, synth_classes(cfg), cfg.data.clips_per_class, cfg.data.synth_seed
        )
    if not root.is_dir():
        raise DatasetError(f"data.root '{root}' does not exist or is not a directory")
    return root


def resolve_classes(cfg: FedA2VConfig, root: Path | None = None) -> list[str]:
    """The federation's class list, in label order (targets, labels and metrics all use it).

    Without ``data.classes`` the list is read from the dataset (its default order, first
    ``data.num-classes``), which the server may not have: then ``data.classes`` must be given.
    """
    if cfg.data.dataset == "synthetic":
        return synth_classes(cfg)
    if cfg.data.classes:
        return list(cfg.data.classes)
    if root is None or not root.is_dir():
        where = f"data.root '{root}' is not a directory here" if root is not None else "data.root is not set"
        raise ConfigError(
            f"data.classes is empty and the dataset is not available here ({where}): set data.root, or list the "
            "federation's classes in data.classes (the server needs them to compute text targets)"
        )
    try:
        categories = list_classes(cfg.data.dataset, root, cfg.data.audio_dir)
    except DatasetError as err:
        raise ConfigError(f"data.classes is empty and the dataset's classes cannot be read: {err} (list the "
                          "federation's classes in data.classes)") from err
    return categories[: cfg.data.num_classes]


def scan_dataset(cfg: FedA2VConfig, root: Path, class_names: list[str] | None) -> DatasetIndex:
    """The dataset's clips of ``class_names`` with the reader ``data.dataset`` names."""
    return scan(cfg.data.dataset, root, class_names, cfg.data.audio_dir)


def node_splits(cfg: FedA2VConfig, clips: list[Clip], class_names: list[str], num_nodes: int) -> list[NodeSplit]:
    """Every node's train/val/test clips, as each node derives them from the shared config."""
    return partition_nodes(
        clips,
        class_names,
        num_nodes=num_nodes,
        mode=cfg.data.partition,
        seed=cfg.seed,
        val_fraction=cfg.data.val_fraction,
        test_fraction=cfg.data.test_fraction,
        node_classes=cfg.node_classes(num_nodes),
        node_samples_per_class=cfg.node_samples_per_class(num_nodes),
        dirichlet_alpha=cfg.data.dirichlet_alpha,
        classes_per_node=cfg.data.classes_per_node,
        min_partition_size=cfg.data.min_partition_size,
    )


def embedding_shape(cfg: FedA2VConfig) -> tuple[int, int]:
    """(L, H) of a reduced AST embedding, known without loading AST weights."""
    tokens = 1 if cfg.audio_encoder.reduction == "cls" else cfg.audio_encoder.tokens
    if cfg.audio_encoder.model == "tiny":
        return tokens, int(TINY_AST["hidden_size"])
    from transformers import ASTConfig

    try:
        hidden = ASTConfig.from_pretrained(cfg.audio_encoder.model).hidden_size
    except OSError as err:
        raise ModelLoadError(
            f"audio-encoder.model '{cfg.audio_encoder.model}': config not available offline ({err}). "
            "Point it at a local folder, set HF_HOME to a cache holding it, or use 'tiny'."
        ) from None
    return tokens, int(hidden)


def adapter_config(cfg: FedA2VConfig, clip_dim: int = FLUX_CLIP_DIM, t5_dim: int = FLUX_T5_DIM) -> AdapterConfig:
    """The one place an :class:`AdapterConfig` is built from the config.

    Input dims from the audio encoder, output dims from the text targets' spaces (FLUX.1's by
    default), ``t5_tokens`` from ``text-encoder.t5-tokens`` and width, heads and dropout from
    ``adapter.*``.
    """
    tokens, hidden = embedding_shape(cfg)
    return AdapterConfig(
        in_dim=hidden,
        in_tokens=tokens,
        clip_dim=clip_dim,
        t5_dim=t5_dim,
        t5_tokens=cfg.text_encoder.t5_tokens,
        hidden_dim=cfg.adapter.hidden_dim,
        heads=cfg.adapter.heads,
        dropout=cfg.adapter.dropout,
    )


def build_adapters(cfg: FedA2VConfig, acfg: AdapterConfig | None = None) -> Adapters:
    """Adapters with a seeded init, so every node and the server start from the same weights.

    The init is seeded with ``seed`` in a fork of the global RNG: the caller's RNG is left as it was.
    """
    acfg = acfg or adapter_config(cfg)
    with seeded(cfg.seed):
        return Adapters(acfg)
