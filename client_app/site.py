"""This node in this run: the run's settings that concern one node, resolved once with its node-config.

Why one object: a node's folders (cache, generator checkpoints), whether it holds audio, how many images it
renders, which generators it trains and the privacy limits it applies each depend on both the server's run
config and the site's ``--node-config``. Resolving them here, once per message, gives every function below
the handlers the node's answer instead of the whole run configuration, and keeps the precedence rules
(node-config > run config > defaults) in one file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from client_app.policy import SitePolicy
from common.cache.embed import ExtractionSettings
from common.cache.key import cache_key
from common.config import AudioEncoderConfig, ConfigError, FedA2VConfig, NodeRuntimeConfig, NodeSpec
from common.device import resolve_device

__all__ = ["NodeSite"]


@dataclass(frozen=True)
class NodeSite:
    """The node's resolved settings (build it with :meth:`of`)."""

    node: NodeRuntimeConfig
    seed: int  # the run seed: it places the node's clips in the splits and seeds its models
    node_specs: Mapping[str, NodeSpec]  # the run's [nodes.<id>] tables: explicit partitions read all of them
    device: torch.device  # where this node computes (audio encoder, adapters, rendering)
    cache_dir: Path  # node-config cache-dir > cache-dir > $FEDA2V_CACHE / user cache
    checkpoint_root: Path  # node-config checkpoint-dir > generator.checkpoint-dir > <cache dir>/generators
    audio_encoder: AudioEncoderConfig
    extraction: ExtractionSettings  # the audio encoder as this node runs it
    holds_audio: bool  # nodes.<id>.audio
    images_per_class: int  # nodes.<id>.images-per-class > render.images-per-class
    generator_granularity: str  # nodes.<id>.generator-granularity > generator.granularity
    generator_classes: tuple[str, ...] | None  # nodes.<id>.generator-classes (None: every class it holds)
    policy: SitePolicy

    @classmethod
    def of(cls, cfg: FedA2VConfig, node: NodeRuntimeConfig) -> "NodeSite":
        partition = node.partition_id
        cache_dir = Path(node.cache_dir).expanduser() if node.cache_dir else cfg.resolved_cache_dir()
        if node.checkpoint_dir:
            checkpoint_root = Path(node.checkpoint_dir).expanduser()
        elif cfg.generator.checkpoint_dir:
            checkpoint_root = Path(cfg.generator.checkpoint_dir).expanduser()
        else:
            checkpoint_root = cache_dir / "generators"
        policy = SitePolicy.of(cfg.privacy, node)
        if policy.dp and cfg.generator.mode != "off":  # the run config already refuses privacy.dp with generators
            raise ConfigError(f"node-config privacy-dp (or privacy-epsilon) of node {partition}: this site releases "
                              f"nothing without DP, and generator.mode='{cfg.generator.mode}' trains generators on its "
                              "clips without DP; the run needs generator.mode='off'")
        device = resolve_device(cfg.device)
        granularity, selected = cfg.node_generator_plan(partition)
        return cls(
            node=node, seed=cfg.seed, node_specs=dict(cfg.nodes), device=device, cache_dir=cache_dir,
            checkpoint_root=checkpoint_root, audio_encoder=cfg.audio_encoder,
            extraction=ExtractionSettings.of(cfg.audio_encoder, cfg.data, cfg.seed, device=str(device)),
            holds_audio=cfg.node_holds_audio(partition), images_per_class=cfg.node_images_per_class(partition),
            generator_granularity=granularity, generator_classes=tuple(selected) if selected is not None else None,
            policy=policy,
        )

    @property
    def partition_id(self) -> int:
        return self.node.partition_id

    @property
    def encoder_key(self) -> str:
        """The embedding cache key: generators are only valid for embeddings of exactly this encoder."""
        return cache_key(self.extraction.key_fields())
