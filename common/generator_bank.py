"""A node's (or the server's) set of embedding generators: granularity, training, sampling, checkpoints.

Granularity decides how many models cover the classes:

* ``unified``   - one class-conditional model for all classes (file ``{base}_node{id}``);
* ``per_class`` - one model per class (``{base}_node{id}_class_{cls}``);
* ``per_group`` - one conditional model per semantic group of ``generator.class-groups``; a class in
  no group goes to the group ``other`` (``{base}_node{id}_group_{group}``).

Checkpoints (safetensors + JSON metadata via :mod:`common.checkpoints`, written atomically): the file
without a round suffix is always the latest; every ``checkpoint_frequency`` rounds a copy with
``_round_{r}`` is written too. The server stores banks as ``{base}_server...``. Loading validates the
metadata against what the caller expects and names the file, the field, found vs expected.

``bank_to_tensors`` / ``bank_from_tensors`` give the same content as one flat tensor dict plus one
JSON-able metadata dict, so a bank can travel in a Flower ``ArrayRecord`` + ``ConfigRecord``.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import torch
from torch import Tensor

from common.checkpoints import CheckpointError, load_tensors, save_tensors
from common.config.choices import GRANULARITIES
from common.errors import FedA2VError
from common.models.generators import (
    ConditionalGAN,
    ConditionalVAE,
    GeneratorSpec,
    GeneratorTrainSettings,
    build_generator,
    train_generator,
)
from common.names import safe_name
from common.seeds import class_stream

__all__ = [
    "GRANULARITIES",
    "OTHER_GROUP",
    "GeneratorBank",
    "GeneratorCheckpointError",
    "Unit",
    "bank_from_tensors",
    "bank_to_tensors",
    "checkpoint_name",
    "load_bank",
    "plan_units",
    "save_bank",
]

log = logging.getLogger(__name__)

OTHER_GROUP = "other"
CHECKPOINT_FORMAT = "feda2v-generator/1"
SUFFIX = ".safetensors"
_UNIT_KIND = {"unified": "unified", "per_class": "class", "per_group": "group"}
_ROUND = re.compile(r"_round_\d+\.safetensors$")


class GeneratorCheckpointError(CheckpointError, FedA2VError):
    """A generator checkpoint is missing or does not match the configuration (a ``ValueError``)."""


# ----------------------------------------------------------------------------------- units
@dataclass
class Unit:
    """One model's share of the classes: ``kind`` 'unified' | 'class' | 'group', ``name`` the class or
    group name ('unified' for the unified model). ``classes`` order = the model's local indices."""

    name: str
    kind: Literal["unified", "class", "group"]
    classes: list[str] = field(default_factory=list)

    @property
    def file_part(self) -> str:
        """The unit's part of a checkpoint file name ('' for unified)."""
        if self.kind == "unified":
            return ""
        return f"_{self.kind}_{safe_name(self.name)}"


