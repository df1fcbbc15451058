"""A configuration from a TOML file plus ``key=value`` overrides, outside a Flower run.

Flower hands the apps a run config (pyproject defaults + ``--run-config``); the command line
(``--config-file`` / ``--set``) and the benchmarks (``--run-config 'k=v k2=v2'``) build the same
thing here and validate it exactly like a run's config (:func:`common.config.load_config`). A
value is read as a TOML literal when it is one (``8``, ``true``, ``"x"``, ``[1, 2]``) and as the
bare string otherwise (``render.model=tiny``), as ``flwr run --run-config`` does.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from common.config import FedA2VConfig, flatten, load_config

__all__ = ["load_config_with_overrides", "parse_overrides", "parse_toml_value"]


def parse_toml_value(text: str) -> Any:
    """``"8"`` -> 8, ``"true"`` -> True, ``'"a b"'`` -> "a b"; anything that is not a TOML value stays a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(text: str) -> dict[str, Any]:
    """``'num-rounds=3 render.steps=8'`` -> ``{"num-rounds": 3, "render.steps": 8}`` (space-separated pairs)."""
    out: dict[str, Any] = {}
    for item in text.split():
        key, _, value = item.partition("=")
        out[key] = parse_toml_value(value)
    return out


def load_config_with_overrides(
    config_file: str, sets: Iterable[str] | None, search_dirs: Sequence[Path] | None = None
) -> FedA2VConfig:
    """Defaults + ``config_file`` + ``sets`` (``"dotted.key=value"``, later ones win), validated like a run config.

    A relative ``config_file`` is looked up in ``search_dirs`` (default: the current directory) and
    then the app directory. Invalid keys or values raise :class:`common.config.ConfigError`.
    """
    run_config = flatten(FedA2VConfig().model_dump(by_alias=True))
    for item in sets or []:
        key, _, value = item.partition("=")
        run_config[key.strip()] = parse_toml_value(value)
    if config_file:
        run_config["config-file"] = config_file
    dirs = tuple(Path(d) for d in search_dirs) if search_dirs is not None else (Path.cwd(),)
    return load_config(run_config, search_dirs=dirs)
