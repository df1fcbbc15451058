"""The run report: what it shows for complete, failed and partial runs, that it is self-contained, and
that a real headless browser (Debian's chromium via selenium) loads every image and plot in it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ops.cli import main as cli_main
from common.render.images import contact_sheet
from common.report import REPORT_NAME, RunData, write_comparison, write_report

CLASSES = ["dog", "siren"]


def _node_train(pid: int, r: int, **extra: float) -> dict:
    return {"num-examples": 10, "partition_id": pid, "train_loss": 3.0 - 0.3 * r - 0.1 * pid, "train_loss_clip": 1.0,
            "train_loss_t5": 2.0, "cache_hits": 10 * (r > 1), "cache_misses": 10 * (r == 1),
            "extract_seconds": 1.5 * (r == 1), "load_seconds": 0.01, **extra}


def _node_eval(pid: int, r: int) -> dict:
    acc = min(1.0, 0.3 + 0.2 * r + 0.05 * pid)
    return {"num-examples": 4, "partition_id": pid, "test_retrieval_acc": acc, "test_retrieval_acc_clip": acc,
            "test_retrieval_acc_t5": acc, "val_retrieval_acc": acc, "test_loss": 2.0 / r, "val_loss": 2.1 / r}


def make_run(root: Path, name: str = "run-a", rounds: int = 3, status: str | None = "completed", nodes: int = 2) -> Path:
    """A run directory as the ServerApp leaves it (summary, config, checkpoints, images)."""
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    entries = []
    for r in range(1, rounds + 1):
        train_nodes = {str(p): _node_train(p, r, gen_fd_ratio=2.0 / r, gen_precision=0.5, gen_recall=0.4,
                                           gen_coverage=0.6, **{"gen_class_dog:fd_ratio": 1.5})
                       for p in range(nodes) if not (r == 2 and p == 1)}  # node 1 misses round 2
        entry = {
            "round": r,
            "train": {"global": {"train_loss": 2.5 - 0.2 * r, "kd_loss": 0.5 / r, "kd_seconds": 3.0},
                      "nodes": train_nodes},
            "server_training": {"kd": {"loss_clip": [0.5, 0.4, 0.3], "loss_t5": [0.9, 0.8, 0.7]}},
            "evaluate": {"global": {"test_retrieval_acc": 0.4 + 0.2 * r, "test_retrieval_acc_clip": 0.4 + 0.15 * r,
                                    "test_retrieval_acc_t5": 0.4 + 0.1 * r, "val_retrieval_acc": 0.5, "test_loss": 1.0},
                         "nodes": {str(p): _node_eval(p, r) for p in range(nodes)}},
        }
        if r == 2:
            entry["train"]["failures"] = ["node 8812: error code 0: node went away"]
            entry["train"]["rejected"] = ["node 77 (partition 1): non-finite weights"]
        entries.append(entry)
        save_file({"w": torch.zeros(2)}, str(run / "checkpoints" / f"adapters_round_{r}.safetensors"),
                  metadata={"round": str(r), "type": "adapters"})
    run_info = {"run_id": 1, "classes": CLASSES, "num_rounds": rounds, "aggregation": "kd", "config_hash": "abc",
                "started": "2026-12-01T00:00:00+0000", "versions": {"torch": "2.11.0"}}
    if status:
        run_info["status"] = status
    if status == "failed":
        run_info["error"] = "RuntimeError: quorum lost"
    final = {"round": rounds, **entries[-1]["evaluate"]["global"]} if status == "completed" else {}
    (run / "summary.json").write_text(json.dumps({"run": run_info, "rounds": entries, "final": final}))
    (run / "config.json").write_text(json.dumps({"seed": 7, "render": {"output-dir": ""}}))
    images = run / "images"
    lines = []
    for owner in [f"node_{p}" for p in range(nodes)] + ["server"]:
        for k, cls in enumerate(CLASSES):
            for i in (1, 2):
                path = images / owner / f"{cls}_{i:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (32, 32), (200 * k, 50 * i, 100)).save(path)
                lines.append(json.dumps({"owner": owner, "class_name": cls, "index": i, "round": rounds, "source": "text",
                                         "seed": i, "path": f"{owner}/{cls}_{i:04d}.png", "render_model": "tiny"}))
        (images / "manifest.jsonl").write_text("\n".join(lines) + "\n")
        contact_sheet(images, owner)
    return run


def data_images(html: str) -> list[str]:
    return re.findall(r'<img[^>]+src="(data:image/png;base64,[^"]+)"', html)


def test_report_of_a_complete_run_is_self_contained(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    path = write_report(run)
    assert path == run / REPORT_NAME
    html = path.read_text()
    # no network: no URL to any host, every <img> is a data URI
    assert not re.search(r'(src|href)="(https?:)?//', html), "the report references something outside itself"
    imgs = re.findall(r"<img[^>]+>", html)
    assert imgs and len(imgs) == len(data_images(html)), "an image is not embedded"
    for section in ("Final metrics", "Accuracy and losses per round", "Participation and failures", "Embedding cache",
                    "Generator quality", "Server training", "Images", "Checkpoints and artifacts", "Configuration and versions"):
        assert section in html, section
    # 3 contact sheets (node_0, node_1, server) with their class rows named
    assert html.count('alt="contact sheet') == 3
    assert "rows = dog, siren" in html
    # participation: node 1 missed round 2's training and was rejected; the failure text is listed
    assert "train rejected: non-finite weights" in html
    assert "node 8812: error code 0: node went away" in html
    # generator quality per node and class, server losses, manifest rows, checkpoints with rounds
    assert "gen" not in RunData.load(run).generator_quality()[0]  # keys are stripped of the gen_ prefix
    assert html.count("<td>dog</td>") >= 1
    assert "adapters_round_3.safetensors" in html
    assert html.count("text</td>") == 12  # manifest: 3 owners x 2 classes x 2 images
    assert "2.11.0" in html


def test_report_of_failed_partial_and_empty_runs(tmp_path: Path) -> None:
    failed = make_run(tmp_path, "failed", rounds=2, status="failed")
    html = write_report(failed).read_text()
    assert "failed" in html and "RuntimeError: quorum lost" in html and "2 of 2 rounds" in html

    killed = make_run(tmp_path, "killed", rounds=1, status=None)  # killed mid-run: no status, no final
    html = write_report(killed).read_text()
    assert "running or killed" in html and data_images(html)

    bare = tmp_path / "bare"  # killed before round 1 finished: only a truncated summary
    bare.mkdir()
    (bare / "summary.json").write_text('{"run": {"status"')
    html = write_report(bare).read_text()
    assert "summary.json: unreadable" in html and "config.json: missing" in html and "No round finished" in html

    with pytest.raises(Exception, match="does not exist"):
        write_report(tmp_path / "nope")


def test_report_cli_one_run_and_comparison(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = make_run(tmp_path, "run-a"), make_run(tmp_path / "other", "run-a", rounds=2, status="failed")
    assert cli_main(["report", str(a)]) == 0
    assert (a / REPORT_NAME).is_file()
    out = tmp_path / "cmp.html"
    assert cli_main(["report", str(a), str(b), "--out", str(out)]) == 0
    html = out.read_text()
    assert "2 runs compared" in html
    assert "run-a (tmp" in html or "run-a (" in html  # same names are told apart by their parent folder
    assert len(data_images(html)) == 5  # overlaid curves: test acc, CLIP, T5, val, train loss
    assert cli_main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _chromium() -> "webdriver.Chrome":  # noqa: F821
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver, ("the report test needs Debian's chromium and chromium-driver "
                               "(apt-get install chromium chromium-driver; .ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,2000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def test_report_loads_in_a_headless_browser(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    path = write_report(run)
    browser = _chromium()
    try:
        browser.set_page_load_timeout(60)
        browser.get(path.as_uri())
        assert browser.title == "feda2v run run-a"
        states = browser.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);")
        assert len(states) == len(data_images(path.read_text())) >= 8
        broken = [s for s in states if not (s[1] and s[2] > 0 and s[3] > 0)]
        assert not broken, f"images that did not load: {broken}"
        shot = tmp_path / "report.png"
        assert browser.save_screenshot(str(shot))
    finally:
        browser.quit()
    with Image.open(shot) as im:  # the page rendered something other than a blank sheet
        colours = im.convert("RGB").resize((64, 64)).getcolors(64 * 64)
    assert colours is not None and len(colours) > 20


def test_tensorboard_step_writes_scalars_and_images(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from server_app.round_state import NodeReplies, RoundState
    from server_app.tensorboard import TensorBoardStep

    run = make_run(tmp_path)
    step = TensorBoardStep(run / "tensorboard", lambda r: run / "images")
    for r in (1, 2):
        state = RoundState(r, None, NodeReplies(), metrics={"train_loss": 2.0 / r},
                           evaluate_metrics={"test_retrieval_acc": 0.4 * r}, evaluate_nodes={"0": {"test_retrieval_acc": 0.5}},
                           render_metrics={"server_images_rendered": 4.0} if r == 2 else {})
        step(state)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/train_loss", "evaluate/test_retrieval_acc", "node_0/test_retrieval_acc"} <= set(tags["scalars"])
    assert [e.value for e in events.Scalars("evaluate/test_retrieval_acc")] == pytest.approx([0.4, 0.8])
    assert set(tags["images"]) == {"images/node_0", "images/node_1", "images/server"}  # rendered round only


def test_tensorboard_missing_package_is_a_clear_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    import sys

    from server_app.tensorboard import open_writer

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    assert open_writer(tmp_path) is None
    assert "pip install 'feda2v[tensorboard]'" in caplog.text
