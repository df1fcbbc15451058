"""Tests for the data layer: ESC-50 reader, synthetic generator, audio loading, split and node partitioning.

Everything runs on tiny generated datasets (a few classes x a few 1-s clips) so the file stays fast on 2 cores.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from common.data import synth
from common.data.audio import AudioLoadError, LoadedAudio, load_clip, load_clips
from common.data.clips import Clip, DatasetError
from common.data.esc50 import ESC50_COLUMNS, list_categories, read_esc50, scan_esc50
from common.data.partition import (
    PARTITIONERS,
    NodeSplit,
    partition_nodes,
    register_partitioner,
    source_id,
    split_dataset,
)
from common.data.synth import (
    ESC50_TARGETS,
    PARAMS_FILENAME,
    SYNTH_CLASSES,
    ensure_synthetic_dataset,
    synthesize_clip,
    synthesize_dataset,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CLASSES = ["dog", "siren", "engine"]
TINY_CLIPS = 6


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 6 clips x 1 s at the official 44.1 kHz. Tests must not modify it (copy it first)."""
    return synthesize_dataset(tmp_path_factory.mktemp("tiny") / "esc", TINY_CLASSES, TINY_CLIPS, seed=0,
                              clip_seconds=1.0)


@pytest.fixture
def tiny_copy(tiny_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_root, tmp_path / "copy"))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _warnings(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == logger]


