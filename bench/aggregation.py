"""Aggregation methods when sites hold different classes: none, FedAvg, KD, KD + fine-tuning, central.

Federation: the default synthetic data, 5 nodes x 2 disjoint classes (10 classes), explicit
partition. Every method gets the same node budget: the same local epochs per round and rounds
(``one_shot``: 1 round x 60 local epochs; ``multi_round``: 10 rounds x 6), and node generators of the
same total epochs for the KD methods (unified VAE, uploaded with the adapters). ``central`` trains
the same adapters on the union of the nodes' training clips for rounds x local epochs.

Every federated method runs as a real ``flwr run`` simulation; its final adapters are then
evaluated here on the union of all nodes' test clips (all 10 classes): the global adapters for
``fedavg`` / ``kd`` / ``kd_finetune``, the mean over the nodes' own adapters for ``none``.

Usage:  python bench/aggregation.py [--settings one_shot,multi_round] [--methods none,fedavg,kd,kd_finetune]
Last line of output: one JSON object with global test retrieval accuracy per setting and method, the
wall seconds per run and the server's own seconds per round (its pipeline steps: aggregation, server
generator, distillation, fine-tuning, checkpoint, summary).
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
from fed_vs_central import run_federated  # the sibling script (bench/ is this script's sys.path[0])
from record import add_record_argument, emit  # the sibling module (bench/ is sys.path[0])
from workspace import isolated_cache

from client_app.node_data import load_node_data
from client_app.site import NodeSite
from common.checkpoints import load_adapters
from common.config import FedA2VConfig, NodeRuntimeConfig, flatten, load_config
from common.config_overrides import parse_overrides
from common.data.dataset import synth_classes
from common.device import resolve_device
from common.logs import setup_logging
from common.models.adapters import AdapterConfig, Adapters
from common.report.run_data import server_seconds_per_round
from common.training import TrainSettings, evaluate_adapters, train_adapters

log = logging.getLogger("bench.aggregation")

NUM_NODES = 5
SHARED_SECTIONS = ("seed", "data", "audio-encoder", "text-encoder", "adapter", "train", "cache-dir", "device")
SETTINGS = {
    "one_shot": {"num-rounds": 1, "train.local-epochs": 60, "generator.epochs": 300},
    "multi_round": {"num-rounds": 10, "train.local-epochs": 6, "generator.epochs": 30},
}
KD = {"aggregation": "kd", "generator.mode": "generator-training", "generator.granularity": "unified"}
METHODS = {
    "none": {"aggregation": "none"},
    "fedavg": {"aggregation": "fedavg"},
    "kd": KD,
    "kd_finetune": {**KD, "finetune.epochs": 10, "finetune.target": "both"},
}


def partition(cfg: FedA2VConfig) -> dict[str, object]:
    classes = synth_classes(cfg.data)
    per = len(classes) // NUM_NODES
    out: dict[str, object] = {"data.partition": "explicit", "min-nodes": NUM_NODES}
    for i in range(NUM_NODES):
        out[f"nodes.{i}.classes"] = ",".join(classes[i * per : (i + 1) * per])
    return out


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else str(value)


def write_config_file(path: Path, values: dict[str, object]) -> Path:
    """A TOML config-file of dotted keys: Flower's run config only accepts keys declared in
    pyproject.toml, so per-node tables (``nodes.<id>.classes``) must travel in a config-file."""
    lines = [f"{key} = {_toml(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def union(cfg: FedA2VConfig, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    nodes = [load_node_data(cfg.data, NodeSite.of(cfg, NodeRuntimeConfig(partition_id=i, num_partitions=NUM_NODES))) for i in range(NUM_NODES)]
    x = torch.cat([n.splits[split].embeddings for n in nodes])
    y = torch.cat([n.splits[split].labels for n in nodes])
    return x, y, nodes[0].class_names


def evaluate_checkpoint(path: Path, cfg: FedA2VConfig, x: torch.Tensor, y: torch.Tensor, targets) -> float:
    adapters, _ = load_adapters(path)
    settings = TrainSettings.from_config(cfg.train, seed=cfg.seed)
    return float(evaluate_adapters(adapters, x, y, targets.clip, targets.t5, settings)["retrieval_acc"])


def central(cfg: FedA2VConfig, targets, x_test, y_test) -> float:
    x, y, _ = union(cfg, "train")
    adapters = Adapters.seeded(AdapterConfig.from_sections(cfg.adapter, cfg.audio_encoder, cfg.text_encoder, targets.clip.shape[1], targets.t5.shape[2]), cfg.seed)
    settings = TrainSettings.from_config(cfg.train, seed=cfg.seed)
    settings.epochs = cfg.num_rounds * cfg.train.local_epochs
    train_adapters(adapters, x, y, targets.clip, targets.t5, settings, resolve_device(cfg.device))
    return float(evaluate_adapters(adapters, x_test, y_test, targets.clip, targets.t5, settings)["retrieval_acc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="one_shot,multi_round")
    parser.add_argument("--methods", default="none,fedavg,kd,kd_finetune")
    parser.add_argument("--run-config", default="", help="extra run-config overrides for every run ('k=v k2=v2')")
    add_record_argument(parser)
    args = parser.parse_args()
    setup_logging()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from server_app.app import class_targets

    result: dict[str, object] = {"nodes": NUM_NODES}
    extra = parse_overrides(args.run_config)
    isolated_cache(extra, prefix="feda2v-bench-agg")
    with tempfile.TemporaryDirectory(prefix="feda2v-bench-agg-") as tmp:
        for setting in args.settings.split(","):
            base = {**partition(FedA2VConfig()), **SETTINGS[setting]}
            flat = flatten(FedA2VConfig().model_dump(by_alias=True))
            shared = {k: v for k, v in extra.items() if k.split(".")[0] in SHARED_SECTIONS}  # data / model keys
            cfg = load_config({**flat, **base, **shared})
            x_test, y_test, names = union(cfg, "test")
            targets = class_targets(cfg, names)
            accs: dict[str, float] = {}
            seconds: dict[str, float] = {}
            server: dict[str, float] = {}  # the server's own steps per round (aggregate, generator, KD, fine-tuning)
            for method in args.methods.split(","):
                values = {**base, **METHODS[method], **extra}  # one value per key: flwr rejects duplicates
                t0 = time.perf_counter()
                config_file = write_config_file(Path(tmp) / f"{setting}-{method}.toml", values)
                summary_path = run_federated(f'config-file="{config_file}"', NUM_NODES, Path(tmp),
                                             run_name=f"{setting}-{method}")
                seconds[method] = round(time.perf_counter() - t0, 1)
                if not summary_path.is_file():
                    raise RuntimeError(f"{setting}/{method}: the run wrote no {summary_path}; see its log above")
                summary = json.loads(summary_path.read_text())
                if not summary.get("final"):
                    raise RuntimeError(f"{setting}/{method}: the run did not finish ({summary_path})")
                server[method] = server_seconds_per_round(summary)
                ckpt = summary_path.parent / "checkpoints"
                if method == "none":
                    per_node = [evaluate_checkpoint(ckpt / f"adapters_node{i}.safetensors", cfg, x_test, y_test, targets)
                                for i in range(NUM_NODES)]
                    accs[method] = sum(per_node) / len(per_node)
                else:
                    accs[method] = evaluate_checkpoint(ckpt / "adapters.safetensors", cfg, x_test, y_test, targets)
                log.info("%s / %s: global test retrieval acc %.4f (%.0fs)", setting, method, accs[method], seconds[method])
            t0 = time.perf_counter()
            accs["central"] = central(cfg, targets, x_test, y_test)
            seconds["central"] = round(time.perf_counter() - t0, 1)
            log.info("%s / central: %.4f", setting, accs["central"])
            result[setting] = {k: round(v, 4) for k, v in accs.items()}
            result[f"{setting}_seconds"] = seconds
            result[f"{setting}_server_seconds_per_round"] = server
    one, multi = result.get("one_shot"), result.get("multi_round")
    if isinstance(one, dict) and "kd" in one and "fedavg" in one:
        result["goal_one_shot_kd_minus_fedavg"] = round(one["kd"] - one["fedavg"], 4)
    if isinstance(multi, dict) and "central" in multi:
        best = max((k for k in multi if k != "central"), key=lambda k: multi[k])
        result["multi_round_best"] = best
        result["goal_multi_round_best_over_central"] = round(multi[best] / multi["central"], 4) if multi["central"] else None
    result["test_clips"] = int(len(y_test))
    emit(result, record=args.record)


if __name__ == "__main__":
    main()
