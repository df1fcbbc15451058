"""One server round's data: the parsed node replies and what each step adds to them.

The strategy turns Flower's reply messages into :class:`NodeReplies` once (without modifying the
messages), then every step of the round reads and extends one :class:`RoundState`: the aggregated
weights, the global class means, the server's training histories, this round's evaluation. Nothing
here does I/O; steps do, each with one job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from common.generator_bank import GeneratorBank, bank_from_records
from common.metric_keys import PARTITION_ID
from common.records import (
    ARRAYS,
    CLASS_MEANS,
    CLASS_MEANS_META,
    GENERATORS,
    METRICS,
    ClassTensors,
    RecordError,
)
from common.wire import WireError
from server_app.teachers import OwnerTeachers
from server_app.validation import Rejected

log = logging.getLogger(__name__)


@dataclass
class NodeReply:
    """What one node sent back from training, parsed and checked."""

    partition_id: int
    node_id: int  # Flower's id of the SuperNode that sent it
    arrays: ArrayRecord | None
    metrics: dict[str, Any]
    means: ClassTensors | None = None
    bank: GeneratorBank | None = None
    encoder_key: str = ""

    def record_dict(self) -> RecordDict:
        """The node's weights and metrics alone: what a weighted average of replies reads."""
        content = RecordDict({METRICS: MetricRecord(self.metrics)})
        if self.arrays is not None:
            content[ARRAYS] = self.arrays
        return content


@dataclass
class NodeReplies:
    """Every node that answered a round, keyed by partition id (failures kept as text)."""

    nodes: dict[int, NodeReply] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # error replies: Flower node id, error code, reason
    rejected: list[str] = field(default_factory=list)  # replies that failed validation, with the reason

    @property
    def arrays(self) -> dict[int, ArrayRecord]:
        return {p: r.arrays for p, r in self.nodes.items() if r.arrays is not None}

    @property
    def means(self) -> dict[int, ClassTensors]:
        return {p: r.means for p, r in self.nodes.items() if r.means is not None}

    @property
    def banks(self) -> dict[int, GeneratorBank]:
        return {p: r.bank for p, r in self.nodes.items() if r.bank is not None}

    @property
    def metrics(self) -> dict[str, dict[str, Any]]:
        return {str(p): dict(r.metrics) for p, r in self.nodes.items()}

    @property
    def encoder_key(self) -> str:
        keys = [r.encoder_key for r in self.nodes.values() if r.encoder_key]
        return keys[-1] if keys else ""

    def owner_counts(self) -> dict[int, dict[str, int]]:
        """Real training clips per class each node reported (its class-mean counts)."""
        return {
            pid: {c: int(n) for c, n in zip(m.class_names, m.counts.tolist())} if m.counts is not None else {}
            for pid, m in self.means.items()
        }


def partition_id(msg: Message) -> int:
    """The node's partition id from its metrics (its Flower node id when it did not say)."""
    metrics = msg.content[METRICS] if METRICS in msg.content else {}
    try:
        return int(metrics.get(PARTITION_ID, msg.metadata.src_node_id))  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return int(msg.metadata.src_node_id)


def fail_if_all_failed(server_round: int, replies: list[Message], phase: str) -> None:
    """Stop the run when every node failed: continuing would only repeat the error N rounds."""
    if replies and all(m.has_error() for m in replies):
        reason = replies[0].error.reason.strip().splitlines()
        raise RuntimeError(
            f"round {server_round}: all {len(replies)} nodes failed in {phase}; first error: "
            + (reason[-1] if reason else "unknown")
        )


def describe_error(msg: Message, sent_to: dict[str, int] | None = None) -> str:
    """An error reply in one line: which node, Flower's error code, the last line of its reason.

    The SuperLink itself answers for a node that stopped heartbeating, so the reply's source is the
    SuperLink: ``sent_to`` (message id -> destination node of what the server sent) names the node.
    """
    lines = msg.error.reason.strip().splitlines()
    node = (sent_to or {}).get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
    return f"node {node}: error code {msg.error.code}: {lines[-1] if lines else 'no reason given'}"


def collect_train_replies(server_round: int, replies: Iterable[Message], validator=None,
                          connected: set[int] | None = None, sent_to: dict[str, int] | None = None,
                          decode_arrays: Callable[[RecordDict], ArrayRecord | None] | None = None) -> NodeReplies:
    """Parse and check every train reply (weights, metrics, class means, generator bank).

    The messages stay as they are. With a ``validator`` (:class:`server_app.validation.ReplyValidator`)
    every reply is parsed totally (:func:`parse_train_reply`): a reply that fails a check is dropped with
    a warning naming the node and the reason, and listed in ``rejected``; so is one whose parsing raised
    anything else (logged with its traceback: a parser fault to fix, never a reason to stop the run).
    ``decode_arrays`` turns a reply's weights as they travelled into float32 weights (:mod:`common.wire`;
    default: as they are).
    """
    replies = list(replies)
    fail_if_all_failed(server_round, replies, "train")
    out = NodeReplies()
    for msg in replies:
        if msg.has_error():
            out.failures.append(describe_error(msg, sent_to))
            log.warning("round %d: %s", server_round, out.failures[-1])
            continue
        node_id = int(msg.metadata.src_node_id)
        try:
            reply = parse_train_reply(msg, validator, set(out.nodes), connected, decode_arrays)
        except Exception as err:  # noqa: BLE001 - one node's reply never stops the run (see the docstring)
            reason = str(err) if isinstance(err, Rejected) else f"unparseable reply ({type(err).__name__}: {err})"
            if not isinstance(err, Rejected):
                log.error("round %d: parsing the reply of node %d raised", server_round, node_id, exc_info=True)
            who = f"node {node_id} (partition {claimed_partition(msg)})"
            out.rejected.append(f"{who}: {reason}")
            log.warning("round %d: reply of %s rejected: %s", server_round, who, reason)
            continue
        if validator is not None:
            validator.remember(node_id, reply.partition_id)
        out.nodes[reply.partition_id] = reply
    log.info("round %d: %d valid train replies, %d failures, %d rejected", server_round, len(out.nodes),
             len(out.failures), len(out.rejected))
    return out


