"""A node's (or the server's) set of embedding generators: granularity, training, sampling, checkpoints.

:mod:`.units` plans which models cover which classes, :mod:`.bank` is the bank itself (with its one
file pair, ``save_pretrained`` / ``from_pretrained``), :mod:`.files` the checkpoint format and its
checks, :mod:`.records` the bank in Flower records.
"""

from __future__ import annotations

from common.config.choices import GRANULARITIES

from .bank import GeneratorBank
from .files import GeneratorCheckpointError, checkpoint_class_counts, checkpoint_name
from .records import bank_from_records, bank_to_records
from .units import OTHER_GROUP, Unit, plan_units

__all__ = [
    "GRANULARITIES",
    "OTHER_GROUP",
    "GeneratorBank",
    "GeneratorCheckpointError",
    "Unit",
    "bank_from_records",
    "bank_to_records",
    "checkpoint_class_counts",
    "checkpoint_name",
    "plan_units",
]
