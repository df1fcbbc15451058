"""Conversion between tensors/metadata and Flower records: the wire format of a federation.

Record names used in messages (one place, so both sides agree):

* ``arrays``           ArrayRecord: adapter weights (the only ArrayRecord FedAvg aggregates)
* ``config``           ConfigRecord: round settings sent by the server
* ``metrics``          MetricRecord: numbers, incl. ``num-examples``
* ``targets``          ArrayRecord ``clip [C, 768]`` and ``t5 [C, n, 4096]`` + ``targets-meta``
  ConfigRecord ``class-names``: the federation's class targets, computed once on the server so
  sites never need FLUX's text encoders (T5-XXL alone is ~9 GB)
* ``generators``       ArrayRecord of a node's generator bank + ``generators-meta`` ConfigRecord
  ``meta`` (JSON: granularity, units and their classes, spec, embedding shape, encoder key)
* ``server-generator`` the server generator, same format (+ ``server-generator-meta``), sent to
  the nodes only with ``server-generator.send-to-nodes``
* ``class-means``      ArrayRecord ``clip``, ``t5``, ``counts`` for the node's classes only +
  ``class-means-meta`` ConfigRecord ``class-names``: per-class **means**, never per-clip outputs

Everything a node sends is either weights, per-class means with counts, or scalar metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
TARGETS = "targets"
TARGETS_META = "targets-meta"
CLASS_MEANS = "class-means"
CLASS_MEANS_META = "class-means-meta"
GENERATORS = "generators"  # ArrayRecord: a node's generator bank (all units' weights)
GENERATORS_META = "generators-meta"  # ConfigRecord {"meta": JSON}: granularity, units, spec, encoder key
SERVER_GENERATOR = "server-generator"  # server -> nodes (server-generator.send-to-nodes): same format
SERVER_GENERATOR_META = "server-generator-meta"


class RecordError(ValueError):
    """A message is missing a record or carries one with the wrong content."""


def module_to_arrays(module: torch.nn.Module) -> ArrayRecord:
    """Adapter weights -> ArrayRecord (CPU copies; no autograd state crosses the wire)."""
    return ArrayRecord({k: v.detach().cpu() for k, v in module.state_dict().items()})


def arrays_to_module(arrays: ArrayRecord, module: torch.nn.Module) -> torch.nn.Module:
    """Load weights strictly: a shape or key mismatch is an error naming the key."""
    state = arrays.to_torch_state_dict()
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise RecordError(f"adapter weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise RecordError(f"adapter weight '{key}': shape {tuple(value.shape)} != expected {tuple(expected[key].shape)}")
    module.load_state_dict(state)
    return module


@dataclass
class ClassTensors:
    """Per-class tensors with their class names: targets, or a node's class means (+ counts)."""

    class_names: list[str]
    clip: torch.Tensor
    t5: torch.Tensor
    counts: torch.Tensor | None = None

    def to_records(self, content: RecordDict, name: str, meta_name: str) -> None:
        arrays = {"clip": self.clip.detach().cpu().float(), "t5": self.t5.detach().cpu().float()}
        if self.counts is not None:
            arrays["counts"] = self.counts.detach().cpu().to(torch.int64)
        content[name] = ArrayRecord(arrays)
        content[meta_name] = ConfigRecord({"class-names": list(self.class_names)})

    @classmethod
    def from_records(cls, content: RecordDict, name: str, meta_name: str) -> "ClassTensors":
        if name not in content or meta_name not in content:
            raise RecordError(f"message lacks the '{name}' / '{meta_name}' records")
        state = content[name].to_torch_state_dict()  # type: ignore[union-attr]
        names = list(content[meta_name]["class-names"])  # type: ignore[index]
        for key in ("clip", "t5"):
            if key not in state:
                raise RecordError(f"record '{name}' lacks array '{key}'")
            if state[key].shape[0] != len(names):
                raise RecordError(f"record '{name}': '{key}' has {state[key].shape[0]} rows for {len(names)} class names")
        return cls(names, state["clip"], state["t5"], state.get("counts"))


def weighted_mean(arrays: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Sample-weighted average (FedAvg's rule), exposed for tests and server-side reuse."""
    if not arrays:
        raise ValueError("nothing to average")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    out = np.zeros_like(arrays[0], dtype=np.float64)
    for arr, w in zip(arrays, weights):
        out += arr.astype(np.float64) * (w / total)
    return out.astype(arrays[0].dtype)


def bank_to_records(
    bank, content: RecordDict, encoder_key: str, node_id: int | None, server_round: int,
    name: str = GENERATORS, meta_name: str = GENERATORS_META,
) -> None:
    """A generator bank -> ``generators`` + ``generators-meta`` records (weights only, no data)."""
    import json

    from common.generator_bank import bank_to_tensors

    tensors, meta = bank_to_tensors(bank, encoder_key, node_id=node_id, round=server_round)
    content[name] = ArrayRecord({k: v.detach().cpu() for k, v in tensors.items()})
    content[meta_name] = ConfigRecord({"meta": json.dumps(meta)})


def bank_from_records(
    content, source: str, expected_shape: tuple[int, int] | None = None,
    name: str = GENERATORS, meta_name: str = GENERATORS_META,
):
    """The inverse of :func:`bank_to_records`; ``content`` is any mapping holding the two records."""
    import json

    from common.generator_bank import bank_from_tensors

    if name not in content or meta_name not in content:
        raise RecordError(f"{source}: lacks the '{name}' / '{meta_name}' records")
    meta = json.loads(content[meta_name]["meta"])
    tensors = content[name].to_torch_state_dict()
    return bank_from_tensors(tensors, meta, expected_shape=expected_shape, source=source), meta
