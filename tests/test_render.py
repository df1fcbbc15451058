"""Images from sound: tiny FLUX backend, file names and manifest, seeds, resume, oracle switch,
generation from checkpoints and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.checkpoints import save_adapters, save_tensors
from common.config import load_config
from common.generator_bank import GeneratorBank, GeneratorCheckpointError
from common.models.adapters import AdapterConfig, Adapters
from common.models.generators import GeneratorSpec, GeneratorTrainSettings
from common.records import ClassTensors
from common.render.backend import Conditioning
from common.render.conditioning import calibrate, target_radius, target_soft, with_oracle
from common.render.images import MANIFEST, read_manifest
from common.render.jobs import RenderContext, render_job
from ops.cli import main as cli_main

CLASSES = ["dog", "rain", "siren"]
RENDER = {"render.model": "tiny", "render.resolution": 32, "render.steps": 2, "render.batch-size": 3, "text-encoder.t5-tokens": 4,
          "adapter.hidden-dim": 32}


def cfg_with(**extra):
    return load_config({**RENDER, **extra})


def random_cond(n: int, seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning({"clip_pooled": torch.randn(n, 768, generator=g), "t5_sequence": torch.randn(n, 4, 4096, generator=g)})


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def same_image(a, b) -> bool:
    """Same seed and conditioning: equal up to float batch effects (a batch of 1 vs of 3 may move a
    pixel by a level or two of 255); different images differ by far more."""
    return int(np.abs(pixels(a) - pixels(b)).max()) <= 3


def test_names_manifest_contact_sheet_and_resume(tmp_path):
    cfg = cfg_with()
    rows = ["dog", "dog", "dog", "rain", "siren", "siren"]
    sources = [f"clip:{i}.wav" for i in range(6)]
    report = render_job(RenderContext.of(cfg), 3, random_cond(6), rows, sources, tmp_path, server_round=5)
    assert report.written == 5  # images-per-class = 2: the third dog row is not rendered
    names = sorted(p.name for p in (tmp_path / "node_3").glob("*.png"))
    assert names == ["contact_sheet.png", "dog_0001.png", "dog_0002.png", "rain_0001.png", "siren_0001.png", "siren_0002.png"]
    with Image.open(tmp_path / "node_3" / "dog_0001.png") as im:
        assert im.size == (32, 32)
    with Image.open(tmp_path / "node_3" / "contact_sheet.png") as sheet:
        assert sheet.size[1] == 3 * 96  # one row per class
    manifest = read_manifest(tmp_path)
    assert len(manifest) == 5
    first = next(e for e in manifest if e["path"] == "node_3/dog_0001.png")
    assert (first["owner"], first["class_name"], first["index"], first["source"], first["round"]) == ("node_3", "dog", 1, "clip:0.wav", 5)
    assert first["render_resolution"] == 32 and first["render_steps"] == 2 and isinstance(first["seed"], int)
    # resume: remove one image; only it is rendered again, and it is the same image
    (tmp_path / "node_3" / "rain_0001.png").rename(tmp_path / "before.png")
    again = render_job(RenderContext.of(cfg), 3, random_cond(6), rows, sources, tmp_path, server_round=5)
    assert (again.written, again.skipped) == (1, 4)
    assert same_image(tmp_path / "before.png", tmp_path / "node_3" / "rain_0001.png")
    assert len((tmp_path / MANIFEST).read_text().splitlines()) == 5


def test_same_seed_same_image_whatever_the_batch(tmp_path):
    cfg = cfg_with()
    cond = random_cond(3, seed=1)
    render_job(RenderContext.of(cfg), None, cond, ["dog", "rain", "siren"], ["x"] * 3, tmp_path / "a", None)
    cfg_single = cfg_with(**{"render.batch-size": 1})
    render_job(RenderContext.of(cfg_single), None, cond.rows([1]), ["rain"], ["x"], tmp_path / "b", None)
    assert same_image(tmp_path / "a" / "server" / "rain_0001.png", tmp_path / "b" / "server" / "rain_0001.png")
    assert not same_image(tmp_path / "a" / "server" / "dog_0001.png", tmp_path / "a" / "server" / "rain_0001.png")
    render_job(RenderContext.of(cfg), None, cond, ["dog", "rain", "siren"], ["x"] * 3, tmp_path / "a2", None)  # same batch: bit-identical
    assert np.array_equal(pixels(tmp_path / "a" / "server" / "dog_0001.png"), pixels(tmp_path / "a2" / "server" / "dog_0001.png"))
    other_seed = cfg_with(**{"render.seed": 7})
    render_job(RenderContext.of(other_seed), None, cond, ["dog", "rain", "siren"], ["x"] * 3, tmp_path / "c", None)
    assert not same_image(tmp_path / "a" / "server" / "dog_0001.png", tmp_path / "c" / "server" / "dog_0001.png")


def test_oracle_switch_replaces_one_branch_by_the_class_text_target(tmp_path):
    targets = ClassTensors(CLASSES, torch.randn(3, 768), torch.randn(3, 4, 4096))
    cond = random_cond(2)
    clip_only = with_oracle(cond, targets, ["rain", "dog"], "clip")
    assert torch.equal(clip_only.tensors["clip_pooled"], targets.clip[[1, 0]])
    assert torch.equal(clip_only.tensors["t5_sequence"], cond.tensors["t5_sequence"])
    both = with_oracle(cond, targets, ["rain", "dog"], "both")
    assert torch.equal(both.tensors["t5_sequence"], targets.t5[[1, 0]])
    render_job(RenderContext.of(cfg_with()), 0, cond, ["rain", "dog"], ["clip:a", "clip:b"], tmp_path / "adapter", None)
    render_job(RenderContext.of(cfg_with(**{"render.oracle": "clip"})), 0, cond, ["rain", "dog"], ["clip:a", "clip:b"], tmp_path / "oracle", None, targets)
    assert not same_image(tmp_path / "adapter" / "node_0" / "rain_0001.png", tmp_path / "oracle" / "node_0" / "rain_0001.png")
    entry = next(e for e in read_manifest(tmp_path / "oracle") if e["class_name"] == "rain")
    assert entry["source"] == "clip:a+oracle-clip"
    with pytest.raises(ValueError, match="needs the class text targets"):
        render_job(RenderContext.of(cfg_with(**{"render.oracle": "t5"})), 0, cond, ["rain", "dog"], ["a", "b"], tmp_path / "x", None)


def test_target_radius_restores_the_length_of_shrunk_outputs_and_keeps_their_direction(tmp_path):
    g = torch.Generator().manual_seed(3)
    targets = ClassTensors(CLASSES, torch.randn(3, 768, generator=g), torch.randn(3, 4, 4096, generator=g))
    centre_clip, centre_t5 = targets.clip.mean(0), targets.t5.mean(0)
    radius_clip = (targets.clip - centre_clip).norm(dim=1).mean()
    radius_t5 = (targets.t5 - centre_t5).flatten(1).norm(dim=1).mean()
    # adapter-like outputs: 0.3 of the way from the centre to "rain", 0.5 of the way to "dog", and the centre itself
    shrink = torch.tensor([0.3, 0.5, 0.0])
    clip = centre_clip + shrink[:, None] * (targets.clip[[1, 0, 2]] - centre_clip)
    t5 = centre_t5 + shrink[:, None, None] * (targets.t5[[1, 0, 2]] - centre_t5)
    out = target_radius(Conditioning({"clip_pooled": clip, "t5_sequence": t5}), targets)
    new_clip, new_t5 = out.tensors["clip_pooled"], out.tensors["t5_sequence"]
    assert torch.allclose((new_clip[:2] - centre_clip).norm(dim=1), radius_clip.expand(2), rtol=1e-4)
    assert torch.allclose((new_t5[:2] - centre_t5).flatten(1).norm(dim=1), radius_t5.expand(2), rtol=1e-4)
    cos = torch.nn.functional.cosine_similarity(new_clip[:2] - centre_clip, targets.clip[[1, 0]] - centre_clip)
    assert torch.allclose(cos, torch.ones(2), atol=1e-5)
    assert torch.allclose(new_clip[2], centre_clip) and torch.allclose(new_t5[2], centre_t5)  # no direction: unchanged
    # per row: a row's result does not depend on the other rows in its batch
    alone = target_radius(Conditioning({"clip_pooled": clip[:1], "t5_sequence": t5[:1]}), targets)
    assert torch.allclose(alone.tensors["clip_pooled"], new_clip[:1])
    # the job applies it (recorded in the manifest) and renders differently from the uncalibrated rows
    cond = Conditioning({"clip_pooled": clip[:2], "t5_sequence": t5[:2]})
    render_job(RenderContext.of(cfg_with(**{"render.calibrate": "target-span"})), 0, cond, ["rain", "dog"], ["a", "b"], tmp_path / "cal", None, targets)
    render_job(RenderContext.of(cfg_with(**{"render.calibrate": "none"})), 0, cond, ["rain", "dog"], ["a", "b"], tmp_path / "raw", None, targets)
    assert {e["render_calibrate"] for e in read_manifest(tmp_path / "cal")} == {"target-span"}
    assert {e["render_calibrate"] for e in read_manifest(tmp_path / "raw")} == {"none"}
    assert not same_image(tmp_path / "cal" / "node_0" / "rain_0001.png", tmp_path / "raw" / "node_0" / "rain_0001.png")


def test_target_span_drops_what_lies_outside_the_class_targets_span():
    g = torch.Generator().manual_seed(4)
    targets = ClassTensors(CLASSES, torch.randn(3, 768, generator=g), torch.randn(3, 4, 4096, generator=g))
    centre = targets.clip.mean(0)
    offsets = targets.clip - centre
    basis = torch.linalg.svd(offsets, full_matrices=False)[2][:2]  # 3 centred targets span 2 directions
    noise = torch.randn(768, generator=g) * 3
    noise = noise - (noise @ basis.T) @ basis  # all of it outside the span
    row = centre + 0.3 * offsets[1] + noise
    cond = Conditioning({"clip_pooled": row[None], "t5_sequence": targets.t5[1:2] * 0.5})
    radius_only = target_radius(cond, targets).tensors["clip_pooled"][0] - centre
    span = target_radius(cond, targets, span=True).tensors["clip_pooled"][0] - centre
    cos = torch.nn.functional.cosine_similarity
    assert float(cos(span, offsets[1], dim=0)) > 0.999  # the class's direction, and nothing else
    assert float(cos(radius_only, offsets[1], dim=0)) < 0.5  # the noise took most of the radius
    assert torch.allclose(span.norm(), offsets.norm(dim=1).mean(), rtol=1e-4)


def test_target_soft_gives_a_clear_row_its_class_prompt_and_an_ambiguous_row_a_blend(tmp_path):
    g = torch.Generator().manual_seed(5)
    targets = ClassTensors(CLASSES, torch.randn(3, 768, generator=g), torch.randn(3, 4, 4096, generator=g))
    dog, rain = CLASSES.index("dog"), CLASSES.index("rain")
    clip = torch.stack([
        targets.clip[rain],  # exactly a prompt
        targets.clip[dog] + 0.1 * (targets.clip[rain] - targets.clip[dog]) + 0.05 * torch.randn(768, generator=g),
        0.5 * (targets.clip[dog] + targets.clip[rain]),  # half way between two prompts
    ])
    t5 = targets.t5[[rain, dog, dog]]
    out = target_soft(Conditioning({"clip_pooled": clip, "t5_sequence": t5}), targets, sigma=0.25)
    new = out.tensors["clip_pooled"]
    assert torch.allclose(new[0], targets.clip[rain], atol=1e-2)
    assert torch.allclose(new[1], targets.clip[dog], atol=0.05 * float(targets.clip[dog].abs().max()))
    # the blend: equally far from both, so equal weights on both prompts and ~none on the third
    w = torch.linalg.lstsq(targets.clip.T, new[2][:, None]).solution.flatten()
    assert abs(float(w[dog]) - float(w[rain])) < 0.02 and float(w[dog] + w[rain]) > 0.98
    assert torch.allclose(out.tensors["t5_sequence"], targets.t5[[rain, dog, dog]], atol=1e-2)
    # per row: a row's result does not depend on the other rows in its batch
    alone = target_soft(Conditioning({"clip_pooled": clip[2:], "t5_sequence": t5[2:]}), targets, sigma=0.25)
    assert torch.allclose(alone.tensors["clip_pooled"][0], new[2], atol=1e-5)
    # a wider sigma blends more; the dispatcher knows every name and refuses others
    wide = calibrate(Conditioning({"clip_pooled": clip[1:2], "t5_sequence": t5[1:2]}), targets, "target-soft", 2.0)
    assert (wide.tensors["clip_pooled"][0] - targets.clip[dog]).norm() > (new[1] - targets.clip[dog]).norm()
    with pytest.raises(ValueError, match="render.calibrate must be one of"):
        calibrate(out, targets, "nearest", 1.0)
    with pytest.raises(ValueError, match="calibrate-sigma"):
        target_soft(out, targets, 0.0)
    render_job(RenderContext.of(cfg_with()), 0, Conditioning({"clip_pooled": clip[:2], "t5_sequence": t5[:2]}), ["rain", "dog"], ["a", "b"], tmp_path / "soft", None, targets)
    assert {e["render_calibrate"] for e in read_manifest(tmp_path / "soft")} == {"target-soft"}  # the default


@pytest.fixture()
def run_dir(tmp_path):
    """A run directory as a federation leaves it: adapters, targets, class means, generators."""
    cfg = cfg_with()
    acfg = AdapterConfig.from_sections(cfg.adapter, cfg.audio_encoder, cfg.text_encoder, 768, 4096)
    adapters = Adapters.seeded(acfg, cfg.seed)
    run = tmp_path / "run"
    save_adapters(run / "checkpoints" / "adapters.safetensors", adapters, acfg.to_dict(), CLASSES, 3, "h", {})
    targets = ClassTensors(CLASSES, torch.randn(3, 768), torch.randn(3, 4, 4096))
    save_tensors(run / "targets.safetensors", {"clip": targets.clip, "t5": targets.t5},
                 {"type": "class-targets", "class-names": CLASSES})
    save_tensors(run / "class_means.safetensors", {"clip": torch.randn(3, 768), "t5": torch.randn(3, 4, 4096),
                                                    "counts": torch.tensor([4, 4, 4])}, {"type": "class-means", "class-names": CLASSES})
    spec = GeneratorSpec.from_config(cfg.generator, acfg.in_tokens, acfg.in_dim)
    bank = GeneratorBank.create(spec, "per_class", ["dog", "rain"], known_classes=CLASSES)
    x = torch.randn(12, acfg.in_tokens, acfg.in_dim)
    bank.train(x, torch.tensor([0] * 6 + [1] * 6), CLASSES,
               GeneratorTrainSettings(epochs=2, batch_size=4, lr=None, seed=0, min_steps=0))
    bank.save_pretrained(run / "generators", base="generator", node_id=2, round=3, checkpoint_every=1, encoder_key="key")
    return run


def test_generate_from_checkpoints_cli(run_dir, tmp_path):
    common = ["generate", "--adapters", str(run_dir / "checkpoints" / "adapters.safetensors"), "--set", "render.resolution=32",
              "--set", "render.steps=1"]
    out = tmp_path / "gen"
    assert cli_main(common + ["--out", str(out), "--generators", str(run_dir / "generators"), "--node", "2", "--n", "2"]) == 0
    assert sorted(p.name for p in (out / "node_2").glob("*_0*.png")) == ["dog_0001.png", "dog_0002.png", "rain_0001.png", "rain_0002.png"]
    sources = {e["source"] for e in read_manifest(out)}
    assert sources == {"generator:node2#1", "generator:node2#2", "generator:node2#3", "generator:node2#4"}
    assert cli_main(common + ["--out", str(out), "--source", "class-means", "--n", "1", "--classes", "siren"]) == 0
    assert (out / "server" / "siren_0001.png").is_file()
    assert cli_main(common + ["--out", str(out), "--source", "text", "--n", "1", "--oracle", "both"]) == 0
    lines = [json.loads(x) for x in (out / MANIFEST).read_text().splitlines()]
    assert {e["path"] for e in lines} >= {"node_2/dog_0001.png", "server/siren_0001.png", "server/rain_0001.png"}


def test_generate_with_missing_or_mismatched_checkpoints_is_a_clear_error(run_dir, tmp_path, caplog):
    adapters = str(run_dir / "checkpoints" / "adapters.safetensors")
    out = str(tmp_path / "o")
    assert cli_main(["generate", "--adapters", str(tmp_path / "nope.safetensors"), "--out", out]) == 2
    assert "nope.safetensors' does not exist" in caplog.text
    assert cli_main(["generate", "--adapters", adapters, "--out", out, "--generators", str(run_dir / "generators"), "--node", "5"]) == 2
    assert "no generator checkpoint 'generator_node5*.safetensors'" in caplog.text
    assert cli_main(["generate", "--adapters", adapters, "--out", out, "--generators", str(run_dir / "generators"),
                     "--node", "2", "--classes", "siren"]) == 2
    assert "missing generator for class(es) ['siren']" in caplog.text
    with pytest.raises(GeneratorCheckpointError, match="embedding-shape"):
        GeneratorBank.from_pretrained(run_dir / "generators", base="generator", node_id=2, expected_shape=(6, 256))
    assert cli_main(["generate", "--adapters", adapters, "--out", out, "--source", "text", "--targets",
                     str(run_dir / "class_means.safetensors")]) == 2
    assert "is not a class-targets file" in caplog.text


def tiny_clip_folder(path):
    """A tiny random CLIP (model + processor) saved like a real local CLIP folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from common.models.text_encoders import tiny_tokenizer

    tok = tiny_tokenizer("clip")
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, **ids),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}), tokenizer=tok)
    processor.save_pretrained(path)
    return path


