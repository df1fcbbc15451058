"""The feda2v ServerApp: computes class targets, runs the FedA2V strategy, writes the run's outputs.

Run directory ``<output-dir>/<run-name>/``: ``config.json`` (the validated config),
``targets.safetensors``, ``summary.json`` (per-round per-node and global metrics),
``checkpoints/adapters*.safetensors``, ``class_means.safetensors``, ``generators/``, ``images/``.
A round's steps and where each lives: :mod:`server_app.pipeline`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from common.atomic import atomic_write_json
from common.config import FedA2VConfig, config_hash, load_config
from common.factory import adapter_config, build_adapters, resolve_classes, resolve_device
from common.logs import setup_logging
from common.models.text_encoders import compute_class_targets
from common.records import CLASS_TARGETS, GLOBAL_MODEL, RUN_NAME, ClassTensors, module_to_arrays
from server_app.pipeline import build_pipelines
from server_app.run_context import ServerRun
from server_app.strategy import FedA2VStrategy
from server_app.summary import RunSummary

log = logging.getLogger(__name__)
app = ServerApp()


def run_directory(cfg: FedA2VConfig, run_id: int) -> Path:
    name = cfg.run_name or time.strftime("%Y%m%d-%H%M%S") + f"-{run_id}"
    return (Path(cfg.output_dir).expanduser() / name).resolve()


def class_targets(cfg: FedA2VConfig, class_names: list[str]) -> ClassTensors:
    te = cfg.text_encoder
    targets = compute_class_targets(te.model, class_names, te.prompt_template, te.t5_tokens,
                                    cache_dir=cfg.resolved_cache_dir() / "targets", seed=cfg.seed)
    return ClassTensors(list(targets.class_names), targets.clip.float(), targets.t5.float())


def final_metrics(result: Result) -> dict:
    """The last round's global evaluation, from Flower's own record of the run."""
    history = result.evaluate_metrics_clientapp
    if not history:
        return {"round": None}
    last = max(history)
    return {**dict(history[last]), "round": last}


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
    targets.save(run_dir / "targets.safetensors", CLASS_TARGETS,
                 {"prompt-template": cfg.text_encoder.prompt_template, "text-encoder": cfg.text_encoder.model})
    acfg = adapter_config(cfg, clip_dim=targets.clip.shape[1], t5_dim=targets.t5.shape[2])
    adapters = build_adapters(cfg, acfg)
    n_params = sum(p.numel() for p in adapters.parameters())
    log.info(
        "%d classes, adapters %s -> clip %d, t5 %dx%d (%.2f M params), aggregation=%s",
        len(class_names), (acfg.in_tokens, acfg.in_dim), acfg.clip_dim, acfg.t5_tokens, acfg.t5_dim, n_params / 1e6,
        cfg.aggregation,
    )
    run = ServerRun(run_dir=run_dir, targets=targets, template=build_adapters(cfg, acfg), adapter_config=acfg.to_dict(),
                    config_hash=config_hash(cfg), num_rounds=cfg.num_rounds, device=resolve_device(cfg))
    summary = RunSummary(
        run_dir / "summary.json",
        {
            "run_id": context.run_id,
            "run_dir": str(run_dir),
            "config_hash": run.config_hash,
            "classes": class_names,
            "num_rounds": cfg.num_rounds,
            "aggregation": cfg.aggregation,
            "server_generator": cfg.server_generator.mode,
            "finetune_epochs": cfg.finetune.epochs,
            "adapter_params": n_params,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    pipelines = build_pipelines(cfg, run, summary)
    strategy = FedA2VStrategy(
        targets=targets,
        round_pipeline=pipelines.round,
        after_round=pipelines.after_round,
        send_server_generator=cfg.server_generator.send_to_nodes,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_nodes,
        min_evaluate_nodes=cfg.min_nodes if cfg.fraction_evaluate > 0 else 0,
        min_available_nodes=cfg.min_nodes,
    )
    # Nodes get the run's directory *name* (each resolves it under its own output-dir, never a path
    # of this host) and whether a global model exists (the aggregation method says; nodes need no name).
    round_config = {RUN_NAME: run_dir.name, GLOBAL_MODEL: pipelines.aggregator.global_model}
    result = strategy.start(
        grid=grid,
        initial_arrays=module_to_arrays(adapters),
        num_rounds=cfg.num_rounds,
        train_config=ConfigRecord(round_config),
        evaluate_config=ConfigRecord(round_config),
        evaluate_fn=strategy.after_round,
    )
    summary.finish(final_metrics(result))
    per_round = ", ".join(
        f"r{r}: {m.get('test_retrieval_acc', float('nan')):.3f}" for r, m in sorted(result.evaluate_metrics_clientapp.items())
    )
    log.info("global test retrieval accuracy per round: %s", per_round)
    log.info("summary: %s", run_dir / "summary.json")
