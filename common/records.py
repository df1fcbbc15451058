"""Conversion between tensors/metadata and Flower records: the wire format of a federation.

Record names used in messages (one place, so both sides agree):

* ``arrays``           ArrayRecord: adapter weights (the only ArrayRecord FedAvg aggregates)
* ``config``           ConfigRecord: round settings sent by the server: ``server-round``,
  ``run-name`` (the run directory's name; nodes resolve it under their own output-dir),
  ``run-identity`` (random, made when the run directory is made and kept by a resumed run: what a
  node's carried state is tagged with, so another run of the same name never restores it) and
  ``global-model`` (False: no global adapters, each node continues its own)
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
from pathlib import Path
from typing import Any, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from common.checkpoints import CheckpointError, load_tensors, save_tensors
from common.errors import FedA2VError

ARRAYS = "arrays"
CONFIG = "config"
GLOBAL_MODEL = "global-model"  # keys of the round config
RUN_NAME = "run-name"
RUN_IDENTITY = "run-identity"
METRICS = "metrics"
TARGETS = "targets"
TARGETS_META = "targets-meta"
CLASS_MEANS = "class-means"
CLASS_MEANS_META = "class-means-meta"
GENERATORS = "generators"  # ArrayRecord: a node's generator bank (all units' weights)
GENERATORS_META = "generators-meta"  # ConfigRecord {"meta": JSON}: granularity, units, spec, encoder key
SERVER_GENERATOR = "server-generator"  # server -> nodes (server-generator.send-to-nodes): same format
SERVER_GENERATOR_META = "server-generator-meta"
HELD_MISSING = "held-missing"  # ConfigRecord of a reply {"records": names}: this node lacks records the server
# sent by reference (its state was lost); the server sends that message again in full (server_app.holdings)


class RecordError(FedA2VError, ValueError):
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
    """Per-class tensors with their class names: the class text targets, or class means (+ counts).

    One artifact, one save/load pair per medium, both carrying the class names: ``save`` / ``load``
    (a safetensors file whose metadata says ``type`` = ``class-targets`` or ``class-means``) and
    ``to_records`` / ``from_records`` (an ArrayRecord plus a ConfigRecord in a Flower message).
    """

    class_names: list[str]
    clip: torch.Tensor
    t5: torch.Tensor
    counts: torch.Tensor | None = None

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"clip": self.clip.detach().cpu().float(), "t5": self.t5.detach().cpu().float()}
        if self.counts is not None:
            tensors["counts"] = self.counts.detach().cpu().to(torch.int64)
        return tensors

    @classmethod
    def _from_tensors(cls, state: Mapping[str, torch.Tensor], names: list[str], source: str,
                      error: type[Exception] = RecordError) -> "ClassTensors":
        for key in ("clip", "t5"):
            if key not in state:
                raise error(f"{source} lacks array '{key}'")
            if state[key].shape[0] != len(names):
                raise error(f"{source}: '{key}' has {state[key].shape[0]} rows for {len(names)} class names")
        counts = state.get("counts")
        if counts is not None and counts.shape[0] != len(names):
            raise error(f"{source}: 'counts' has {counts.shape[0]} rows for {len(names)} class names")
        return cls(list(names), state["clip"].float(), state["t5"].float(), counts)

    # -- Flower records
    def to_records(self, content: RecordDict, name: str, meta_name: str, half: bool = False) -> None:
        """``half``: clip and t5 travel as float16 (read back as float32), e.g. under a compact wire codec."""
        tensors = self._tensors()
        if half:
            tensors.update({k: tensors[k].to(torch.float16) for k in ("clip", "t5")})
        content[name] = ArrayRecord(tensors)
        content[meta_name] = ConfigRecord({"class-names": list(self.class_names)})

    @classmethod
    def from_records(cls, content: RecordDict, name: str, meta_name: str) -> "ClassTensors":
        if name not in content or meta_name not in content:
            raise RecordError(f"message lacks the '{name}' / '{meta_name}' records")
        state = content[name].to_torch_state_dict()  # type: ignore[union-attr]
        names = list(content[meta_name]["class-names"])  # type: ignore[index]
        return cls._from_tensors(state, names, f"record '{name}'")

    # -- files
    def save(self, path: str | Path, kind: str, extra: Mapping[str, Any] | None = None) -> Path:
        """``kind``: ``class-targets`` or ``class-means``; ``extra`` joins the metadata (e.g. the round)."""
        return save_tensors(Path(path), self._tensors(), {"type": kind, "class-names": list(self.class_names), **(extra or {})})

    @classmethod
    def load(cls, path: str | Path, kind: str) -> tuple["ClassTensors", dict[str, Any]]:
        """The inverse of :meth:`save`; a file of another type is an error naming the file."""
        tensors, meta = load_tensors(Path(path))
        if meta.get("type") != kind:
            raise CheckpointError(f"'{path}' is not a {kind} file (type {meta.get('type')!r})")
        names = meta.get("class-names")
        if not isinstance(names, list):
            raise CheckpointError(f"'{path}': metadata lacks 'class-names'")
        return cls._from_tensors(tensors, names, f"'{path}'", CheckpointError), meta


CLASS_TARGETS = "class-targets"  # ClassTensors.save kinds
CLASS_MEANS_FILE = "class-means"
