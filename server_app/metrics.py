"""How the server combines the nodes' metric records into one global record per phase."""

from __future__ import annotations

import statistics
from collections.abc import Callable

from flwr.app import MetricRecord, RecordDict

from common.metric_keys import NUM_EXAMPLES, NUM_VAL, PARTITION_ID

ID_KEYS = (PARTITION_ID,)
SUMMED = (NUM_VAL, "skipped_files", "images_rendered", "images_skipped", "images_scored")  # counts: summed over nodes
MAXED = ("dp_epsilon", "dp_epsilon_run")  # privacy spent: the federation's figure is its most exposed site's


def _gather(records: list[RecordDict], weighted_by_key: str) -> tuple[dict[str, float], dict[str, list[tuple[float, float]]]]:
    """Counts summed over nodes (``weighted_by_key`` and :data:`SUMMED`), :data:`MAXED` as their maximum, and every other metric's
    ``(value, weight)`` per node that reported it: ``val_*`` weighted by ``num_val``, ``image_*`` by
    ``images_scored``, the rest by ``weighted_by_key``; ids and non-numbers left out."""
    counts: dict[str, float] = {}
    values: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        for key, value in metrics.items():
            if key in ID_KEYS or not isinstance(value, (int, float)):
                continue
            if key in (weighted_by_key, *SUMMED):
                counts[key] = counts.get(key, 0.0) + float(value)  # counts are summed, not averaged
                continue
            if key in MAXED:
                counts[key] = max(counts.get(key, 0.0), float(value))
                continue
            weight_key = (NUM_VAL if key.startswith("val_") and NUM_VAL in metrics
                          else "images_scored" if key.startswith("image_") and "images_scored" in metrics
                          else weighted_by_key)
            values.setdefault(key, []).append((float(value), float(metrics.get(weight_key, 0))))
    return counts, values


def _weighted_means(counts: dict[str, float], values: dict[str, list[tuple[float, float]]]) -> MetricRecord:
    """Counts as they are, every other metric's weighted mean; a metric no node had data for (weight 0)
    is left out rather than reported as 0."""
    out = dict(counts)
    for key, pairs in values.items():
        weight = sum(w for _, w in pairs)
        if weight:
            out[key] = sum(w * v for v, w in pairs) / weight
    return MetricRecord(out)


def aggregate_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Weighted average of each metric; ``val_*`` weighted by ``num_val``, ``image_*`` by ``images_scored``, ids left out.

    FedAvg's default weights every metric by ``num-examples`` (here: test clips) and would also
    average node ids into nonsense. Counts (``num-examples`` and :data:`SUMMED`) are summed. A node
    may lack a key another node has: the mean is over the nodes that reported it.
    """
    return _weighted_means(*_gather(records, weighted_by_key))


def median_metrics(records: list[RecordDict], weighted_by_key: str = NUM_EXAMPLES) -> MetricRecord:
    """The median over nodes of each metric (counts summed, ids left out): one node, whatever it reports,
    cannot move a median beyond the range of the others' values. A key is over the nodes that reported it."""
    counts, values = _gather(records, weighted_by_key)
    return MetricRecord({**counts, **{k: statistics.median(v for v, _ in pairs) for k, pairs in values.items()}})


def trimmed_metrics(records: list[RecordDict], weighted_by_key: str = NUM_EXAMPLES,
                    trim_fraction: float = 0.2) -> MetricRecord:
    """Per metric, the nodes' values sorted, ``int(trim_fraction * nodes)`` cut from each end, the rest
    averaged weighted by their clips (counts summed, ids left out). Why: a median over nodes that hold
    16 test clips each moves in steps of 1/16; cutting only the extremes keeps the weighted mean of the
    honest middle, which no single node can pull outside the others' range once one is cut per end."""
    counts, values = _gather(records, weighted_by_key)
    kept = {}
    for key, pairs in values.items():
        pairs = sorted(pairs)
        cut = int(trim_fraction * len(pairs))
        kept[key] = pairs[cut:len(pairs) - cut]
    return _weighted_means(counts, kept)


#: How the server turns the nodes' evaluation metrics into the global figure (``robust.evaluate``)
EVALUATE_AGGREGATES: dict[str, Callable[..., MetricRecord]] = {
    "weighted": aggregate_metrics,
    "median": median_metrics,
    "trimmed": trimmed_metrics,
}
