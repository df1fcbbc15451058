"""Keep: the global adapters the round sent pass through unchanged (``generate-only`` runs, where nobody trains)."""

from __future__ import annotations

from flwr.app import ArrayRecord

from server_app.aggregators.base import Aggregator, register
from server_app.round_state import RoundState


@register
class KeepGlobal(Aggregator):
    name = "keep"

    def aggregate(self, state: RoundState) -> ArrayRecord | None:
        return state.sent
