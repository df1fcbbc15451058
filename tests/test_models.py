"""Model layer: tiny AST encoder, FLUX text targets, adapters (all offline, CPU, seconds)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from common.models import adapters as adapters_mod
from common.models.adapters import AdapterConfig, Adapters
from common.models.audio_encoder import (
    TINY_AST,
    AudioEncoder,
    ModelLoadError,
    ast_frames,
    build_tiny_ast,
)
from common.models.text_encoders import (
    FLUX_CLIP_DIM,
    FLUX_T5_DIM,
    ClassTargets,
    TextEncoders,
    class_prompts,
    compute_class_targets,
)

CLASSES = ["dog", "rooster", "siren", "engine", "rain", "clock_tick", "chirping_birds", "church_bells",
           "crackling_fire", "car_horn"]
TEMPLATE = "a photo of a {label}"
SR = 16000


def build_ast(model: str, clip_seconds: float, **kw) -> AudioEncoder:
    """AudioEncoder.build with this module's test settings (8 pooled tokens, fp32, seed 0) unless given."""
    settings = dict(sample_rate=SR, reduction="pool", tokens=8, dtype="float32", seed=0)
    return AudioEncoder.build(model, clip_seconds, **{**settings, **kw})


def _waves(n: int, seconds: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR)) / SR
    freqs = 200 + 1800 * torch.rand(n, 1, generator=g)
    return (0.3 * torch.sin(2 * torch.pi * freqs * t) + 0.05 * torch.randn(n, t.numel(), generator=g)).float()


# ----------------------------------------------------------------------------------- AST
def test_ast_frames():
    assert ast_frames(5.0, SR) == 498
    assert ast_frames(10.0, SR) == 998
    assert ast_frames(10.24, SR) == 1022
    for n in (400, 401, 559, 560, 16000, 80123):
        assert ast_frames(n / SR, SR) == 1 + (n - 400) // 160
    with pytest.raises(ValueError):
        ast_frames(0.01, SR)


@pytest.mark.parametrize("seconds", [5.0, 10.0])
@pytest.mark.parametrize("reduction,tokens", [("cls", 8), ("pool", 8), ("pool", 3)])
def test_tiny_ast_shapes(seconds, reduction, tokens):
    enc = build_ast("tiny", clip_seconds=seconds, reduction=reduction, tokens=tokens)
    assert enc.max_length == ast_frames(seconds, SR)
    assert enc.feature_extractor.max_length == enc.max_length
    assert enc.hidden_size == TINY_AST["hidden_size"]
    emb = enc.encode(_waves(3, seconds), batch_size=2)
    expected_l = 1 if reduction == "cls" else tokens
    assert enc.num_tokens == expected_l
    assert emb.shape == (3, expected_l, TINY_AST["hidden_size"])
    assert emb.dtype == torch.float32 and emb.device.type == "cpu"
    assert torch.isfinite(emb).all()
    assert not torch.allclose(emb[0], emb[1])  # different clips -> different embeddings


def test_pool_is_frequency_bands_of_patch_sequence():
    enc = build_ast("tiny", clip_seconds=5.0, reduction="pool", tokens=12)
    n_f, n_t = enc.grid
    assert (n_f, n_t) == (12, 49)
    hidden = torch.randn(2, 2 + n_f * n_t, enc.hidden_size)
    red = enc._reduce(hidden)
    # frequency-major order: with 12 tokens, token f is frequency row f averaged over time
    per_row = hidden[:, 2:].reshape(2, n_f, n_t, -1).mean(2)
    assert torch.allclose(red, per_row, atol=1e-6)
    assert not torch.allclose(red, red.mean(1, keepdim=True).expand_as(red))  # CLS/distill tokens excluded, bands differ
    with pytest.raises(ValueError):
        build_ast("tiny", clip_seconds=5.0, reduction="pool", tokens=n_f * n_t + 1)


def test_tiny_ast_deterministic_by_seed():
    w = _waves(2, 5.0)
    a = build_ast("tiny", 5.0, seed=0)
    b = build_ast("tiny", 5.0, seed=0)
    c = build_ast("tiny", 5.0, seed=1)
    ea = a.encode(w, batch_size=32)
    assert torch.equal(ea, b.encode(w, batch_size=32))
    assert not torch.allclose(ea, c.encode(w, batch_size=32))
    assert a.identity() == b.identity()
    assert a.identity() != c.identity()
    json.dumps(a.identity())  # JSON-able
    ident = a.identity()
    for key in ("model", "seed", "tiny_config", "sample_rate", "clip_seconds", "max_length", "reduction", "tokens", "dtype"):
        assert key in ident
    assert build_ast("tiny", 5.0, reduction="cls").identity() != ident