def plan_units(
    granularity: str,
    class_names: list[str],
    class_groups: Mapping[str, list[str]] | None = None,
    known_classes: Iterable[str] | None = None,
) -> list[Unit]:
    """Which models cover ``class_names`` (the classes this bank trains generators for).

    ``class_groups`` (per_group only) may name classes of the whole federation (``known_classes``,
    default ``class_names``): a group holding none of ``class_names`` gets no model, a class of
    ``class_names`` in no group goes to ``other``. Errors name the offending group or class: a
    class unknown to the federation, a class in two groups, duplicate class names, file-name clashes.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown generator granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")
    class_names = list(class_names)
    if not class_names:
        raise ValueError("no classes to train generators for")
    dupes = sorted({c for c in class_names if class_names.count(c) > 1})
    if dupes:
        raise ValueError(f"duplicate class name(s): {', '.join(dupes)}")
    if class_groups and granularity != "per_group":
        log.debug("generator.class-groups ignored for granularity %s", granularity)
    if granularity == "unified":
        units = [Unit("unified", "unified", class_names)]
    elif granularity == "per_class":
        units = [Unit(c, "class", [c]) for c in class_names]
    else:
        units = _plan_groups(class_names, dict(class_groups or {}), set(known_classes or class_names) | set(class_names))
    clash: dict[str, str] = {}
    for unit in units:
        other = clash.setdefault(unit.file_part, unit.name)
        if other != unit.name:
            raise ValueError(f"{unit.kind} names {other!r} and {unit.name!r} map to the same file name part {unit.file_part!r}")
    return units


def _plan_groups(class_names: list[str], groups: dict[str, list[str]], known: set[str]) -> list[Unit]:
    owner: dict[str, str] = {}
    for group, members in groups.items():
        if not str(group).strip():
            raise ValueError("generator.class-groups: empty group name")
        if isinstance(members, str):
            raise ValueError(f"generator.class-groups.{group}: expected a list of class names, got a string")
        for cls in members:
            if cls not in known:
                raise ValueError(f"generator.class-groups.{group}: unknown class {cls!r} (not a federation class)")
            if cls in owner and owner[cls] != group:
                raise ValueError(f"generator.class-groups: class {cls!r} is in two groups, {owner[cls]!r} and {group!r}")
            owner[cls] = group
    order = list(groups) + ([OTHER_GROUP] if OTHER_GROUP not in groups else [])
    members_of: dict[str, list[str]] = {g: [] for g in order}
    for cls in class_names:  # federation order inside each group
        members_of[owner.get(cls, OTHER_GROUP)].append(cls)
    return [Unit(g, "group", members_of[g]) for g in order if members_of[g]]


# ----------------------------------------------------------------------------------- bank
class GeneratorBank:
    """One generator per unit; sampling by class name picks the unit that owns the class."""

    def __init__(self, granularity: str, units: list[Unit], models: Mapping[str, ConditionalVAE | ConditionalGAN]) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown generator granularity {granularity!r}")
        names = [u.name for u in units]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate generator unit names: {names}")
        owners: dict[str, str] = {}
        for unit in units:
            for c in unit.classes:
                if owners.setdefault(c, unit.name) != unit.name:
                    raise ValueError(f"class {c!r} is covered by two generator units, {owners[c]!r} and {unit.name!r}")
        missing = [u.name for u in units if u.name not in models]
        if missing:
            raise ValueError(f"no model for unit(s): {', '.join(missing)}")
        self.granularity = granularity
        self.units = list(units)
        self.models = {u.name: models[u.name] for u in units}
        self._unit_of = {c: u for u in units for c in u.classes}
        specs = [m.spec for m in self.models.values()]
        if len({s.shape for s in specs}) > 1:
            raise ValueError(f"generators of one bank must share the embedding shape, got {sorted({s.shape for s in specs})}")
        for unit in units:
            if self.models[unit.name].spec.num_classes != len(unit.classes):
                found = self.models[unit.name].spec.num_classes
                raise ValueError(f"unit {unit.name!r}: its model has {found} classes, the unit {len(unit.classes)}")
        self.class_counts: dict[str, int] = {}

    @classmethod
    def create(
        cls,
        spec: GeneratorSpec,
        granularity: str,
        class_names: list[str],
        class_groups: Mapping[str, list[str]] | None = None,
        known_classes: Iterable[str] | None = None,
        seed: int = 0,
    ) -> "GeneratorBank":
        """Fresh models for the planned units (``spec.num_classes`` is set per unit)."""
        units = plan_units(granularity, class_names, class_groups, known_classes)
        models = {u.name: build_generator(replace(spec, num_classes=len(u.classes)), seed=seed + i) for i, u in enumerate(units)}
        return cls(granularity, units, models)

    # -- views
    @property
    def classes(self) -> list[str]:
        """Every class some model of the bank generates (unit order)."""
        return [c for u in self.units for c in u.classes]

    @property
    def kind(self) -> str:
        kinds = {m.spec.kind for m in self.models.values()}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def shape(self) -> tuple[int, int]:
        return next(iter(self.models.values())).spec.shape

    def unit_for(self, class_name: str) -> Unit:
        try:
            return self._unit_of[class_name]
        except KeyError:
            raise KeyError(f"no generator for class {class_name!r}; the bank covers: {', '.join(self.classes)}") from None

    def to(self, device: torch.device | str) -> "GeneratorBank":
        for model in self.models.values():
            model.to(device)
        return self

    # -- training
    def train(
        self,
        embeddings: Tensor,
        labels: Tensor,
        class_names: list[str],
        settings: GeneratorTrainSettings,
        device: torch.device | str = "cpu",
    ) -> dict[str, dict[str, list[float]]]:
        """Train every unit on its classes' embeddings; ``labels`` index ``class_names`` (federation
        order). Returns each unit's per-epoch losses. A class of the bank without training
        embeddings is an error (its generator would be untrained noise)."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        if len(embeddings) != len(labels):
            raise ValueError(f"{len(embeddings)} embeddings but {len(labels)} labels")
        index = {c: i for i, c in enumerate(class_names)}
        unknown = [c for c in self.classes if c not in index]
        if unknown:
            raise ValueError(f"bank classes not in class_names: {', '.join(unknown)}")
        counts = torch.bincount(labels, minlength=len(class_names)) if len(labels) else torch.zeros(len(class_names), dtype=torch.long)
        empty = [c for c in self.classes if int(counts[index[c]]) == 0]
        if empty:
            raise ValueError(f"no training embeddings for generator class(es): {', '.join(empty)}")
        histories: dict[str, dict[str, list[float]]] = {}
        for i, unit in enumerate(self.units):
            fed_ids = torch.tensor([index[c] for c in unit.classes])
            local = torch.full((len(class_names),), -1, dtype=torch.long)
            local[fed_ids] = torch.arange(len(unit.classes))
            mask = local[labels] >= 0
            unit_settings = replace(settings, seed=settings.seed + i)
            histories[unit.name] = train_generator(self.models[unit.name], embeddings[mask], local[labels[mask]], unit_settings, device)
        self.class_counts = {c: int(counts[index[c]]) for c in self.classes}
        return histories

    # -- sampling
    def sample(self, class_name: str, n: int, seed: int) -> Tensor:
        """``n`` embeddings ``[n, L, H]`` of ``class_name`` (float32, CPU), reproducible from ``seed``."""
        unit = self.unit_for(class_name)
        labels = torch.full((n,), unit.classes.index(class_name), dtype=torch.long)
        return self.models[unit.name].sample(labels, torch.Generator().manual_seed(seed))

    def sample_dataset(self, counts: Mapping[str, int], class_names: list[str], seed: int) -> tuple[Tensor, Tensor]:
        """Synthetic ``(embeddings [N, L, H], labels [N])`` with ``counts[c]`` clips of each class;
        labels index ``class_names``; class ``c`` uses seed ``class_stream(seed, class_names.index(c))``
        (:mod:`common.seeds`) so adding a class does not change the others' samples."""
        xs, ys = [], []
        for cls, n in counts.items():
            if n <= 0:
                continue
            j = class_names.index(cls)
            xs.append(self.sample(cls, n, class_stream(seed, j)))
            ys.append(torch.full((n,), j, dtype=torch.long))
        if not xs:
            return torch.empty(0, *self.shape), torch.empty(0, dtype=torch.long)
        return torch.cat(xs), torch.cat(ys)


    # -- quality
    def evaluate(
        self,
        heldout: Tensor,
        heldout_labels: Tensor,
        class_names: list[str],
        reference: Tensor | None = None,
        reference_labels: Tensor | None = None,
        k: int = 5,
        seed: int = 0,
    ) -> dict[str, dict[str, float]]:
        """Quality of the bank's samples per class and pooled (key ``"all"``), see
        :func:`common.metrics.embedding_quality`. Labels index ``class_names``. Each class gets as
        many samples as it has reference (e.g. training) embeddings, else held-out ones, so FD
        values compare like with like; classes without held-out embeddings are skipped."""
        from common.metrics import embedding_quality

        heldout_labels = torch.as_tensor(heldout_labels, dtype=torch.long)
        ref_labels = torch.as_tensor(reference_labels, dtype=torch.long) if reference_labels is not None else None
        out: dict[str, dict[str, float]] = {}
        fakes, fake_labels, counts = [], [], {}
        for cls in self.classes:
            j = class_names.index(cls)
            real = heldout[heldout_labels == j]
            ref = reference[ref_labels == j] if reference is not None and ref_labels is not None else None
            n = len(ref) if ref is not None and len(ref) else len(real)
            if len(real) == 0 or n == 0:
                continue
            counts[cls] = n
            fake = self.sample(cls, n, class_stream(seed, j))
            fakes.append(fake)
            fake_labels.append(torch.full((n,), j))
            out[cls] = embedding_quality(real, fake, ref if ref is not None and len(ref) else None, k=k, seed=seed)
        if fakes:
            covered = torch.tensor([class_names.index(c) for c in counts])
            mask = torch.isin(heldout_labels, covered)
            ref_all = reference[torch.isin(ref_labels, covered)] if reference is not None and ref_labels is not None else None
            out["all"] = embedding_quality(heldout[mask], torch.cat(fakes), ref_all, k=k, seed=seed)
        return out


