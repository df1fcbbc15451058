"""One message's node: its config, the server's message parsed once, the class targets, and the node's
state on disk, opened once when the message arrives and closed once before the reply leaves.

Why one object: the carried state (a node's own adapters, its generator bank) and the server's records the
node holds (:mod:`client_app.held`) live on the node's disk between messages
(:class:`~client_app.node_state.DiskState`); reading and writing them at one opening and one closing keeps
every handler free of that bookkeeping, and keeps the Context that travels back to the SuperNode small.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict

from client_app.held import resolve, state_keys
from client_app.message import NodeMessage
from client_app.node_data import NodeDataMemo
from client_app.node_state import LOCAL_ADAPTERS, DiskState, state_dir
from client_app.site import NodeSite
from client_app.sources import TrainingSource, source_for
from common.config import FedA2VConfig, NodeRuntimeConfig, load_config
from common.errors import redact_paths
from common.logs import setup_logging
from common.models.adapters import AdapterConfig, Adapters
from common.records import TARGETS, TARGETS_META, ClassTensors, RecordError, arrays_to_module

__all__ = ["NodeSession", "check_classes"]

log = logging.getLogger(__name__)


def check_classes(targets: ClassTensors, class_names: list[str], node: NodeRuntimeConfig) -> None:
    """The server's class targets and this node's class list must be the same list, in the same order."""
    if targets.class_names != class_names:
        raise RecordError(
            f"node {node.partition_id}: server targets are for classes {targets.class_names} but this node's "
            f"configuration gives {class_names}; both sides must use the same data.classes"
        )


@dataclass
class NodeSession:
    """Everything one train or evaluate message works with (see the module docstring)."""

    cfg: FedA2VConfig
    site: NodeSite  # this node's side of the run config, resolved once
    message: NodeMessage
    context: Context
    targets: ClassTensors
    disk: DiskState
    source: TrainingSource
    memo: NodeDataMemo
    carried: tuple[str, ...] = ()  # the state keys this node carries across rounds in this run
    state_metrics: dict[str, int] = field(default_factory=dict)  # state_restored / state_lost

    @property
    def state(self) -> RecordDict:
        return self.context.state

    @property
    def node(self) -> NodeRuntimeConfig:
        return self.site.node

    @classmethod
    def open(cls, msg: Message, context: Context, memo: NodeDataMemo, evaluate: bool = False) -> "NodeSession":
        """Parse the message, read back the node's state (its carried records of earlier rounds; for an
        evaluate message also this round's) and complete the message from the records the node holds."""
        setup_logging()
        cfg = load_config(context.run_config)
        node = NodeRuntimeConfig.from_node_config(context.node_config)
        if node.num_threads:
            torch.set_num_threads(node.num_threads)
        message = NodeMessage.parse(msg)  # the run name is checked before any path is built from it
        site = NodeSite.of(cfg, node)
        source = source_for(cfg, site)
        carried = source.carries + (() if message.global_model else (LOCAL_ADAPTERS,))
        disk = DiskState(state_dir(site.cache_dir, message.run_name, node.partition_id),
                         message.run_identity)
        state_metrics = _restore_carried(disk, context.state, carried, message.server_round + int(evaluate),
                                         node.partition_id, message.server_round)
        if message.by_reference:
            disk.restore(context.state, state_keys(), message.server_round + 1)  # held records live on the disk
        content, kept = resolve(msg.content, context.state)
        msg.content = content
        if kept:
            try:
                disk.persist(context.state, tuple(kept), message.server_round)
            except OSError as err:  # an optimisation only: the state in memory still serves this SuperNode's life
                log.warning("node %d: the server's records could not be kept on disk (%s); a restart will need "
                            "them sent again", node.partition_id, redact_paths(str(err)))
        targets = ClassTensors.from_records(content, TARGETS, TARGETS_META)
        return cls(cfg, site, message.completed(content), context, targets, disk, source, memo, carried, state_metrics)

    def adapters(self) -> tuple[Adapters, dict | None]:
        """The adapters this message works on, and the server's weights as received (``None`` when the node
        works on its own adapters): the base of a train reply sent as a difference (:mod:`common.wire`)."""
        acfg = AdapterConfig.from_sections(self.cfg.adapter, self.cfg.audio_encoder, self.cfg.text_encoder, clip_dim=self.targets.clip.shape[1], t5_dim=self.targets.t5.shape[2])
        adapters = Adapters.seeded(acfg, self.cfg.seed)
        if not self.message.global_model and LOCAL_ADAPTERS in self.state:
            return arrays_to_module(self.state[LOCAL_ADAPTERS], adapters), None  # type: ignore[arg-type]
        sent = self.message.global_weights()
        return arrays_to_module(ArrayRecord(sent), adapters), sent

    def keep_own_adapters(self, weights: ArrayRecord) -> None:
        """Standalone nodes (no global model) continue their own adapters next round."""
        if not self.message.global_model:
            self.state[LOCAL_ADAPTERS] = weights

    def close(self, persist: bool) -> None:
        """Write what changed (``persist``: a train message) and leave the Context small for the trip back."""
        if persist:
            self.disk.persist(self.state, self.carried, self.message.server_round)
        self.disk.release(self.state)


def _restore_carried(disk: DiskState, state: RecordDict, keys: tuple[str, ...], before_round: int, partition_id: int,
                     server_round: int) -> dict[str, int]:
    """Claim the state folder for this run and read back the carried ``keys``; the ``state_restored``
    (reloaded after a SuperNode restart) and ``state_lost`` metrics."""
    try:
        disk.claim()  # another run of this name left its state here: removed before anything is read
    except OSError as err:  # the identity in each file still keeps another run's state out
        log.warning("node %d: could not mark %s as this run's state folder (%s)", partition_id, disk.directory,
                    redact_paths(str(err)))
    restored = disk.restore(state, keys, before_round)
    if restored:
        log.info("node %d: restored %s from %s (the SuperNode restarted)", partition_id, restored, disk.directory)
    lost = [k for k in keys if k not in state]
    if lost and server_round > 1:
        log.warning("node %d round %d: %s from earlier rounds is gone (not in the node's state nor in %s): starting "
                    "them over", partition_id, server_round, lost, disk.directory)
    return {"state_restored": int(bool(restored)), "state_lost": int(bool(lost) and server_round > 1)}
