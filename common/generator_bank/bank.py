"""A node's (or the server's) set of embedding generators: training, sampling, quality, and its files.

Why a bank: a site may cover its classes with one model, one per class or one per group
(:mod:`.units`); everything else (training, sampling by class name, checkpoints) goes through the bank
so callers never care which. ``save_pretrained`` / ``from_pretrained`` are its one pair of file methods
(:mod:`.files` holds the format); :mod:`.records` its one pair for Flower records.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from common.checkpoints import load_tensors, save_tensors
from common.config.choices import GRANULARITIES
from common.metrics.embeddings import embedding_quality
from common.models.generator_training import train_generator
from common.models.generators import (
    ConditionalGAN,
    ConditionalVAE,
    GeneratorSpec,
    GeneratorTrainSettings,
    build_generator,
)
from common.seeds import class_stream

from .files import (
    SUFFIX,
    UNIT_KIND,
    GeneratorCheckpointError,
    check,
    checkpoint_name,
    missing_message,
    model_from,
    owner,
    owner_files,
    read_metadata,
    unit_metadata,
    validate,
)
from .units import Unit, plan_units

__all__ = ["GeneratorBank"]

log = logging.getLogger(__name__)


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

    # -- files
    def save_pretrained(self, directory: str | Path, *, base: str, node_id: int | None, round: int | None,
                        checkpoint_every: int, encoder_key: str, extra: Mapping[str, Any] | None = None) -> list[Path]:
        """Write every unit's latest file and, when ``round`` is a multiple of ``checkpoint_every`` (> 0), its
        ``_round_{round}`` copy (:mod:`.files`). Returns the paths written (latest files first)."""
        directory = Path(directory)
        with_round = round is not None and checkpoint_every > 0 and round % checkpoint_every == 0
        latest, copies = [], []
        for unit in self.units:
            meta = unit_metadata(self.granularity, unit, self.models[unit.name], self.class_counts, encoder_key,
                                 node_id, round)
            meta.update(extra or {})
            state = self.models[unit.name].state_dict()
            latest.append(save_tensors(directory / checkpoint_name(base, node_id, unit), state, meta))
            if with_round:
                copies.append(save_tensors(directory / checkpoint_name(base, node_id, unit, round), state, meta))
        return latest + copies

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        base: str,
        node_id: int | None,
        granularity: str | None = None,
        classes: list[str] | None = None,
        expected_shape: tuple[int, int] | None = None,
        encoder_key: str | None = None,
        class_groups: Mapping[str, list[str]] | None = None,
        kind: str | None = None,
        round: int | None = None,
    ) -> "GeneratorBank":
        """The bank an owner (``node_id``; ``None``: the server) saved in ``directory``: latest files, or
        ``round``'s copies.

        With ``granularity`` the caller says what it expects: the generators covering ``classes``
        (per_group: the planned groups' files when ``class_groups`` is given, else every ``..._group_*``
        file), every file's metadata checked (granularity, embedding shape, encoder key, type, unit name;
        a ``None`` expectation skips that check). Without it the bank is taken as found (granularity and
        classes from the files' metadata, e.g. to render from checkpoints without a config); ``classes``
        then restricts (and requires) the classes. Errors (``GeneratorCheckpointError``) name the file,
        the field, found vs expected; a class no file covers names the class and the files looked for.
        """
        directory = Path(directory)
        if granularity is None:
            granularity, classes, class_groups = cls._as_found(directory, base, node_id, classes, round)
        elif classes is None:
            raise ValueError("from_pretrained with a granularity needs the classes it must cover")
        return cls._load(directory, base, node_id, granularity, list(classes), expected_shape, encoder_key,
                         class_groups, kind, round)

    @staticmethod
    def _as_found(directory: Path, base: str, node_id: int | None, classes: list[str] | None, round: int | None
                  ) -> tuple[str, list[str], dict[str, list[str]] | None]:
        """Granularity, classes and groups of the owner's files, read from their metadata."""
        files = owner_files(directory, base, node_id, round)
        prefix = f"{base}_{owner(node_id)}"
        if not files:
            raise GeneratorCheckpointError(f"no generator checkpoint '{prefix}*{SUFFIX}' in '{directory}'")
        metas = [read_metadata(p) for p in files]
        granularities = {str(m.get("granularity")) for m in metas}
        if len(granularities) != 1:
            raise GeneratorCheckpointError(f"generator checkpoints '{prefix}*' in '{directory}' mix granularities "
                                           f"{sorted(granularities)}")
        available = [str(c) for m in metas for c in m.get("classes") or []]
        missing = [c for c in classes or [] if c not in available]
        if missing:
            raise GeneratorCheckpointError(f"missing generator for class(es) {missing} in '{directory}' ({prefix}*: {available})")
        granularity = granularities.pop()
        groups = None
        if granularity == "per_group":
            groups = {str(m["unit-name"]): [str(c) for c in m.get("classes") or []] for m in metas if m.get("unit-name") != "other"}
        return granularity, list(classes or available), groups

    @classmethod
    def _load(cls, directory: Path, base: str, node_id: int | None, expected_granularity: str,
              expected_classes: list[str], expected_shape: tuple[int, int] | None, expected_encoder_key: str | None,
              class_groups: Mapping[str, list[str]] | None, expected_kind: str | None, round: int | None
              ) -> "GeneratorBank":
        if expected_granularity not in GRANULARITIES:
            raise ValueError(f"unknown generator granularity {expected_granularity!r}")
        expected_classes = list(expected_classes)
        shape = tuple(expected_shape) if expected_shape is not None else None
        if expected_granularity == "per_group" and not class_groups:
            checkpoint_name(base, node_id, Unit("unified", "unified"))  # validates the base name
            prefix = f"{base}_{owner(node_id)}_group_"
            paths = [p for p in owner_files(directory, base, node_id, round) if p.name.startswith(prefix)]
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
            validate(path, meta, expected_granularity, shape, expected_encoder_key, expected_kind)
            unit_kind = UNIT_KIND[expected_granularity]
            check(path, "unit-kind", meta.get("unit-kind"), unit_kind)
            if planned is not None:
                check(path, "unit-name", meta.get("unit-name"), planned[i].name)
            if node_id is not None:
                check(path, "node-id", meta.get("node-id"), node_id)
            unit = Unit(str(meta["unit-name"]), unit_kind, [str(c) for c in meta.get("classes") or []])
            model = model_from(path, tensors, meta)
            check(path, "generator-spec.num_classes", model.spec.num_classes, len(unit.classes))
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
            raise GeneratorCheckpointError(missing_message(directory, base, node_id, expected_granularity, missing, looked_for, paths))
        bank = cls(expected_granularity, units, models)
        bank.class_counts = counts
        return bank