# ----------------------------------------------------------------------------------- names
def checkpoint_name(base: str, node_id: int | None, unit: Unit, round: int | None = None) -> str:
    """``{base}_node{id}[_class_{cls}|_group_{group}][_round_{r}].safetensors``; ``node_id=None``
    gives the server's ``{base}_server...``."""
    if not base or safe_name(base) != base:
        raise ValueError(f"generator checkpoint base name {base!r} must be non-empty and use only letters, digits, '_', '.', '-'")
    rnd = "" if round is None else f"_round_{int(round)}"
    return f"{base}_{_owner(node_id)}{unit.file_part}{rnd}{SUFFIX}"


def _owner(node_id: int | None) -> str:
    return "server" if node_id is None else f"node{int(node_id)}"


def _unit_metadata(bank: GeneratorBank, unit: Unit, encoder_key: str, node_id: int | None, round: int | None) -> dict[str, Any]:
    model = bank.models[unit.name]
    return {
        "format": CHECKPOINT_FORMAT,
        "type": model.spec.kind,
        "granularity": bank.granularity,
        "unit-kind": unit.kind,
        "unit-name": unit.name,
        "classes": list(unit.classes),
        "class-counts": {c: bank.class_counts[c] for c in unit.classes if c in bank.class_counts},
        "embedding-shape": list(model.spec.shape),
        "encoder-key": encoder_key,
        "generator-spec": model.spec.to_dict(),
        "round": round,
        "node-id": node_id,
    }


