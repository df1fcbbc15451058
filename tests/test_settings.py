"""Every component built from the config uses exactly the config's values: no default of its own.

Each table below maps a component's field to the config key it comes from. For the default config
and for configs with every such key overridden to a non-default value, the component's field (and,
where cheap, the effective value inside the built object) must equal the config value. A default
re-declared in a settings class that drifts from the config (the earlier ``TrainSettings`` had
``contrastive_weight=0.0`` while the config said 1.0) then fails here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from client_app.site import NodeSite
from common.cache import ExtractionSettings
from common.cache.key import CACHE_FORMAT, cache_key
from common.config import FedA2VConfig, NodeRuntimeConfig, flatten, load_config
from common.generator_bank import GeneratorBank
from common.models.adapters import AdapterConfig, Adapters
from common.models.audio_encoder import TINY_AST, AudioEncoder, ast_frames
from common.models.generators import GeneratorSpec, GeneratorTrainSettings
from common.models.text_encoders import FLUX_CLIP_DIM, FLUX_T5_DIM
from common.training import TrainSettings, make_optimizers

# component field -> config key
TRAIN = {
    "epochs": "train.local-epochs",
    "batch_size": "train.batch-size",
    "lr_clip": "train.lr-clip",
    "lr_t5": "train.lr-t5",
    "weight_decay": "train.weight-decay",
    "cosine_weight": "train.cosine-weight",
    "contrastive_weight": "train.contrastive-weight",
    "temperature": "train.temperature",
}
EXTRACTION = {
    "model": "audio-encoder.model",
    "clip_seconds": "data.clip-seconds",
    "sample_rate": "data.sample-rate",
    "reduction": "audio-encoder.reduction",
    "tokens": "audio-encoder.tokens",
    "dtype": "audio-encoder.dtype",
    "seed": "seed",
    "storage_dtype": "audio-encoder.cache-dtype",
    "batch_size": "audio-encoder.batch-size",
    "min_clip_seconds": "data.min-clip-seconds",
    "max_file_mb": "data.max-file-mb",
}
IDENTITY = {  # embedding-cache key fields (the encoder part; "tokens" is 1 for the CLS reduction)
    "model": "audio-encoder.model",
    "clip_seconds": "data.clip-seconds",
    "sample_rate": "data.sample-rate",
    "reduction": "audio-encoder.reduction",
    "dtype": "audio-encoder.dtype",
}
ADAPTER = {
    "hidden_dim": "adapter.hidden-dim",
    "heads": "adapter.heads",
    "dropout": "adapter.dropout",
    "t5_tokens": "text-encoder.t5-tokens",
}
GEN_SPEC = {
    "kind": "generator.kind",
    "latent_dim": "generator.latent-dim",
    "hidden_dim": "generator.hidden-dim",
    "num_layers": "generator.num-layers",
    "token_dim": "generator.token-dim",
}
GEN_TRAIN = {
    "epochs": "generator.epochs",
    "batch_size": "generator.batch-size",
    "min_steps": "generator.min-steps",
}

# a non-default value for every key above (plus generator.lr, whose 0 means "per-kind default")
OVERRIDES: dict[str, Any] = {
    "seed": 7,
    "train.local-epochs": 3,
    "train.batch-size": 7,
    "train.lr-clip": 2e-3,
    "train.lr-t5": 5e-4,
    "train.weight-decay": 0.02,
    "train.cosine-weight": 0.25,
    "train.contrastive-weight": 0.5,
    "train.temperature": 0.2,
    "data.clip-seconds": 1.0,
    "data.sample-rate": 22050,
    "audio-encoder.reduction": "cls",
    "audio-encoder.tokens": 6,
    "audio-encoder.dtype": "bfloat16",
    "audio-encoder.cache-dtype": "float32",
    "audio-encoder.batch-size": 5,
    "data.min-clip-seconds": 0.25,
    "data.max-file-mb": 64.0,
    "text-encoder.t5-tokens": 8,
    "adapter.hidden-dim": 64,
    "adapter.heads": 4,
    "adapter.dropout": 0.2,
    "generator.kind": "gan",
    "generator.latent-dim": 8,
    "generator.hidden-dim": 48,
    "generator.num-layers": 3,
    "generator.token-dim": 16,
    "generator.epochs": 7,
    "generator.batch-size": 9,
    "generator.min-steps": 11,
    "generator.lr": 2e-3,
}
MODEL_KEY = "audio-encoder.model"  # overridden with a saved AST folder (see the fixture)
MAPPED = {*TRAIN.values(), *EXTRACTION.values(), *IDENTITY.values(), *ADAPTER.values(), *GEN_SPEC.values(),
          *GEN_TRAIN.values()}


@pytest.fixture(scope="module")
def ast_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ast") / "tiny-ast"
    AudioEncoder.build("tiny", 1.0, sample_rate=16000, reduction="pool", tokens=4, dtype="float32",
                       seed=3).save_pretrained(folder)
    return folder


@pytest.fixture(params=["default", "overridden", "overridden-pool"])
def case(request, ast_folder) -> tuple[FedA2VConfig, dict[str, Any]]:
    """(config, its flat dotted values); the overridden cases change every mapped key."""
    if request.param == "default":
        run_config: dict[str, Any] = {}
    else:
        run_config = {**OVERRIDES, MODEL_KEY: str(ast_folder)}
        if request.param == "overridden-pool":  # "tokens" only shapes a pooled embedding
            run_config["audio-encoder.reduction"] = "pool"
    cfg = load_config(run_config)
    return cfg, flatten(cfg.model_dump(by_alias=True))


def _assert_fields(obj: Any, mapping: dict[str, str], flat: dict[str, Any], what: str) -> None:
    get = obj.get if isinstance(obj, dict) else lambda name: getattr(obj, name)
    for name, key in mapping.items():
        assert get(name) == flat[key], f"{what}.{name} = {get(name)!r} but config {key} = {flat[key]!r}"


def test_overrides_change_every_mapped_key():
    """The overridden cases are meaningful: every mapped key gets a value other than its default."""
    defaults = flatten(FedA2VConfig().model_dump(by_alias=True))
    assert MAPPED <= set(OVERRIDES) | {MODEL_KEY}
    same = [k for k, v in OVERRIDES.items() if defaults[k] == v]
    assert not same, f"not overridden: {same}"


@pytest.mark.parametrize(
    "cls, config_fields",
    [
        (TrainSettings, set(TRAIN) | {"seed"}),
        (ExtractionSettings, set(EXTRACTION)),
        (AdapterConfig, set(ADAPTER)),
        (GeneratorSpec, set(GEN_SPEC) | {"tokens", "dim"}),
        (GeneratorTrainSettings, set(GEN_TRAIN) | {"lr", "seed"}),
    ],
)
def test_config_fields_have_no_default_of_their_own(cls, config_fields):
    """A default here would be a second declaration of a config default (and could drift)."""
    defaults = {f.name for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    assert not defaults & config_fields, f"{cls.__name__} declares defaults for {sorted(defaults & config_fields)}"


def test_train_settings(case):
    cfg, flat = case
    settings = TrainSettings.from_config(cfg.train, seed=123)
    _assert_fields(settings, TRAIN, flat, "TrainSettings")
    assert settings.seed == 123
    # effective: the optimisers the loop builds
    adapters = Adapters.seeded(AdapterConfig.from_sections(cfg.adapter, cfg.audio_encoder, cfg.text_encoder, clip_dim=8, t5_dim=8), cfg.seed)
    optimizers = make_optimizers(adapters, settings)
    for branch, key in (("clip", "train.lr-clip"), ("t5", "train.lr-t5")):
        group = optimizers[branch].param_groups[0]
        assert group["lr"] == flat[key] and group["weight_decay"] == flat["train.weight-decay"]


def test_extraction_settings_audio_encoder_and_cache_key(case):
    cfg, flat = case
    settings = ExtractionSettings.of(cfg.audio_encoder, cfg.data, cfg.seed)
    _assert_fields(settings, EXTRACTION, flat, "ExtractionSettings")
    pooled = flat["audio-encoder.reduction"] == "pool"
    tokens = flat["audio-encoder.tokens"] if pooled else 1
    # the embedding-cache key fields, computed without building the encoder
    fields = settings.key_fields()
    assert fields["format"] == CACHE_FORMAT and fields["storage_dtype"] == flat["audio-encoder.cache-dtype"]
    ident = fields["encoder"]
    _assert_fields(ident, IDENTITY, flat, "encoder identity")
    assert ident["tokens"] == tokens
    assert ident["max_length"] == ast_frames(flat["data.clip-seconds"], flat["data.sample-rate"])
    if flat[MODEL_KEY] == "tiny":
        assert ident["seed"] == flat["seed"] and ident["tiny_config"] == TINY_AST
    else:
        assert "seed" not in ident and "files_sha256" in ident
    node = NodeRuntimeConfig(partition_id=0, num_partitions=1)
    assert NodeSite.of(cfg, node).encoder_key == cache_key(fields)  # what the node's generator checkpoints are keyed by
    # effective: the encoder these settings build
    enc = settings.build_encoder()
    assert (enc.model_id, enc.clip_seconds, enc.sample_rate, enc.reduction, enc.tokens, enc.dtype) == (
        flat[MODEL_KEY], flat["data.clip-seconds"], flat["data.sample-rate"], flat["audio-encoder.reduction"],
        flat["audio-encoder.tokens"], flat["audio-encoder.dtype"],
    )
    assert enc.num_tokens == tokens
    assert next(enc.model.parameters()).dtype == getattr(torch, flat["audio-encoder.dtype"])
    assert enc.identity() == ident


def test_adapter_config_and_built_adapters(case):
    cfg, flat = case
    acfg = AdapterConfig.from_sections(cfg.adapter, cfg.audio_encoder, cfg.text_encoder)
    _assert_fields(acfg, ADAPTER, flat, "AdapterConfig")
    pooled = flat["audio-encoder.reduction"] == "pool"
    assert acfg.in_tokens == (flat["audio-encoder.tokens"] if pooled else 1)
    assert acfg.in_dim == TINY_AST["hidden_size"]
    assert (acfg.clip_dim, acfg.t5_dim) == (FLUX_CLIP_DIM, FLUX_T5_DIM)
    # effective: the modules built from it
    adapters = Adapters.seeded(AdapterConfig.from_sections(cfg.adapter, cfg.audio_encoder, cfg.text_encoder, clip_dim=8, t5_dim=8), cfg.seed)
    for branch in (adapters.clip, adapters.t5):
        assert branch.attn.num_heads == flat["adapter.heads"]
        assert branch.latents.shape[1] == flat["adapter.hidden-dim"]
        assert branch.token_mlp[3].p == flat["adapter.dropout"] and branch.attn.dropout == flat["adapter.dropout"]
        assert branch.pos.shape[0] == acfg.in_tokens
    assert adapters.t5.latents.shape[0] == flat["text-encoder.t5-tokens"]


def test_build_adapters_is_seeded_and_leaves_the_global_rng_alone(case):
    cfg, _ = case
    acfg = AdapterConfig.from_sections(cfg.adapter, cfg.audio_encoder, cfg.text_encoder, clip_dim=8, t5_dim=8)
    before = torch.random.get_rng_state()
    a = Adapters.seeded(acfg, cfg.seed)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = Adapters.seeded(acfg, cfg.seed)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_generator_spec_and_train_settings(case):
    cfg, flat = case
    spec = GeneratorSpec.from_config(cfg.generator, tokens=5, dim=24)
    _assert_fields(spec, GEN_SPEC, flat, "GeneratorSpec")
    assert (spec.tokens, spec.dim) == (5, 24)
    settings = GeneratorTrainSettings.from_config(cfg.generator, seed=99)
    _assert_fields(settings, GEN_TRAIN, flat, "GeneratorTrainSettings")
    assert settings.seed == 99
    assert settings.lr == (flat["generator.lr"] or None)  # 0 = the per-kind default
    # effective: the models of a bank built from the spec
    bank = GeneratorBank.create(spec, "per_class", ["a", "b"], seed=0)
    for model in bank.models.values():
        assert {name: getattr(model.spec, name) for name in GEN_SPEC} == {n: flat[k] for n, k in GEN_SPEC.items()}
        assert model.spec.shape == (5, 24) and model.spec.num_classes == 1


def test_user_facing_errors_share_one_base_and_stay_value_errors():
    from common.cache.store import IndexCorrupt
    from common.config import ConfigError
    from common.errors import FedA2VError
    from common.generator_bank import GeneratorCheckpointError
    from common.models.audio_encoder import ModelLoadError

    for cls in (ConfigError, ModelLoadError, GeneratorCheckpointError, IndexCorrupt):
        assert issubclass(cls, FedA2VError) and issubclass(cls, ValueError), cls
