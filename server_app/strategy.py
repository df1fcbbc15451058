"""FedA2V strategy: Flower's FedAvg with the federation's class targets and a pipeline per round.

What it changes in FedAvg, and why:

* ``configure_train`` / ``configure_evaluate`` attach the class targets (computed once on the
  server) to every message, so sites never load FLUX's text encoders; with
  ``server-generator.send-to-nodes`` the train message also carries the server generator.
* ``aggregate_train`` parses the replies once (weights, metrics, class means, generator banks;
  the messages are left as they are) and runs the **round pipeline**: aggregate adapters -> server
  generator -> distillation -> fine-tuning (:mod:`server_app.pipeline`). It returns the new global
  adapters and the round's train metrics; it writes nothing.
* ``aggregate_evaluate`` aggregates the nodes' evaluation metrics onto the same round state
  (tolerant of nodes that report different metric keys: each key is averaged over the nodes that
  sent it, nothing is lost and nothing raises).
* Faults: before sampling nodes it waits at most ``connect-timeout`` for ``min-nodes`` (Flower would
  wait forever); every reply is validated (:mod:`server_app.validation`) and every phase needs its
  quorum (:mod:`server_app.quorum`); the round deadline is ``start(timeout=round-timeout)``.
* Resume: ``round_offset`` shifts Flower's round counter (which always starts at 1) to the run's own,
  so a resumed run's round 3 is round 3 for the nodes, the seeds, the checkpoints and the summary.
* :meth:`after_round` is Flower's per-round ``evaluate_fn`` hook: it runs the **after-round
  pipeline** (checkpoint -> summary -> render), the round's side effects, once the nodes evaluated.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.config import FedA2VConfig
from common.generator_bank import bank_to_records
from common.metric_keys import TEST_ACC, TEST_ACC_CLIP, TEST_ACC_T5
from common.records import (
    ARRAYS,
    METRICS,
    SERVER_GENERATOR,
    SERVER_GENERATOR_META,
    TARGETS,
    TARGETS_META,
    ClassTensors,
)
from common.wire import HELD, WIRE, WireError, content_bytes, decode, encode, is_delta, received, wire_config
from server_app.holdings import NodeHoldings
from server_app.metrics import EVALUATE_AGGREGATES, median_metrics
from server_app.pipeline import Pipeline
from server_app.quorum import check_quorum, wait_for_nodes
from server_app.round_state import (
    RoundState,
    claimed_partition,
    collect_train_replies,
    describe_error,
    fail_if_all_failed,
    partition_id,
)
from server_app.server_generator import ServerGeneratorStep
from server_app.validation import Rejected, ReplyValidator

_DEFAULT = FedA2VConfig()  # the keyword defaults below are the config's, declared there once

log = logging.getLogger(__name__)


def _mean_bytes(messages: list[Message]) -> float:
    """Bytes of a phase's message per node (each node's own: some records may go by reference)."""
    return sum(content_bytes(m.content) for m in messages) / len(messages) if messages else 0.0


class FedA2VStrategy(FedAvg):
    def __init__(
        self,
        *,
        targets: ClassTensors,
        round_pipeline: Pipeline,
        after_round: Pipeline,
        send_generator: ServerGeneratorStep | None = None,
        validator: ReplyValidator | None = None,
        min_replies: float = _DEFAULT.min_replies,
        connect_timeout: float = _DEFAULT.connect_timeout,
        round_offset: int = 0,
        wire_codec: str = _DEFAULT.wire_codec,
        evaluate_metrics: str = _DEFAULT.robust.evaluate,
        trim_fraction: float = _DEFAULT.robust.trim_fraction,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        aggregate = EVALUATE_AGGREGATES[evaluate_metrics]  # robust.evaluate
        self.evaluate_aggregate = (functools.partial(aggregate, trim_fraction=trim_fraction)
                                   if evaluate_metrics == "trimmed" else aggregate)
        self.targets = targets
        self.round_pipeline = round_pipeline
        self.after_round_pipeline = after_round
        self.send_generator = send_generator  # with server-generator.send-to-nodes: its latest bank goes out
        self.validator = validator
        self.min_replies = min_replies
        self.connect_timeout = connect_timeout
        self.round_offset = round_offset
        self.wire_codec = wire_codec
        self.sent_base: dict[str, Any] | None = None  # what the nodes decode from this round's train message
        self.wire_bytes: dict[str, float] = {}  # per node: train down, train up (mean), evaluate down
        self.holdings = NodeHoldings()  # what each node keeps of targets and weights (sent by reference)
        self.asked: dict[str, int] = {}  # phase -> nodes asked in the round in progress
        self.connected: set[int] | None = None  # Flower node ids online when the round was configured
        self.sent: dict[str, list[Message]] = {}  # phase -> the messages sent (Flower gives them ids on sending)
        self.sent_arrays: ArrayRecord | None = None  # the global adapters of the round in progress
        self.state: RoundState | None = None  # the latest round (tensors of older rounds are not kept)

    # ------------------------------------------------------------------ configure
    def _attach_targets(self, messages: Iterable[Message]) -> list[Message]:
        """The class targets onto every message, and the weights in the wire codec (:mod:`common.wire`)."""
        messages = list(messages)
        for content in {id(m.content): m.content for m in messages}.values():  # FedAvg shares one RecordDict
            # full precision: the targets go once per node and run (server_app.holdings), and they key the
            # nodes' caches (e.g. the trained render preset) exactly as on the server
            self.targets.to_records(content, TARGETS, TARGETS_META)
            if ARRAYS in content:
                content[ARRAYS] = encode(content[ARRAYS], self.wire_codec)  # type: ignore[arg-type]
                content[WIRE] = wire_config(self.wire_codec, delta=False)
        return messages

    def _decode_reply(self, content: RecordDict) -> ArrayRecord | None:
        """A train reply's weights as float32 (a difference is added back to what this round sent)."""
        if ARRAYS not in content:
            return None
        if is_delta(content) and self.sent_base is None:
            raise WireError("the reply is a difference from weights this server did not send this round")
        limits = (self.validator.shapes, self.validator.limits.max_abs) if self.validator is not None else (None, None)
        return ArrayRecord(decode(content[ARRAYS], self.sent_base if is_delta(content) else None,  # type: ignore[arg-type]
                                  expected=limits[0], max_abs=limits[1]))

    def _sent_to(self, phase: str) -> dict[str, int]:
        return {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent.get(phase, []) if m.metadata.message_id}

    def _wait_for_nodes(self, grid: Grid) -> None:
        self.connected = set(wait_for_nodes(grid, self.min_available_nodes, self.connect_timeout))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self.sent_arrays = arrays
        self.sent_base = received(arrays, self.wire_codec)
        self._wait_for_nodes(grid)
        messages = self._attach_targets(super().configure_train(server_round, arrays, config, grid))
        self.asked["train"] = len(messages)
        self.sent["train"] = messages
        bank = self.send_generator.bank if self.send_generator is not None else None
        if bank is not None:
            for content in {id(m.content): m.content for m in messages}.values():  # nodes fill thin classes (augment-to)
                bank_to_records(bank, content, "", None, server_round - 1, SERVER_GENERATOR, SERVER_GENERATOR_META)
        self.holdings.personalise(messages)
        self.wire_bytes = {"wire_bytes_train_down": _mean_bytes(messages)}
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        if self.fraction_evaluate > 0:
            self._wait_for_nodes(grid)
        messages = self.holdings.personalise(self._attach_targets(super().configure_evaluate(server_round, arrays,
                                                                                            config, grid)))
        self.asked["evaluate"] = len(messages)
        self.sent["evaluate"] = messages
        if messages and self.state is not None and self.state.server_round == server_round:
            # bytes per node and round (summary.json, bench/scale.py): what goes down twice and up once
            down = _mean_bytes(messages)
            self.state.metrics.update({**self.wire_bytes, "wire_bytes_evaluate_down": down})
            self.state.metrics["wire_bytes_per_node"] = sum(self.state.metrics.get(k, 0.0) for k in (
                "wire_bytes_train_down", "wire_bytes_train_up", "wire_bytes_evaluate_down"))
        return messages

    # ------------------------------------------------------------------ aggregate
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = list(replies)
        self._update_holdings(replies)
        ok = [m for m in replies if not m.has_error()]
        if ok:
            self.wire_bytes["wire_bytes_train_up"] = sum(content_bytes(m.content) for m in ok) / len(ok)
        parsed = collect_train_replies(server_round, replies, self.validator, self.connected, self._sent_to("train"),
                                       decode_arrays=self._decode_reply)
        check_quorum(server_round, "train", list(parsed.nodes), self.asked.get("train", len(parsed.nodes)),
                     self.min_replies, parsed.failures, parsed.rejected)
        state = RoundState(server_round, self.sent_arrays, parsed)
        self.state = self.round_pipeline(state)
        return state.arrays, MetricRecord(state.metrics)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        replies = list(replies)
        self._update_holdings(replies)
        fail_if_all_failed(server_round, replies, "evaluate")
        nodes, failures, rejected = self._parse_evaluate_replies(server_round, replies)
        if self.asked.get("evaluate"):
            check_quorum(server_round, "evaluate", [int(p) for p in nodes], self.asked["evaluate"], self.min_replies,
                         failures, rejected)
        records = [RecordDict({METRICS: MetricRecord(m)}) for m in nodes.values()]
        global_metrics = dict(self.evaluate_aggregate(records, self.weighted_by_key)) if records else {}
        if self.state is not None and self.state.server_round == server_round:
            self.state.evaluate_metrics, self.state.evaluate_nodes = global_metrics, nodes
            self.state.evaluate_median = dict(median_metrics(records)) if records else {}
            self.state.evaluate_failures = failures + rejected
        if global_metrics:
            log.info(
                "[round %d] global test retrieval acc %.4f (clip %.4f, t5 %.4f) | test loss %.4f | %d nodes",
                server_round,
                global_metrics.get(TEST_ACC, float("nan")),
                global_metrics.get(TEST_ACC_CLIP, float("nan")),
                global_metrics.get(TEST_ACC_T5, float("nan")),
                global_metrics.get("test_loss", float("nan")),
                len(nodes),
            )
        return MetricRecord(global_metrics) if records else None

    def _update_holdings(self, replies: list[Message]) -> None:
        """What each node now holds (:mod:`server_app.holdings`), one reply at a time: a reply whose ``held``
        record is unreadable is treated as holding nothing (it gets the records in full), never a crash."""
        for msg in replies:
            try:
                self.holdings.update([msg])
            except Exception as err:  # noqa: BLE001 - a node's bookkeeping record is as hostile as the rest
                log.warning("node %s: unreadable '%s' record (%s); it gets held records in full",
                            msg.metadata.src_node_id, HELD, type(err).__name__)
                self.holdings.by_node.pop(int(msg.metadata.src_node_id), None)

    def _parse_evaluate_replies(self, server_round: int, replies: list[Message]
                                ) -> tuple[dict[str, dict[str, Any]], list[str], list[str]]:
        """Each node's evaluation metrics by partition id, with the same size, metric and identity checks as
        a train reply (:mod:`server_app.validation`); error replies and rejected ones listed apart."""
        nodes: dict[str, dict[str, Any]] = {}
        failures, rejected = [], []
        for msg in replies:
            if msg.has_error():
                failures.append(describe_error(msg, self._sent_to("evaluate")))
                continue
            node_id = int(msg.metadata.src_node_id)
            try:
                if self.validator is None:
                    metrics = dict(msg.content[METRICS]) if METRICS in msg.content else {}
                    pid = partition_id(msg)
                    reason = (ReplyValidator.check_metrics(metrics, min_examples=0)
                              or ("partition id replied twice" if str(pid) in nodes else None))
                    if reason:
                        raise Rejected(reason)
                else:
                    self.validator.check_size(msg.content)
                    metrics = self.validator.metrics_of(msg, min_examples=0)
                    pid = self.validator.check_partition(node_id, metrics, {int(p) for p in nodes}, self.connected)
                    self.validator.remember(node_id, pid)
            except Exception as err:  # noqa: BLE001 - one node's reply never stops the run
                if not isinstance(err, Rejected):
                    log.error("round %d: parsing the evaluate reply of node %d raised", server_round, node_id,
                              exc_info=True)
                rejected.append(f"node {node_id} (partition {claimed_partition(msg)}): "
                                f"{err if isinstance(err, Rejected) else repr(err)}")
                log.warning("round %d: evaluate reply rejected: %s", server_round, rejected[-1])
                continue
            nodes[str(pid)] = metrics
        return nodes, failures, rejected

    # ------------------------------------------------------------------ side effects
    def after_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: checkpoint, summary and render of the round just finished."""
        server_round += self.round_offset
        if server_round == self.round_offset or self.state is None or self.state.server_round != server_round:
            return None
        self.after_round_pipeline(self.state)
        return MetricRecord(self.state.render_metrics) if self.state.render_metrics else None
