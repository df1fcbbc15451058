"""What a node trains its adapters on, by ``generator.mode``: the training sources and their registry.

Why a registry: each mode differs in where the round's embeddings come from, what the node carries
between rounds and whether the adapters train; the handlers ask the source and never compare modes.
A new mode is one new module with a :class:`TrainingSource` subclass decorated with :func:`register`
(and its import in ``client_app/sources/__init__.py``). ``generate-only`` runs are a flag every source
honours: nobody trains the adapters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
from flwr.app import RecordDict

from client_app.message import NodeMessage
from client_app.node_data import NodeDataMemo
from client_app.node_state import DiskState
from client_app.site import NodeSite
from common.config import FedA2VConfig
from common.errors import FedA2VError

__all__ = ["SOURCES", "NodeSessionView", "TrainingSet", "TrainingSource", "register", "source_for"]


class NodeSessionView(Protocol):
    """What a source reads of the message's session (:class:`client_app.session.NodeSession`, which
    imports the sources: they see it through this view only)."""

    message: NodeMessage
    disk: DiskState
    memo: NodeDataMemo

    @property
    def state(self) -> RecordDict: ...


@dataclass
class TrainingSet:
    """This round's training embeddings and what obtaining them cost."""

    class_names: list[str]
    embeddings: torch.Tensor
    labels: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    has_bank: bool = False  # the node holds a generator bank in its state (sent to the server with the reply)


class TrainingSource:
    """Where a node's training embeddings come from (subclasses are registered per ``generator.mode``)."""

    carries: ClassVar[tuple[str, ...]] = ()  # Context.state keys the node carries from round to round
    trains: ClassVar[bool] = True  # the adapters train (a generator-only run computes their losses only)

    def __init__(self, cfg: FedA2VConfig, site: NodeSite) -> None:
        self.cfg = cfg  # the run's config: a source is where the handlers hand each function its sections
        self.site = site

    @property
    def trains_adapters(self) -> bool:
        return self.trains and not self.cfg.generate_only

    @property
    def cache_only(self) -> bool:
        """Held-out embeddings come from the embedding cache alone (no AST is built for evaluation)."""
        return False

    def training_set(self, session: NodeSessionView) -> TrainingSet:
        raise NotImplementedError

    def before_render(self, session: NodeSessionView) -> None:
        """Whatever rendering needs of this source in this message (default: nothing)."""


SOURCES: dict[str, type[TrainingSource]] = {}


def register(*modes: str) -> Callable[[type[TrainingSource]], type[TrainingSource]]:
    """Class decorator: the source of ``generator.mode`` values ``modes``."""

    def add(cls: type[TrainingSource]) -> type[TrainingSource]:
        for mode in modes:
            SOURCES[mode] = cls
        return cls

    return add


def source_for(cfg: FedA2VConfig, site: NodeSite) -> TrainingSource:
    """The registry lookup: the one place the client reads ``generator.mode``."""
    try:
        return SOURCES[cfg.generator.mode](cfg, site)
    except KeyError:
        raise FedA2VError(f"generator.mode '{cfg.generator.mode}' has no training source on this node "
                          f"(known: {', '.join(sorted(SOURCES))})") from None
