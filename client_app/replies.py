"""What a node sends back: the class means it may share, and its train and evaluate replies.

Why here: the rules of what leaves a site sit in one place: per-class means only for classes above the
privacy floor (the larger of the run's and the site's own, :class:`client_app.policy.SitePolicy`),
weights in the server's codec (a difference from the weights it sent), the generator bank only when the
server keeps it, and the names of the server's records the node holds.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from client_app.held import HELD, held
from client_app.session import NodeSession
from common.metric_keys import NUM_EXAMPLES, PARTITION_ID
from common.metrics.resources import EXIT_UNIX
from common.records import ARRAYS, CLASS_MEANS, CLASS_MEANS_META, GENERATORS, GENERATORS_META, METRICS, ClassTensors
from common.wire import WIRE, encode, wire_config

__all__ = ["evaluate_reply", "shared_means", "train_reply"]


def shared_means(session: NodeSession, class_names: list[str], clip: torch.Tensor, t5: torch.Tensor,
                 counts: torch.Tensor) -> tuple[ClassTensors, dict[str, int]]:
    """The class means this node may share, and how much it withheld (``withheld_classes``, ``withheld_clips``)."""
    shared = set(session.site.policy.shareable_classes(dict(zip(class_names, counts.tolist()))))
    present = [i for i, c in enumerate(class_names) if c in shared]
    withheld = [i for i, n in enumerate(counts.tolist()) if n > 0 and class_names[i] not in shared]
    means = ClassTensors([class_names[i] for i in present], clip[present], t5[present], counts[present])
    return means, {"withheld_classes": len(withheld),  # privacy.min-class-count: too few clips to share a mean
                   "withheld_clips": int(counts[withheld].sum()) if withheld else 0}


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
