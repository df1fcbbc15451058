"""FedA2V strategy: Flower's FedAvg with the federation's class targets and a pipeline per round.

What it changes in FedAvg, and why:

* ``configure_train`` / ``configure_evaluate`` attach the class targets (computed once on the
  server) to every message, so sites never load FLUX's text encoders; with
  ``server-generator.send-to-nodes`` the train message also carries the server generator.
* ``aggregate_train`` parses the replies once (weights, metrics, class means, generator banks;
  the messages are left as they are) and runs the **round pipeline**: aggregate adapters -> server
  generator -> distillation -> fine-tuning (:mod:`server_app.pipeline`). It returns the new global
  adapters and the round's train metrics; it writes nothing.
* ``aggregate_evaluate`` aggregates the nodes' evaluation metrics onto the same round state.
* :meth:`after_round` is Flower's per-round ``evaluate_fn`` hook: it runs the **after-round
  pipeline** (checkpoint -> summary -> render), the round's side effects, once the nodes evaluated.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.records import METRICS, SERVER_GENERATOR, SERVER_GENERATOR_META, TARGETS, TARGETS_META, ClassTensors, bank_to_records
from server_app.metrics import aggregate_metrics
from server_app.pipeline import Pipeline
from server_app.round_state import RoundState, collect_train_replies, fail_if_all_failed, partition_id

log = logging.getLogger(__name__)


class FedA2VStrategy(FedAvg):
    def __init__(
        self,
        *,
        targets: ClassTensors,
        round_pipeline: Pipeline,
        after_round: Pipeline,
        send_server_generator: bool = False,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(evaluate_metrics_aggr_fn=aggregate_metrics, train_metrics_aggr_fn=aggregate_metrics, **fedavg_kwargs)
        self.targets = targets
        self.round_pipeline = round_pipeline
        self.after_round_pipeline = after_round
        self.send_server_generator = send_server_generator
        self.sent_arrays: ArrayRecord | None = None  # the global adapters of the round in progress
        self.state: RoundState | None = None  # the latest round (tensors of older rounds are not kept)

    # ------------------------------------------------------------------ configure
    def _attach_targets(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for message in messages:  # FedAvg shares one RecordDict between messages; setting twice is harmless
            self.targets.to_records(message.content, TARGETS, TARGETS_META)
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.sent_arrays = arrays
        messages = self._attach_targets(super().configure_train(server_round, arrays, config, grid))
        bank = self.state.server_bank if self.state is not None else None
        if self.send_server_generator and bank is not None:
            for message in messages:  # nodes fill thin classes with its samples (train.augment-to)
                bank_to_records(bank, message.content, "", None, server_round - 1, SERVER_GENERATOR, SERVER_GENERATOR_META)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self._attach_targets(super().configure_evaluate(server_round, arrays, config, grid))

    # ------------------------------------------------------------------ aggregate
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        state = RoundState(server_round, self.sent_arrays, collect_train_replies(server_round, replies))
        self.state = self.round_pipeline(state)
        return state.arrays, (MetricRecord(state.metrics) if state.replies.nodes else None)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        fail_if_all_failed(server_round, replies, "evaluate")
        nodes = {str(partition_id(m)): dict(m.content[METRICS]) for m in replies if not m.has_error() and METRICS in m.content}
        metrics = super().aggregate_evaluate(server_round, replies)
        global_metrics = dict(metrics) if metrics is not None else {}
        if self.state is not None and self.state.server_round == server_round:
            self.state.evaluate_metrics, self.state.evaluate_nodes = global_metrics, nodes
        if global_metrics:
            log.info(
                "[round %d] global test retrieval acc %.4f (clip %.4f, t5 %.4f) | test loss %.4f | %d nodes",
                server_round,
                global_metrics.get("test_retrieval_acc", float("nan")),
                global_metrics.get("test_retrieval_acc_clip", float("nan")),
                global_metrics.get("test_retrieval_acc_t5", float("nan")),
                global_metrics.get("test_loss", float("nan")),
                len(nodes),
            )
        return metrics

    # ------------------------------------------------------------------ side effects
    def after_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: checkpoint, summary and render of the round just finished."""
        if server_round == 0 or self.state is None or self.state.server_round != server_round:
            return None
        self.after_round_pipeline(self.state)
        return MetricRecord(self.state.render_metrics) if self.state.render_metrics else None
