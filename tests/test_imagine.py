"""Sound in, picture out: the pipeline from a run, its export and import, `feda2v imagine` on odd and bad
files, and the local page in a real browser."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from common.checkpoints import save_adapters
from common.config import load_config
from common.imagine.export import pipeline_from_run
from common.imagine.pipeline import AudioToImagePipeline, PipelineError
from common.models.adapters import AdapterConfig, Adapters
from common.records import CLASS_TARGETS, ClassTensors
from common.render import trained_preset
from common.render.trained_preset import Recipe, ensure_preset
from ops.cli import main as cli_main

CLASSES = ["dog", "rain", "siren"]
RATE = 16000
SETTINGS = {"render.model": "tiny-trained", "render.resolution": 32, "render.steps": 2, "render.batch-size": 4,
            "text-encoder.t5-tokens": 4, "adapter.hidden-dim": 32, "data.clip-seconds": 1.0, "seed": 3}


def tone(path: Path, freq: float, seconds: float, rate: int = RATE, channels: int = 1, subtype: str = "PCM_16") -> Path:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))
    sf.write(path, np.repeat(x[:, None], channels, axis=1) if channels > 1 else x, rate, subtype=subtype)
    return path


def make_run(root: Path, cache: Path, aggregation: str = "fedavg") -> Path:
    """A run folder as a federation leaves it: config.json, targets, final and best adapters; the render
    preset is trained (with a few steps: plumbing only) in ``cache`` under the key a real run would use."""
    cfg = load_config({**SETTINGS, "cache-dir": str(cache), "aggregation": aggregation})
    g = torch.Generator().manual_seed(0)
    targets = ClassTensors(CLASSES, torch.randn(3, 768, generator=g), torch.randn(3, 4, 4096, generator=g))
    acfg = AdapterConfig.from_sections(cfg.adapter, cfg.audio_encoder, cfg.text_encoder, 768, 4096)
    run = root / f"run-{aggregation}"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg.model_dump(by_alias=True)))
    targets.save(run / "targets.safetensors", CLASS_TARGETS, {"text-encoder": "tiny"})
    names = ["adapters", "adapters_best"] if aggregation != "none" else ["adapters_node0", "adapters_node2"]
    for i, name in enumerate(names):
        save_adapters(run / "checkpoints" / f"{name}.safetensors", Adapters.seeded(acfg, i), acfg.to_dict(), CLASSES, 2,
                      "h", {})
    fast = Recipe(resolution=32, vae_steps=4, steps=4)
    original = trained_preset.train_preset
    trained_preset.train_preset = lambda t, recipe: original(t, fast)
    try:
        ensure_preset(cache, targets, Recipe(resolution=32))
    finally:
        trained_preset.train_preset = original
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagine")
    return make_run(root, root / "cache")


@pytest.fixture(scope="module")
def sounds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sounds")
    tone(folder / "low.wav", 220, 1.5)
    (folder / "sub").mkdir()
    tone(folder / "sub" / "high.flac", 1800, 0.8, rate=44100, channels=2)
    return folder


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(im.convert("RGB")) for im in images]


def test_a_run_exports_a_pipeline_that_loads_elsewhere_and_draws_the_same(run: Path, sounds: Path, tmp_path: Path) -> None:
    files = [str(sounds / "low.wav"), str(sounds / "sub" / "high.flac")]
    own = pipeline_from_run(run)
    first = own(files, n=2)
    assert [c.source for c in first.clips] == files and not first.failed
    assert all(len(c.images) == 2 and c.images[0].size == (32, 32) for c in first.clips)
    assert {c.nearest for c in first.clips} <= set(CLASSES)
    assert all(-1 <= s <= 1 for c in first.clips for _, s in c.top) and first.clips[0].top[0][0] == first.clips[0].nearest
    out = tmp_path / "pipe"
    assert cli_main(["export", str(run), str(out)]) == 0
    spec = json.loads((out / "pipeline.json").read_text())
    assert spec["classes"] == CLASSES and spec["audio_encoder"]["bundled"] == "audio_encoder"
    assert spec["render"]["bundled"] == "render" and spec["provenance"]["checkpoint"] == "final"
    assert {p.name for p in out.iterdir()} == {"pipeline.json", "adapters.safetensors", "targets.safetensors",
                                              "audio_encoder", "render"}
    cache, away = run.parent / "cache" / "render", run.parent / "render-away"
    cache.rename(away)  # the pipeline is self-contained: it needs neither the run's cache nor the run
    try:
        loaded = AudioToImagePipeline.from_pretrained(out)
        again = loaded(files, n=2)
    finally:
        away.rename(cache)
    assert [c.nearest for c in again.clips] == [c.nearest for c in first.clips]
    assert [c.seeds for c in again.clips] == [c.seeds for c in first.clips]
    for a, b in zip(first.clips, again.clips):
        assert all(np.array_equal(x, y) for x, y in zip(pixels(a.images), pixels(b.images)))
    # a raw waveform at its own rate is the same clip as the file it came from
    wave, rate = sf.read(files[1], dtype="float32", always_2d=True)
    raw = loaded([torch.from_numpy(wave.T.copy())], n=1, sample_rate=rate)
    assert raw.clips[0].digest == again.clips[1].digest and raw.clips[0].nearest == again.clips[1].nearest
    # export again under the same name replaces it; the best adapters differ from the final ones
    assert cli_main(["export", str(run), str(out), "--checkpoint", "best"]) == 0
    best = AudioToImagePipeline.from_pretrained(out)
    assert best.provenance["checkpoint"] == "best"
    assert any(not torch.equal(a, b) for a, b in zip(best.adapters.state_dict().values(),
                                                     loaded.adapters.state_dict().values()))


def test_export_errors_name_what_is_wrong(run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert cli_main(["export", str(run), str(tmp_path / "p"), "--checkpoint", "ema"]) == 2
    assert "adapters_ema.safetensors' does not exist" in caplog.text
    assert cli_main(["export", str(run), str(tmp_path / "p"), "--node", "1"]) == 2
    assert "--node applies to standalone runs only" in caplog.text
    standalone = make_run(tmp_path, run.parent / "cache", aggregation="none")
    assert cli_main(["export", str(standalone), str(tmp_path / "p")]) == 2
    assert "choose one with --node (found: 0, 2)" in caplog.text
    assert cli_main(["export", str(standalone), str(tmp_path / "p"), "--node", "2"]) == 0
    assert json.loads((tmp_path / "p" / "pipeline.json").read_text())["provenance"]["checkpoint"] == "node2"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert cli_main(["export", str(run), str(busy)]) == 2
    assert "is not a pipeline folder: refusing to overwrite it" in caplog.text and (busy / "notes.txt").is_file()
    assert cli_main(["export", str(tmp_path / "nowhere"), str(tmp_path / "q")]) == 2
    assert "is not a run folder (no config.json)" in caplog.text


def test_a_folder_of_runs_stands_for_its_newest_completed_run(tmp_path: Path) -> None:
    from common.config import ConfigError
    from common.imagine.export import find_run

    outputs = tmp_path / "outputs"
    for name, status, when in (("old", "completed", 1000), ("new", "completed", 2000), ("going", "running", 3000)):
        run_dir = outputs / name
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "config.json").write_text("{}")
        (run_dir / "summary.json").write_text(json.dumps({"run": {"status": status}}))
        os.utime(run_dir / "summary.json", (when, when))
    assert find_run(outputs) == outputs / "new"  # a run still going on is passed over
    assert find_run(outputs / "going") == outputs / "going"  # named, it is used
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="is not a run folder .no config.json. and holds none"):
        find_run(tmp_path / "empty")


def test_a_pipeline_whose_parts_do_not_match_is_refused_naming_the_field(run: Path, tmp_path: Path) -> None:
    good = tmp_path / "good"
    pipeline_from_run(run).save_pretrained(good)

    def broken(edit) -> Path:
        folder = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(good, folder)
        edit(folder)
        return folder

    def edit_json(change):
        def apply(folder: Path) -> None:
            spec = json.loads((folder / "pipeline.json").read_text())
            change(spec)
            (folder / "pipeline.json").write_text(json.dumps(spec))
        return apply

    other = ClassTensors(["dog", "rain", "wind"], torch.randn(3, 768), torch.randn(3, 4, 4096))
    cases = [
        (lambda f: other.save(f / "targets.safetensors", CLASS_TARGETS), "targets.files_sha256"),
        (edit_json(lambda s: s.update(classes=["a", "b", "c"])), "differ from pipeline.json classes"),
        (edit_json(lambda s: s["audio_encoder"].update(bundled=None)), "audio_encoder.files_sha256"),
        (edit_json(lambda s: s["audio_encoder"].update(bundled="../elsewhere")), "audio_encoder.bundled"),
        (lambda f: (f / "audio_encoder" / "config.json").write_text("{}"), "audio_encoder.files_sha256"),
        (edit_json(lambda s: s["render"].update(preset_key="0" * 16)), "render.preset_key"),
        (edit_json(lambda s: s.update(version=99)), "version 99"),
        (edit_json(lambda s: s.pop("targets")), "field 'targets' is missing"),
        (lambda f: (f / "pipeline.json").write_text("{not json"), "not readable JSON"),
    ]
    for edit, words in cases:
        with pytest.raises(PipelineError, match=words.replace("(", r"\(").replace(".", r"\.")):
            AudioToImagePipeline.from_pretrained(broken(edit))
    # adapters of another audio encoder width: the field is named
    cfg = load_config({**SETTINGS})
    acfg = dataclasses.replace(AdapterConfig.from_sections(cfg.adapter, cfg.audio_encoder, cfg.text_encoder, 768, 4096),
                               in_dim=128)
    pipe = pipeline_from_run(run)
    with pytest.raises(PipelineError, match=r"adapters\.adapter_config\.in_dim is 128 but the audio_encoder hidden size is 256"):
        AudioToImagePipeline(pipe.encoder, Adapters.seeded(acfg, 0), pipe.targets, pipe.audio, pipe.encoder_spec,
                             pipe.render, pipe.render_model)
    with pytest.raises(PipelineError, match="no pipeline.json"):
        AudioToImagePipeline.from_pretrained(tmp_path / "nothing")


def odd_files(folder: Path) -> dict[str, str]:
    """Odd but usable files (name -> kind) and bad ones, all in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    tone(folder / "eight_bit.wav", 440, 1.2, subtype="PCM_U8")
    tone(folder / "rate_96k.wav", 440, 1.2, rate=96000)
    tone(folder / "six_channels.wav", 440, 1.2, channels=6)
    tone(folder / "short_0.2s.wav", 440, 0.2)
    tone(folder / "ten_minutes.wav", 300, 600.0)
    tone(folder / "first_second.wav", 300, 1.0)  # the ten-minute file's crop, on its own
    (folder / "empty.wav").write_bytes(b"")
    data = tone(folder / "whole.wav", 440, 1.0).read_bytes()
    (folder / "truncated.wav").write_bytes(data[: len(data) // 2])
    (folder / "whole.wav").unlink()
    (folder / "text.ogg").write_text("not audio at all\n")
    sf.write(folder / "no_frames.wav", np.zeros((0, 1)), RATE)
    return {"usable": "eight_bit rate_96k six_channels short_0.2s ten_minutes first_second",
            "bad": "empty truncated text no_frames"}


def test_imagine_reads_odd_files_and_skips_bad_ones_with_one_line_each(run: Path, tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    inputs = tmp_path / "in"
    kinds = odd_files(inputs)
    out = tmp_path / "out"
    args = ["imagine", str(inputs), str(tmp_path / "missing.wav"), "--run", str(run), "--out", str(out), "-n", "2",
            "--no-progress"]
    assert cli_main(args) == 0
    usable, bad = kinds["usable"].split(), kinds["bad"].split()
    assert sorted(p.stem for p in out.glob("*.png") if p.name != "contact_sheet.png") == sorted(
        f"{name}_{k:02d}" for name in usable for k in (1, 2))
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert len(skipped) == len(bad) + 1, skipped
    for name in bad:
        assert sum(name in line for line in skipped) == 1, (name, skipped)
    assert any("missing.wav: no such file or folder" in line for line in skipped)
    assert any("truncated" in line and "header declares" in line for line in skipped)
    assert f"{len(bad) + 1} file(s) skipped" in capsys.readouterr().out
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 2 * len(usable)
    entry = manifest[0]
    assert set(entry) >= {"path", "source", "nearest", "similarity", "top", "seed", "index", "clip_digest",
                          "render_model", "render_calibrate", "pipeline"}
    assert (out / "contact_sheet.png").is_file()
    by = {Path(e["source"]).stem: e for e in manifest if e["index"] == 1}
    # a ten-minute file is its first clip-seconds: the same clip, seeds and nearest class as that second alone
    assert by["ten_minutes"]["clip_digest"] == by["first_second"]["clip_digest"]
    assert by["ten_minutes"]["seed"] == by["first_second"]["seed"]
    # the same files into the same folder again: the same images, one manifest line per image
    before = {p.name: p.read_bytes() for p in out.glob("*_0[12].png")}
    assert cli_main(args) == 0
    assert {p.name: p.read_bytes() for p in out.glob("*_0[12].png")} == before
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 2 * len(usable)
    # a file over the size bound is refused before it is decoded, with the bound named
    assert cli_main(["imagine", str(inputs / "ten_minutes.wav"), "--run", str(run), "--out", str(tmp_path / "o2"),
                     "--max-file-mb", "1", "--no-progress"]) == 1
    assert "larger than data.max-file-mb=1" in caplog.text


def test_imagine_from_an_exported_pipeline_in_a_fresh_process(run: Path, sounds: Path, tmp_path: Path) -> None:
    pipe = tmp_path / "pipe"
    pipeline_from_run(run).save_pretrained(pipe)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "ops.cli", "imagine", str(sounds), "--pipeline", str(pipe), "--out",
                           str(out), "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 image(s) from 2 clip(s)" in proc.stdout
    assert sorted(p.name for p in out.glob("*_0?.png")) == ["low_01.png", "low_02.png", "sub__high_01.png",
                                                            "sub__high_02.png"]


# ------------------------------------------------------------------------------------------------ the page
def _chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver, "the page test needs Debian's chromium and chromium-driver (.ci/run installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


@pytest.fixture()
def page(run: Path, tmp_path: Path):
    """``feda2v serve --run RUN`` on a free loopback port; stopped by PID at the end."""
    import httpx

    from ops.launcher import free_port

    (run / "report.html").write_text("<!doctype html><title>feda2v run report</title><h1>report</h1>")
    (tmp_path / "secret.txt").write_text("outside the run")
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "serve", "--run", str(run), "--port", str(port),
                             "--max-upload-mb", "1", "--queue", "4"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):  # bounded: at most about 2 minutes for the model to load
            if proc.poll() is not None:
                break
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail("feda2v serve did not answer")
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_the_local_page_in_a_real_browser(page: str, sounds: Path, tmp_path: Path) -> None:
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _chromium()
    try:
        browser.set_page_load_timeout(60)
        browser.get(page)
        assert "sound in, picture out" in browser.title
        browser.find_element(By.ID, "audio").send_keys(str(sounds / "low.wav"))
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 120).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#result img.pic"))
        states = browser.execute_script("return Array.from(document.querySelectorAll('#result img.pic'))"
                                        ".map(i => [i.complete, i.naturalWidth]);")
        assert len(states) == 2 and all(done and width == 32 for done, width in states), states
        assert browser.find_element(By.ID, "nearest").text in CLASSES
        assert len(browser.find_elements(By.CSS_SELECTOR, "#top tr")) == 1 + 3
        bad = tmp_path / "bad.wav"
        bad.write_text("not audio")
        browser.find_element(By.ID, "audio").send_keys(str(bad))
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.ID, "error"))
        message = browser.find_element(By.ID, "error").text
        assert message.startswith("bad.wav: unreadable or not an audio file") and "Traceback" not in browser.page_source
        browser.get(page + "report")
        assert browser.title == "feda2v run report"
    finally:
        browser.quit()
    # too large an upload is refused before decoding; a path out of the run folder is not served
    big = httpx.post(page + "imagine", files={"audio": ("big.wav", b"\0" * (2 << 20), "audio/wav")}, timeout=60)
    assert big.status_code == 413 and "larger than 1 MiB" in big.text
    for path in ("run/../secret.txt", "run/%2e%2e/secret.txt", "run/..%2fsecret.txt", "run/config.json/../../secret.txt"):
        answer = httpx.get(page + path, timeout=10)
        assert answer.status_code == 404 and "outside the run" not in answer.text, path
    assert httpx.get(page + "run/config.json", timeout=10).status_code == 200
    # requests at once take turns on one model: all answered
    data = (sounds / "low.wav").read_bytes()
    answers: list[int] = []

    def post() -> None:
        answers.append(httpx.post(page + "imagine", files={"audio": ("low.wav", data, "audio/wav")}, timeout=120).status_code)

    workers = [threading.Thread(target=post) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert answers == [200, 200, 200]