# ================================================================================================ ESC-50 reader
class TestReader:
    def test_reads_all_classes_in_csv_order(self, tiny_root: Path) -> None:
        clips, names = read_esc50(tiny_root)
        assert names == TINY_CLASSES
        assert len(clips) == len(TINY_CLASSES) * TINY_CLIPS
        assert [c.rel_path for c in clips] == sorted(c.rel_path for c in clips)
        for clip in clips:
            assert clip.path.is_absolute() and clip.path.is_file()
            assert clip.rel_path == f"audio/{clip.path.name}"
            assert names[clip.label] == clip.category
            assert 1 <= clip.fold <= 5
        assert list_categories(tiny_root) == TINY_CLASSES

    def test_labels_follow_the_selected_class_order_not_the_csv_target(self, tiny_root: Path) -> None:
        clips, names = read_esc50(tiny_root, ["engine", "dog"])
        assert names == ["engine", "dog"]
        assert {c.category for c in clips} == {"engine", "dog"}
        assert len(clips) == 2 * TINY_CLIPS
        assert all(c.label == (0 if c.category == "engine" else 1) for c in clips)
        # the csv target of engine is 44: labels must not be csv targets
        assert max(c.label for c in clips) == 1

    def test_missing_root(self, tmp_path: Path) -> None:
        with pytest.raises(DatasetError, match="nowhere"):
            read_esc50(tmp_path / "nowhere")

    def test_missing_csv_and_audio_dir(self, tiny_copy: Path) -> None:
        shutil.rmtree(tiny_copy / "audio")
        with pytest.raises(DatasetError, match="audio"):
            read_esc50(tiny_copy)
        (tiny_copy / "meta" / "esc50.csv").unlink()
        with pytest.raises(DatasetError, match="esc50.csv"):
            read_esc50(tiny_copy)

    def test_missing_columns_are_named(self, tiny_copy: Path) -> None:
        meta = tiny_copy / "meta" / "esc50.csv"
        rows = list(csv.DictReader(meta.open()))
        keep = [c for c in ESC50_COLUMNS if c not in ("fold", "take")]
        with meta.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, keep, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        with pytest.raises(DatasetError, match=r"fold, take"):
            read_esc50(tiny_copy)

    def test_bad_fold_value_names_line_and_column(self, tiny_copy: Path) -> None:
        meta = tiny_copy / "meta" / "esc50.csv"
        lines = meta.read_text().splitlines()
        first = lines[1].split(",")
        first[1] = "one"
        lines[1] = ",".join(first)
        meta.write_text("\n".join(lines) + "\n")
        with pytest.raises(DatasetError, match=r"line 2: column 'fold'"):
            read_esc50(tiny_copy)

    def test_unknown_class_is_named_with_available_ones(self, tiny_root: Path) -> None:
        with pytest.raises(DatasetError) as info:
            read_esc50(tiny_root, ["dog", "unicorn"])
        message = str(info.value)
        assert "unicorn" in message and "available" in message and "siren" in message

    def test_duplicate_and_malformed_class_requests(self, tiny_root: Path) -> None:
        with pytest.raises(DatasetError, match="more than once: dog"):
            read_esc50(tiny_root, ["dog", "siren", "dog"])
        with pytest.raises(DatasetError, match="string"):
            read_esc50(tiny_root, "dog")
        with pytest.raises(DatasetError, match="empty"):
            read_esc50(tiny_root, [])

    def test_missing_wavs_are_skipped_with_one_warning_each(self, tiny_copy: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
        clips, _ = read_esc50(tiny_copy)
        gone = [clips[0], clips[7]]
        for clip in gone:
            clip.path.unlink()
        with caplog.at_level(logging.WARNING):
            index = scan_esc50(tiny_copy)
        assert len(index.clips) == len(clips) - 2
        assert sorted(index.missing) == sorted(c.rel_path for c in gone)
        warnings = _warnings(caplog, "common.data.esc50")
        for clip in gone:
            assert sum(clip.path.name in w for w in warnings) == 1
        assert any("2 of 18" in w for w in warnings)
        # read_esc50 returns the same surviving clips
        assert read_esc50(tiny_copy)[0] == index.clips

    def test_class_with_no_files_left_is_an_error(self, tiny_copy: Path) -> None:
        for wav in (tiny_copy / "audio").glob("*-42.wav"):  # siren's ESC-50 target is 42
            wav.unlink()
        with pytest.raises(DatasetError, match="siren"):
            read_esc50(tiny_copy)


# ================================================================================================ synthetic data
class TestSynth:
    def test_class_list(self) -> None:
        assert len(SYNTH_CLASSES) >= 12
        assert len(set(SYNTH_CLASSES)) == len(SYNTH_CLASSES)
        assert set(SYNTH_CLASSES) <= set(ESC50_TARGETS)  # all real ESC-50 category names
        assert SYNTH_CLASSES[:10] == ("dog", "rooster", "siren", "engine", "rain", "clock_tick", "chirping_birds",
                                      "church_bells", "crackling_fire", "car_horn")
        assert synth.synth_classes(3) == ["dog", "rooster", "siren"]
        with pytest.raises(DatasetError):
            synth.synth_classes(len(SYNTH_CLASSES) + 1)

    def test_official_layout(self, tiny_root: Path) -> None:
        rows = list(csv.reader((tiny_root / "meta" / "esc50.csv").open()))
        assert tuple(rows[0]) == ESC50_COLUMNS
        body = [dict(zip(rows[0], r)) for r in rows[1:]]
        assert len(body) == len(TINY_CLASSES) * TINY_CLIPS
        wavs = sorted(p.name for p in (tiny_root / "audio").iterdir())
        assert wavs == sorted(r["filename"] for r in body)
        for row in body:
            assert row["filename"] == f"{row['fold']}-{row['src_file']}-{row['take']}-{row['target']}.wav"
            assert int(row["target"]) == ESC50_TARGETS[row["category"]]
            assert row["esc10"] == ("True" if row["category"] == "dog" else "False")
            assert row["take"] == "A"
            assert 1 <= int(row["fold"]) <= 5
        # folds are balanced per class, like the official release
        for name in TINY_CLASSES:
            folds = [int(r["fold"]) for r in body if r["category"] == name]
            assert sorted(set(folds)) == [1, 2, 3, 4, 5]
        info = sf.info(str(tiny_root / "audio" / wavs[0]))
        assert (info.samplerate, info.channels, info.frames, info.subtype, info.format) == \
            (44100, 1, 44100, "PCM_16", "WAV")
        params = json.loads((tiny_root / PARAMS_FILENAME).read_text())
        assert params["classes"] == TINY_CLASSES and params["clips_per_class"] == TINY_CLIPS
        assert not list(tiny_root.parent.glob(".esc.tmp-*"))  # the temporary build folder was renamed away

    def test_deterministic_by_seed(self, tmp_path: Path) -> None:
        kwargs = dict(clips_per_class=2, clip_seconds=0.5, sample_rate=16000)
        a = _files(synthesize_dataset(tmp_path / "a", ["rain", "dog"], seed=3, **kwargs))
        b = _files(synthesize_dataset(tmp_path / "b", ["rain", "dog"], seed=3, **kwargs))
        c = _files(synthesize_dataset(tmp_path / "c", ["rain", "dog"], seed=4, **kwargs))
        assert a == b
        wavs = [k for k in a if k.endswith(".wav")]
        assert all(a[k] != c[k] for k in wavs)
        # a clip does not depend on which other classes were generated with it
        d = _files(synthesize_dataset(tmp_path / "d", ["dog"], seed=3, **kwargs))
        assert all(d[k] == a[k] for k in d if k.endswith(".wav"))
        # the same command again on its own folder changes nothing; other parameters there are refused
        assert _files(synthesize_dataset(tmp_path / "a", ["rain", "dog"], seed=3, **kwargs)) == a
        with pytest.raises(DatasetError, match="already exists and is not empty"):
            synthesize_dataset(tmp_path / "a", ["rain", "dog"], seed=4, **kwargs)

    def test_clips_vary_within_a_class(self) -> None:
        for name in SYNTH_CLASSES:
            x = [synthesize_clip(name, i, 0, 1.0, 16000) for i in range(3)]
            assert all(np.isfinite(v).all() and 0.2 < np.abs(v).max() < 0.9 for v in x)
            corr = np.corrcoef(np.stack(x))
            assert np.abs(corr[np.triu_indices(3, 1)]).max() < 0.95, name

    def test_classes_are_distinguishable(self) -> None:
        sr, seconds, per_class = 16000, 2.0, 5

        def features(x: np.ndarray) -> tuple[np.ndarray, float, float]:
            frame, hop = 512, 256
            idx = np.arange(frame)[None, :] + hop * np.arange((len(x) - frame) // hop + 1)[:, None]
            power = np.abs(np.fft.rfft(x[idx] * np.hanning(frame), axis=1)) ** 2
            freqs = np.fft.rfftfreq(frame, 1 / sr)
            edges = np.geomspace(50, sr / 2, 17)
            bands = np.log(np.stack([power[:, (freqs >= lo) & (freqs < hi)].sum(1)
                                     for lo, hi in zip(edges[:-1], edges[1:])], 1) + 1e-10).mean(0)
            centroid = float(((power * freqs).sum(1) / (power.sum(1) + 1e-12)).mean())
            mag = np.sqrt(power)
            flux = float(np.sqrt((np.diff(mag, axis=0) ** 2).sum(1)).mean() / mag.sum(1).mean())
            loudness = np.log(power.sum(1) + 1e-10)
            return np.r_[bands - bands.max(), np.log(centroid), 10 * flux, loudness.std()], centroid, flux

        stats = {name: [features(synthesize_clip(name, i, 7, seconds, sr)) for i in range(per_class)]
                 for name in SYNTH_CLASSES}
        centroid = {name: np.array([s[1] for s in v]) for name, v in stats.items()}
        flux = {name: np.array([s[2] for s in v]) for name, v in stats.items()}
        # Simple statistics separate some pairs outright ...
        assert centroid["engine"].max() < centroid["rain"].min()
        assert centroid["engine"].mean() < 1000 < centroid["chirping_birds"].mean()
        assert flux["car_horn"].mean() < flux["clock_tick"].mean()
        # ... and a nearest-centroid classifier on crude features is far above chance (1/16) without being perfect
        # on the noisy classes -- learnable, not trivial.
        x = np.stack([s[0] for v in stats.values() for s in v])
        y = np.repeat(np.arange(len(SYNTH_CLASSES)), per_class)
        x = (x - x.mean(0)) / (x.std(0) + 1e-9)
        hits = 0
        for i in range(len(x)):
            others = np.arange(len(x)) != i
            centres = np.stack([x[others & (y == k)].mean(0) for k in range(len(SYNTH_CLASSES))])
            hits += int(np.argmin(((centres - x[i]) ** 2).sum(1)) == y[i])
        assert hits / len(x) > 0.35

    def test_invalid_requests(self, tmp_path: Path) -> None:
        with pytest.raises(DatasetError, match="unicorn"):
            synthesize_dataset(tmp_path / "x", ["dog", "unicorn"], 2)
        with pytest.raises(DatasetError, match="more than once"):
            synthesize_dataset(tmp_path / "x", ["dog", "dog"], 2)
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "something").write_text("mine")
        with pytest.raises(DatasetError, match="not empty"):
            synthesize_dataset(tmp_path / "full", ["dog"], 2)

    def test_ensure_generates_once_and_rejects_other_params(self, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
        root = tmp_path / "data"
        args = (["dog", "siren"], 2, 0)
        with caplog.at_level(logging.INFO, logger="common.data.synth"):
            assert ensure_synthetic_dataset(root, *args, clip_seconds=0.5) == root.absolute()
        assert sum("generating" in m for m in caplog.messages) == 1
        before = _files(root)
        stamp = (root / PARAMS_FILENAME).stat().st_mtime_ns
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="common.data.synth"):
            ensure_synthetic_dataset(root, *args, clip_seconds=0.5)
        assert not any("generating" in m for m in caplog.messages)
        assert (root / PARAMS_FILENAME).stat().st_mtime_ns == stamp and _files(root) == before
        with pytest.raises(DatasetError, match=r"clips_per_class.*data.root"):
            ensure_synthetic_dataset(root, ["dog", "siren"], 3, 0, clip_seconds=0.5)
        other = tmp_path / "not-synth"
        (other / "audio").mkdir(parents=True)
        with pytest.raises(DatasetError, match="not a synthetic dataset"):
            ensure_synthetic_dataset(other, *args, clip_seconds=0.5)

    def test_interrupted_generation_leaves_nothing_and_is_redone(self, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        root = tmp_path / "data"
        real = synth.synthesize_clip
        calls = {"n": 0}

        def failing(*a, **k):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt  # e.g. the user pressed Ctrl-C mid-generation
            return real(*a, **k)

        monkeypatch.setattr(synth, "synthesize_clip", failing)
        with pytest.raises(KeyboardInterrupt):
            ensure_synthetic_dataset(root, ["dog"], 4, 0, clip_seconds=0.25)
        assert not root.exists() and not list(tmp_path.glob(".data.tmp-*"))
        # a crash that could not clean up (power loss) leaves a tmp folder without the params file
        stale = tmp_path / ".data.tmp-crashed"
        (stale / "audio").mkdir(parents=True)
        monkeypatch.setattr(synth, "synthesize_clip", real)
        ensure_synthetic_dataset(root, ["dog"], 4, 0, clip_seconds=0.25)
        assert not stale.exists()
        assert len(read_esc50(root)[0]) == 4

    def test_ensure_is_safe_across_concurrent_processes(self, tmp_path: Path) -> None:
        root = tmp_path / "shared"
        code = textwrap.dedent(f"""
            import logging, sys
            logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
            from common.data.synth import ensure_synthetic_dataset
            ensure_synthetic_dataset({str(root)!r}, ["dog", "rain", "siren"], 3, 1, clip_seconds=0.5)
        """)
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path, stderr=subprocess.PIPE,
                                  text=True) for _ in range(3)]
        logs = [p.communicate(timeout=60)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], logs
        assert sum(log.count("generating synthetic") for log in logs) == 1, logs
        clips, names = read_esc50(root)
        assert names == ["dog", "rain", "siren"] and len(clips) == 9