def test_classification_scores_on_a_known_confusion():
    from common.render.scoring import classification_scores

    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 0, 1, 1, 1, 0, 2])
    s = classification_scores(pred, labels, 3)
    assert s["acc"] == pytest.approx(6 / 8)
    assert s["balanced_acc"] == pytest.approx((3 / 4 + 1 + 1 / 2) / 3)
    f1 = [2 * 3 / (6 + 1 + 1), 2 * 2 / (4 + 1 + 0), 2 * 1 / (2 + 0 + 1)]
    assert s["macro_f1"] == pytest.approx(sum(f1) / 3)


def test_zero_shot_metric_plumbing_and_skip_without_weights(tmp_path, caplog):
    import logging

    from common.render.jobs import score_owner

    render_job(RenderContext.of(cfg_with()), 1, random_cond(4), ["dog", "rain", "siren", "dog"], ["x"] * 4, tmp_path / "img", None)
    with caplog.at_level(logging.INFO):
        assert score_owner(RenderContext.of(cfg_with()), tmp_path / "img", "node_1", CLASSES) == {}
    assert "zero-shot CLIP image metric skipped" in caplog.text
    folder = tiny_clip_folder(tmp_path / "clip")
    scores = score_owner(RenderContext.of(cfg_with(**{"render.clip-metric-model": str(folder)})), tmp_path / "img", "node_1", CLASSES)
    assert set(scores) == {"image_zs_acc", "image_zs_balanced_acc", "image_zs_macro_f1", "images_scored",
                           "image_zs_acc:dog", "image_zs_acc:rain", "image_zs_acc:siren"}
    assert scores["images_scored"] == 4
    assert all(0.0 <= v <= 1.0 for k, v in scores.items() if k != "images_scored")


