"""Drive a ClientApp function in-process, without a SuperLink: benchmarks, tests and debugging.

Why: measuring a node (peak memory of one ``train`` call, say) or testing its reply must not need a
running federation. These helpers build exactly what the ServerApp's strategy sends (adapter
weights, the round in the config record, the class text targets) and the node's Context.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from common.records import ARRAYS, CONFIG, GLOBAL_MODEL, RUN_NAME, TARGETS, TARGETS_META, ClassTensors

__all__ = ["server_content", "server_message", "node_context"]


def server_content(targets: ClassTensors, arrays: ArrayRecord, server_round: int = 1, global_model: bool = True,
                   run_name: str = "") -> RecordDict:
    """The records of a train/evaluate message: weights, the round config, class targets.

    ``global_model``: what the server's aggregation method says (False: nodes keep their own adapters);
    ``run_name``: the run's name (the node's folders for this run: state, generator checkpoints, images).
    """
    config = {"server-round": server_round, GLOBAL_MODEL: global_model, **({RUN_NAME: run_name} if run_name else {})}
    content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(config)})
    targets.to_records(content, TARGETS, TARGETS_META)
    return content


def server_message(content: RecordDict, message_type: str = MessageType.TRAIN, dst_node_id: int = 7) -> Message:
    """A message as the SuperLink would deliver it (explicit metadata: Flower 1.41 needs it in-process)."""
    meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=dst_node_id, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=3600, message_type=message_type)
    return Message(content=content, metadata=meta)


def node_context(run_config: Mapping[str, Any], node_config: Mapping[str, Any], state: RecordDict | None = None) -> Context:
    """A node's Context; keep and pass the same one to emulate one SuperNode across rounds."""
    return Context(run_id=1, node_id=7, state=state if state is not None else RecordDict(),
                   run_config=dict(run_config), node_config=dict(node_config))