# ================================================================================================ audio loading
def _write(path: Path, data: np.ndarray, sr: int, subtype: str = "PCM_16") -> Path:
    sf.write(str(path), data, sr, subtype=subtype)
    return path


def _clip(path: Path, category: str = "dog") -> Clip:
    return Clip(path=path, rel_path=f"audio/{path.name}", category=category, label=0, fold=1)


class TestAudio:
    def test_dataset_clip_is_mono_float32_at_target_rate(self, tiny_root: Path) -> None:
        clips, _ = read_esc50(tiny_root)
        wave = load_clip(clips[0].path, sample_rate=16000, clip_seconds=1.0)
        assert wave.dtype == torch.float32 and wave.shape == (16000,)
        assert 0.01 < wave.abs().max() <= 1.0
        assert load_clip(clips[0].path, sample_rate=8000, clip_seconds=5.0).shape == (40000,)

    def test_resampling_keeps_pitch_and_level(self, tmp_path: Path) -> None:
        t = np.arange(44100) / 44100
        path = _write(tmp_path / "sine.wav", 0.5 * np.sin(2 * np.pi * 440 * t), 44100, "FLOAT")
        wave = load_clip(path, sample_rate=16000, clip_seconds=1.0).numpy()
        spectrum = np.abs(np.fft.rfft(wave))
        assert abs(np.argmax(spectrum) * 16000 / len(wave) - 440) <= 1.0
        assert abs(np.abs(wave[1000:-1000]).max() - 0.5) < 0.02

    def test_stereo_is_averaged_to_mono(self, tmp_path: Path) -> None:
        rng = np.random.default_rng(0)
        left = rng.uniform(-0.5, 0.5, 16000)
        right = rng.uniform(-0.5, 0.5, 16000)
        path = _write(tmp_path / "stereo.wav", np.stack([left, right], 1), 16000, "FLOAT")
        wave = load_clip(path, sample_rate=16000, clip_seconds=1.0)
        expected = (left.astype(np.float32) + right.astype(np.float32)) / 2
        assert wave.shape == (16000,)
        np.testing.assert_allclose(wave.numpy(), expected, atol=1e-6)

    def test_pad_and_trim(self, tmp_path: Path) -> None:
        x = np.random.default_rng(1).uniform(-0.5, 0.5, 16000 * 2)
        path = _write(tmp_path / "long.wav", x, 16000, "FLOAT")
        np.testing.assert_allclose(load_clip(path, 16000, 1.0).numpy(), x[:16000].astype(np.float32), atol=1e-7)
        short = _write(tmp_path / "short.wav", x[:8000], 16000, "FLOAT")
        wave = load_clip(short, 16000, 1.0)
        assert wave.shape == (16000,)
        assert torch.all(wave[8000:] == 0) and wave[:8000].abs().sum() > 0
        assert load_clip(short, 16000, 0.3).shape == (4800,)

    @pytest.fixture
    def bad_files(self, tmp_path: Path) -> dict[str, Path]:
        corrupt = tmp_path / "corrupt.wav"
        corrupt.write_bytes(b"RIFF" + struct.pack("<I", 100) + b"WAVEfmt " + struct.pack("<I", 16) + b"\xff" * 16
                            + b"data" + struct.pack("<I", 64) + b"\x01" * 10)
        empty = tmp_path / "empty.wav"
        empty.write_bytes(b"")
        text = tmp_path / "text.wav"
        text.write_text("this is not audio\n" * 20)
        no_frames = _write(tmp_path / "noframes.wav", np.zeros(0), 16000)
        nan = _write(tmp_path / "nan.wav", np.array([0.1, np.nan, 0.2] * 100), 16000, "FLOAT")
        return {"corrupt": corrupt, "empty": empty, "text": text, "noframes": no_frames, "nan": nan,
                "missing": tmp_path / "missing.wav"}

    def test_bad_files_raise_audio_load_error_naming_the_file(self, bad_files: dict[str, Path]) -> None:
        reasons = {}
        for name, path in bad_files.items():
            with pytest.raises(AudioLoadError) as info:
                load_clip(path)
            assert info.value.path == path and str(path) in str(info.value)
            reasons[name] = info.value.reason
        assert "no audio frames" in reasons["noframes"]
        assert "non-finite" in reasons["nan"]
        assert "not found" in reasons["missing"]

    def test_load_clips_skips_bad_files_with_one_warning_each(self, tmp_path: Path, bad_files: dict[str, Path],
                                                              caplog: pytest.LogCaptureFixture) -> None:
        good = [_write(tmp_path / f"good{i}.wav", np.full(22050, 0.1 * (i + 1)), 22050) for i in range(2)]
        bad = [bad_files["corrupt"], bad_files["empty"], bad_files["text"]]
        clips = [_clip(good[0]), *(_clip(p) for p in bad), _clip(good[1])]
        with caplog.at_level(logging.WARNING):
            loaded = load_clips(clips, sample_rate=16000, clip_seconds=1.0)
        assert isinstance(loaded, LoadedAudio)
        assert loaded.waveforms.shape == (2, 16000) and loaded.waveforms.dtype == torch.float32
        assert loaded.clips == [clips[0], clips[-1]]
        assert [c.path for c, _ in loaded.skipped] == bad
        warnings = _warnings(caplog, "common.data.audio")
        assert len(warnings) == 3
        for path, message in zip(bad, warnings):
            assert path.name in message
        # rows are in kept order: the second good file is louder
        assert loaded.waveforms[0, 8000] == pytest.approx(0.1, abs=1e-3)
        assert loaded.waveforms[1, 8000] == pytest.approx(0.2, abs=1e-3)

    def test_load_clips_of_nothing(self) -> None:
        assert load_clips([], 16000, 1.0).waveforms.shape == (0, 16000)

    @pytest.mark.parametrize("rate, clip_seconds", [(44100, 5.0), (48000, 1.0), (22050, 2.5), (16000, 1.0)])
    def test_a_long_file_gives_the_crop_of_decoding_it_whole_from_the_frames_it_needs(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rate: int, clip_seconds: float) -> None:
        """Only the frames the crop needs are decoded, and the samples are those of the earlier whole-file path
        (decode everything, average channels, resample, keep the first clip_seconds)."""
        frames = rate * 30
        data = np.random.default_rng(rate).uniform(-0.8, 0.8, (frames, 2))
        path = _write(tmp_path / "long.wav", data, rate)
        whole, _ = sf.read(str(path), dtype="float32", always_2d=True)
        expected = torch.from_numpy(np.ascontiguousarray(whole.mean(axis=1, dtype=np.float32)))
        if rate != 16000:
            expected = torchaudio.transforms.Resample(rate, 16000)(expected)
        expected = expected[: int(round(clip_seconds * 16000))]
        read: list[int] = []
        original = sf.SoundFile.read

        def counting_read(self, frames=-1, *args, **kwargs):
            out = original(self, frames, *args, **kwargs)
            read.append(len(out))
            return out

        monkeypatch.setattr(sf.SoundFile, "read", counting_read)
        wave = load_clip(path, 16000, clip_seconds)
        assert torch.equal(wave, expected)
        assert read and sum(read) < frames // 4  # a fraction of the file, not all of it

    def test_file_over_max_mb_is_skipped_naming_the_file_and_the_key(self, tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
        small = _write(tmp_path / "small.wav", np.full(16000, 0.1), 16000)  # 31 KiB
        big = _write(tmp_path / "big.wav", np.full(16000 * 20, 0.1), 16000)  # 625 KiB
        with caplog.at_level(logging.WARNING):
            loaded = load_clips([_clip(small), _clip(big)], 16000, 1.0, max_mb=0.5)
        assert loaded.clips == [_clip(small)] and loaded.waveforms.shape == (1, 16000)
        assert [c.path for c, _ in loaded.skipped] == [big]
        assert "larger than data.max-file-mb=0.5" in loaded.skipped[0][1]
        assert big.name in _warnings(caplog, "common.data.audio")[0]
        assert load_clips([_clip(big)], 16000, 1.0, max_mb=1.0).clips == [_clip(big)]  # under the bound: read


# ================================================================================================ partitioning
def make_clips(classes: list[str], per_class: int, takes: int = 1) -> list[Clip]:
    """In-memory clips with ESC-50 file names; `takes` consecutive clips share one source recording."""
    clips = []
    for label, name in enumerate(classes):
        for i in range(per_class):
            src, take = 1000 * (label + 1) + i // takes, "ABCDEFGH"[i % takes]
            filename = f"{i % 5 + 1}-{src}-{take}-{label}.wav"
            clips.append(Clip(Path("/data/audio") / filename, f"audio/{filename}", name, label, i % 5 + 1))
    return clips


CLASSES = ["dog", "siren", "engine", "rain"]


def assert_partition_guarantees(nodes: list[NodeSplit], clips: list[Clip]) -> None:
    trains = [{c.rel_path for c in n.train} for n in nodes]
    for i in range(len(nodes)):
        for j in range(i + 1, len(nodes)):
            assert not trains[i] & trains[j], f"nodes {i} and {j} share training clips"
    all_train = set().union(*trains)
    for node in nodes:
        held_out = {c.rel_path for c in node.val + node.test}
        assert not held_out & all_train, "a val/test clip is in some node's train set"
        assert not {c.rel_path for c in node.val} & {c.rel_path for c in node.test}
        for part in (node.train, node.val, node.test):
            assert {c.category for c in part} <= set(node.classes)
    known = {c.rel_path for c in clips}
    assert all(c.rel_path in known for n in nodes for c in n.train + n.val + n.test)


class TestSplit:
    def test_stratified_disjoint_covering(self) -> None:
        clips = make_clips(CLASSES, 10)
        parts = split_dataset(clips, 0.1, 0.2, seed=0)
        assert set(parts) == {"train", "val", "test"}
        names = [c.rel_path for p in parts.values() for c in p]
        assert len(names) == len(set(names)) == len(clips)
        for name in CLASSES:
            counts = {k: sum(c.category == name for c in v) for k, v in parts.items()}
            assert counts == {"train": 7, "val": 1, "test": 2}

    def test_deterministic_and_seed_dependent(self) -> None:
        clips = make_clips(CLASSES, 10)
        a = split_dataset(clips, 0.1, 0.2, seed=0)
        assert a == split_dataset(list(reversed(clips)), 0.1, 0.2, seed=0)  # input order does not matter
        assert a["test"] != split_dataset(clips, 0.1, 0.2, seed=1)["test"]
        # a class's split does not depend on which other classes are present
        dog_only = split_dataset([c for c in clips if c.category == "dog"], 0.1, 0.2, seed=0)
        assert dog_only["test"] == [c for c in a["test"] if c.category == "dog"]

    def test_small_classes(self) -> None:
        parts = split_dataset(make_clips(["a", "b"], 3)[:-1], 0.1, 0.1, seed=0)  # a: 3 clips, b: 2
        per_class = {k: sorted(c.category for c in v) for k, v in parts.items()}
        assert per_class == {"train": ["a", "b", "b"], "val": ["a"], "test": ["a"]}
        assert len(split_dataset(make_clips(["a"], 3), 0.0, 0.5, seed=0)["test"]) == 2
        with pytest.raises(ValueError, match="sum to less than 1"):
            split_dataset(make_clips(["a"], 3), 0.5, 0.5, seed=0)

    def test_takes_of_one_recording_stay_in_one_split(self) -> None:
        clips = make_clips(CLASSES, 12, takes=3)
        assert len({source_id(c) for c in clips}) == 16
        for seed in range(5):
            parts = split_dataset(clips, 0.2, 0.2, seed=seed)
            where = {}
            for split, members in parts.items():
                for clip in members:
                    assert where.setdefault(source_id(clip), split) == split
            for name in CLASSES:
                assert all(any(c.category == name for c in parts[s]) for s in parts)


class TestPartition:
    def test_iid(self) -> None:
        clips = make_clips(CLASSES, 20)
        nodes = partition_nodes(clips, CLASSES, 3, "iid", seed=0, val_fraction=0.1, test_fraction=0.2)
        assert len(nodes) == 3
        assert_partition_guarantees(nodes, clips)
        assert all(n.classes == CLASSES for n in nodes)
        global_split = split_dataset(clips, 0.1, 0.2, seed=0)
        for split in ("train", "val", "test"):
            union = sorted((c for n in nodes for c in getattr(n, split)), key=lambda c: c.rel_path)
            assert union == global_split[split]  # nothing lost, nothing duplicated
            totals = [len(getattr(n, split)) for n in nodes]
            assert max(totals) - min(totals) <= 1
            for name in CLASSES:
                per_node = [sum(c.category == name for c in getattr(n, split)) for n in nodes]
                assert max(per_node) - min(per_node) <= 1

    def test_deterministic_and_seed_dependent(self) -> None:
        clips = make_clips(CLASSES, 20)
        args = dict(num_nodes=3, mode="iid", val_fraction=0.1, test_fraction=0.2)
        a = partition_nodes(clips, CLASSES, seed=5, **args)
        assert a == partition_nodes(clips, CLASSES, seed=5, **args)
        assert [n.train for n in a] != [n.train for n in partition_nodes(clips, CLASSES, seed=6, **args)]

    def test_explicit_with_overlapping_classes(self) -> None:
        clips = make_clips(CLASSES, 20)
        node_classes = [["siren", "dog"], ["siren", "engine"], ["engine", "dog", "rain"]]
        nodes = partition_nodes(clips, CLASSES, 3, "explicit", seed=0, val_fraction=0.1, test_fraction=0.2,
                                node_classes=node_classes)
        assert_partition_guarantees(nodes, clips)
        assert [n.classes for n in nodes] == [["dog", "siren"], ["siren", "engine"], ["dog", "engine", "rain"]]
        global_train = split_dataset(clips, 0.1, 0.2, seed=0)["train"]
        for name, owners in {"siren": [0, 1], "dog": [0, 2], "engine": [1, 2], "rain": [2]}.items():
            expected = {c.rel_path for c in global_train if c.category == name}
            shares = [{c.rel_path for c in nodes[i].train if c.category == name} for i in owners]
            assert set().union(*shares) == expected
            assert all(abs(len(s) - len(expected) / len(owners)) <= 1 for s in shares)
        assert partition_nodes(clips, CLASSES, 3, "explicit", seed=0, val_fraction=0.1, test_fraction=0.2,
                               node_classes=node_classes) == nodes

    def test_explicit_samples_per_class_caps_training_clips(self, caplog: pytest.LogCaptureFixture) -> None:
        clips = make_clips(CLASSES, 20)
        node_classes = [CLASSES, ["dog", "rain"]]
        uncapped = partition_nodes(clips, CLASSES, 2, "explicit", 0, 0.1, 0.2, node_classes=node_classes)
        with caplog.at_level(logging.INFO, logger="common.data.partition"):
            capped = partition_nodes(clips, CLASSES, 2, "explicit", 0, 0.1, 0.2, node_classes=node_classes,
                                     node_samples_per_class=[3, None])
        assert_partition_guarantees(capped, clips)
        for name in CLASSES:
            assert sum(c.category == name for c in capped[0].train) == 3
        assert {c.rel_path for c in capped[0].train} < {c.rel_path for c in uncapped[0].train}
        assert capped[1] == uncapped[1] and capped[0].test == uncapped[0].test
        assert any("capped at 3" in m for m in caplog.messages)

    def test_explicit_errors_name_node_and_class(self) -> None:
        clips = make_clips(CLASSES, 6)
        run = lambda **kw: partition_nodes(clips, CLASSES, 2, "explicit", 0, 0.1, 0.2, **kw)  # noqa: E731
        with pytest.raises(DatasetError, match=r"node 1: class\(es\) 'unicorn'"):
            run(node_classes=[["dog"], ["siren", "unicorn"]])
        with pytest.raises(DatasetError, match="one entry per node"):
            run(node_classes=[["dog"]])
        with pytest.raises(DatasetError, match="node 0: class.*more than once"):
            run(node_classes=[["dog", "dog"], ["siren"]])
        with pytest.raises(DatasetError, match="needs node_classes"):
            run()
        with pytest.raises(DatasetError, match="node 1: samples per class"):
            run(node_classes=[["dog"], ["siren"]], node_samples_per_class=[None, 0])

    def test_unknown_mode_and_pluggable_registry(self, monkeypatch: pytest.MonkeyPatch) -> None:
        clips = make_clips(CLASSES, 6)
        with pytest.raises(ValueError, match="'by-moon-phase'"):
            partition_nodes(clips, CLASSES, 2, "by-moon-phase", 0, 0.1, 0.2)
        monkeypatch.setattr("common.data.partition.PARTITIONERS", dict(PARTITIONERS))

        @register_partitioner("first-takes-all")
        def _first(splits, class_names, num_nodes, seed, **_):  # type: ignore[no-untyped-def]
            return [NodeSplit(splits["train"], splits["val"], splits["test"], list(class_names))] + [
                NodeSplit([], [], [], list(class_names)) for _ in range(num_nodes - 1)]

        from common.data import partition

        assert "first-takes-all" in partition.PARTITIONERS and "first-takes-all" not in PARTITIONERS
        nodes = partition_nodes(clips, CLASSES, 2, "first-takes-all", 0, 0.1, 0.2)
        assert len(nodes[0].train) == len(split_dataset(clips, 0.1, 0.2, 0)["train"]) and not nodes[1].train

    @pytest.mark.parametrize("alpha", [0.1, 1.0])
    def test_dirichlet_label_skew_keeps_the_guarantees(self, alpha: float) -> None:
        classes = [f"class{i}" for i in range(8)]
        clips = make_clips(classes, 20, takes=2)
        args = dict(seed=3, val_fraction=0.1, test_fraction=0.2, dirichlet_alpha=alpha, min_partition_size=2)
        nodes = partition_nodes(clips, classes, 4, "dirichlet", **args)
        assert_partition_guarantees(nodes, clips)
        global_split = split_dataset(clips, 0.1, 0.2, seed=3)
        union = sorted((c for n in nodes for c in n.train), key=lambda c: c.rel_path)
        assert union == global_split["train"]  # every train clip is used exactly once
        assert all(len(n.train) >= 2 for n in nodes)
        for node in nodes:  # a node evaluates only classes it trains on, and every one of them
            assert node.classes == sorted({c.category for c in node.train}, key=classes.index)
        assert nodes == partition_nodes(clips, classes, 4, "dirichlet", **args)  # seeded
        assert [n.train for n in nodes] != [n.train for n in partition_nodes(clips, classes, 4, "dirichlet",
                                                                            **{**args, "seed": 4})]

    def test_dirichlet_alpha_controls_skew(self) -> None:
        classes = [f"class{i}" for i in range(10)]
        clips = make_clips(classes, 30)
        held = {alpha: sum(len(n.classes) for n in partition_nodes(clips, classes, 5, "dirichlet", seed=0,
                                                                    val_fraction=0.1, test_fraction=0.2,
                                                                    dirichlet_alpha=alpha, min_partition_size=1))
                for alpha in (0.05, 100.0)}
        assert held[0.05] < held[100.0] == 50  # near-IID with a large alpha: every node holds every class

    def test_pathological_gives_each_node_its_classes(self) -> None:
        classes = [f"class{i}" for i in range(6)]
        clips = make_clips(classes, 20)
        nodes = partition_nodes(clips, classes, 3, "pathological", seed=0, val_fraction=0.1, test_fraction=0.2,
                                classes_per_node=2)
        assert_partition_guarantees(nodes, clips)
        assert all(len(n.classes) == 2 for n in nodes)
        assert [n.classes[0] for n in nodes] == classes[:3]  # first-deterministic: node i's first class is class i
        covering = partition_nodes(clips, classes, 6, "pathological", seed=0, val_fraction=0.1, test_fraction=0.2,
                                   classes_per_node=1)
        assert sorted(c for n in covering for c in n.classes) == classes  # nodes x k covers every class
        with pytest.raises(DatasetError, match="classes-per-node"):
            partition_nodes(clips, classes, 3, "pathological", seed=0, val_fraction=0.1, test_fraction=0.2,
                            classes_per_node=7)

    def test_dirichlet_that_cannot_fill_every_node_names_the_setting(self) -> None:
        clips = make_clips(CLASSES, 5)
        with pytest.raises(DatasetError, match="min-partition-size"):
            partition_nodes(clips, CLASSES, 4, "dirichlet", seed=0, val_fraction=0.1, test_fraction=0.2,
                            dirichlet_alpha=0.1, min_partition_size=10)

    def test_rejects_clips_outside_class_names(self) -> None:
        with pytest.raises(DatasetError, match="rain"):
            partition_nodes(make_clips(CLASSES, 6), CLASSES[:3], 2, "iid", 0, 0.1, 0.2)


def test_end_to_end_reader_partition_audio(tiny_root: Path) -> None:
    """The path a client takes: read the dataset, take its node's share, decode the training clips."""
    clips, names = read_esc50(tiny_root)
    nodes = partition_nodes(clips, names, 2, "iid", seed=0, val_fraction=0.2, test_fraction=0.2)
    assert_partition_guarantees(nodes, clips)
    loaded = load_clips(nodes[0].train, sample_rate=16000, clip_seconds=1.0)
    assert loaded.waveforms.shape == (len(nodes[0].train), 16000) and not loaded.skipped
    assert torch.isfinite(loaded.waveforms).all()
