"""What every configuration section shares: strict kebab-case models, the config error, list parsing.

Why a base: every section forbids unknown keys and takes kebab-case keys, so a typo fails with the
dotted key instead of silently becoming a default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from common.errors import FedA2VError

__all__ = ["ConfigError", "Strict", "default_cache_dir", "format_errors", "kebab", "split_list"]


class ConfigError(FedA2VError, ValueError):
    """A configuration problem; the message names the offending key (and file, if any)."""


def kebab(name: str) -> str:
    return name.replace("_", "-")


class Strict(BaseModel):
    """Base for every config section: kebab-case keys, unknown keys forbidden, no coercion surprises."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=kebab,
        populate_by_name=True,
        validate_assignment=True,
        frozen=False,
    )


def split_list(value: Any) -> Any:
    """Flower run-config values are scalars, so lists travel as comma-separated strings."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def format_errors(err: ValidationError, source: str) -> str:
    """pydantic's errors as one message naming every dotted key at fault."""
    lines = [f"invalid configuration ({source}):"]
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}'")
        elif not item["loc"]:  # a cross-key rule: its message names the keys
            lines.append(f"  {str(item['msg']).removeprefix('Value error, ')}")
        else:
            lines.append(f"  '{key}': {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def default_cache_dir() -> Path:
    """``$FEDA2V_CACHE`` or the platform's user cache dir: never a hard-coded absolute path."""
    env = os.environ.get("FEDA2V_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("feda2v"))