# ----------------------------------------------------------------------------------- save / load
def save_bank(
    bank: GeneratorBank,
    directory: str | Path,
    base: str,
    node_id: int | None,
    round: int | None,
    checkpoint_frequency: int,
    encoder_key: str,
    extra: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write every unit's latest file and, when ``round`` is a multiple of ``checkpoint_frequency``
    (> 0), its ``_round_{round}`` copy. Returns the paths written (latest files first)."""
    directory = Path(directory)
    with_round = round is not None and checkpoint_frequency > 0 and round % checkpoint_frequency == 0
    latest, copies = [], []
    for unit in bank.units:
        meta = _unit_metadata(bank, unit, encoder_key, node_id, round)
        meta.update(extra or {})
        state = bank.models[unit.name].state_dict()
        latest.append(save_tensors(directory / checkpoint_name(base, node_id, unit), state, meta))
        if with_round:
            copies.append(save_tensors(directory / checkpoint_name(base, node_id, unit, round), state, meta))
    return latest + copies


def _read_metadata(path: Path) -> dict[str, Any]:
    _, meta = load_tensors(path)
    return meta


def _check(path: Path | str, field: str, found: Any, expected: Any) -> None:
    if found != expected:
        raise GeneratorCheckpointError(f"generator checkpoint '{path}': {field} is {found!r}, expected {expected!r}")


def _model_from(path: Path | str, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> ConditionalVAE | ConditionalGAN:
    try:
        spec = GeneratorSpec.from_dict(dict(meta["generator-spec"]))
    except (KeyError, TypeError, ValueError) as err:
        raise GeneratorCheckpointError(f"generator checkpoint '{path}': generator-spec is invalid: {err}") from None
    _check(path, "type", meta.get("type"), spec.kind)
    model = build_generator(spec)
    try:
        model.load_state_dict(dict(tensors))
    except RuntimeError as err:
        raise GeneratorCheckpointError(f"generator checkpoint '{path}': weights do not match generator-spec: {err}") from None
    return model.eval()


def _validate(
    path: Path | str,
    meta: Mapping[str, Any],
    granularity: str | None,
    shape: tuple[int, int] | None,
    encoder_key: str | None,
    kind: str | None,
) -> None:
    if meta.get("format") != CHECKPOINT_FORMAT:
        _check(path, "format", meta.get("format"), CHECKPOINT_FORMAT)
    if granularity is not None:
        _check(path, "granularity", meta.get("granularity"), granularity)
    if shape is not None:
        _check(path, "embedding-shape", list(meta.get("embedding-shape") or []), list(shape))
    if encoder_key is not None:
        _check(path, "encoder-key", meta.get("encoder-key"), encoder_key)
    if kind is not None:
        _check(path, "type", meta.get("type"), kind)


def checkpoint_class_counts(directory: str | Path, base: str, node_id: int | None,
                            round: int | None = None) -> dict[str, int]:
    """Classes and training counts recorded in an owner's generator checkpoints (latest files, or ``round``'s
    copies), read from their metadata alone: what a node that holds no audio knows about its classes."""
    directory = Path(directory)
    prefix = f"{base}_{_owner(node_id)}"
    wanted = f"_round_{int(round)}{SUFFIX}" if round is not None else None
    counts: dict[str, int] = {}
    for path in sorted(directory.glob(f"{prefix}*{SUFFIX}")):
        rest = path.name[len(prefix):]
        if not (rest.startswith(("_class_", "_group_", SUFFIX, "_round_"))):
            continue  # another owner whose name merely starts alike (node1 vs node10)
        if (not path.name.endswith(wanted)) if wanted else _ROUND.search(path.name):
            continue
        meta = _read_metadata(path)
        counts.update({str(k): int(v) for k, v in (meta.get("class-counts") or {}).items()})
        for c in meta.get("classes") or []:
            counts.setdefault(str(c), 0)
    return counts


def load_bank(
    directory: str | Path,
    base: str,
    node_id: int | None,
    expected_granularity: str,
    expected_classes: list[str],
    expected_shape: tuple[int, int] | None,
    expected_encoder_key: str | None,
    class_groups: Mapping[str, list[str]] | None = None,
    expected_kind: str | None = None,
    round: int | None = None,
) -> GeneratorBank:
    """Load the generators covering ``expected_classes`` (latest files, or ``round``'s copies).

    Which files: unified -> one file; per_class -> one per class; per_group -> the planned groups'
    files when ``class_groups`` is given, else every ``..._group_*`` file of this base and node.
    Every file's metadata is checked (granularity, embedding shape, encoder key, type, unit name);
    a ``None`` expectation skips that check. Errors (``GeneratorCheckpointError``) name the file,
    the field, found vs expected; a class no file covers names the class and the files looked for.
    """
    directory = Path(directory)
    if expected_granularity not in GRANULARITIES:
        raise ValueError(f"unknown generator granularity {expected_granularity!r}")
    expected_classes = list(expected_classes)
    shape = tuple(expected_shape) if expected_shape is not None else None
    if expected_granularity == "per_group" and not class_groups:
        checkpoint_name(base, node_id, Unit("unified", "unified"))  # validates the base name
        wanted = f"_round_{int(round)}{SUFFIX}" if round is not None else None
        paths = sorted(
            p
            for p in directory.glob(f"{base}_{_owner(node_id)}_group_*{SUFFIX}")
            if (p.name.endswith(wanted) if wanted else not _ROUND.search(p.name))
        )
        planned = None
    else:
        grouped = [c for members in (class_groups or {}).values() for c in members]
        planned = plan_units(expected_granularity, expected_classes, class_groups, known_classes=expected_classes + grouped)
        paths = [directory / checkpoint_name(base, node_id, u, round) for u in planned]

    units: list[Unit] = []
    models: dict[str, ConditionalVAE | ConditionalGAN] = {}
    counts: dict[str, int] = {}
    looked_for: dict[str, Path] = {}
    kinds: set[str] = set()
    for i, path in enumerate(paths):
        if planned is not None:
            for c in planned[i].classes:
                looked_for[c] = path
        if not path.is_file():
            continue
        tensors, meta = load_tensors(path)
        _validate(path, meta, expected_granularity, shape, expected_encoder_key, expected_kind)
        unit_kind = _UNIT_KIND[expected_granularity]
        _check(path, "unit-kind", meta.get("unit-kind"), unit_kind)
        if planned is not None:
            _check(path, "unit-name", meta.get("unit-name"), planned[i].name)
        if node_id is not None:
            _check(path, "node-id", meta.get("node-id"), node_id)
        unit = Unit(str(meta["unit-name"]), unit_kind, [str(c) for c in meta.get("classes") or []])
        model = _model_from(path, tensors, meta)
        _check(path, "generator-spec.num_classes", model.spec.num_classes, len(unit.classes))
        kinds.add(model.spec.kind)
        if len(kinds) > 1:
            others = sorted(kinds - {model.spec.kind})
            raise GeneratorCheckpointError(f"generator checkpoint '{path}': type is {model.spec.kind!r}, other files of this bank are {others}")
        units.append(unit)
        models[unit.name] = model
        counts.update({str(k): int(v) for k, v in (meta.get("class-counts") or {}).items()})
        for c in unit.classes:
            looked_for.setdefault(c, path)

    covered = {c for u in units for c in u.classes}
    missing = [c for c in expected_classes if c not in covered]
    if missing:
        raise GeneratorCheckpointError(_missing_message(directory, base, node_id, expected_granularity, missing, looked_for, paths))
    bank = GeneratorBank(expected_granularity, units, models)
    bank.class_counts = counts
    return bank


def _missing_message(
    directory: Path,
    base: str,
    node_id: int | None,
    granularity: str,
    missing: list[str],
    looked_for: Mapping[str, Path],
    paths: list[Path],
) -> str:
    tried = sorted({str(looked_for[c]) for c in missing if c in looked_for}) or [str(p) for p in paths]
    tried = tried or [f"{directory}/{base}_{_owner(node_id)}_group_*{SUFFIX}"]
    names = ", ".join(repr(c) for c in missing)
    msg = f"missing generator for class(es) {names} (granularity {granularity!r}); looked for: {', '.join(tried)}"
    # A common cause: the files were written with another granularity. Say so, with the field.
    prefix = f"{base}_{_owner(node_id)}"
    for other in sorted(directory.glob(f"{prefix}*{SUFFIX}")):
        rest = other.name[len(prefix):]
        if _ROUND.search(other.name) or not (rest == SUFFIX or rest.startswith(("_class_", "_group_"))):
            continue
        try:
            found = _read_metadata(other).get("granularity")
        except CheckpointError:
            continue
        if found != granularity:
            msg += f"; generator checkpoint '{other}': granularity is {found!r}, expected {granularity!r}"
            break
    return msg


# ----------------------------------------------------------------------------------- records
def bank_to_tensors(
    bank: GeneratorBank, encoder_key: str, node_id: int | None = None, round: int | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The bank as one flat tensor dict (``unit{i}.{param}``) and one JSON-able metadata dict
    (``units``: the per-file metadata of each unit, in order) for Flower records."""
    tensors: dict[str, Tensor] = {}
    units_meta = []
    for i, unit in enumerate(bank.units):
        for key, value in bank.models[unit.name].state_dict().items():
            tensors[f"unit{i}.{key}"] = value.detach().cpu()
        units_meta.append(_unit_metadata(bank, unit, encoder_key, node_id, round))
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


def bank_from_tensors(
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, Any],
    expected_granularity: str | None = None,
    expected_shape: tuple[int, int] | None = None,
    expected_encoder_key: str | None = None,
    source: str = "record",
) -> GeneratorBank:
    """Inverse of ``bank_to_tensors`` with the same checks as ``load_bank`` (``source`` names the
    origin in errors, e.g. ``'reply of node 3'``)."""
    shape = tuple(expected_shape) if expected_shape is not None else None
    _validate(source, metadata, expected_granularity, shape, expected_encoder_key, None)
    units, models = [], {}
    for i, umeta in enumerate(metadata.get("units") or []):
        where = f"{source} unit {i} ({umeta.get('unit-name')!r})"
        prefix = f"unit{i}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        _validate(where, umeta, metadata.get("granularity"), shape, expected_encoder_key, None)
        unit = Unit(str(umeta["unit-name"]), umeta["unit-kind"], [str(c) for c in umeta.get("classes") or []])
        models[unit.name] = _model_from(where, state, umeta)
        units.append(unit)
    if not units:
        raise GeneratorCheckpointError(f"generator {source}: holds no generator units")
    bank = GeneratorBank(str(metadata["granularity"]), units, models)
    bank.class_counts = {str(k): int(v) for u in metadata["units"] for k, v in (u.get("class-counts") or {}).items()}
    return bank