def test_server_renders_global_images_from_its_generator_or_the_class_means(tmp_path):
    from common.records import module_to_arrays
    from server_app.render import GlobalRenderer

    cfg = cfg_with(**{"num-rounds": 3, "render.images-per-class": 1})
    acfg = AdapterConfig.from_sections(cfg.adapter, cfg.audio_encoder, cfg.text_encoder, 768, 4096)
    targets = ClassTensors(CLASSES, torch.randn(3, 768), torch.randn(3, 4, 4096))
    renderer = GlobalRenderer(RenderContext.of(cfg), cfg.num_rounds, targets, Adapters.seeded(acfg, cfg.seed), tmp_path, "cpu")
    assert not renderer.due(2) and renderer.due(3)
    means = ClassTensors(["dog", "siren"], torch.randn(2, 768), torch.randn(2, 4, 4096), torch.tensor([3, 3]))
    metrics = renderer(3, None, means, None)
    assert metrics["server_images_rendered"] == 2
    assert {e["source"] for e in read_manifest(tmp_path / "images")} == {"class-mean"}
    bank = GeneratorBank.create(GeneratorSpec.from_config(cfg.generator, acfg.in_tokens, acfg.in_dim), "unified", CLASSES)
    renderer.run_dir = tmp_path / "with-bank"
    renderer(3, module_to_arrays(Adapters.seeded(acfg, cfg.seed)), means, bank)
    entries = read_manifest(tmp_path / "with-bank" / "images")
    assert sorted(e["class_name"] for e in entries) == CLASSES
    assert all(e["source"].startswith("server-generator#") and e["owner"] == "server" for e in entries)


