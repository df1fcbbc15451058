"""A generator bank in Flower records: ``generators`` (ArrayRecord) + ``generators-meta`` (ConfigRecord).

Why its own pair: a bank travels in replies (node -> server), in the server's message (its generator)
and in a node's state between messages; ``bank_to_records`` / ``bank_from_records`` are the one way in
and out, with the same checks as loading a bank from files.
"""

from __future__ import annotations

import json
import time
from typing import Any, Mapping

from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import Tensor

from common.records import GENERATORS, GENERATORS_META, RecordError

from .bank import GeneratorBank
from .files import CHECKPOINT_FORMAT, GeneratorCheckpointError, model_from, unit_metadata, validate
from .units import Unit

__all__ = ["bank_from_records", "bank_to_records"]


def bank_to_records(
    bank: GeneratorBank, content: RecordDict, encoder_key: str, node_id: int | None, server_round: int,
    name: str = GENERATORS, meta_name: str = GENERATORS_META,
) -> None:
    """A generator bank -> ``name`` + ``meta_name`` records (weights and metadata only, no data)."""
    tensors, meta = _to_tensors(bank, encoder_key, node_id=node_id, round=server_round)
    content[name] = ArrayRecord({k: v.detach().cpu() for k, v in tensors.items()})
    content[meta_name] = ConfigRecord({"meta": json.dumps(meta)})


def bank_from_records(
    content: Mapping[str, Any], source: str, expected_shape: tuple[int, int] | None = None,
    name: str = GENERATORS, meta_name: str = GENERATORS_META, expected_granularity: str | None = None,
    expected_encoder_key: str | None = None,
) -> tuple[GeneratorBank, dict[str, Any]]:
    """The inverse of :func:`bank_to_records` (``content``: any mapping holding the two records) and the
    bank's metadata; ``source`` names the origin in errors, e.g. ``'reply of node 3'``."""
    if name not in content or meta_name not in content:
        raise RecordError(f"{source}: lacks the '{name}' / '{meta_name}' records")
    meta = json.loads(content[meta_name]["meta"])
    tensors = content[name].to_torch_state_dict()
    bank = _from_tensors(tensors, meta, expected_granularity, expected_shape, expected_encoder_key, source=source)
    return bank, meta


def _to_tensors(
    bank: GeneratorBank, encoder_key: str, node_id: int | None = None, round: int | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The bank as one flat tensor dict (``unit{i}.{param}``) and one JSON-able metadata dict
    (``units``: the per-file metadata of each unit, in order) for Flower records."""
    tensors: dict[str, Tensor] = {}
    units_meta = []
    for i, unit in enumerate(bank.units):
        for key, value in bank.models[unit.name].state_dict().items():
            tensors[f"unit{i}.{key}"] = value.detach().cpu()
        units_meta.append(unit_metadata(bank.granularity, unit, bank.models[unit.name], bank.class_counts, encoder_key,
                                        node_id, round))
    meta = {
        "format": CHECKPOINT_FORMAT,
        "granularity": bank.granularity,
        "type": bank.kind,
        "embedding-shape": list(bank.shape),
        "encoder-key": encoder_key,
        "node-id": node_id,
        "round": round,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "units": units_meta,
    }
    return tensors, meta


def _from_tensors(
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, Any],
    expected_granularity: str | None = None,
    expected_shape: tuple[int, int] | None = None,
    expected_encoder_key: str | None = None,
    source: str = "record",
) -> GeneratorBank:
    """Inverse of :func:`_to_tensors` with the same checks as ``GeneratorBank.from_pretrained`` (``source`` names the
    origin in errors, e.g. ``'reply of node 3'``)."""
    shape = tuple(expected_shape) if expected_shape is not None else None
    validate(source, metadata, expected_granularity, shape, expected_encoder_key, None)
    units, models = [], {}
    for i, umeta in enumerate(metadata.get("units") or []):
        where = f"{source} unit {i} ({umeta.get('unit-name')!r})"
        prefix = f"unit{i}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        validate(where, umeta, metadata.get("granularity"), shape, expected_encoder_key, None)
        unit = Unit(str(umeta["unit-name"]), umeta["unit-kind"], [str(c) for c in umeta.get("classes") or []])
        models[unit.name] = model_from(where, state, umeta)
        units.append(unit)
    if not units:
        raise GeneratorCheckpointError(f"generator {source}: holds no generator units")
    bank = GeneratorBank(str(metadata["granularity"]), units, models)
    bank.class_counts = {str(k): int(v) for u in metadata["units"] for k, v in (u.get("class-counts") or {}).items()}
    return bank