def test_save_pretrained_roundtrip(tmp_path):
    w = _waves(3, 5.0)
    enc = build_ast("tiny", 5.0, seed=3)
    enc.save_pretrained(tmp_path / "ast")
    assert (tmp_path / "ast" / "model.safetensors").is_file()
    assert (tmp_path / "ast" / "preprocessor_config.json").is_file()
    again = build_ast(str(tmp_path / "ast"), 5.0)
    assert again.max_length == enc.max_length
    assert torch.equal(enc.encode(w, batch_size=32), again.encode(w, batch_size=32, progress=True))
    saved, loaded = enc.model.state_dict(), again.model.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert again.identity()["model"] == str(tmp_path / "ast")
    assert "files_sha256" in again.identity() and "seed" not in again.identity()


def test_pretrained_1024_is_cropped_along_time(tmp_path):
    """Simulates the real checkpoint (1024 frames): loading for 5-s clips keeps the first time columns."""
    from transformers import ASTFeatureExtractor

    src = build_tiny_ast(max_length=1024, seed=7)
    src.save_pretrained(tmp_path / "ast1024")
    ASTFeatureExtractor(max_length=1024).save_pretrained(tmp_path / "ast1024")
    orig = src.embeddings.position_embeddings.detach().clone()
    hidden = orig.shape[-1]
    assert orig.shape[1] == 2 + 12 * 101

    enc = build_ast(str(tmp_path / "ast1024"), clip_seconds=5.0)
    assert enc.max_length == 498 == enc.model.config.max_length
    assert enc.feature_extractor.max_length == 498
    pos = enc.model.embeddings.position_embeddings.detach()
    assert pos.shape == (1, 2 + 12 * 49, hidden)
    assert torch.equal(pos[:, :2], orig[:, :2])  # CLS + distillation kept
    grid_orig = orig[0, 2:].reshape(12, 101, hidden)
    grid_new = pos[0, 2:].reshape(12, 49, hidden)
    for f in range(12):
        assert torch.equal(grid_new[f], grid_orig[f, :49])
    # every other weight is untouched
    sd_src, sd_new = src.state_dict(), enc.model.state_dict()
    for k, v in sd_src.items():
        if k != "embeddings.position_embeddings":
            assert torch.equal(v, sd_new[k]), k
    emb = enc.encode(_waves(2, 5.0), batch_size=32)
    assert emb.shape == (2, 8, hidden)