def test_render_every_round_keeps_rounds_apart(tmp_path: Path) -> None:
    """render.when = "every": round r's images live in images/round_{r:03d}/ and are never skipped or overwritten."""
    from common.render.jobs import images_dir
    from common.report import RunData

    every = cfg_with(**{"render.when": "every"})
    final = cfg_with(**{"render.when": "final"})
    run = tmp_path / "run"
    assert images_dir(final.render, run, server_round=3) == run / "images"
    assert images_dir(every.render, run, server_round=3) == run / "images" / "round_003"
    for r in (1, 2):
        out = images_dir(every.render, run, server_round=r)
        report = render_job(RenderContext.of(every), 0, random_cond(2, seed=r), ["dog", "rain"], ["x", "y"], out, r)
        assert report.written == 2 and report.skipped == 0  # round 2 is not skipped because round 1 drew the same names
    for r in (1, 2):
        manifest = read_manifest(run / "images" / f"round_{r:03d}")
        assert {e["round"] for e in manifest} == {r} and len(manifest) == 2
    first = (run / "images" / "round_001" / "node_0" / "dog_0001.png").read_bytes()
    assert first != (run / "images" / "round_002" / "node_0" / "dog_0001.png").read_bytes()
    data = RunData.load(run)  # the report sees both rounds' sheets and one manifest of 4 images
    assert sorted((s.round, s.owner) for s in data.contact_sheets()) == [(1, "node_0"), (2, "node_0")]
    assert sorted(e["path"] for e in data.manifest)[0] == "round_001/node_0/dog_0001.png"
