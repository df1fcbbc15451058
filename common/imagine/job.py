"""``feda2v imagine``: audio files in, a folder of pictures out.

Layout under the output folder::

    {out}/{name}_{k:02d}.png      image k (1-based) of the clip from file {name}
    {out}/contact_sheet.png       one row per clip: file name, nearest class and similarity, its images
    {out}/manifest.jsonl          one line per image: path, source file, nearest class and similarity, the
                                  top classes, seed, clip digest, render settings, the pipeline's provenance

``{name}``: the file's path relative to the inputs' common folder, without its suffix, ``/`` replaced by
``__`` and made file-name safe, so ``dogs/1.wav`` and ``cats/1.wav`` do not collide. Running the same
files into the same folder again writes the same images (the seeds come from the sound) and replaces
their manifest lines. Files go through the pipeline :data:`CHUNK` at a time (one AST and render batch
stream per chunk), so memory stays flat for any number of files; a progress bar counts clips.
A file that cannot be used is logged once (``skipped <file>: <reason>``), counted, and the rest go on.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.imagine.inputs import find_audio
from common.imagine.pipeline import AudioToImagePipeline
from common.names import safe_name
from common.progress import Progress
from common.render.images import draw_contact_sheet, merge_manifest, save_png

__all__ = ["CHUNK", "ImagineReport", "imagine_files"]

log = logging.getLogger(__name__)

CHUNK = 32  # clips per pipeline call
SHEET = "contact_sheet.png"


@dataclass
class ImagineReport:
    clips: int = 0
    images: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    seconds: float = 0.0
    paths: list[Path] = field(default_factory=list)
    entries: list[dict[str, Any]] = field(default_factory=list)  # the manifest lines written

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.seconds if self.seconds > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _names(files: list[Path]) -> dict[Path, str]:
    """Each file's output name: its path below the files' common folder, suffix dropped, '/' as '__'."""
    if not files:
        return {}
    root = Path(os.path.commonpath([str(f.resolve().parent) for f in files]))
    return {f: safe_name("__".join(f.resolve().relative_to(root).with_suffix("").parts)) for f in files}


def imagine_files(pipe: AudioToImagePipeline, paths: Iterable[str | Path], out: str | Path, n: int | None = None,
                  progress: bool = True, chunk: int = CHUNK) -> ImagineReport:
    """Imagine ``n`` images for every audio file in ``paths`` (files or folders) into ``out``."""
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    files, missing = find_audio(paths)
    report = ImagineReport(failed=[(str(p), reason) for p, reason in missing])
    for name, reason in report.failed:
        log.warning("skipped %s: %s", name, reason)
    names = _names(files)
    by_source = {str(f): f for f in files}
    settings = {f"render_{k}": v for k, v in pipe.render_settings().manifest_fields().items()}
    settings["render_calibrate_sigma"] = pipe.render.calibrate_sigma
    sheet_rows: list[tuple[list[str], list[Path]]] = []
    bar = Progress(len(files), "imagine", "clip", bar=progress)
    t0 = time.perf_counter()
    for start in range(0, len(files), max(1, chunk)):
        result = pipe([str(f) for f in files[start:start + chunk]], n=n)
        for name, reason in result.failed:
            log.warning("skipped %s: %s", name, reason)
        report.failed.extend(result.failed)
        entries = []
        for clip in result.clips:
            stem = names[by_source[clip.source]]
            paths = []
            for k, (image, seed) in enumerate(zip(clip.images, clip.seeds), 1):
                path = out / f"{stem}_{k:02d}.png"
                save_png(image, path)
                paths.append(path)
                entries.append({"path": path.name, "source": clip.source, "index": k, "seed": seed,
                                "nearest": clip.nearest, "similarity": clip.similarity,
                                "top": [[c, s] for c, s in clip.top], "clip_digest": clip.digest, **settings,
                                "pipeline": pipe.provenance})
            report.paths.extend(paths)
            report.clips += 1
            report.images += len(paths)
            sheet_rows.append(([stem[:18], f"{clip.nearest[:12]} {clip.similarity:.2f}"], paths))
        if entries:
            merge_manifest(out, entries)
            report.entries.extend(entries)
        bar.update(min(chunk, len(files) - start))
    bar.close()
    report.seconds = time.perf_counter() - t0
    if sheet_rows:
        draw_contact_sheet(sheet_rows, out / SHEET, cell=64, label=130)
    log.info("imagined %d image(s) from %d clip(s) in %.1fs (%.2f clips/s, %.2f img/s) under %s; %d file(s) skipped",
             report.images, report.clips, report.seconds, report.clips_per_s, report.images_per_s, out,
             len(report.failed))
    return report