def test_legacy_classification_checkpoint_loads(tmp_path):
    """Like MIT/ast-finetuned-audioset-*: ASTForAudioClassification, transformers-4 key names, 1024 frames."""
    from safetensors.torch import save_file
    from transformers import ASTConfig, ASTForAudioClassification

    cfg = ASTConfig(**TINY_AST, max_length=1024, num_labels=3)
    cfg.architectures = ["ASTForAudioClassification"]
    torch.manual_seed(0)
    clf = ASTForAudioClassification(cfg)
    with torch.no_grad():
        clf.audio_spectrogram_transformer.embeddings.position_embeddings.normal_()
    renames = [(".layers.", ".encoder.layer."), ("attention.q_proj", "attention.attention.query"),
               ("attention.k_proj", "attention.attention.key"), ("attention.v_proj", "attention.attention.value"),
               ("attention.o_proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
               ("mlp.fc2", "output.dense")]

    def legacy(key: str) -> str:
        for new, old in renames:
            key = key.replace(new, old)
        return key

    sd = clf.state_dict()
    assert any(".encoder.layer.0.attention.attention.query." in legacy(k) for k in sd)
    cfg.save_pretrained(tmp_path / "clf")
    save_file({legacy(k): v.contiguous() for k, v in sd.items()}, str(tmp_path / "clf" / "model.safetensors"),
              metadata={"format": "pt"})

    enc = build_ast(str(tmp_path / "clf"), clip_seconds=5.0)
    prefix = "audio_spectrogram_transformer."
    loaded = enc.model.state_dict()
    for k, v in sd.items():
        if k.startswith(prefix) and not k.endswith("position_embeddings"):
            assert torch.equal(loaded[k[len(prefix):]], v), k
    pos = sd[prefix + "embeddings.position_embeddings"]
    grid = pos[0, 2:].reshape(12, 101, -1)[:, :49]
    assert torch.equal(enc.model.embeddings.position_embeddings[0, 2:].reshape(12, 49, -1), grid)


def test_shorter_checkpoint_is_interpolated_for_longer_clips(tmp_path):
    build_ast("tiny", 5.0, seed=2).save_pretrained(tmp_path / "ast5")
    enc = build_ast(str(tmp_path / "ast5"), clip_seconds=10.0, reduction="cls")
    assert enc.max_length == 998 and enc.grid == (12, 99)
    assert enc.model.embeddings.position_embeddings.shape[1] == 2 + 12 * 99
    assert enc.encode(_waves(1, 10.0), batch_size=32).shape == (1, 1, TINY_AST["hidden_size"])


def test_missing_model_path_raises_model_load_error(tmp_path):
    missing = tmp_path / "no" / "such-ast"
    with pytest.raises(ModelLoadError, match="such-ast") as err:
        build_ast(str(missing), 5.0)
    assert isinstance(err.value, ValueError)
    assert "tiny" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        build_ast(str(tmp_path / "empty"), 5.0)


# ----------------------------------------------------------------------------------- text targets
@pytest.fixture(scope="module")
def tiny_text():
    return TextEncoders.build("tiny", seed=0)


def _max_offdiag_cos(x: torch.Tensor) -> float:
    x = F.normalize(x.flatten(1).float(), dim=1)
    sim = x @ x.T
    sim.fill_diagonal_(-2.0)
    return sim.max().item()


def test_class_targets_shapes_and_cache_hit(tmp_path, monkeypatch):
    t = compute_class_targets("tiny", CLASSES, TEMPLATE, t5_tokens=16, cache_dir=tmp_path)
    assert t.class_names == CLASSES
    assert t.clip.shape == (10, FLUX_CLIP_DIM) and t.t5.shape == (10, 16, FLUX_T5_DIM)
    assert t.clip.dtype == torch.float32 and torch.isfinite(t.clip).all() and torch.isfinite(t.t5).all()
    assert t.meta["prompts"][5] == "a photo of a clock tick"
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1

    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        raise AssertionError("TextEncoders.build must not run on a cache hit")

    monkeypatch.setattr(TextEncoders, "build", classmethod(lambda cls, *a, **k: spy(*a, **k)))
    hit = compute_class_targets("tiny", CLASSES, TEMPLATE, t5_tokens=16, cache_dir=tmp_path)
    assert not calls
    assert torch.equal(hit.clip, t.clip) and torch.equal(hit.t5, t.t5)
    # a different template / token budget / class list is a miss
    for kwargs in (dict(template="the sound of a {label}"), dict(t5_tokens=8), dict(class_names=CLASSES[:3])):
        args = dict(model="tiny", class_names=CLASSES, template=TEMPLATE, t5_tokens=16, cache_dir=tmp_path)
        with pytest.raises(AssertionError, match="must not run"):
            compute_class_targets(**{**args, **kwargs})


def test_tiny_targets_are_distinct(tiny_text):
    clip, t5 = tiny_text.encode(class_prompts(CLASSES, TEMPLATE), t5_tokens=16)
    # measured (seed 0): clip 0.95, t5 0.95; FLUX retrieval needs distinct class targets
    assert _max_offdiag_cos(clip) < 0.99
    assert _max_offdiag_cos(t5) < 0.99


def test_tiny_tokenizer_handles_any_prompt(tiny_text):
    ids = tiny_text.tokenizer_2(["a photo of a chirping birds", "Zürich café 日本 😀 xylophone!!"]).input_ids
    assert len(ids[0]) == 7  # one piece per word + </s>: fits the 16-token T5 budget
    assert tiny_text.tokenizer_2.unk_token_id not in ids[1]
    clip, t5 = tiny_text.encode(["Zürich café 日本 😀 xylophone!!"], t5_tokens=16)
    assert clip.shape == (1, 768) and t5.shape == (1, 16, 4096)


def test_encode_matches_diffusers_flux_pipeline(tiny_text):
    """Same numbers as FluxPipeline._get_clip_prompt_embeds / _get_t5_prompt_embeds."""
    from diffusers import FluxPipeline

    prompts = class_prompts(CLASSES[:4], TEMPLATE)
    fake = SimpleNamespace(
        tokenizer=tiny_text.tokenizer, text_encoder=tiny_text.text_encoder,
        tokenizer_2=tiny_text.tokenizer_2, text_encoder_2=tiny_text.text_encoder_2,
        tokenizer_max_length=tiny_text.tokenizer.model_max_length, _execution_device=torch.device("cpu"),
    )
    with torch.inference_mode():
        ref_clip = FluxPipeline._get_clip_prompt_embeds(fake, prompts, device=torch.device("cpu"))
        ref_t5 = FluxPipeline._get_t5_prompt_embeds(fake, prompts, max_sequence_length=16, device=torch.device("cpu"))
    clip, t5 = tiny_text.encode(prompts, t5_tokens=16)
    assert torch.equal(clip, ref_clip.float()) and torch.equal(t5, ref_t5.float())


def test_class_targets_save_load_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = ClassTargets(["a", "b_c"], torch.randn(2, 768, generator=g), torch.randn(2, 4, 4096, generator=g),
                     meta={"template": TEMPLATE})
    path = tmp_path / "sub" / "targets.safetensors"
    t.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["targets.safetensors"]  # no temp file left
    back = ClassTargets.load(path)
    assert back.class_names == t.class_names and back.meta == t.meta and back.t5_tokens == 4
    assert torch.equal(back.clip, t.clip) and torch.equal(back.t5, t.t5)
    with pytest.raises(ValueError):
        ClassTargets(["a"], torch.zeros(2, 768), torch.zeros(2, 4, 4096))


def test_tiny_text_encoders_in_flux_layout_load_by_path(tmp_path, tiny_text):
    root = tmp_path / "flux-tiny"
    tiny_text.save_pretrained(root)
    for sub in ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"):
        assert (root / sub).is_dir()
    ref = compute_class_targets("tiny", CLASSES, TEMPLATE, 16, cache_dir=None)
    got = compute_class_targets(str(root), CLASSES, TEMPLATE, 16, cache_dir=tmp_path / "cache")
    assert torch.equal(ref.clip, got.clip) and torch.equal(ref.t5, got.t5)
    loaded = TextEncoders.build(str(root))
    assert loaded.identity()["model"] == str(root) and "files_sha256" in loaded.identity()

    # incomplete folder / missing path -> ModelLoadError naming what is missing
    import shutil

    shutil.rmtree(root / "text_encoder_2")
    with pytest.raises(ModelLoadError, match="text_encoder_2"):
        TextEncoders.build(str(root))
    with pytest.raises(ModelLoadError, match="nowhere"):
        compute_class_targets(str(tmp_path / "nowhere"), CLASSES, TEMPLATE, 16, cache_dir=None)


# ----------------------------------------------------------------------------------- adapters
def test_adapter_shapes_and_both_branches_get_gradients():
    cfg = AdapterConfig(in_dim=64, in_tokens=8, clip_dim=FLUX_CLIP_DIM, t5_dim=FLUX_T5_DIM, t5_tokens=16, hidden_dim=64,
                        heads=4, dropout=0.1)
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bogus"):
        AdapterConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    torch.manual_seed(0)
    model = Adapters(cfg).train()
    x = torch.randn(5, 8, 64)
    clip, t5 = model(x)
    assert clip.shape == (5, 768) and t5.shape == (5, 16, 4096)
    (clip.square().mean() + t5.square().mean()).backward()
    groups = model.branch_parameters()
    assert set(groups) == {"clip", "t5"}
    all_ids = {id(p) for p in model.parameters()}
    assert {id(p) for ps in groups.values() for p in ps} == all_ids
    assert not {id(p) for p in groups["clip"]} & {id(p) for p in groups["t5"]}
    for name, params in groups.items():
        for p in params:
            assert p.grad is not None and p.grad.abs().sum() > 0, name

    model.eval()
    with torch.no_grad():
        c1, _ = model(x)
        c2, _ = model(x)
    assert torch.equal(c1, c2)  # eval mode: no dropout
    with pytest.raises(ValueError):
        model(torch.randn(2, 5, 64))  # wrong number of tokens


def test_adapter_cls_embedding_and_module_api():
    cfg = AdapterConfig(in_dim=32, in_tokens=1, clip_dim=FLUX_CLIP_DIM, t5_dim=FLUX_T5_DIM, t5_tokens=4, hidden_dim=32,
                        heads=2, dropout=0.0)
    model = Adapters(cfg)
    clip, t5 = model(torch.randn(3, 1, 32))
    assert clip.shape == (3, 768) and t5.shape == (3, 4, 4096)
    clip2, _ = model(torch.randn(3, 32))  # [B, H] accepted for L = 1
    assert clip2.shape == (3, 768)
    branch = adapters_mod.BranchAdapter(32, 32, 10, num_latents=2, heads=2, dropout=0.0)
    assert branch(torch.randn(4, 6, 32)).shape == (4, 2, 10)
