"""Image accuracy from sound on the default federation, against the text-oracle ceiling.

Runs the embedded default (``flwr run``: 3 simulated nodes, 5 rounds, ``render.model = "tiny-trained"``)
in a fresh cache, so the one-time training of the render preset is part of the measurement. In the
final round every node renders its held-out test clips through its adapters and FLUX; the picture
classifier scores each image against the class of the clip that drew it (``image_acc`` in the
evaluate metrics, pooled over nodes by images scored). The ceiling renders the same number of
images per class from the class text targets themselves (``feda2v generate --source text``, i.e.
``render.oracle = "both"``), with the same preset and seeds scheme.

Usage:  python bench/image_accuracy.py [--run-config 'k=v ...'] [--cache DIR]
Last line of output: one JSON object with image_acc_from_audio, image_acc_oracle, ratio,
preset_train_seconds, per-node / server / per-class accuracies.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from fed_vs_central import run_federated  # the sibling script (bench/ is this script's sys.path[0])
from record import add_record_argument, emit  # the sibling module (bench/ is sys.path[0])
from workspace import isolated_cache

from common.config import flatten, load_config
from common.config_overrides import parse_overrides
from common.logs import setup_logging
from common.render.generate import generate_images
from common.render.images import read_manifest
from common.render.scoring import PictureScorer, score_images
from common.render.trained_preset import preset_stats

log = logging.getLogger("bench.image_accuracy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", default="", help="run-config overrides ('k=v k2=v2')")
    parser.add_argument("--num-nodes", type=int, default=3)
    parser.add_argument("--cache", default="", help="cache dir (default: a fresh one, so the preset is trained here)")
    add_record_argument(parser)
    args = parser.parse_args()
    setup_logging()
    with tempfile.TemporaryDirectory(prefix="feda2v-bench-images-") as tmp:
        isolated_cache(parse_overrides(args.run_config), args.cache or Path(tmp) / "cache")
        t0 = time.perf_counter()
        summary_path = run_federated(args.run_config, args.num_nodes, Path(tmp), run_name="images")
        run_seconds = time.perf_counter() - t0
        run_dir = summary_path.parent
        summary = json.loads(summary_path.read_text())
        if summary["run"].get("status") != "completed":
            raise RuntimeError(f"the run did not complete ({summary_path})")
        last = summary["rounds"][-1]
        evaluate, render = last["evaluate"], last.get("render", {})
        cfg = load_config({**flatten(json.loads((run_dir / "config.json").read_text())), **parse_overrides(args.run_config)})
        manifest = read_manifest(run_dir / "images")
        preset = Path(manifest[0]["render_model"])
        class_names = summary["run"]["classes"]

        # the ceiling: the class text targets drawn by the same preset, as many images per class as the nodes drew
        per_class = max(sum(1 for e in manifest if e["owner"] != "server" and e["class_name"] == c) for c in class_names)
        oracle_dir = Path(tmp) / "oracle"
        generate_images(cfg, run_dir / "checkpoints" / "adapters.safetensors", oracle_dir, source="text", n=per_class,
                        progress=False)
        scorer = PictureScorer(len(class_names), cfg.render.resolution)
        oracle = score_images(scorer, oracle_dir, read_manifest(oracle_dir), class_names, "")["all"]
        nodes = score_images(scorer, run_dir / "images",
                             [e for e in manifest if e["owner"] != "server"], class_names, "")
        from_audio = nodes["all"]
        result = {
            "image_acc_from_audio": round(from_audio["acc"], 4),
            "image_acc_oracle": round(oracle["acc"], 4),
            "ratio": round(from_audio["acc"] / oracle["acc"], 4) if oracle["acc"] else None,
            "image_acc_from_audio_clip_branch": round(from_audio["acc_clip"], 4),
            "image_acc_from_audio_t5_branch": round(from_audio["acc_t5"], 4),
            "oracle_clip_branch": round(oracle["acc_clip"], 4),
            "oracle_t5_branch": round(oracle["acc_t5"], 4),
            "images_from_audio": int(from_audio["n"]),
            "images_oracle": int(oracle["n"]),
            "evaluate_metric_image_acc": evaluate["global"].get("image_acc"),
            "per_node": {k: round(v["acc"], 4) for k, v in nodes.items() if k != "all"},
            "server_image_acc_class_means": render.get("server_image_acc"),
            "per_class": {k.split(":", 1)[1]: round(v, 4) for k, v in from_audio.items() if k.startswith("acc:")},
            "test_retrieval_acc": evaluate["global"].get("test_retrieval_acc"),
            "preset_train_seconds": preset_stats(preset).get("train_seconds"),
            "run_seconds": round(run_seconds, 1),
            "contact_sheet": str(run_dir / "images" / "node_0" / "contact_sheet.png"),
        }
        if not args.cache:
            result["note"] = "fresh cache: run_seconds includes the dataset, the AST embeddings and the preset training"
        log.info("%s", result)
        keep = Path("outputs") / "bench-image-accuracy"  # contact sheets and report outlive the temp dir
        keep.mkdir(parents=True, exist_ok=True)
        for sheet in (run_dir / "images").glob("*/contact_sheet.png"):
            (keep / f"{sheet.parent.name}.png").write_bytes(sheet.read_bytes())
        (keep / "report.html").write_bytes((run_dir / "report.html").read_bytes())
        result["contact_sheet"] = str(keep.resolve() / "node_0.png")
    emit(result, record=args.record)


if __name__ == "__main__":
    main()
