"""Dataset readers by name: ``data.dataset`` picks one, everything downstream sees :class:`~.clips.Clip` records.

Adding a layout is one module with ``scan_<name>(root, classes, audio_dir) -> DatasetIndex`` and
``list_<name>_classes(root, audio_dir)``, registered here. The embedding cache, partitioners and training are
unchanged by it: clips are keyed by their path relative to the dataset root. (``synthetic`` is an ESC-50-layout
folder generated on first use, read by the ESC-50 reader.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .clips import DatasetError, DatasetIndex
from .esc50 import list_categories, scan_esc50
from .vegas import list_vegas_classes, scan_vegas
from .vggsound import list_vggsound_classes, scan_vggsound

__all__ = ["READERS", "Reader", "list_classes", "reader", "scan"]


@dataclass(frozen=True)
class Reader:
    scan: Callable[[Path, Sequence[str] | None, str], DatasetIndex]
    list_classes: Callable[[Path, str], list[str]]
    describe: str  # what the folder must hold, for error messages and docs


READERS: dict[str, Reader] = {
    "esc50": Reader(scan_esc50, list_categories, "meta/esc50.csv + audio/"),
    "synthetic": Reader(scan_esc50, list_categories, "an ESC-50-layout folder generated on first use"),
    "vegas": Reader(scan_vegas, list_vegas_classes, "<class>/audios/video_00000.wav (+ <class>/video_info.csv)"),
    "vggsound": Reader(scan_vggsound, list_vggsound_classes, "vggsound.csv (no header) + audio/{ytid}_{start:06d}.wav"),
}


def reader(dataset: str) -> Reader:
    try:
        return READERS[dataset]
    except KeyError:
        raise DatasetError(f"unknown dataset {dataset!r}; known: {', '.join(sorted(READERS))}") from None


def scan(dataset: str, root: Path, classes: Sequence[str] | None = None, audio_dir: str = "") -> DatasetIndex:
    return reader(dataset).scan(Path(root), classes, audio_dir)


def list_classes(dataset: str, root: Path, audio_dir: str = "") -> list[str]:
    return reader(dataset).list_classes(Path(root), audio_dir)
