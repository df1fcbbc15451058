"""What every dataset reader produces: :class:`Clip` records, a :class:`DatasetIndex`, and the class selection
rules all readers share (labels index the *selected* class list, in the order the user gave).

An earlier code base gave every clip of a multi-class VGGSound csv the first class's label and validated
on the test files; here a clip's label comes from its own row, and a dataset's official split (VGGSound's
train/test column) travels with the clip so that validation is carved from train only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import FedA2VError

logger = logging.getLogger(__name__)

__all__ = ["Clip", "DatasetError", "DatasetIndex", "dataset_files", "finish_index", "select_classes"]


class DatasetError(FedA2VError, ValueError):
    """A problem with a dataset the user pointed us at; the message names the file, column or class."""


@dataclass(frozen=True)
class Clip:
    """One labelled audio file.

    ``rel_path`` (posix, relative to the dataset root) is the clip's identity: it does not change when the dataset
    folder moves, so caches keyed by it survive a relocation. ``source`` groups clips cut from one recording
    (a YouTube id; empty: derived from the file name), so that they never straddle train and test. ``split``
    is the dataset's official split ("train"/"test"), empty when it has none.
    """

    path: Path
    rel_path: str
    category: str
    label: int
    fold: int
    source: str = ""
    split: str = ""


@dataclass
class DatasetIndex:
    """Everything a reader found: the kept clips, the label order, and what it skipped (counted, not lost)."""

    root: Path
    clips: list[Clip]
    class_names: list[str]
    missing: list[str] = field(default_factory=list)  # listed in the metadata but absent on disk
    skipped: list[str] = field(default_factory=list)  # present but unusable (bad name, bad row), with the reason


def select_classes(source: Path | str, available: Sequence[str], classes: Sequence[str] | None) -> list[str]:
    """The requested classes in the requested order (``None``: every available one), checked against ``source``."""
    if classes is None:
        return list(available)
    if isinstance(classes, str):  # a bare string would silently become a list of characters
        raise DatasetError(f"classes must be a list of class names, got the string {classes!r}")
    selected = [str(c).strip() for c in classes]
    if not selected:
        raise DatasetError("classes is empty: select at least one class (or leave it unset for all)")
    duplicates = sorted({c for c in selected if selected.count(c) > 1})
    if duplicates:
        raise DatasetError(f"class(es) requested more than once: {', '.join(duplicates)}")
    unknown = [c for c in selected if c not in available]
    if unknown:
        raise DatasetError(
            f"class(es) {', '.join(repr(c) for c in unknown)} not in {source}; available: {', '.join(available)}"
        )
    return selected


def dataset_files(root: Path, expected: str, meta_relpath: str | Path | None, audio_dir: str,
                  layout: str) -> tuple[Path, Path | None, Path]:
    """``(root, metadata file, audio folder)`` of a dataset, resolved; each missing piece is an error that
    names it and what the folder should hold (``expected``). ``meta_relpath=None``: no metadata file."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset root {str(root)!r} does not exist or is not a directory (expected {expected})")
    root = root.resolve()
    meta = root / meta_relpath if meta_relpath is not None else None
    if meta is not None and not meta.is_file():
        raise DatasetError(f"metadata file {str(meta)!r} is missing: {root} is not a {layout} dataset")
    audio = root / audio_dir
    if not audio.is_dir():
        raise DatasetError(f"audio directory {str(audio)!r} is missing: {root} is not a {layout} dataset "
                           "(set data.audio-dir if the audio folder has another name)")
    return root, meta, audio


def finish_index(root: Path, audio: Path, clips: list[Clip], class_names: list[str], missing: list[str],
                 skipped: list[str] | None = None, log: logging.Logger = logger) -> DatasetIndex:
    """The reader's result: missing files reported once (on the reader's ``log``), a selected class without
    any file an error naming it, clips sorted by their identity."""
    if missing:
        log.warning("%d of %d selected clips in %s are missing on disk and were skipped (first: %s)",
                       len(missing), len(missing) + len(clips), root, ", ".join(missing[:3]))
    empty = [name for name in class_names if not any(c.category == name for c in clips)]
    if empty:
        raise DatasetError(f"class(es) {', '.join(repr(n) for n in empty)} have no audio files under {audio}")
    clips.sort(key=lambda c: c.rel_path)
    return DatasetIndex(root=root, clips=clips, class_names=class_names, missing=missing, skipped=list(skipped or []))
