"""The 'aggregate adapters' step: the configured :class:`Aggregator`, the global train metrics and
the count-weighted global class means of the round."""

from __future__ import annotations

from common.metric_keys import NUM_EXAMPLES
from server_app.aggregators.base import Aggregator
from server_app.metrics import aggregate_metrics
from server_app.round_state import RoundState


class AggregateStep:
    name = "aggregate adapters"

    def __init__(self, aggregator: Aggregator, weighted_by_key: str = NUM_EXAMPLES) -> None:
        self.aggregator = aggregator
        self.weighted_by_key = weighted_by_key

    def __call__(self, state: RoundState) -> None:
        replies = state.replies
        state.arrays = self.aggregator.aggregate(state)
        records = [r.record_dict() for r in replies.nodes.values()]
        state.metrics.update(aggregate_metrics(records, self.weighted_by_key) if records else {})
        if replies.means:
            state.global_means = self.aggregator.merge_means(self.aggregator.run.class_names, replies.means)
