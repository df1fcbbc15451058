"""The configuration reference: one row per key with its type, default and description.

Why generated: docs/configuration.md is written from this table (tools/sync_config_docs.py) and a test
fails when the page and the schema differ.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any

from pydantic import BaseModel

from common.config.base import kebab
from common.config.run import FedA2VConfig
from common.config.sections import NodeSpec

__all__ = ["markdown_reference"]


def _walk_fields(model: type[BaseModel], prefix: str = ""):
    """Yield (dotted key, annotation text, default, description) for every leaf field."""
    for name, field in model.model_fields.items():
        key = prefix + kebab(name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _walk_fields(ann, key + ".")
            continue
        if name == "nodes":
            for sub_name, sub_field in NodeSpec.model_fields.items():
                yield (
                    f"nodes.<id>.{kebab(sub_name)}",
                    _type_text(sub_field.annotation),
                    sub_field.get_default(call_default_factory=True),
                    sub_field.description or "",
                )
            continue
        yield key, _type_text(ann), field.get_default(call_default_factory=True), field.description or ""


def _type_text(ann: Any) -> str:
    if isinstance(ann, types.UnionType) or typing.get_origin(ann) is typing.Union:
        return " \\| ".join(_type_text(a) for a in typing.get_args(ann))
    text = str(ann) if getattr(ann, "__origin__", None) is list else (getattr(ann, "__name__", None) or str(ann))
    if str(ann).startswith("typing.Literal"):
        text = " \\| ".join(repr(a) for a in ann.__args__)
    return text.replace("typing.", "")


def markdown_reference() -> str:
    """The configuration reference table of docs/configuration.md (a test checks that the page matches it)."""
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for key, type_text, default, description in _walk_fields(FedA2VConfig):
        if isinstance(default, list):
            default = ",".join(default)
        lines.append(f"| `{key}` | {type_text} | `{json.dumps(default)}` | {description} |")
    return "\n".join(lines)
