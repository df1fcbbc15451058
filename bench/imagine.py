"""Sound in, picture out: images from audio files through an exported pipeline, how right and how fast.

1. Trains the default federation (``flwr run``: 3 simulated nodes, 5 rounds) in a cache of the bench's
   own (the render preset is trained there, never in the user's cache), or reuses ``--run``.
2. Exports its pipeline (``feda2v export``'s code) and renders the first ``--roundtrip`` test clips with
   the run's own pipeline in this process.
3. In a **fresh process**: loads the exported pipeline (``pipeline_load_s``: ``from_pretrained`` plus the
   render model), then imagines every test clip of every node from its audio file, and a folder of 10-s
   stereo 44.1 kHz files made from test clips (two clips of one class back to back, channels apart), 2
   images per clip (``feda2v imagine``'s code: ``imagine_files``), counting every embedding-cache lookup
   (``cache_hits`` must be 0: the files are decoded) and renders the round-trip clips again.
4. Scores every image with the picture classifier against its clip's class.

Usage:  python bench/imagine.py [--run RUN_DIR] [--run-config 'k=v ...'] [--device cpu] [--record]
Last line: one JSON object with image_acc_from_file (goal >= 0.90), image_acc_test_clips,
image_acc_long_files, nearest_class_acc, cache_hits, clips_per_s, images_per_s, pipeline_load_s,
roundtrip_identical, and the counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from record import add_record_argument, emit  # the sibling module (bench/ is sys.path[0])
from workspace import isolated_cache

from common.config_overrides import parse_overrides
from common.logs import setup_logging

log = logging.getLogger("bench.imagine")

LONG_SECONDS, LONG_RATE = 10.0, 44100


def _hashes(images) -> list[str]:
    return [hashlib.sha256(np.asarray(im.convert("RGB")).tobytes()).hexdigest() for im in images]


def test_clips(run_dir: Path, nodes: int) -> list[tuple[str, str]]:
    """(file, class) of every node's test clips, as the run split them."""
    from common.config import FedA2VConfig
    from common.data.dataset import dataset_root, node_splits, prepare_dataset, resolve_classes, scan_dataset

    cfg = FedA2VConfig.model_validate(json.loads((run_dir / "config.json").read_text()))
    root = prepare_dataset(cfg.data, dataset_root(cfg.data, cfg.resolved_cache_dir()))
    classes = resolve_classes(cfg.data, root)
    index = scan_dataset(cfg.data, root, classes)
    splits = node_splits(cfg.data, cfg.nodes, cfg.seed, index.clips, classes, nodes)
    return [(str(c.path), c.category) for split in splits for c in split.test]


