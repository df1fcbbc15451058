"""The ``tiny-trained`` render preset and the picture classifier behind image accuracy from sound."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from common.config import load_config
from common.render.scoring import PictureScorer, per_class_accuracy, score_images
from common.records import ClassTensors
from common.render.backend import Conditioning
from common.render.flux import check_render_settings
from common.render.jobs import RenderContext, render_job, score_owner
from common.render.pictures import (PALETTE, SHAPES, class_look, class_pictures, nearest_colour, nearest_shape, picture,
                                    shape_mask)
from common.render.trained_preset import PRESET, Recipe, ensure_preset, preset_dir, preset_key, preset_stats

CLASSES = ["dog", "rain", "siren"]
FAST = Recipe(vae_steps=4, steps=4)  # plumbing only; what the preset draws is checked end to end


def targets(seed: int = 0, names: list[str] = CLASSES) -> ClassTensors:
    g = torch.Generator().manual_seed(seed)
    return ClassTensors(list(names), torch.randn(len(names), 768, generator=g), torch.randn(len(names), 4, 4096, generator=g))


def to_pil(x: torch.Tensor) -> Image.Image:
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def test_class_looks_are_distinct_and_read_back() -> None:
    looks = [class_look(i) for i in range(100)]
    assert len(set(looks)) == 100  # up to 100 classes the colour x shape pair is unique
    assert [c for c, _ in looks[:10]] == list(range(10)) and [s for _, s in looks[:10]] == list(range(10))
    masks = torch.stack([shape_mask(s, 64) for s in range(len(SHAPES))]).flatten(1).float()
    assert ((masks @ masks.T) / masks.sum(1)).fill_diagonal_(0).max() < 0.9  # no shape contains another
    pics = class_pictures(10, 64)
    assert pics.shape == (10, 3, 64, 64) and pics.min() >= -1 and pics.max() <= 1
    assert nearest_colour(pics).tolist() == list(range(10))
    assert nearest_shape(pics).tolist() == list(range(10))
    mixed = torch.stack([picture(c, (c + 3) % 10, 64) for c in range(10)])
    assert nearest_colour(mixed).tolist() == list(range(10))
    assert nearest_shape(mixed).tolist() == [(c + 3) % 10 for c in range(10)]


def test_picture_scorer_accuracy_per_class_and_branch(tmp_path: Path) -> None:
    scorer = PictureScorer(4, 64)
    right = [to_pil(picture(*class_look(i), 64)) for i in range(4)]
    assert scorer.predict(right).tolist() == [0, 1, 2, 3]
    # class 1's colour with class 2's shape: the CLIP branch said 1, the T5 branch said 2
    swapped = to_pil(picture(class_look(1)[0], class_look(2)[1], 64))
    assert scorer.branch_scores([swapped], torch.tensor([1])) == {"acc_clip": 1.0, "acc_t5": 0.0}
    assert scorer.branch_scores([swapped], torch.tensor([2])) == {"acc_clip": 0.0, "acc_t5": 1.0}
    # larger renders are compared at the picture resolution
    assert scorer.predict([right[3].resize((128, 128))]).tolist() == [3]
    assert per_class_accuracy(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), ["a", "b", "c"]) == {"acc:a": 0.5, "acc:b": 1.0}
    # score_images over a manifest: per owner and pooled
    names = ["dog", "rain", "siren", "wind"]
    entries = []
    for owner, images in (("node_0", right), ("server", [right[0], right[0]])):
        for i, im in enumerate(images):
            path = f"{owner}/{i}.png"
            (tmp_path / owner).mkdir(exist_ok=True)
            im.save(tmp_path / path)
            entries.append({"owner": owner, "class_name": names[i], "path": path})
    scores = score_images(scorer, tmp_path, entries, names, "")
    assert scores["node_0"]["acc"] == 1.0 and scores["node_0"]["acc_clip"] == 1.0 and scores["node_0"]["acc_t5"] == 1.0
    assert scores["server"]["acc"] == 0.5 and scores["server"]["acc:rain"] == 0.0 and scores["server"]["acc:dog"] == 1.0
    assert scores["all"]["n"] == 6.0


def test_preset_is_cached_by_key_and_loads_like_real_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = targets()
    assert preset_key(t, FAST) == preset_key(targets(), FAST)
    assert preset_key(t, FAST) != preset_key(targets(1), FAST)  # other targets (text encoder, prompts)
    assert preset_key(t, FAST) != preset_key(targets(0, ["dog", "rain", "wind"]), FAST)
    assert preset_key(t, FAST) != preset_key(t, dataclasses.replace(FAST, resolution=32))
    # two processes asking at once: one trains, both get the same folder
    results: list[Path] = []
    workers = [threading.Thread(target=lambda: results.append(ensure_preset(tmp_path, t, FAST))) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    folder = preset_dir(tmp_path, t, FAST)
    assert results == [folder, folder]
    assert {p.name for p in folder.iterdir()} >= {"transformer", "vae", "scheduler", "model_index.json", "preset.json"}
    stats = preset_stats(folder)
    assert stats["classes"] == CLASSES and stats["train_seconds"] >= 0 and stats["steps"] == 4
    mtime = (folder / "preset.json").stat().st_mtime
    assert ensure_preset(tmp_path, t, FAST) == folder and (folder / "preset.json").stat().st_mtime == mtime  # cache hit
    # the renderer loads it through FluxPipeline.from_pretrained, like a real FLUX.1 folder
    cfg = load_config({"render.model": PRESET, "render.resolution": 64, "cache-dir": str(tmp_path)})
    with pytest.raises(ValueError, match="needs the class text targets"):
        RenderContext.of(cfg).settings()
    cond = Conditioning({"clip_pooled": t.clip, "t5_sequence": t.t5})
    import common.render.jobs as jobs

    monkeypatch.setattr(jobs, "Recipe", lambda resolution: dataclasses.replace(FAST, resolution=resolution))
    jobs.cached_backend.cache_clear()
    report = render_job(RenderContext.of(cfg), None, cond, CLASSES, ["text"] * 3, tmp_path / "img", 1, t, per_class=1)
    jobs.cached_backend.cache_clear()
    assert report.written == 3
    with Image.open(tmp_path / "img" / "server" / "dog_0001.png") as im:
        assert im.size == (64, 64)
    scores = score_owner(RenderContext.of(cfg), tmp_path / "img", "server", CLASSES, server_round=1)
    assert set(scores) >= {"image_acc", "image_acc_clip", "image_acc_t5", "images_scored"} and scores["images_scored"] == 3
    assert score_owner(RenderContext.of(cfg), tmp_path / "img", "server", CLASSES, server_round=2) == {}  # no images of round 2


def test_preset_resolution_rule() -> None:
    check_render_settings(load_config({"render.model": PRESET, "render.resolution": 64}).render)
    with pytest.raises(Exception, match="multiple of 8"):
        check_render_settings(load_config({"render.model": PRESET, "render.resolution": 60}).render)
    assert len(PALETTE) == len(SHAPES) == 10


def test_preconditioner_keeps_the_targets_span_whitens_it_and_folds_into_a_plain_linear_layer() -> None:
    from common.render.trained_preset import Preconditioner

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 32, generator=g) @ torch.randn(32, 64, generator=g) + 5.0  # 6 targets in 64 dims
    pre = Preconditioner.fit(rows, min_scale=0.0)
    assert pre.basis.shape == (64, 5)  # 6 centred rows span 5 directions
    z = pre(rows) @ pre.basis
    assert torch.allclose(z.std(0, unbiased=False), torch.ones(5), atol=1e-4)  # whitened along the span
    noise = torch.randn(64, generator=g)
    off_span = noise - pre.basis @ (pre.basis.T @ noise)
    assert torch.allclose(pre(rows[:1] + off_span), pre(rows[:1]), atol=1e-4)  # noise outside the span: gone
    linear = torch.nn.Linear(64, 8)
    x = torch.randn(3, 64, generator=g)
    expected = linear(pre(x))
    pre.fold(linear)
    assert torch.allclose(linear(x), expected, atol=1e-4)
