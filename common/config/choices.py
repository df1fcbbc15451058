"""Every closed set of choices of the configuration, declared once as a ``Literal``.

Why: the config validates these values and the code that acts on them checks them again (a
checkpoint's metadata, a call from a bench); both read the same declaration, and the tuples the
code checks against are derived from it with ``typing.get_args``, so a new choice is one edit.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "AGGREGATIONS", "CALIBRATIONS", "DATASETS", "GENERATOR_KINDS", "GENERATOR_MODES", "GRANULARITIES", "ORACLES",
    "STORAGE_DTYPES", "AggregationName", "Calibration", "DatasetName", "GeneratorKind", "GeneratorMode", "Granularity",
    "Oracle", "Precision", "StorageDtype",
]

# Forward passes of a training step: fp32, bf16 autocast (fp32 weights), or bf16 where the device has bf16 units
Precision = Literal["fp32", "bf16", "auto"]
DatasetName = Literal["synthetic", "esc50", "vegas", "vggsound"]
AggregationName = Literal["fedavg", "median", "trimmed-mean", "none", "kd", "dp-fedavg"]
GeneratorMode = Literal["off", "generator-training", "generator-only", "use-pretrained-generators"]
GeneratorKind = Literal["vae", "gan"]
Granularity = Literal["unified", "per_class", "per_group"]
Oracle = Literal["none", "clip", "t5", "both"]
Calibration = Literal["none", "target-radius", "target-span", "target-soft"]
StorageDtype = Literal["float16", "bfloat16", "float32"]

DATASETS: tuple[str, ...] = get_args(DatasetName)
AGGREGATIONS: tuple[str, ...] = get_args(AggregationName)
GENERATOR_MODES: tuple[str, ...] = get_args(GeneratorMode)
GENERATOR_KINDS: tuple[str, ...] = get_args(GeneratorKind)
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
ORACLES: tuple[str, ...] = get_args(Oracle)
CALIBRATIONS: tuple[str, ...] = get_args(Calibration)
STORAGE_DTYPES: tuple[str, ...] = get_args(StorageDtype)
