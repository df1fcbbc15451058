"""Reader for the VEGAS layout (the dataset of the user's notes): one folder per class.

::

    root/                       e.g. VEGAS/
      dog/
        audios/video_00000.wav  clips of varying length, up to 10 s
        video_info.csv          optional: YTID,start,end (one row per video; a `filename` column, or row k
                                describes video_{k:05d})
      chainsaw/ ...

The ten classes are baby_cry, chainsaw, dog, drum, fireworks, helicopter, printer, rail_transport, snoring
and water_flowing; the default label order is the sorted folder names, so every node derives the same one.
The audio folder name is configurable (``data.audio-dir``, default ``audios``). Files whose name is not
``video_<digits>.wav`` are skipped and counted; a class folder without audio is an error naming it. When
``video_info.csv`` gives a clip's YouTube id, clips of one video share a source (never split apart).
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Sequence
from pathlib import Path

from .clips import Clip, DatasetError, DatasetIndex, select_classes

logger = logging.getLogger(__name__)

VEGAS_CLASSES = ("baby_cry", "chainsaw", "dog", "drum", "fireworks", "helicopter", "printer", "rail_transport",
                 "snoring", "water_flowing")
AUDIO_DIRNAME = "audios"
INFO_FILENAME = "video_info.csv"
_CLIP_NAME = re.compile(r"^video_(?P<idx>\d+)\.wav$")


def _root(root: Path) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset root {str(root)!r} does not exist or is not a directory (expected a VEGAS folder "
                           "with <class>/audios/video_00000.wav)")
    return root.resolve()


def list_vegas_classes(root: Path, audio_dir: str = "") -> list[str]:
    """Class folders (those holding an audio folder), sorted: the default label order."""
    root = _root(root)
    audio_dir = audio_dir or AUDIO_DIRNAME
    classes = sorted(p.name for p in root.iterdir() if (p / audio_dir).is_dir())
    if not classes:
        raise DatasetError(f"{root}: no class folder with an {audio_dir}/ folder inside; not a VEGAS-layout dataset")
    return classes


def _video_info(path: Path) -> dict[str, str]:
    """``video_NNNNN`` stem -> YouTube id, from an optional ``video_info.csv`` (bad rows are skipped, counted)."""
    if not path.is_file():
        return {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except (UnicodeDecodeError, csv.Error) as err:
        logger.warning("%s is unreadable (%s): clips of this class are grouped by file", path, err)
        return {}
    sources: dict[str, str] = {}
    for k, row in enumerate(rows):
        row = {(key or "").strip().lower(): (value or "").strip() for key, value in row.items()}
        ytid = row.get("ytid") or row.get("youtube_id") or ""
        name = Path(row.get("filename", "")).stem or f"video_{k:05d}"
        if ytid:
            sources[name] = ytid
    return sources


def scan_vegas(root: Path, classes: Sequence[str] | None = None, audio_dir: str = "") -> DatasetIndex:
    """Every ``<class>/<audio_dir>/video_*.wav`` of the selected classes, labels in the selected order."""
    root = _root(root)
    audio_dir = audio_dir or AUDIO_DIRNAME
    class_names = select_classes(root, list_vegas_classes(root, audio_dir), classes)
    clips: list[Clip] = []
    skipped: list[str] = []
    for label, category in enumerate(class_names):
        folder = root / category / audio_dir
        sources = _video_info(root / category / INFO_FILENAME)
        for path in sorted(folder.iterdir()):
            rel_path = path.relative_to(root).as_posix()
            match = _CLIP_NAME.match(path.name)
            if not match or not path.is_file():
                skipped.append(f"{rel_path}: not a video_<digits>.wav file")
                continue
            source = sources.get(path.stem, "")
            clips.append(Clip(path=path, rel_path=rel_path, category=category, label=label, fold=0,
                              source=f"{category}/{source}" if source else ""))
    if skipped:
        logger.warning("VEGAS %s: %d file(s) skipped (first: %s)", root, len(skipped), "; ".join(skipped[:3]))
    empty = [name for name in class_names if not any(c.category == name for c in clips)]
    if empty:
        raise DatasetError(f"class(es) {', '.join(empty)} have no video_*.wav files under {root}/<class>/{audio_dir}")
    logger.info("VEGAS dataset %s: %d clips, %d classes", root, len(clips), len(class_names))
    return DatasetIndex(root=root, clips=clips, class_names=class_names, skipped=skipped)
