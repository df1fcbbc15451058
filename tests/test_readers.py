"""The VEGAS and VGGSound readers (and the reader registry): layouts written by ``feda2v data synth --layout``
plus hand-made edge cases. Labels come from each clip's own row or folder; the official VGGSound split holds."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from common.config import load_config
from common.data.clips import DatasetError
from common.data.dataset import resolve_classes
from common.data.partition import partition_nodes, split_dataset
from common.data.readers import READERS, list_classes, scan
from common.data.synth import VGGSOUND_LABELS, synthesize_dataset
from common.data.vegas import scan_vegas
from common.data.vggsound import scan_vggsound

CLASSES = ["dog", "rooster", "siren", "engine"]


def _tone(path: Path, seconds: float = 1.0, sr: int = 16000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr,
             format="FLAC" if path.suffix == ".flac" else "WAV")


@pytest.fixture(scope="module")
def vegas_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize_dataset(tmp_path_factory.mktemp("vegas") / "VEGAS", CLASSES, clips_per_class=5,
                              clip_seconds=2.0, layout="vegas")


@pytest.fixture(scope="module")
def vgg_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize_dataset(tmp_path_factory.mktemp("vgg") / "vggsound", CLASSES, clips_per_class=10,
                              clip_seconds=2.0, layout="vggsound")


# ------------------------------------------------------------------ VEGAS
def test_vegas_classes_labels_and_varying_lengths(vegas_root: Path) -> None:
    index = scan_vegas(vegas_root)
    assert index.class_names == sorted(CLASSES)  # folder names, sorted: the default label order
    assert len(index.clips) == 20 and not index.skipped
    for clip in index.clips:
        assert clip.rel_path.startswith(f"{clip.category}/audios/video_")
        assert index.class_names[clip.label] == clip.category
        assert clip.source.startswith(f"{clip.category}/")  # the YouTube id from video_info.csv
    lengths = {round(sf.info(c.path).duration, 2) for c in index.clips}
    assert len(lengths) > 5 and max(lengths) <= 2.0  # clips of varying length, up to clip_seconds


def test_vegas_selection_order_unknown_class_and_skipped_files(tmp_path: Path, vegas_root: Path) -> None:
    index = scan("vegas", vegas_root, ["siren", "dog"])
    assert index.class_names == ["siren", "dog"] and {c.label for c in index.clips if c.category == "siren"} == {0}
    with pytest.raises(DatasetError, match="'chainsaw'.*available: dog, engine, rooster, siren"):
        scan("vegas", vegas_root, ["chainsaw"])
    root = tmp_path / "VEGAS"
    _tone(root / "dog" / "audios" / "video_00000.wav")
    _tone(root / "dog" / "audios" / "notes.wav")  # not video_<digits>.wav: skipped, counted
    (root / "dog" / "audios" / "video_00001.mp3").write_bytes(b"x")
    index = scan_vegas(root)
    assert len(index.clips) == 1 and len(index.skipped) == 2
    assert "notes.wav" in index.skipped[0] or "notes.wav" in index.skipped[1]
    (root / "cat" / "audios").mkdir(parents=True)
    with pytest.raises(DatasetError, match="cat have no video"):
        scan_vegas(root)
    _tone(root / "cat" / "sounds" / "video_00000.wav")
    assert len(scan_vegas(root, ["cat"], audio_dir="sounds").clips) == 1  # the audio folder is configurable


# ------------------------------------------------------------------ VGGSound
def test_vggsound_synth_layout_keeps_labels_and_official_split(vgg_root: Path) -> None:
    index = scan_vggsound(vgg_root)
    labels = sorted(VGGSOUND_LABELS[c] for c in CLASSES)
    assert index.class_names == labels  # sorted label set
    assert len(index.clips) == 40 and not index.missing
    assert {c.path.suffix for c in index.clips} == {".wav", ".flac"}  # both naming conventions found
    assert sum(c.split == "test" for c in index.clips) == 8


def test_vggsound_every_row_gets_its_own_label_and_val_never_touches_test(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "vgg"
    labels = ["dog barking", "engine accelerating, revving, vroom", "police car (siren)"]
    rows, expected = [], {}
    for i in range(30):
        label = labels[i % 3]
        ytid, start = f"vid{i:08d}", 10 * i
        split = "test" if i % 5 == 0 else "train"
        rows.append([ytid, start, label, split])
        if i == 7:
            continue  # listed, no file: counted as missing
        name = f"{ytid}_{start * 1000}_{(start + 10) * 1000}.flac" if i % 4 == 0 else f"{ytid}_{start:06d}.wav"
        _tone(root / "audio" / name)
        expected[name] = (label, split)
    rows.insert(3, ["broken", "not-a-number", "dog barking", "train"])
    rows.insert(9, ["short", "1"])
    with (root / "vggsound.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    assert '"engine accelerating, revving, vroom"' in (root / "vggsound.csv").read_text()  # quoted, as the real csv

    with caplog.at_level(logging.WARNING):
        index = scan("vggsound", root)
    assert len(index.clips) == len(expected) == 29 and len(index.missing) == 1 and len(index.skipped) == 2
    assert "malformed" in caplog.text and "missing on disk" in caplog.text
    for clip in index.clips:
        label, split = expected[clip.path.name]
        assert clip.category == label and index.class_names[clip.label] == label and clip.split == split
    assert len({c.label for c in index.clips}) == 3  # not every clip the first class's label

    parts = split_dataset(index.clips, 0.2, 0.2, seed=0)
    assert {c.path.name for c in parts["test"]} == {n for n, (_, s) in expected.items() if s == "test"}
    assert all(c.split == "train" for c in parts["val"] + parts["train"])
    assert not {c.rel_path for c in parts["val"]} & {c.rel_path for c in parts["test"]}
    nodes = partition_nodes(index.clips, index.class_names, 2, "iid", 0, 0.2, 0.2)
    assert sorted(c.rel_path for n in nodes for c in n.test) == sorted(c.rel_path for c in parts["test"])

    selected = scan("vggsound", root, ["police car (siren)"])
    assert selected.class_names == ["police car (siren)"] and all(c.label == 0 for c in selected.clips)


def test_vggsound_hostile_rows_are_skipped_counted_and_the_rest_is_read(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Non-finite, huge or negative starts, a line far over csv's 128 KiB field limit and a quoted field that
    runs past it over many lines are each a skipped row with its line number; the rows after them still count."""
    root = tmp_path / "vgg"
    lines = []
    for i in range(4):
        lines.append(f"good{i},{i},dog barking,train")
        _tone(root / "audio" / f"good{i}_{i:06d}.wav")
    bad = {  # line number (1-based, as written below) -> what the reason names
        5: "start_seconds 'inf'", 6: "start_seconds 'nan'", 7: "start_seconds '1e300'", 8: "start_seconds '-5'",
        9: "longer than", 10: "field larger than field limit",
    }
    lines += ["bad1,inf,dog barking,train", "bad2,nan,dog barking,train", "bad3,1e300,dog barking,train",
              "bad4,-5,dog barking,train", "huge,1,\"" + "x" * 300_000 + "\",train"]
    lines += ['quoted,1,"' + "\n".join("y" * 4000 for _ in range(40)) + '",train']  # lines 10-49, one field
    for i in range(4, 6):  # after the damage: still read
        lines.append(f"good{i},{i},engine idling,test")
        _tone(root / "audio" / f"good{i}_{i:06d}.wav")
    (root / "vggsound.csv").write_text("\n".join(lines) + "\n")

    with caplog.at_level(logging.WARNING):
        index = scan_vggsound(root)
    assert sorted(c.source for c in index.clips) == [f"good{i}" for i in range(6)]
    assert index.class_names == ["dog barking", "engine idling"]
    reasons = {int(s.split(":")[0].removeprefix("line ")): s for s in index.skipped}
    for line, what in bad.items():
        assert what in reasons.get(line, ""), (line, index.skipped)
    assert all(line <= 49 for line in reasons)  # the quoted field's remaining lines are counted, never the good rows
    assert "vggsound.csv" in caplog.text and "malformed row(s) skipped" in caplog.text and "line 5" in caplog.text


def test_vggsound_layout_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="vggsound.csv' is missing"):
        scan("vggsound", tmp_path)
    (tmp_path / "vggsound.csv").write_text("a,1,dog,train\n")
    with pytest.raises(DatasetError, match="audio directory"):
        scan("vggsound", tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset 'audioset'"):
        scan("audioset", tmp_path)


def test_config_reads_classes_through_the_registry(vegas_root: Path, vgg_root: Path) -> None:
    assert set(READERS) == {"esc50", "synthetic", "vegas", "vggsound"}
    cfg = load_config({"data.dataset": "vegas", "data.root": str(vegas_root), "data.num-classes": 2})
    assert resolve_classes(cfg.data, vegas_root) == ["dog", "engine"]
    assert list_classes("vggsound", vgg_root)[0] == "chicken crowing"
