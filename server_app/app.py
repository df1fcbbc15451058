"""The feda2v ServerApp: computes class targets, runs the FedA2V strategy, writes the run's outputs.

Run directory ``<output-dir>/<run-name>/``: ``config.json`` (the validated config),
``summary.json`` (per-round per-node and global metrics), ``checkpoints/adapters*.safetensors``,
``class_means.safetensors`` and ``targets.safetensors``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.checkpoints import atomic_write_json, save_tensors
from common.config import FedA2VConfig, config_hash, load_config
from common.factory import adapter_config, build_adapters, resolve_classes, resolve_device
from common.logs import setup_logging
from common.models.text_encoders import compute_class_targets
from common.records import ClassTensors, module_to_arrays
from server_app.render import GlobalRenderer
from server_app.server_training import ServerTrainer
from server_app.strategy import FedA2VStrategy
from server_app.summary import RunSummary

log = logging.getLogger(__name__)
app = ServerApp()


def run_directory(cfg: FedA2VConfig, run_id: int) -> Path:
    name = cfg.run_name or time.strftime("%Y%m%d-%H%M%S") + f"-{run_id}"
    return (Path(cfg.output_dir).expanduser() / name).resolve()


def class_targets(cfg: FedA2VConfig, class_names: list[str]) -> ClassTensors:
    targets = compute_class_targets(
        cfg.text_encoder.model,
        class_names,
        cfg.text_encoder.prompt_template,
        cfg.text_encoder.t5_tokens,
        cache_dir=cfg.resolved_cache_dir() / "targets",
        seed=cfg.seed,
    )
    return ClassTensors(list(targets.class_names), targets.clip.float(), targets.t5.float())


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    cfg = load_config(context.run_config)
    run_dir = run_directory(cfg, context.run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", cfg.model_dump(by_alias=True))
    log.info("feda2v run %s: outputs in %s", context.run_id, run_dir)

    class_names = resolve_classes(cfg, Path(cfg.data.root) if cfg.data.root else None)
    targets = class_targets(cfg, class_names)
    save_tensors(
        run_dir / "targets.safetensors", {"clip": targets.clip, "t5": targets.t5},
        {"type": "class-targets", "class-names": targets.class_names, "prompt-template": cfg.text_encoder.prompt_template,
         "text-encoder": cfg.text_encoder.model},
    )
    acfg = adapter_config(cfg, clip_dim=targets.clip.shape[1], t5_dim=targets.t5.shape[2])
    adapters = build_adapters(cfg, acfg)
    n_params = sum(p.numel() for p in adapters.parameters())
    log.info(
        "%d classes, adapters %s -> clip %d, t5 %dx%d (%.2f M params), aggregation=%s",
        len(class_names), (acfg.in_tokens, acfg.in_dim), acfg.clip_dim, acfg.t5_tokens, acfg.t5_dim, n_params / 1e6,
        cfg.aggregation,
    )
    summary = RunSummary(
        run_dir / "summary.json",
        {
            "run_id": context.run_id,
            "run_dir": str(run_dir),
            "config_hash": config_hash(cfg),
            "classes": class_names,
            "num_rounds": cfg.num_rounds,
            "aggregation": cfg.aggregation,
            "server_generator": cfg.server_generator.mode,
            "finetune_epochs": cfg.finetune.epochs,
            "adapter_params": n_params,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    strategy = FedA2VStrategy(
        targets=targets,
        aggregation=cfg.aggregation,
        template=build_adapters(cfg, acfg),
        adapter_config=acfg.to_dict(),
        run_dir=run_dir,
        summary=summary,
        num_rounds=cfg.num_rounds,
        checkpoint_every=cfg.checkpoint_every,
        config_hash=config_hash(cfg),
        generator_base=cfg.generator.checkpoint_base,
        server_trainer=ServerTrainer(cfg, targets, build_adapters(cfg, acfg), run_dir) if ServerTrainer.needed(cfg) else None,
        send_server_generator=cfg.server_generator.send_to_nodes,
        renderer=GlobalRenderer(cfg, targets, build_adapters(cfg, acfg), run_dir, str(resolve_device(cfg))),
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_nodes,
        min_evaluate_nodes=cfg.min_nodes if cfg.fraction_evaluate > 0 else 0,
        min_available_nodes=cfg.min_nodes,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=module_to_arrays(adapters),
        num_rounds=cfg.num_rounds,
        train_config=ConfigRecord({"aggregation": cfg.aggregation, "run-dir": str(run_dir)}),
        evaluate_config=ConfigRecord({"aggregation": cfg.aggregation, "run-dir": str(run_dir)}),
    )
    strategy.save_class_means()
    last = max(strategy.history) if strategy.history else None
    final = dict(strategy.history[last]) if last is not None else {}
    final["round"] = last
    summary.finish(final)
    per_round = ", ".join(
        f"r{r}: {m.get('test_retrieval_acc', float('nan')):.3f}" for r, m in sorted(strategy.history.items())
    )
    log.info("global test retrieval accuracy per round: %s", per_round)
    log.info("summary: %s", run_dir / "summary.json")
    del result
