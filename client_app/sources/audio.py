"""Real audio: the node's own clips, embedded once by the frozen AST through the embedding cache."""

from __future__ import annotations

from client_app.node_data import NodeData, load_node_data
from client_app.sources.base import NodeSessionView, TrainingSet, TrainingSource, register

__all__ = ["AudioSource", "data_metrics"]


def data_metrics(data: NodeData) -> dict[str, float]:
    """What obtaining the node's embeddings cost in this message (0 when the process already held them)."""
    return {
        "extract_seconds": data.stats.extract_seconds,
        "load_seconds": data.stats.load_seconds,
        "cache_hits": data.stats.hits,
        "cache_misses": data.stats.misses,
        "skipped_files": data.skipped_files,
        "missing_files": data.missing_files,
    }


@register("off")
class AudioSource(TrainingSource):
    """``generator.mode = "off"``: train on the node's real clips."""

    def training_set(self, session: NodeSessionView) -> TrainingSet:
        data = load_node_data(self.cfg.data, self.site, memo=session.memo)
        split = data.splits["train"]
        return TrainingSet(data.class_names, split.embeddings, split.labels, data_metrics(data))
