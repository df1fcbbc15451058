"""Image sets on disk: names, seeds, batched resumable rendering, manifest, contact sheets.

Layout under an output directory::

    {out}/node_{id}/{class}_{0001}.png     (the server's: {out}/server/...)
    {out}/node_{id}/contact_sheet.png      rows = classes, columns = image index
    {out}/manifest.jsonl                   one line per image: owner, class, index, source, seed,
                                           round, backend settings, path

Why per-image seeds from (base seed, owner, class, index): the same request always gives the same
image, whatever else is rendered in the same batch or run (tested), and a resumed run skips the
files that exist and renders exactly the missing ones. PNGs and the manifest are written
atomically (temp file + rename); the manifest is merged under a file lock, since several nodes of a
host (simulation) render into one directory at the same time.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from common.atomic import atomic_path, atomic_write_text
from common.names import safe_name
from common.progress import Progress
from common.render.backend import Conditioning, RenderBackend, RenderSettings
from common.seeds import image_seed_base

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
CONTACT_SHEET = "contact_sheet.png"


@dataclass
class ImageRequest:
    """One picture to make; ``row`` indexes the conditioning passed alongside."""

    owner: str  # "node_3" or "server"
    class_name: str
    index: int  # 1-based within (owner, class)
    source: str  # e.g. "clip:1-100038-A-14.wav", "generator:node3#5", "class-mean", "+oracle-clip"
    row: int
    round: int | None = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RenderReport:
    written: int = 0
    skipped: int = 0
    seconds: float = 0.0
    paths: list[Path] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def owner_name(node_id: int | None) -> str:
    return "server" if node_id is None else f"node_{int(node_id)}"


def image_seed(base_seed: int, owner: str, class_name: str, index: int) -> int:
    """A stable 31-bit seed per (base seed, owner, class, index)."""
    return (image_seed_base(int(base_seed)) + zlib.crc32(f"{owner}/{class_name}/{index}".encode())) % (2**31 - 1)


def image_path(out: Path, owner: str, class_name: str, index: int) -> Path:
    return Path(out) / owner / f"{safe_name(class_name)}_{index:04d}.png"


def save_png(image: Image.Image, path: Path) -> None:
    """One PNG, written atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def read_manifest(out: Path) -> list[dict[str, Any]]:
    path = Path(out) / MANIFEST
    if not path.is_file():
        return []
    entries = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s line %d is not JSON: skipped", path, line_no)
    return entries


def _write_manifest(out: Path, entries: list[dict[str, Any]]) -> Path:
    text = "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in entries)
    return atomic_write_text(Path(out) / MANIFEST, text)


def render_images(
    backend: RenderBackend,
    settings: RenderSettings,
    requests: list[ImageRequest],
    cond: Conditioning,
    out: Path,
    progress: bool = True,
) -> RenderReport:
    """Render the requests whose file is missing (batched), then update manifest and contact sheets."""
    out = Path(out)
    report = RenderReport()
    for req in requests:
        req.seed = image_seed(settings.seed, req.owner, req.class_name, req.index)
    todo = [r for r in requests if not image_path(out, r.owner, r.class_name, r.index).is_file()]
    report.skipped = len(requests) - len(todo)
    if report.skipped:
        log.info("%d image(s) already on disk under %s: skipped (resume)", report.skipped, out)
    bar = Progress(len(todo), f"rendering {', '.join(sorted({r.owner for r in todo}))}", "img", bar=progress) if todo else None
    t0 = time.perf_counter()
    for start in range(0, len(todo), max(1, settings.batch_size)):
        batch = todo[start : start + settings.batch_size]
        images = backend.render(cond.rows([r.row for r in batch]), [r.seed for r in batch])
        for req, image in zip(batch, images):
            path = image_path(out, req.owner, req.class_name, req.index)
            save_png(image, path)
            report.paths.append(path)
        report.written += len(batch)
        if bar is not None:
            bar.update(len(batch))
    report.seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    _update_manifest(out, requests, settings, backend.name)
    for owner in sorted({r.owner for r in requests}):
        contact_sheet(out, owner)
    if report.written:
        log.info("rendered %d image(s) in %.1fs (%.2f img/s) under %s", report.written, report.seconds,
                 report.images_per_s, out)
    return report


def _update_manifest(out: Path, requests: list[ImageRequest], settings: RenderSettings, backend: str) -> None:
    entries = []
    for req in requests:
        entry = {k: v for k, v in asdict(req).items() if k not in ("row", "extra")}
        entry.update(req.extra)
        entry.update({"path": str(image_path(out, req.owner, req.class_name, req.index).relative_to(out)),
                      "backend": backend, **{f"render_{k}": v for k, v in settings.manifest_fields().items()}})
        entries.append(entry)
    merge_manifest(out, entries, keep_same_seed=True)


def merge_manifest(out: Path, entries: list[dict[str, Any]], keep_same_seed: bool = False) -> Path:
    """Add ``entries`` (keyed by their ``path``, relative to ``out``) to ``{out}/manifest.jsonl``: read, merge,
    write atomically, under a file lock (nodes of one host, or two ``feda2v imagine`` runs, write one image
    dir at once). ``keep_same_seed``: an entry whose image was not re-rendered (same path and seed: a resumed
    run) keeps its original record."""
    from filelock import FileLock

    Path(out).mkdir(parents=True, exist_ok=True)
    with FileLock(str(Path(out) / f".{MANIFEST}.lock")):
        merged = {e.get("path"): e for e in read_manifest(out)}
        for entry in entries:
            old = merged.get(entry["path"])
            if keep_same_seed and old is not None and old.get("seed") == entry.get("seed"):
                continue
            merged[entry["path"]] = entry
        return _write_manifest(out, sorted(merged.values(), key=lambda e: e["path"]))


def contact_sheet(out: Path, owner: str, cell: int = 96) -> Path | None:
    """``{out}/{owner}/contact_sheet.png``: one row per class, images in index order."""
    folder = Path(out) / owner
    rows: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*_[0-9][0-9][0-9][0-9].png")):
        rows.setdefault(path.stem.rsplit("_", 1)[0], []).append(path)
    if not rows:
        return None
    return draw_contact_sheet([([name[:18]], rows[name]) for name in sorted(rows)], folder / CONTACT_SHEET, cell)


def draw_contact_sheet(rows: list[tuple[list[str], list[Path]]], target: Path, cell: int = 96, label: int = 120) -> Path:
    """A sheet of one row per ``(label lines, image paths)``: the labels in a strip on the left, the images in
    order; written atomically to ``target``."""
    from PIL import ImageDraw

    cols = max((len(paths) for _, paths in rows), default=1)
    sheet = Image.new("RGB", (label + max(cols, 1) * cell, max(len(rows), 1) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (lines, paths) in enumerate(rows):
        top = r * cell + cell // 2 - 6 * len(lines)
        for i, line in enumerate(lines):
            draw.text((4, top + 12 * i), line, fill="black")
        for c, path in enumerate(paths):
            with Image.open(path) as im:
                sheet.paste(im.convert("RGB").resize((cell, cell)), (label + c * cell, r * cell))
    save_png(sheet, target)
    return target
