"""FedAvg: the sample-weighted mean of the node adapters (Flower's own array aggregation)."""

from __future__ import annotations

from flwr.app import ArrayRecord
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.metric_keys import NUM_EXAMPLES
from server_app.aggregators.base import Aggregator, register
from server_app.round_state import RoundState


def fedavg(state: RoundState, weighted_by_key: str = NUM_EXAMPLES) -> ArrayRecord | None:
    """Weighted by each reply's ``num-examples``, in reply order (Flower's ``aggregate_arrayrecords``)."""
    records = [r.record_dict() for r in state.replies.nodes.values() if r.arrays is not None]
    return aggregate_arrayrecords(records, weighted_by_key) if records else None


@register
class FedAvgAggregator(Aggregator):
    name = "fedavg"

    def aggregate(self, state: RoundState) -> ArrayRecord | None:
        return fedavg(state)
