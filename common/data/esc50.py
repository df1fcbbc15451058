"""Reader for datasets in the ESC-50 layout.

The official ESC-50 release (and our synthetic stand-in, see :mod:`common.data.synth`) is a folder::

    root/
      meta/esc50.csv     filename,fold,target,category,esc10,src_file,take
      audio/<filename>   e.g. 1-100032-A-0.wav

The reader only turns that folder into :class:`Clip` records; decoding audio is :mod:`common.data.audio`'s job,
so listing a dataset stays cheap (no torch import, no file reads beyond the csv and ``stat``).

Labels are indices into the *selected* class list, never the csv ``target``: a run on 5 of the 50 classes needs
labels 0..4, and every node must derive the same mapping from the same configuration. (An earlier code base gave
every clip the first class's label, so the mapping is explicit and tested here.)
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

from .clips import Clip, DatasetError, DatasetIndex, dataset_files, finish_index, select_classes

logger = logging.getLogger(__name__)

ESC50_COLUMNS = ("filename", "fold", "target", "category", "esc10", "src_file", "take")
META_RELPATH = Path("meta") / "esc50.csv"
AUDIO_DIRNAME = "audio"


def _check_root(root: Path, audio_dir: str = "") -> tuple[Path, Path, Path]:
    root, meta, audio = dataset_files(root, f"an ESC-50-format folder with {META_RELPATH.as_posix()} and "
                                      f"{AUDIO_DIRNAME}/", META_RELPATH, audio_dir or AUDIO_DIRNAME, "ESC-50-format")
    return root, meta, audio  # type: ignore[return-value]


def _read_rows(meta: Path) -> list[dict[str, str]]:
    """Read the csv, insisting on the columns we use and naming the ones that are absent."""
    try:
        with meta.open(newline="", encoding="utf-8-sig") as handle:  # tolerate a BOM from spreadsheet tools
            reader = csv.DictReader(handle)
            header = [name.strip() for name in (reader.fieldnames or [])]
            missing = [col for col in ESC50_COLUMNS if col not in header]
            if missing:
                raise DatasetError(
                    f"{meta}: missing column(s) {', '.join(missing)}; "
                    f"expected {', '.join(ESC50_COLUMNS)}, found {', '.join(header) or 'no header'}"
                )
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{meta}: not a UTF-8 text csv ({exc})") from exc
    if not rows:
        raise DatasetError(f"{meta}: the csv has a header but no rows")
    return rows


def _parse_int(meta: Path, line: int, column: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DatasetError(f"{meta}, line {line}: column {column!r} must be an integer, got {value!r}") from None


def list_categories(root: Path, audio_dir: str = "") -> list[str]:
    """All categories of the dataset in csv order of first appearance (the default label order)."""
    _, meta, _ = _check_root(root, audio_dir)
    return _categories(_read_rows(meta))


def _categories(rows: list[dict[str, str]]) -> list[str]:
    return list(dict.fromkeys(row["category"] for row in rows))


def scan_esc50(root: Path, classes: Sequence[str] | None = None, audio_dir: str = "") -> DatasetIndex:
    """Like :func:`read_esc50` but also reports which csv rows had no file (for callers that count them)."""
    root, meta, audio = _check_root(root, audio_dir)
    rows = _read_rows(meta)
    class_names = select_classes(meta, _categories(rows), classes)
    label_of = {name: i for i, name in enumerate(class_names)}

    clips: list[Clip] = []
    missing: list[str] = []
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        category = row["category"]
        if category not in label_of:
            continue
        filename = row["filename"]
        if not filename or "/" in filename or "\\" in filename or filename in (".", ".."):
            raise DatasetError(f"{meta}, line {line}: column 'filename' must be a plain file name, got {filename!r}")
        if filename in seen:
            raise DatasetError(f"{meta}, line {line}: file {filename!r} is listed more than once")
        seen.add(filename)
        fold = _parse_int(meta, line, "fold", row["fold"])
        rel_path = f"{audio.name}/{filename}"
        path = audio / filename
        if not path.is_file():
            logger.debug("ESC-50 row skipped: audio file %s listed in %s does not exist", path, meta)
            missing.append(rel_path)
            continue
        clips.append(Clip(path=path, rel_path=rel_path, category=category, label=label_of[category], fold=fold))

    index = finish_index(root, audio, clips, class_names, missing, log=logger)
    logger.info("ESC-50 dataset %s: %d clips, %d classes", root, len(clips), len(class_names))
    return index


def read_esc50(root: Path, classes: Sequence[str] | None = None) -> tuple[list[Clip], list[str]]:
    """Read an ESC-50-format dataset.

    Returns ``(clips sorted by rel_path, class_names)``; ``clip.label`` indexes ``class_names``. ``classes=None``
    selects every category in csv order of first appearance, so the label order is stable across machines.
    Rows whose wav is absent are skipped with a warning naming each file (use :func:`scan_esc50` to get them);
    everything else that is wrong raises :class:`DatasetError`.
    """
    index = scan_esc50(root, classes)
    return index.clips, index.class_names
