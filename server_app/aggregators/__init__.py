"""Aggregation methods, one module each, registered by their config name (``aggregation``)."""

from server_app.aggregators import central_dp, fedavg, kd, keep, none, robust  # noqa: F401  (each registers itself)
from server_app.aggregators.base import AGGREGATORS, Aggregator, register

__all__ = ["AGGREGATORS", "Aggregator", "register"]
