"""Training sources of a node, one module per ``generator.mode`` (see :mod:`client_app.sources.base`)."""

from client_app.sources import audio, generator_training, pretrained  # noqa: F401  (each registers itself)
from client_app.sources.base import SOURCES, TrainingSet, TrainingSource, register, source_for

__all__ = ["SOURCES", "TrainingSet", "TrainingSource", "register", "source_for"]
