"""How the server combines the nodes' metric records into one global record per phase."""

from __future__ import annotations

import statistics
from collections.abc import Callable

from flwr.app import MetricRecord, RecordDict

ID_KEYS = ("partition_id",)
SUMMED = ("num_val", "skipped_files", "images_rendered", "images_skipped", "images_scored")  # counts: summed over nodes


def aggregate_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Weighted average of each metric; ``val_*`` weighted by ``num_val``, ``image_*`` by ``images_scored``, ids left out.

    FedAvg's default weights every metric by ``num-examples`` (here: test clips) and would also
    average node ids into nonsense. Counts (``num-examples`` and :data:`SUMMED`) are summed. A node
    may lack a key another node has: the mean is over the nodes that reported it.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        for key, value in metrics.items():
            if key in ID_KEYS or not isinstance(value, (int, float)):
                continue
            weight_key = ("num_val" if key.startswith("val_") and "num_val" in metrics
                          else "images_scored" if key.startswith("image_") and "images_scored" in metrics
                          else weighted_by_key)
            w = float(metrics.get(weight_key, 0))
            if key in (weighted_by_key, *SUMMED):
                sums[key] = sums.get(key, 0.0) + float(value)  # counts are summed, not averaged
                weights[key] = 1.0
                continue
            sums[key] = sums.get(key, 0.0) + w * float(value)
            weights[key] = weights.get(key, 0.0) + w
    # A metric no node had data for (weight 0) is left out rather than reported as 0.
    return MetricRecord({k: sums[k] / weights[k] for k in sums if weights[k]})


def median_metrics(records: list[RecordDict], weighted_by_key: str = "num-examples") -> MetricRecord:
    """The median over nodes of each metric (counts summed, ids left out): one node, whatever it reports,
    cannot move a median beyond the range of the others' values. A key is over the nodes that reported it."""
    values: dict[str, list[float]] = {}
    sums: dict[str, float] = {}
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        for key, value in metrics.items():
            if key in ID_KEYS or not isinstance(value, (int, float)):
                continue
            if key in (weighted_by_key, *SUMMED):
                sums[key] = sums.get(key, 0.0) + float(value)
            else:
                values.setdefault(key, []).append(float(value))
    return MetricRecord({**sums, **{k: statistics.median(v) for k, v in values.items()}})


#: How the server turns the nodes' evaluation metrics into the global figure (``robust.evaluate``)
EVALUATE_AGGREGATES: dict[str, Callable[[list[RecordDict], str], MetricRecord]] = {
    "weighted": aggregate_metrics,
    "median": median_metrics,
}
