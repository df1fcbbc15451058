"""Federated vs centralized adapters on the same test clips.

Federated: the real app, run with `flwr run` (a local simulation, default: the embedded default
federation, 3 nodes x 5 rounds) — or an existing run's ``summary.json`` via ``--summary``.
Centralized: the same adapters, loss and hyper-parameters trained in one process on the union of
every node's training clips, for the same total epochs (rounds x local epochs), evaluated on the
union of the nodes' test clips (exactly the clips the federated evaluation used).

Usage:  python bench/fed_vs_central.py [--summary RUN/summary.json] [--run-config 'k=v ...']
Last line of output: one JSON object with fedavg_test_acc, central_test_acc, ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
from record import add_record_argument, emit  # the sibling module (bench/ is sys.path[0])
from workspace import cache_dir_override, isolated_cache  # the sibling module (bench/ is sys.path[0])

from client_app.node_data import load_node_data
from client_app.site import NodeSite
from common.config import FedA2VConfig, NodeRuntimeConfig, flatten, load_config
from common.config_overrides import parse_overrides
from common.device import resolve_device
from common.logs import setup_logging
from common.models.adapters import AdapterConfig, Adapters
from common.training import TrainSettings, evaluate_adapters, train_adapters
from ops import launcher
from server_app.app import class_targets

log = logging.getLogger("bench.fed_vs_central")


def run_federated(overrides: str, num_nodes: int, workdir: Path, run_name: str = "fed") -> Path:
    """Run the app with `flwr run` in an isolated FLWR_HOME; return its summary.json.

    The local SuperLink that the run starts is stopped afterwards (by the launcher's run tag, so
    only this run's processes); a run the SuperLink does not call completed raises RuntimeError.
    The run's cache is the benchmark's (:func:`workspace.isolated_cache`), never the user's.
    """
    out = workdir / "outputs"
    cmd = launcher.flwr_run_command(
        launcher.APP_DIR, federation_config=launcher.federation_config(num_nodes, 1),
        run_config=[f'output-dir="{out}" run-name="{run_name}" {cache_dir_override(overrides)} {overrides}'.strip()],
    )
    log.info("federated run: %s", " ".join(cmd))
    result = launcher.launch(cmd, extra_env={"FLWR_HOME": str(workdir / "flwr-home")}, cwd=workdir, timeout=3600)
    if not result.ok:
        raise RuntimeError(f"federated run {run_name!r}: {result.problem}")
    return out / run_name / "summary.json"


def central(cfg: FedA2VConfig, num_nodes: int) -> dict:
    device = resolve_device(cfg.device)
    nodes = [load_node_data(cfg.data, NodeSite.of(cfg, NodeRuntimeConfig(partition_id=i, num_partitions=num_nodes))) for i in range(num_nodes)]
    def union(split: str):
        return (torch.cat([n.splits[split].embeddings for n in nodes]), torch.cat([n.splits[split].labels for n in nodes]))
    x_train, y_train = union("train")
    x_test, y_test = union("test")
    targets = class_targets(cfg, nodes[0].class_names)
    adapters = Adapters.seeded(AdapterConfig.from_sections(cfg.adapter, cfg.audio_encoder, cfg.text_encoder, targets.clip.shape[1], targets.t5.shape[2]), cfg.seed)
    settings = TrainSettings.from_config(cfg.train, seed=cfg.seed)
    settings.epochs = cfg.num_rounds * cfg.train.local_epochs
    t0 = time.perf_counter()
    train_adapters(adapters, x_train, y_train, targets.clip, targets.t5, settings, device)
    seconds = time.perf_counter() - t0
    metrics = evaluate_adapters(adapters, x_test, y_test, targets.clip, targets.t5, settings, device=device)
    return {"train_clips": len(x_train), "test_clips": len(x_test), "epochs": settings.epochs, "seconds": seconds, **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", help="use this federated run's summary.json instead of running one")
    parser.add_argument("--run-config", default="", help="run-config overrides for both runs ('k=v k2=v2')")
    parser.add_argument("--num-nodes", type=int, default=3)
    add_record_argument(parser)
    args = parser.parse_args()
    setup_logging()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    run = flatten(FedA2VConfig().model_dump(by_alias=True))
    run.update(parse_overrides(args.run_config))
    isolated_cache(parse_overrides(args.run_config))  # both runs share one cache, the benchmark's own
    with tempfile.TemporaryDirectory(prefix="feda2v-bench-") as tmp:
        t0 = time.perf_counter()
        summary_path = Path(args.summary) if args.summary else run_federated(args.run_config, args.num_nodes, Path(tmp))
        fed_seconds = time.perf_counter() - t0
        summary = json.loads(summary_path.read_text())
        cfg = load_config(run)
        fed = summary["final"]
        cen = central(cfg, args.num_nodes)
    fed_acc = float(fed["test_retrieval_acc"])
    cen_acc = float(cen["retrieval_acc"])
    result = {
        "fedavg_test_acc": round(fed_acc, 4),
        "central_test_acc": round(cen_acc, 4),
        "ratio": round(fed_acc / cen_acc, 4) if cen_acc else None,
        "fedavg_test_acc_clip": round(float(fed["test_retrieval_acc_clip"]), 4),
        "fedavg_test_acc_t5": round(float(fed["test_retrieval_acc_t5"]), 4),
        # per round: what "the same per-round accuracy at the same seeds" is checked against
        "fedavg_test_acc_per_round": [round(float(r["evaluate"]["global"].get("test_retrieval_acc", float("nan"))), 4)
                                      for r in summary.get("rounds", [])],
        "central_test_acc_clip": round(cen["retrieval_acc_clip"], 4),
        "central_test_acc_t5": round(cen["retrieval_acc_t5"], 4),
        "fed_test_clips": int(fed.get("num-examples", 0)),
        "central_test_clips": cen["test_clips"],
        "central_train_clips": cen["train_clips"],
        "central_epochs": cen["epochs"],
        "fed_wall_seconds": round(fed_seconds, 1) if not args.summary else None,
        "central_train_seconds": round(cen["seconds"], 1),
        "rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if args.summary:
        result["summary"] = str(summary_path)  # a temporary run's summary is gone when the bench ends
    emit(result, record=args.record)


if __name__ == "__main__":
    main()
