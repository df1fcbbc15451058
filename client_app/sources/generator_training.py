"""Run 1 of the three-run workflow: the node trains its generator bank on its real embeddings each round."""

from __future__ import annotations

from client_app.generators import train_node_generators
from client_app.node_data import load_node_data
from client_app.sources.audio import data_metrics
from client_app.sources.base import NodeSessionView, TrainingSet, TrainingSource, register
from common.records import GENERATORS

__all__ = ["GeneratorOnlySource", "GeneratorTrainingSource"]


@register("generator-training")
class GeneratorTrainingSource(TrainingSource):
    """Real clips train the adapters and, continuing from the bank the node carries, its generators."""

    carries = (GENERATORS,)

    def training_set(self, session: NodeSessionView) -> TrainingSet:
        data = load_node_data(self.cfg.data, self.site, memo=session.memo)
        msg = session.message
        _, gen_metrics = train_node_generators(self.cfg.generator, self.site, data, session.state, msg.server_round,
                                               msg.run_name, msg.run_identity)
        split = data.splits["train"]
        return TrainingSet(data.class_names, split.embeddings, split.labels, {**data_metrics(data), **gen_metrics},
                           has_bank=True)


@register("generator-only")
class GeneratorOnlySource(GeneratorTrainingSource):
    """As generator training, with the adapters left untouched (their losses are still reported)."""

    trains = False
