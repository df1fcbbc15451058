"""Learning under non-IID sites: Dirichlet label skew (alpha 0.1, 0.5, 1.0) and 2 disjoint classes per node.

Federation: the synthetic data with 16 classes, 5 nodes. Splits: ``dirichlet-<alpha>`` (flwr-datasets'
DirichletPartitioner over the train clips, every class in play) and ``disjoint`` (node i holds classes
2i and 2i+1; the other 6 classes are in no node's data and out of the test). Methods, at equal node
compute (the same rounds x local epochs everywhere; the KD methods add node generators):
``fedavg``; ``fedprox`` (the proximal term ``train.proximal-mu``); ``kd`` (owner-only teachers
distilled on samples of the nodes' unified VAEs); ``kd_finetune`` (plus server fine-tuning). ``central``
trains the same adapters on the union of the nodes' training clips for rounds x local epochs.

Every federated cell is a real ``flwr run`` simulation; its final global adapters (``<method>``), the
round its nodes' *validation* clips preferred (``<method>_best_val``, ``adapters_best.safetensors``) and
the moving average over rounds (``<method>_ema``, ``adapters_ema.safetensors``, ``ema-decay``) are
evaluated here on the union of the nodes' test clips, the same clips the central baseline is tested on.

Usage:  python bench/noniid.py [--splits dirichlet-0.1,dirichlet-0.5,dirichlet-1.0,disjoint]
                               [--methods fedavg,fedprox,kd,kd_finetune] [--rounds 10] [--local-epochs 6]
Last line of output: one JSON object, every cell plus ``best_over_central`` per split.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from aggregation import NUM_NODES, central, evaluate_checkpoint, union, write_config_file  # sibling scripts
from fed_vs_central import run_federated
from record import add_record_argument, emit  # the sibling module (bench/ is sys.path[0])
from workspace import isolated_cache

from common.config import FedA2VConfig, flatten, load_config
from common.config_overrides import parse_overrides
from common.data.synth import SYNTH_CLASSES
from common.logs import setup_logging
from common.report.run_data import server_seconds_per_round

log = logging.getLogger("bench.noniid")

NUM_CLASSES = 16
KD = {"aggregation": "kd", "generator.mode": "generator-training", "generator.granularity": "unified"}
METHODS = {
    "fedavg": {"aggregation": "fedavg"},
    "fedprox": {"aggregation": "fedavg", "train.proximal-mu": 0.01},
    "kd": KD,
    "kd_finetune": {**KD, "finetune.epochs": 10, "finetune.target": "both"},
}


def split_values(split: str) -> dict[str, object]:
    """Run-config values of one split (per-node tables travel in the config file)."""
    values: dict[str, object] = {"data.num-classes": NUM_CLASSES, "min-nodes": NUM_NODES, "privacy.min-class-count": 1}
    if split.startswith("dirichlet-"):
        values.update({"data.partition": "dirichlet", "data.dirichlet-alpha": float(split.split("-", 1)[1]),
                       "data.min-partition-size": 5})
    elif split == "disjoint":
        values["data.partition"] = "explicit"
        for i in range(NUM_NODES):
            values[f"nodes.{i}.classes"] = ",".join(SYNTH_CLASSES[2 * i : 2 * i + 2])
    else:
        raise SystemExit(f"unknown split {split!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", default="dirichlet-0.1,dirichlet-0.5,dirichlet-1.0,disjoint")
    parser.add_argument("--methods", default="fedavg,fedprox,kd,kd_finetune")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=6)
    parser.add_argument("--run-config", default="", help="extra run-config overrides for every run ('k=v k2=v2')")
    add_record_argument(parser)
    args = parser.parse_args()
    setup_logging()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from server_app.app import class_targets

    budget = {"num-rounds": args.rounds, "train.local-epochs": args.local_epochs,
              "generator.epochs": max(1, 300 // args.rounds)}
    extra = parse_overrides(args.run_config)
    isolated_cache(extra, prefix="feda2v-bench-noniid")
    result: dict[str, object] = {"nodes": NUM_NODES, "classes": NUM_CLASSES, "budget": budget}
    with tempfile.TemporaryDirectory(prefix="feda2v-bench-noniid-") as tmp:
        for split in args.splits.split(","):
            base = {**split_values(split), **budget, **extra}
            flat = flatten(FedA2VConfig().model_dump(by_alias=True))
            cfg = load_config({**flat, **base})
            x_test, y_test, names = union(cfg, "test")
            targets = class_targets(cfg, names)
            cells: dict[str, float] = {}
            seconds: dict[str, float] = {}
            server: dict[str, float] = {}  # the server's own seconds per round (its pipeline steps)
            for method in args.methods.split(","):
                values = {**base, **METHODS[method], **extra}
                t0 = time.perf_counter()
                config_file = write_config_file(Path(tmp) / f"{split}-{method}.toml", values)
                summary_path = run_federated(f'config-file="{config_file}"', NUM_NODES, Path(tmp),
                                             run_name=f"{split}-{method}")
                seconds[method] = round(time.perf_counter() - t0, 1)
                summary = json.loads(summary_path.read_text())
                if summary["run"].get("status") != "completed":
                    raise RuntimeError(f"{split}/{method}: the run did not complete ({summary_path})")
                histogram = summary["rounds"][-1].get("node_class_counts", {})
                server[method] = server_seconds_per_round(summary)
                ckpts = summary_path.parent / "checkpoints"
                cells[method] = evaluate_checkpoint(ckpts / "adapters.safetensors", cfg, x_test, y_test, targets)
                # the round the nodes' validation clips preferred (model selection without the test clips)
                for variant, name in (("best_val", "adapters_best"), ("ema", "adapters_ema")):
                    if (ckpts / f"{name}.safetensors").is_file():
                        cells[f"{method}_{variant}"] = evaluate_checkpoint(ckpts / f"{name}.safetensors", cfg, x_test,
                                                                           y_test, targets)
                log.info("%s / %s: final %.4f, best-by-validation %.4f, moving average %.4f (%.0fs); node classes %s",
                         split, method, cells[method], cells.get(f"{method}_best_val", float("nan")),
                         cells.get(f"{method}_ema", float("nan")), seconds[method], {p: len(c) for p, c in histogram.items()})
            t0 = time.perf_counter()
            cells["central"] = central(cfg, targets, x_test, y_test)
            seconds["central"] = round(time.perf_counter() - t0, 1)
            best = max((k for k in cells if k != "central"), key=cells.__getitem__)
            result[split] = {**{k: round(v, 4) for k, v in cells.items()}, "best": best,
                             "best_over_central": round(cells[best] / cells["central"], 4) if cells["central"] else None,
                             "test_clips": int(len(y_test)), "seconds": seconds,
                             "server_seconds_per_round": server}
            log.info("%s: %s", split, result[split])
    emit(result, record=args.record)


if __name__ == "__main__":
    main()