def long_files(clips: list[tuple[str, str]], folder: Path, per_class: int = 1) -> list[tuple[str, str]]:
    """10-s stereo 44.1 kHz files: two test clips of one class back to back, the right channel delayed."""
    folder.mkdir(parents=True, exist_ok=True)
    by_class: dict[str, list[str]] = {}
    for path, cls in clips:
        by_class.setdefault(cls, []).append(path)
    made = []
    for cls, paths in sorted(by_class.items()):
        for j in range(min(per_class, len(paths) // 2)):
            parts = []
            for p in paths[2 * j: 2 * j + 2]:
                x, rate = sf.read(p, dtype="float32", always_2d=True)
                if rate != LONG_RATE:
                    raise RuntimeError(f"{p}: {rate} Hz, the bench expects the synthetic {LONG_RATE} Hz")
                parts.append(x.mean(axis=1))
            mono = np.concatenate(parts)[: int(LONG_SECONDS * LONG_RATE)]
            mono = np.pad(mono, (0, int(LONG_SECONDS * LONG_RATE) - len(mono)))
            stereo = np.stack([mono, np.roll(mono, 441) * 0.8], axis=1)
            out = folder / f"{cls}_{j}.wav"
            sf.write(out, stereo, LONG_RATE, subtype="PCM_16")
            made.append((str(out), cls))
    return made


def child(args: argparse.Namespace) -> None:
    """The fresh process: load the exported pipeline, imagine the files, render the round-trip clips."""
    import common.cache.store as store
    from common.imagine.job import imagine_files
    from common.imagine.pipeline import AudioToImagePipeline
    from common.render.scoring import PictureScorer
    from PIL import Image

    lookups = {"n": 0, "hits": 0}
    original = store.EmbeddingStore.lookup

    def counting(self, ids):
        rows = original(self, ids)
        lookups["n"] += 1
        lookups["hits"] += sum(r is not None for r in rows)
        return rows

    store.EmbeddingStore.lookup = counting
    job = json.loads(Path(args.child).read_text())
    t0 = time.perf_counter()
    pipe = AudioToImagePipeline.from_pretrained(job["pipeline"], device=args.device)
    pipe.backend()
    load_s = time.perf_counter() - t0
    classes = pipe.classes
    scorer = PictureScorer(len(classes), pipe.render.resolution)
    result: dict = {"pipeline_load_s": round(load_s, 3)}
    totals = {"clips": 0, "images": 0, "seconds": 0.0, "correct": 0, "nearest": 0}
    for name in ("test_clips", "long_files"):
        files = job[name]
        out = Path(job["out"]) / name
        report = imagine_files(pipe, [f for f, _ in files], out, n=2, progress=False)
        label = {f: c for f, c in files}
        images, truth = [], []
        nearest = 0
        for e in report.entries:
            with Image.open(out / e["path"]) as im:
                images.append(im.convert("RGB"))
            truth.append(classes.index(label[e["source"]]))
            nearest += e["nearest"] == label[e["source"]]
        pred = scorer.predict(images).tolist()
        correct = sum(p == t for p, t in zip(pred, truth))
        result[f"image_acc_{name}"] = round(correct / max(len(pred), 1), 4)
        result[f"clips_{name}"] = report.clips
        result[f"failed_{name}"] = len(report.failed)
        totals["clips"] += report.clips
        totals["images"] += report.images
        totals["seconds"] += report.seconds
        totals["correct"] += correct
        totals["nearest"] += nearest
    result["image_acc_from_file"] = round(totals["correct"] / max(totals["images"], 1), 4)
    result["nearest_class_acc"] = round(totals["nearest"] / max(totals["images"], 1), 4)
    result["clips_per_s"] = round(totals["clips"] / totals["seconds"], 3)
    result["images_per_s"] = round(totals["images"] / totals["seconds"], 3)
    result["images"] = totals["images"]
    result["cache_lookups"] = lookups["n"]
    result["cache_hits"] = lookups["hits"]
    out = pipe(job["roundtrip"], n=2)
    result["roundtrip_hashes"] = _hashes([im for c in out.clips for im in c.images])
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="", help="reuse this run folder instead of training the default federation")
    parser.add_argument("--run-config", default="", help="run-config overrides of the federation ('k=v k2=v2')")
    parser.add_argument("--cache", default="", help="the bench's cache folder (default: a fresh temporary one)")
    parser.add_argument("--num-nodes", type=int, default=3, help="the federation's nodes (also of a reused --run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--roundtrip", type=int, default=8, help="clips rendered in both processes")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    add_record_argument(parser)
    args = parser.parse_args()
    setup_logging()
    if args.child:
        return child(args)
    from common.imagine.export import pipeline_from_run

    with tempfile.TemporaryDirectory(prefix="feda2v-bench-imagine-") as tmp:
        work = Path(tmp)
        isolated_cache(parse_overrides(args.run_config), args.cache or work / "cache")
        t0 = time.perf_counter()
        if args.run:
            run_dir = Path(args.run).resolve()
        else:
            from fed_vs_central import run_federated  # the sibling script

            run_dir = run_federated(args.run_config, args.num_nodes, work, run_name="imagine").parent
        run_seconds = time.perf_counter() - t0
        clips = test_clips(run_dir, args.num_nodes)
        longs = long_files(clips, work / "long")
        pipe = pipeline_from_run(run_dir, device=args.device)
        pipe.save_pretrained(work / "pipeline")
        roundtrip = [f for f, _ in clips[: args.roundtrip]]
        own = _hashes([im for c in pipe(roundtrip, n=2).clips for im in c.images])
        del pipe
        job = {"pipeline": str(work / "pipeline"), "out": str(work / "imagined"), "test_clips": clips,
               "long_files": longs, "roundtrip": roundtrip}
        (work / "job.json").write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, __file__, "--child", str(work / "job.json"), "--device", args.device],
                              capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"the fresh process failed:\n{proc.stderr[-4000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["roundtrip_identical"] = result.pop("roundtrip_hashes") == own
        result["roundtrip_images"] = len(own)
        result["pipeline_mb"] = round(sum(p.stat().st_size for p in (work / "pipeline").rglob("*") if p.is_file()) / 2**20, 2)
        result["run_seconds"] = round(run_seconds, 1)
        result["device"] = args.device
        result["goal_image_acc"] = 0.90
    emit(result, record=args.record, bench="imagine")


if __name__ == "__main__":
    main()
