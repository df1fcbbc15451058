"""Generator checkpoint files: names, metadata and the checks every load runs.

Checkpoints are safetensors + JSON metadata (:mod:`common.checkpoints`, written atomically): the file
without a round suffix is always the latest; every ``checkpoint_frequency`` rounds a copy with
``_round_{r}`` is written too. The server stores banks as ``{base}_server...``. Loading validates the
metadata against what the caller expects and names the file, the field, found vs expected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor, nn

from common.checkpoints import CheckpointError, load_tensors
from common.errors import FedA2VError
from common.models.generators import ConditionalGAN, ConditionalVAE, GeneratorSpec, build_generator
from common.names import safe_name

from .units import Unit

__all__ = ["CHECKPOINT_FORMAT", "SUFFIX", "UNIT_KIND", "GeneratorCheckpointError", "check", "checkpoint_class_counts",
           "checkpoint_name", "missing_message", "model_from", "owner", "owner_files", "read_metadata", "unit_metadata",
           "validate"]

CHECKPOINT_FORMAT = "feda2v-generator/1"
SUFFIX = ".safetensors"
UNIT_KIND = {"unified": "unified", "per_class": "class", "per_group": "group"}
_ROUND = re.compile(r"_round_\d+\.safetensors$")


class GeneratorCheckpointError(CheckpointError, FedA2VError):
    """A generator checkpoint is missing or does not match the configuration (a ``ValueError``)."""


def checkpoint_name(base: str, node_id: int | None, unit: Unit, round: int | None = None) -> str:
    """``{base}_node{id}[_class_{cls}|_group_{group}][_round_{r}].safetensors``; ``node_id=None``
    gives the server's ``{base}_server...``."""
    if not base or safe_name(base) != base:
        raise ValueError(f"generator checkpoint base name {base!r} must be non-empty and use only letters, digits, '_', '.', '-'")
    rnd = "" if round is None else f"_round_{int(round)}"
    return f"{base}_{owner(node_id)}{unit.file_part}{rnd}{SUFFIX}"


def owner(node_id: int | None) -> str:
    return "server" if node_id is None else f"node{int(node_id)}"


def unit_metadata(granularity: str, unit: Unit, model: nn.Module, class_counts: Mapping[str, int], encoder_key: str,
                  node_id: int | None, round: int | None) -> dict[str, Any]:
    """What a unit's file (or its entry in a bank's records) says about it."""
    return {
        "format": CHECKPOINT_FORMAT,
        "type": model.spec.kind,
        "granularity": granularity,
        "unit-kind": unit.kind,
        "unit-name": unit.name,
        "classes": list(unit.classes),
        "class-counts": {c: class_counts[c] for c in unit.classes if c in class_counts},
        "embedding-shape": list(model.spec.shape),
        "encoder-key": encoder_key,
        "generator-spec": model.spec.to_dict(),
        "round": round,
        "node-id": node_id,
    }


def owner_files(directory: Path, base: str, node_id: int | None, round: int | None) -> list[Path]:
    """The owner's files in ``directory``: latest files, or ``round``'s copies (never another owner's whose
    name merely starts alike, node1 vs node10)."""
    prefix = f"{base}_{owner(node_id)}"
    wanted = f"_round_{int(round)}{SUFFIX}" if round is not None else None
    return sorted(
        p for p in directory.glob(f"{prefix}*{SUFFIX}")
        if (p.name.endswith(wanted) if wanted else not _ROUND.search(p.name))
        and p.name[len(prefix):].startswith(("_class_", "_group_", SUFFIX, "_round_"))
    )


def read_metadata(path: Path) -> dict[str, Any]:
    _, meta = load_tensors(path)
    return meta


def check(path: Path | str, field: str, found: Any, expected: Any) -> None:
    if found != expected:
        raise GeneratorCheckpointError(f"generator checkpoint '{path}': {field} is {found!r}, expected {expected!r}")


def model_from(path: Path | str, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> ConditionalVAE | ConditionalGAN:
    try:
        spec = GeneratorSpec.from_dict(dict(meta["generator-spec"]))
    except (KeyError, TypeError, ValueError) as err:
        raise GeneratorCheckpointError(f"generator checkpoint '{path}': generator-spec is invalid: {err}") from None
    check(path, "type", meta.get("type"), spec.kind)
    model = build_generator(spec)
    try:
        model.load_state_dict(dict(tensors))
    except RuntimeError as err:
        raise GeneratorCheckpointError(f"generator checkpoint '{path}': weights do not match generator-spec: {err}") from None
    return model.eval()


def validate(
    path: Path | str,
    meta: Mapping[str, Any],
    granularity: str | None,
    shape: tuple[int, int] | None,
    encoder_key: str | None,
    kind: str | None,
) -> None:
    if meta.get("format") != CHECKPOINT_FORMAT:
        check(path, "format", meta.get("format"), CHECKPOINT_FORMAT)
    if granularity is not None:
        check(path, "granularity", meta.get("granularity"), granularity)
    if shape is not None:
        check(path, "embedding-shape", list(meta.get("embedding-shape") or []), list(shape))
    if encoder_key is not None:
        check(path, "encoder-key", meta.get("encoder-key"), encoder_key)
    if kind is not None:
        check(path, "type", meta.get("type"), kind)


def checkpoint_class_counts(directory: str | Path, base: str, node_id: int | None,
                            round: int | None = None) -> dict[str, int]:
    """Classes and training counts recorded in an owner's generator checkpoints (latest files, or ``round``'s
    copies), read from their metadata alone: what a node that holds no audio knows about its classes."""
    counts: dict[str, int] = {}
    for path in owner_files(Path(directory), base, node_id, round):
        meta = read_metadata(path)
        counts.update({str(k): int(v) for k, v in (meta.get("class-counts") or {}).items()})
        for c in meta.get("classes") or []:
            counts.setdefault(str(c), 0)
    return counts


def missing_message(
    directory: Path,
    base: str,
    node_id: int | None,
    granularity: str,
    missing: list[str],
    looked_for: Mapping[str, Path],
    paths: list[Path],
) -> str:
    tried = sorted({str(looked_for[c]) for c in missing if c in looked_for}) or [str(p) for p in paths]
    tried = tried or [f"{directory}/{base}_{owner(node_id)}_group_*{SUFFIX}"]
    names = ", ".join(repr(c) for c in missing)
    msg = f"missing generator for class(es) {names} (granularity {granularity!r}); looked for: {', '.join(tried)}"
    # A common cause: the files were written with another granularity. Say so, with the field.
    prefix = f"{base}_{owner(node_id)}"
    for other in sorted(directory.glob(f"{prefix}*{SUFFIX}")):
        rest = other.name[len(prefix):]
        if _ROUND.search(other.name) or not (rest == SUFFIX or rest.startswith(("_class_", "_group_"))):
            continue
        try:
            found = read_metadata(other).get("granularity")
        except CheckpointError:
            continue
        if found != granularity:
            msg += f"; generator checkpoint '{other}': granularity is {found!r}, expected {granularity!r}"
            break
    return msg


