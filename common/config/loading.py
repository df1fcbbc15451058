"""A validated configuration from Flower's flat run config and an optional TOML file; its hash.

Why flat and nested: Flower hands the app one flat dict of dotted keys, a config file is nested TOML;
both become one tree validated once.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Mapping

from pydantic import ValidationError

from common.config.base import ConfigError, format_errors
from common.config.run import FedA2VConfig

__all__ = ["RUN_HASH_EXCLUDES", "config_hash", "flatten", "json_schema", "load_config", "unflatten"]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> Flower-style flat dict with dotted keys (lists become comma strings)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if value:
                flat.update(flatten(value, dotted + "."))
        elif isinstance(value, (list, tuple)):
            flat[dotted] = ",".join(str(v) for v in value)
        else:
            flat[dotted] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Flat dotted keys -> nested dict; a key that is both a value and a table is an error."""
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        parts = dotted.split(".")
        node = tree
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' is a value, but '{dotted}' uses it as a table")
            node = child
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(f"config key '{dotted}' is a table, not a value")
        node[parts[-1]] = value
    return tree


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _defaults_flat() -> dict[str, Any]:
    return flatten(FedA2VConfig().model_dump(by_alias=True))


def _read_config_file(path_str: str, search_dirs: tuple[Path, ...]) -> tuple[dict[str, Any], Path]:
    path = Path(path_str).expanduser()
    candidates = [path] if path.is_absolute() else [d / path for d in search_dirs] + [path]
    for candidate in candidates:
        if candidate.is_file():
            try:
                return tomllib.loads(candidate.read_text()), candidate.resolve()
            except tomllib.TOMLDecodeError as err:
                raise ConfigError(f"config-file '{candidate}': not valid TOML: {err}") from None
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"config-file '{path_str}' not found (tried: {tried})")


def load_config(
    run_config: Mapping[str, Any] | None = None,
    search_dirs: tuple[Path, ...] = (),
) -> FedA2VConfig:
    """Build the validated config from Flower's flat run config (+ its optional config-file).

    ``search_dirs``: where a relative ``config-file`` is looked up (the app directory, so that
    ``configs/x.toml`` works wherever the ServerApp process runs), then the current directory.
    """
    run_config = dict(run_config or {})
    defaults = _defaults_flat()
    try:
        run_tree = unflatten(run_config)
    except ConfigError:
        raise
    file_tree: dict[str, Any] = {}
    file_path: Path | None = None
    config_file = run_config.get("config-file", "")
    if config_file:
        file_tree, file_path = _read_config_file(str(config_file), search_dirs + (_app_root(),))
        if "config-file" in file_tree:
            raise ConfigError(f"config-file '{file_path}': may not set 'config-file' itself")
    # Run-config values equal to the built-in default do not override the file (see module doc).
    file_flat = flatten(file_tree)
    explicit = {k: v for k, v in run_config.items() if not (k in file_flat and defaults.get(k) == v)}
    merged = _deep_merge(file_tree, unflatten(explicit)) if file_tree else run_tree
    source = f"run config + {file_path}" if file_path else "run config"
    try:
        cfg = FedA2VConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(format_errors(err, source)) from None
    return cfg


def _app_root() -> Path:
    """The directory holding configs/ (the repo root or the unpacked FAB)."""
    return Path(__file__).resolve().parents[2]


RUN_HASH_EXCLUDES = {"config_file", "output_dir", "run_name", "cache_dir", "resume", "num_rounds", "round_timeout",
                     "reply_poll_interval", "connect_timeout", "min_replies", "min_nodes"}


def config_hash(cfg: FedA2VConfig) -> str:
    """Stable short hash of the settings that define a run's results (stored in checkpoint metadata; a
    resumed run must match it). Where files go, how long to wait and how many rounds are not part of it."""
    payload = cfg.model_dump(by_alias=True, exclude=RUN_HASH_EXCLUDES)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def json_schema() -> dict[str, Any]:
    return FedA2VConfig.model_json_schema(by_alias=True)