def discover_bank(
    directory: str | Path,
    base: str,
    node_id: int | None,
    classes: list[str] | None = None,
    expected_shape: tuple[int, int] | None = None,
    round: int | None = None,
) -> GeneratorBank:
    """Load whatever bank ``{base}_{node{id}|server}*`` holds in ``directory`` (granularity and
    classes read from the files' metadata), e.g. for generation from checkpoints without a config.
    ``classes`` restricts (and requires) the classes; errors name the directory and what is missing."""
    directory = Path(directory)
    prefix = f"{base}_{_owner(node_id)}"
    wanted = f"_round_{int(round)}{SUFFIX}" if round is not None else None
    files = sorted(
        p for p in directory.glob(f"{prefix}*{SUFFIX}")
        if (p.name.endswith(wanted) if wanted else not _ROUND.search(p.name))
        and (p.name[len(prefix):].startswith(("_class_", "_group_", SUFFIX, "_round_")))
    )
    if not files:
        raise GeneratorCheckpointError(f"no generator checkpoint '{prefix}*{SUFFIX}' in '{directory}'")
    metas = [(p, _read_metadata(p)) for p in files]
    granularities = {str(m.get("granularity")) for _, m in metas}
    if len(granularities) != 1:
        raise GeneratorCheckpointError(f"generator checkpoints '{prefix}*' in '{directory}' mix granularities {sorted(granularities)}")
    available = [str(c) for _, m in metas for c in m.get("classes") or []]
    if classes:
        missing = [c for c in classes if c not in available]
        if missing:
            raise GeneratorCheckpointError(f"missing generator for class(es) {missing} in '{directory}' ({prefix}*: {available})")
    granularity = granularities.pop()
    groups = None
    if granularity == "per_group":
        groups = {str(m["unit-name"]): [str(c) for c in m.get("classes") or []] for _, m in metas if m.get("unit-name") != "other"}
    return load_bank(directory, base, node_id, granularity, list(classes or available), expected_shape, None,
                     class_groups=groups, round=round)
