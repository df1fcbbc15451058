"""One validated configuration tree for the whole system.

Why one tree: the earlier code base read keys with ``getattr(cfg, key, None)``, so a typo or a
missing key silently became ``None`` and switched features off. Here every key is declared once,
with a real default, a type and a description; unknown keys and wrong types fail fast with a
message naming the dotted key.

Sources, lowest to highest precedence:

1. the defaults declared below (mirrored in ``pyproject.toml`` ``[tool.flwr.app.config]``; a test
   keeps the two in sync),
2. an optional TOML ``config-file`` (nested tables, e.g. ``[train]``), typically under ``configs/``,
3. Flower's run config (``--run-config 'train.local-epochs=3'``): flat, dotted kebab-case keys.

Flower fuses the pyproject defaults and the ``--run-config`` overrides into one flat dict before
the app sees it, so an override equal to the default cannot be told apart from the default: a
config-file value wins over a run-config value that equals the built-in default.
"""

from __future__ import annotations

from common.config.base import ConfigError, default_cache_dir
from common.config.choices import Precision
from common.config.loading import config_hash, flatten, json_schema, load_config, unflatten
from common.config.reference import markdown_reference
from common.config.run import FedA2VConfig, NodeRuntimeConfig
from common.config.sections import (
    AdapterConfigSection,
    AudioEncoderConfig,
    DataConfig,
    FinetuneConfig,
    GeneratorConfig,
    KDConfig,
    LoggingConfig,
    NodeSpec,
    PrivacyConfig,
    RenderConfig,
    RobustConfig,
    ServerGeneratorConfig,
    TextEncoderConfig,
    TrainConfig,
)

__all__ = [
    "AdapterConfigSection", "AudioEncoderConfig", "ConfigError", "DataConfig", "FedA2VConfig", "FinetuneConfig",
    "GeneratorConfig", "KDConfig", "LoggingConfig", "NodeRuntimeConfig", "NodeSpec", "Precision", "PrivacyConfig",
    "RenderConfig", "RobustConfig", "ServerGeneratorConfig", "TextEncoderConfig", "TrainConfig", "config_hash",
    "default_cache_dir", "flatten", "json_schema", "load_config", "markdown_reference", "unflatten",
]
