"""Generator quality and the two-run workflow's payoff, on the default synthetic data.

For every generator kind (VAE, GAN) x granularity (unified, per_class, per_group) this trains a
bank with the configured generator settings on the training embeddings of the whole default
dataset (one site holding every class), then reports:

* ``fd_ratio`` = FD(generated, held-out real) / FD(real half, real half) pooled over classes
  (goal <= 3), ``fd_ratio_median_class`` (per-class), ``precision``, ``recall``, ``coverage``;
* ``pretrained_vs_real_acc`` = test retrieval accuracy of adapters trained only on generated
  embeddings (as many per class as real ones) / that of adapters trained on the real ones, same
  epochs (rounds x local epochs), same real test clips (goal >= 0.80).

Then peak RSS of one ClientApp ``train`` + ``evaluate`` of node 0 of 3, each in a fresh process,
with the AST-base architecture (``--rss-tiny-ast``: the tiny preset):
``rss_mb_ast`` (no embedding cache: the AST is built and audio decoded), ``rss_mb_cached`` (cache
hit: no AST), ``rss_mb_pretrained`` (``use-pretrained-generators`` on run-1 checkpoints), and
``rss_delta_mb_*``, the growth over the process's peak before ``train`` (imports, weights, targets).
With the tiny AST preset the AST's share is small; AST-base adds 86 M parameters (~350 MB fp32)
plus its activations.

Usage:  python bench/generators.py [--kinds vae,gan] [--granularities unified,per_class,per_group]
                                   [--run-config 'k=v ...'] [--skip-rss]
Last line of output: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import torch
from record import add_record_argument, emit  # the sibling module (bench/ is sys.path[0])
from workspace import isolated_cache  # the sibling module (bench/ is this script's sys.path[0])

from client_app.node_data import load_node_data
from client_app.site import NodeSite
from common.checkpoints import load_tensors, save_tensors
from common.config import FedA2VConfig, NodeRuntimeConfig, flatten, load_config
from common.config_overrides import parse_overrides
from common.data.dataset import dataset_root, prepare_dataset, resolve_classes
from common.device import resolve_device
from common.generator_bank import GeneratorBank
from common.logs import setup_logging
from common.models.adapters import AdapterConfig, Adapters
from common.models.generators import GeneratorSpec, GeneratorTrainSettings
from common.records import ClassTensors
from common.training import TrainSettings, evaluate_adapters, train_adapters

log = logging.getLogger("bench.generators")

ROOT = Path(__file__).resolve().parent.parent

GROUPS_FILE = ROOT / "configs" / "generators_per_group.toml"
RSS_NODES = 3


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def adapter_acc(cfg: FedA2VConfig, targets: ClassTensors, x: torch.Tensor, y: torch.Tensor, test) -> float:
    """Test retrieval accuracy of adapters trained on ``(x, y)`` for rounds x local epochs."""
    adapters = Adapters.seeded(AdapterConfig.from_sections(cfg.adapter, cfg.audio_encoder, cfg.text_encoder, targets.clip.shape[1], targets.t5.shape[2]), cfg.seed)
    settings = TrainSettings.from_config(cfg.train, seed=cfg.seed)
    settings.epochs = cfg.num_rounds * cfg.train.local_epochs
    device = resolve_device(cfg.device)
    train_adapters(adapters, x, y, targets.clip, targets.t5, settings, device)
    return float(evaluate_adapters(adapters, test.embeddings, test.labels, targets.clip, targets.t5, settings,
                                   device=device)["retrieval_acc"])


def quality_sweep(cfg: FedA2VConfig, kinds: list[str], granularities: list[str]) -> dict:
    from server_app.app import class_targets

    data = load_node_data(cfg.data, NodeSite.of(cfg, NodeRuntimeConfig(partition_id=0, num_partitions=1)))
    train, test = data.splits["train"], data.splits["test"]
    names = data.class_names
    targets = class_targets(cfg, names)
    groups = tomllib.loads(GROUPS_FILE.read_text())["generator"]["class-groups"]
    counts = {c: int((train.labels == i).sum()) for i, c in enumerate(names)}
    t0 = time.perf_counter()
    real_acc = adapter_acc(cfg, targets, train.embeddings, train.labels, test)
    log.info("adapters on real embeddings: test acc %.4f (%.0fs)", real_acc, time.perf_counter() - t0)
    results: dict[str, dict] = {}
    for kind in kinds:
        for granularity in granularities:
            gcfg = cfg.generator.model_copy(update={"kind": kind})
            bank = GeneratorBank.create(GeneratorSpec.from_config(gcfg, *train.embeddings.shape[1:]), granularity, names, groups,
                                        seed=cfg.seed)
            t0 = time.perf_counter()
            bank.train(train.embeddings, train.labels, names, GeneratorTrainSettings.from_config(gcfg, seed=cfg.seed))
            gen_seconds = time.perf_counter() - t0
            quality = bank.evaluate(test.embeddings, test.labels, names, train.embeddings, train.labels, seed=cfg.seed)
            pooled = quality["all"]
            per_class = sorted(q["fd_ratio"] for c, q in quality.items() if c != "all")
            x, y = bank.sample_dataset(counts, names, seed=cfg.seed + 1)
            acc = adapter_acc(cfg, targets, x, y, test)
            name = f"{kind}_{granularity}"
            results[name] = {
                "fd_ratio": round(pooled["fd_ratio"], 3),
                "fd_ratio_median_class": round(per_class[len(per_class) // 2], 3),
                "fd_ratio_reference": round(pooled.get("fd_ratio_reference", float("nan")), 3),
                "precision": round(pooled["precision"], 3),
                "recall": round(pooled["recall"], 3),
                "coverage": round(pooled["coverage"], 3),
                "units": len(bank.units),
                "gen_train_seconds": round(gen_seconds, 1),
                "synthetic_test_acc": round(acc, 4),
                "pretrained_vs_real_acc": round(acc / real_acc, 4) if real_acc else None,
            }
            log.info("%s: %s", name, results[name])
    return {"real_test_acc": round(real_acc, 4), "train_clips": len(train), "test_clips": len(test), "configs": results}


# ------------------------------------------------------------------------------ node RSS (child processes)
def node_child(workdir: Path, mode: str) -> None:
    """One node's train + evaluate in this fresh process; prints its peak RSS as JSON."""
    from flwr.app import ArrayRecord, MessageType

    from client_app.app import evaluate, train
    from ops.local_run import node_context, server_content, server_message

    run_config = json.loads((workdir / f"run_config_{mode}.json").read_text())
    tensors, meta = load_tensors(workdir / "targets.safetensors")
    targets = ClassTensors(list(meta["class-names"]), tensors["clip"], tensors["t5"])
    arrays, _ = load_tensors(workdir / "adapters.safetensors")
    context = node_context(run_config, {"partition-id": 0, "num-partitions": RSS_NODES,
                                        "checkpoint-dir": str(workdir / "ckpt"), "num-threads": 2})
    t0 = time.perf_counter()
    rss0 = _rss_mb()
    run = {"run_name": f"bench-{mode}"}  # each mode is a run; 'pretrained' loads the generators 'run1' trained
    train(server_message(server_content(targets, ArrayRecord(arrays), 1, **run)), context)
    evaluate(server_message(server_content(targets, ArrayRecord(arrays), 1, **run), MessageType.EVALUATE), context)
    print(json.dumps({"mode": mode, "rss_mb": round(_rss_mb(), 1), "rss_mb_before": round(rss0, 1),
                      "seconds": round(time.perf_counter() - t0, 2)}))


