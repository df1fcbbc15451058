"""Which generator models cover which classes: the units of a bank, planned from its granularity.

Granularity decides how many models cover the classes:

* ``unified``   - one class-conditional model for all classes (file ``{base}_node{id}``);
* ``per_class`` - one model per class (``{base}_node{id}_class_{cls}``);
* ``per_group`` - one conditional model per semantic group of ``generator.class-groups``; a class in
  no group goes to the group ``other`` (``{base}_node{id}_group_{group}``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping

from common.config.choices import GRANULARITIES
from common.names import safe_name

__all__ = ["OTHER_GROUP", "Unit", "plan_units"]

log = logging.getLogger(__name__)

OTHER_GROUP = "other"


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