def claimed_partition(msg: Message) -> str:
    """The partition id a reply claims, for messages about it ('?' when it claims none that reads)."""
    try:
        value = msg.content[METRICS][PARTITION_ID]  # type: ignore[index]
        return str(int(value)) if isinstance(value, (int, float)) and abs(value) < 2**63 else "?"
    except Exception:  # noqa: BLE001 - only a label for the log
        return "?"


def parse_train_reply(msg: Message, validator=None, seen: set[int] | None = None, connected: set[int] | None = None,
                      decode_arrays: Callable[[RecordDict], ArrayRecord | None] | None = None) -> NodeReply:
    """One train reply as a :class:`NodeReply`, or :class:`Rejected` with the reason (size first, then
    metrics and identity, then weights, class means and generator bank)."""
    content = msg.content
    node_id = int(msg.metadata.src_node_id)
    if validator is None:
        metrics = dict(content[METRICS]) if METRICS in content else {}
        reply = NodeReply(partition_id(msg), node_id, None, metrics)
    else:
        validator.check_size(content)
        metrics = validator.metrics_of(msg)
        reply = NodeReply(validator.check_partition(node_id, metrics, seen or set(), connected), node_id, None, metrics)
    try:
        reply.arrays = decode_arrays(content) if decode_arrays is not None else content.get(ARRAYS)  # type: ignore[assignment]
    except (WireError, RecordError, ValueError, TypeError) as err:
        raise Rejected(f"weights unusable: {err}") from None
    if validator is None:
        reason = _parse_extras(reply, content)
        if reason:
            raise Rejected(reason)
        return reply
    reason = validator.check_train(reply)
    if reason:
        raise Rejected(reason)
    reply.means = validator.parse_means(content, metrics)
    reply.bank, meta = validator.parse_bank(content, f"reply of node {reply.partition_id}")
    reply.encoder_key = str(meta.get("encoder-key", ""))[:200]
    return reply


def _parse_extras(reply: NodeReply, content: RecordDict) -> str | None:
    """Class means and generator bank of a reply without a validator (tests); the reason it is unusable."""
    if CLASS_MEANS in content:
        try:
            reply.means = ClassTensors.from_records(content, CLASS_MEANS, CLASS_MEANS_META)
        except (RecordError, KeyError, TypeError) as err:
            return f"class means unusable: {err}"
    if GENERATORS in content:
        try:
            reply.bank, meta = bank_from_records(content, source=f"reply of node {reply.partition_id}")
            reply.encoder_key = str(meta.get("encoder-key", ""))
        except (RecordError, ValueError, KeyError, TypeError) as err:
            return f"generator bank unusable: {err}"
    return None


def merge_class_means(class_names: list[str], node_means: dict[int, ClassTensors]) -> ClassTensors:
    """Count-weighted mean per class over the nodes that own it (classes nobody reported are left out)."""
    first = next(iter(node_means.values()))
    clip = torch.zeros(len(class_names), *first.clip.shape[1:])
    t5 = torch.zeros(len(class_names), *first.t5.shape[1:])
    counts = torch.zeros(len(class_names), dtype=torch.int64)
    index = {n: i for i, n in enumerate(class_names)}
    for pid, means in node_means.items():
        for row, name in enumerate(means.class_names):
            if name not in index:
                log.warning("node %s reported class '%s' that is not in the federation; ignored", pid, name)
                continue
            c = int(means.counts[row]) if means.counts is not None else 0
            i = index[name]
            clip[i] += means.clip[row] * c
            t5[i] += means.t5[row] * c
            counts[i] += c
    denom = counts.clamp(min=1).float()
    idx = (counts > 0).nonzero().flatten().tolist()
    return ClassTensors(
        [class_names[i] for i in idx], (clip / denom[:, None])[idx], (t5 / denom[:, None, None])[idx], counts[idx]
    )


@dataclass
class RoundState:
    """One round as it moves through the server's steps."""

    server_round: int
    sent: ArrayRecord | None  # the global adapters sent out this round
    replies: NodeReplies
    arrays: ArrayRecord | None = None  # the round's new global adapters (None: nodes keep their own)
    metrics: dict[str, float] = field(default_factory=dict)  # global train metrics (+ server training)
    global_means: ClassTensors | None = None
    histories: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # server training, per step
    server_bank: GeneratorBank | None = None
    evaluate_metrics: dict[str, float] = field(default_factory=dict)
    evaluate_nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    evaluate_median: dict[str, float] = field(default_factory=dict)  # the median over nodes of each metric
    evaluate_failures: list[str] = field(default_factory=list)  # error and rejected evaluate replies
    render_metrics: dict[str, float] = field(default_factory=dict)
    _teachers: OwnerTeachers | None = None

    def teachers(self, run) -> OwnerTeachers:
        """This round's node adapters as owner-only teachers (built once per round, on first use)."""
        if self._teachers is None:
            node_adapters = {p: run.adapters(a) for p, a in self.replies.arrays.items()}
            self._teachers = OwnerTeachers.build(run.class_names, node_adapters, self.replies.means)
        return self._teachers
