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
count, a start that is not a finite number of seconds within :data:`MAX_START_SECONDS`, an unknown split, a line
longer than :data:`MAX_LINE_CHARS` or one the csv module cannot parse) are skipped and counted with their line
number, and the rest of the file is read: one malformed row never ends the scan.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from .clips import Clip, DatasetError, DatasetIndex, dataset_files, finish_index, select_classes

logger = logging.getLogger(__name__)

CSV_NAME = "vggsound.csv"
AUDIO_DIRNAME = "audio"
EXTENSIONS = (".wav", ".flac")
CLIP_SECONDS = 10
SPLITS = ("train", "test")
MAX_START_SECONDS = 86_400  # a YouTube video is at most 12 hours long; a larger start is a broken row
# A VGGSound row is under 200 characters. Longer lines are skipped without being held in memory whole, and the
# bound stays below csv's field_size_limit (128 KiB), whose error would otherwise end the scan.
MAX_LINE_CHARS = 4096
_ENDS = ("\n", "\r")  # line ends as read with newline="" (kept untranslated for the csv module)


def _paths(root: Path, audio_dir: str) -> tuple[Path, Path, Path]:
    audio_dir = audio_dir or AUDIO_DIRNAME
    root, meta, audio = dataset_files(root, f"{CSV_NAME} and {audio_dir}/", CSV_NAME, audio_dir, "VGGSound-layout")
    return root, meta, audio  # type: ignore[return-value]


def _bounded_lines(handle: TextIO, oversized: set[int]) -> Iterator[str]:
    """The lines of ``handle``, each read at most :data:`MAX_LINE_CHARS` at a time: a longer line is
    consumed in pieces, noted in ``oversized`` (its line number) and replaced by an empty line, so the
    csv reader's line numbers stay right and memory stays bounded whatever the file holds."""
    number = 0
    while True:
        line = handle.readline(MAX_LINE_CHARS + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_LINE_CHARS and not line.endswith(_ENDS):
            while line and not line.endswith(_ENDS):  # the rest of this line, never held whole
                line = handle.readline(MAX_LINE_CHARS + 1)
            oversized.add(number)
            yield "\n"
            continue
        yield line


def _start_seconds(start: str) -> tuple[int | None, str]:
    """``start_seconds`` as whole seconds, or ``None`` and why not (inf, nan, 1e300, negative: a broken row
    that would otherwise overflow or name a file that cannot exist)."""
    try:
        value = float(start)
    except ValueError:
        return None, f"start_seconds {start[:40]!r} is not a number"
    if not math.isfinite(value) or not 0 <= value <= MAX_START_SECONDS:
        return None, f"start_seconds {start[:40]!r} is not a finite number of seconds from 0 to {MAX_START_SECONDS}"
    return int(value), ""


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _row(line: int, row: list[str]) -> tuple[tuple[int, str, int, str, str] | None, str]:
    """One csv row as (line, ytid, start, label, split), or ``None`` and the reason ('' for a header row)."""
    if len(row) != 4:
        return None, f"{len(row)} columns, expected youtube_id,start_seconds,label,split"
    ytid, start, label, split = (cell.strip() for cell in row)
    seconds, problem = _start_seconds(start)
    if seconds is None:
        return None, "" if line == 1 and not _is_number(start) else problem  # '': the header some copies carry
    if split not in SPLITS or not ytid or not label:
        return None, f"split {split[:40]!r} / youtube_id / label invalid"
    return (line, ytid, seconds, label, split), ""


def _rows(meta: Path) -> tuple[list[tuple[int, str, int, str, str]], list[str]]:
    """(line, ytid, start, label, split) per good row; bad rows as 'line N: reason'."""
    good, bad = [], []
    oversized: set[int] = set()
    try:
        with meta.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(_bounded_lines(handle, oversized))
            while True:
                line = reader.line_num + 1  # where this row starts (a quoted field may span lines)
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as err:  # e.g. a quoted field over csv's field_size_limit: this row only
                    bad.append(f"line {line}: {err} (at line {reader.line_num})")
                    continue
                if line in oversized:
                    bad.append(f"line {line}: longer than {MAX_LINE_CHARS} characters")
                    continue
                if not row or all(not cell.strip() for cell in row):
                    continue
                parsed, problem = _row(line, row)
                if parsed is not None:
                    good.append(parsed)
                elif problem:
                    bad.append(f"line {line}: {problem}")
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
