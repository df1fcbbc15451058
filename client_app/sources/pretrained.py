"""Run 2 of the three-run workflow: adapters train on embeddings sampled from the node's pretrained generators."""

from __future__ import annotations

from client_app.pretrained import load_node_bank, pretrained_index, synthetic_train_set
from client_app.sources.base import NodeSessionView, TrainingSet, TrainingSource, register
from common.records import GENERATORS

__all__ = ["PretrainedSource"]


@register("use-pretrained-generators")
class PretrainedSource(TrainingSource):
    """No AST and no audio (unless ``real-mix-ratio > 0``): the bank lives in its checkpoints, so every
    message reads it from there again rather than carrying it in the node's state."""

    @property
    def cache_only(self) -> bool:
        return self.cfg.generator.real_mix_ratio == 0

    def training_set(self, session: NodeSessionView) -> TrainingSet:
        synth, _ = synthetic_train_set(self.cfg.data, self.cfg.generator, self.site, session.state,
                                       session.message.server_round, memo=session.memo)
        session.disk.on_disk.add(GENERATORS)  # in its checkpoints: the next message reads them again
        metrics = {"synthetic_samples": synth.synthetic, "real_samples": synth.real, "extract_seconds": 0.0,
                   "load_seconds": 0.0, "cache_hits": 0, "cache_misses": 0, "skipped_files": 0, "missing_files": 0}
        return TrainingSet(synth.class_names, synth.embeddings, synth.labels, metrics, has_bank=True)

    def before_render(self, session: NodeSessionView) -> None:
        if self.cfg.render.source == "generator":  # images drawn from the bank: load it from its checkpoints
            gcfg = self.cfg.generator
            load_node_bank(gcfg, self.site, pretrained_index(self.cfg.data, gcfg, self.site), session.state)
            session.disk.on_disk.add(GENERATORS)