def rss_comparison(run: dict, workdir: Path, full_ast: bool) -> dict:
    from server_app.app import class_targets

    base = dict(run, **{"cache-dir": str(workdir / "cache")})
    if full_ast:  # the real AST-base architecture (random weights): what the mode saves on a real site
        from cache import make_full_ast  # sibling script (bench/ is on sys.path when a bench runs)

        base["audio-encoder.model"] = str(make_full_ast(workdir / "ast-full"))
    cfg = load_config(base)
    prepare_dataset(cfg.data, dataset_root(cfg.data, cfg.resolved_cache_dir()))  # the children only read it
    targets = class_targets(cfg, resolve_classes(cfg.data))
    save_tensors(workdir / "targets.safetensors", {"clip": targets.clip, "t5": targets.t5},
                 {"class-names": targets.class_names})
    adapters = Adapters.seeded(AdapterConfig.from_sections(cfg.adapter, cfg.audio_encoder, cfg.text_encoder, targets.clip.shape[1], targets.t5.shape[2]), cfg.seed)
    save_tensors(workdir / "adapters.safetensors", {k: v.detach() for k, v in adapters.state_dict().items()}, {})
    modes = {
        "ast": {"audio-encoder.cache": False},
        "run1": {"generator.mode": "generator-only"},  # writes the checkpoints (and fills the cache)
        "cached": {},
        "pretrained": {"generator.mode": "use-pretrained-generators", "generator.init-from-run": "bench-run1"},
    }
    out = {}
    for mode, extra in modes.items():
        (workdir / f"run_config_{mode}.json").write_text(json.dumps(dict(base, **extra)))
        proc = subprocess.run([sys.executable, __file__, "--node-child", mode, "--workdir", str(workdir)],
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"node child '{mode}' failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        log.info("node child %s: %s", mode, result)
        out[mode] = result
    return {
        # peak RSS of the whole process, and its growth during train + evaluate (imports, the two
        # messages' adapter weights and targets are the same in every mode and sit in the baseline)
        **{f"rss_delta_mb_{m}": round(out[m]["rss_mb"] - out[m]["rss_mb_before"], 1) for m in ("ast", "cached", "pretrained")},
        "rss_mb_ast": out["ast"]["rss_mb"],
        "rss_mb_cached": out["cached"]["rss_mb"],
        "rss_mb_pretrained": out["pretrained"]["rss_mb"],
        "node_seconds_ast": out["ast"]["seconds"],
        "node_seconds_cached": out["cached"]["seconds"],
        "node_seconds_pretrained": out["pretrained"]["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="vae,gan")
    parser.add_argument("--granularities", default="unified,per_class,per_group")
    parser.add_argument("--run-config", default="", help="run-config overrides ('k=v k2=v2')")
    parser.add_argument("--skip-rss", action="store_true", help="skip the node peak-RSS comparison")
    parser.add_argument("--rss-tiny-ast", action="store_true", help="RSS comparison with the tiny AST instead of AST-base")
    parser.add_argument("--node-child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    add_record_argument(parser)
    args = parser.parse_args()
    setup_logging()
    if args.node_child:
        node_child(Path(args.workdir), args.node_child)
        return
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    run = flatten(FedA2VConfig().model_dump(by_alias=True))
    run.update(parse_overrides(args.run_config))
    isolated_cache(parse_overrides(args.run_config), prefix="feda2v-bench-gen")  # the sweep's data and embeddings
    cfg = load_config(run)
    t0 = time.perf_counter()
    result = quality_sweep(cfg, args.kinds.split(","), args.granularities.split(","))
    configs = result["configs"]
    result["goal_fd_ratio_le_3"] = sorted(k for k, v in configs.items() if v["fd_ratio"] <= 3)
    result["goal_acc_ratio_ge_0.8"] = sorted(k for k, v in configs.items() if (v["pretrained_vs_real_acc"] or 0) >= 0.8)
    result["sweep_seconds"] = round(time.perf_counter() - t0, 1)
    if not args.skip_rss:
        with tempfile.TemporaryDirectory(prefix="feda2v-bench-gen-") as tmp:
            result.update(rss_comparison(run, Path(tmp), full_ast=not args.rss_tiny_ast))
            result["rss_audio_encoder"] = "tiny preset" if args.rss_tiny_ast else "AST-base architecture (12 x 768, random weights)"
    emit(result, record=args.record)


if __name__ == "__main__":
    main()
