"""Reader for VGGSound: ``vggsound.csv`` (no header) plus a folder of 10-s clips.

::

    root/
      vggsound.csv    youtube_id,start_seconds,label,split     (split: train | test; labels may hold commas
                      and parentheses, so they are quoted: ---g-f_I2yQ,1,"people marching",test)
      audio/          {ytid}_{start:06d}.wav or .flac, or {ytid}_{start_ms}_{end_ms}.wav / .flac

Every row gets the label of its own ``label`` column (an earlier reader gave every clip the first class's
label), and the official split travels with the clip: test is the official test set, validation is carved
from train only. The default label order is the sorted label set (VGGSound's convention), so every node
derives the same one. Rows whose clip is not on disk are counted as missing; malformed rows (wrong column
count, a non-integer start, an unknown split) are skipped and counted with their line number.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

from .clips import Clip, DatasetError, DatasetIndex, dataset_files, finish_index, select_classes

logger = logging.getLogger(__name__)

CSV_NAME = "vggsound.csv"
AUDIO_DIRNAME = "audio"
EXTENSIONS = (".wav", ".flac")
CLIP_SECONDS = 10
SPLITS = ("train", "test")


def _paths(root: Path, audio_dir: str) -> tuple[Path, Path, Path]:
    audio_dir = audio_dir or AUDIO_DIRNAME
    root, meta, audio = dataset_files(root, f"{CSV_NAME} and {audio_dir}/", CSV_NAME, audio_dir, "VGGSound-layout")
    return root, meta, audio  # type: ignore[return-value]


def _rows(meta: Path) -> tuple[list[tuple[int, str, int, str, str]], list[str]]:
    """(line, ytid, start, label, split) per good row; bad rows as 'line N: reason'."""
    good, bad = [], []
    try:
        with meta.open(newline="", encoding="utf-8-sig") as handle:
            for line, row in enumerate(csv.reader(handle), start=1):
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != 4:
                    bad.append(f"line {line}: {len(row)} columns, expected youtube_id,start_seconds,label,split")
                    continue
                ytid, start, label, split = (cell.strip() for cell in row)
                if line == 1 and not start.lstrip("-").isdigit():  # a header row some copies carry
                    continue
                try:
                    seconds = int(float(start))
                except ValueError:
                    bad.append(f"line {line}: start_seconds {start!r} is not a number")
                    continue
                if split not in SPLITS or not ytid or not label:
                    bad.append(f"line {line}: split {split!r} / youtube_id / label invalid")
                    continue
                good.append((line, ytid, seconds, label, split))
    except UnicodeDecodeError as err:
        raise DatasetError(f"{meta}: not a UTF-8 text csv ({err})") from err
    return good, bad


def list_vggsound_classes(root: Path, audio_dir: str = "") -> list[str]:
    """Every label in the csv, sorted (the default label order)."""
    _, meta, _ = _paths(root, audio_dir)
    good, _ = _rows(meta)
    if not good:
        raise DatasetError(f"{meta}: no usable rows")
    return sorted({row[3] for row in good})


def _candidates(ytid: str, start: int) -> list[str]:
    names = [f"{ytid}_{start:06d}", f"{ytid}_{start * 1000}_{(start + CLIP_SECONDS) * 1000}"]
    return [name + ext for name in names for ext in EXTENSIONS]


def scan_vggsound(root: Path, classes: Sequence[str] | None = None, audio_dir: str = "") -> DatasetIndex:
    """The clips of the selected classes that are on disk, each with its own row's label and split."""
    root, meta, audio = _paths(root, audio_dir)
    good, bad = _rows(meta)
    if not good:
        raise DatasetError(f"{meta}: no usable rows ({len(bad)} malformed; first: {'; '.join(bad[:3])})")
    class_names = select_classes(meta, sorted({row[3] for row in good}), classes)
    label_of = {name: i for i, name in enumerate(class_names)}
    on_disk = {p.name for p in audio.iterdir()}  # one listing instead of a stat per candidate name
    clips: list[Clip] = []
    missing: list[str] = []
    seen: set[str] = set()
    for line, ytid, start, label, split in good:
        if label not in label_of:
            continue
        name = next((n for n in _candidates(ytid, start) if n in on_disk), None)
        if name is None:
            missing.append(f"{ytid}_{start:06d}")
            continue
        rel_path = f"{audio.relative_to(root).as_posix()}/{name}"
        if rel_path in seen:
            bad.append(f"line {line}: {name} is listed more than once")
            continue
        seen.add(rel_path)
        clips.append(Clip(path=audio / name, rel_path=rel_path, category=label, label=label_of[label], fold=0,
                          source=ytid, split=split))
    if bad:
        logger.warning("%s: %d malformed row(s) skipped (first: %s)", meta, len(bad), "; ".join(bad[:3]))
    index = finish_index(root, audio, clips, class_names, missing, bad, log=logger)
    logger.info("VGGSound dataset %s: %d clips (%d train, %d test), %d classes", root, len(clips),
                sum(c.split == "train" for c in clips), sum(c.split == "test" for c in clips), len(class_names))
    return index
