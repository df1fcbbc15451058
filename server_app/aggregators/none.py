"""No aggregation: standalone nodes, each keeps (and continues) its own adapters."""

from __future__ import annotations

from flwr.app import ArrayRecord

from server_app.aggregators.base import Aggregator, register
from server_app.round_state import RoundState


@register
class NoAggregation(Aggregator):
    name = "none"
    global_model = False

    def aggregate(self, state: RoundState) -> ArrayRecord | None:
        return None
