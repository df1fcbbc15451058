"""What a node sends back: its train and evaluate replies.

Why here: how a site's releases travel sits in one place: weights in the server's codec (a difference from
the weights it sent), class means as half floats unless the codec is float32, the generator bank only when
the server keeps it, and the names of the server's records the node holds. Which class means and counts a
site may release at all is decided before (:mod:`client_app.local_training`, :mod:`client_app.privacy`).
"""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from client_app.held import HELD, held
from client_app.session import NodeSession
from common.metric_keys import NUM_EXAMPLES, PARTITION_ID
from common.metrics.resources import EXIT_UNIX
from common.records import ARRAYS, CLASS_MEANS, CLASS_MEANS_META, GENERATORS, GENERATORS_META, METRICS, ClassTensors
from common.wire import WIRE, encode, wire_config

__all__ = ["evaluate_reply", "train_reply"]


def train_reply(msg: Message, session: NodeSession, weights: ArrayRecord, sent: dict | None, means: ClassTensors,
                metrics: dict, send_bank: bool) -> Message:
    """Weights (encoded as the server asked), class means, metrics, held record names, and the node's
    generator bank when ``send_bank``."""
    metrics = {**metrics, PARTITION_ID: session.node.partition_id}
    content = RecordDict({ARRAYS: weights, METRICS: MetricRecord(metrics)})
    codec = session.message.codec
    if session.message.wire:  # the server's codec; a difference only from weights it sent (common.wire)
        content[ARRAYS] = encode(weights, codec, base=sent)
        content[WIRE] = wire_config(codec, delta=sent is not None)
    means.to_records(content, CLASS_MEANS, CLASS_MEANS_META, half=codec != "float32")
    content[HELD] = held(session.state)
    if send_bank:
        for name in (GENERATORS, GENERATORS_META):
            content[name] = session.state[name]
    content[METRICS][EXIT_UNIX] = time.time()
    return Message(content=content, reply_to=msg)


def evaluate_reply(msg: Message, session: NodeSession, metrics: dict) -> Message:
    """Metrics and held record names."""
    metrics = {NUM_EXAMPLES: 0, **metrics, PARTITION_ID: session.node.partition_id, EXIT_UNIX: time.time()}
    return Message(content=RecordDict({METRICS: MetricRecord(metrics), HELD: held(session.state)}), reply_to=msg)
