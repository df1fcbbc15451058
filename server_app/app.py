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

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from common.atomic import atomic_write_json
from common.checkpoints import CheckpointError, load_adapters
from common.config import ConfigError, FedA2VConfig, config_hash, load_config
from common.data.dataset import resolve_classes
from common.device import resolve_device
from common.logs import setup_logging
from common.models.adapters import AdapterConfig, Adapters
from common.models.audio_encoder import embedding_shape
from common.models.generators import GeneratorSpec
from common.models.text_encoders import compute_class_targets
from common.provenance import git_commit, versions
from common.records import CLASS_TARGETS, GLOBAL_MODEL, RUN_IDENTITY, RUN_NAME, ClassTensors, module_to_arrays
from common.render.flux import check_render_settings
from common.render.jobs import RenderContext
from server_app.grid import PromptGrid
from server_app.holdings import ResendInFull
from server_app.pipeline import aggregation_method, build_pipelines
from server_app.resume import open_run, run_directory, run_identity
from server_app.run_context import ServerRun
from server_app.strategy import FedA2VStrategy
from server_app.summary import RunSummary
from server_app.validation import ReplyValidator

log = logging.getLogger(__name__)
app = ServerApp()


def class_targets(cfg: FedA2VConfig, class_names: list[str]) -> ClassTensors:
    te = cfg.text_encoder
    targets = compute_class_targets(te.model, class_names, te.prompt_template, te.t5_tokens,
                                    cache_dir=cfg.resolved_cache_dir() / "targets", seed=cfg.seed)
    return ClassTensors(list(targets.class_names), targets.clip.float(), targets.t5.float())


def final_metrics(result: Result, round_offset: int = 0) -> dict:
    """The last round's global evaluation, from Flower's own record of the run (its rounds count from 1
    in every process; ``round_offset`` is where a resumed run started)."""
    history = result.evaluate_metrics_clientapp
    if not history:
        return {"round": None}
    last = max(history)
    return {**dict(history[last]), "round": last + round_offset}


def initial_adapters(cfg: FedA2VConfig, acfg: AdapterConfig, class_names: list[str], fresh: Adapters) -> ArrayRecord:
    """The round-1 global adapters: ``adapter.init-from`` (dims and classes checked) or ``fresh``."""
    if not cfg.adapter.init_from:
        return module_to_arrays(fresh)
    path = Path(cfg.adapter.init_from).expanduser()
    if not path.is_file():
        raise ConfigError(f"adapter.init-from: '{path}' is not a file (an adapters*.safetensors checkpoint)")
    try:
        loaded, meta = load_adapters(path, acfg.to_dict())
    except CheckpointError as err:
        raise ConfigError(f"adapter.init-from: {err}") from err
    found = list(meta.get("class-names") or [])
    if found != class_names:
        raise ConfigError(f"adapter.init-from: '{path}' was trained for class-names {found}, this run has {class_names} "
                          "(data.classes / data.num-classes must match)")
    log.info("global adapters start from %s (round %s of its run)", path, meta.get("round"))
    return module_to_arrays(loaded)


def write_run_report(run_dir: Path) -> None:
    """``report.html`` at the end of the run; a report problem is logged and never fails the run."""
    try:
        from common.report import write_report

        write_report(run_dir)
    except Exception as err:  # the run's results are on disk either way; `feda2v report` can retry
        log.warning("report.html not written (%s: %s); run `feda2v report %s` to retry", type(err).__name__, err, run_dir)


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    cfg = load_config(context.run_config)
    check_render_settings(cfg.render)  # a bad render.model must fail now, not after the last round
    run_dir = run_directory(cfg.output_dir, cfg.run_name, context.run_id)
    point = open_run(run_dir, cfg.resume, config_hash(cfg), cfg.generator.checkpoint_base,
                     embedding_shape(cfg.audio_encoder))
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", cfg.model_dump(by_alias=True))
    log.info("feda2v run %s: outputs in %s", context.run_id, run_dir)

    class_names = resolve_classes(cfg.data, Path(cfg.data.root) if cfg.data.root else None)
    targets = class_targets(cfg, class_names)
    targets.save(run_dir / "targets.safetensors", CLASS_TARGETS,
                 {"prompt-template": cfg.text_encoder.prompt_template, "text-encoder": cfg.text_encoder.model})
    RenderContext.of(cfg).prepare(targets)
    acfg = AdapterConfig.from_sections(cfg.adapter, cfg.audio_encoder, cfg.text_encoder, clip_dim=targets.clip.shape[1], t5_dim=targets.t5.shape[2])
    adapters = Adapters.seeded(acfg, cfg.seed)
    n_params = sum(p.numel() for p in adapters.parameters())
    log.info(
        "%d classes, adapters %s -> clip %d, t5 %dx%d (%.2f M params), aggregation=%s",
        len(class_names), (acfg.in_tokens, acfg.in_dim), acfg.clip_dim, acfg.t5_tokens, acfg.t5_dim, n_params / 1e6,
        cfg.aggregation,
    )
    run = ServerRun(run_dir=run_dir, targets=targets, template=adapters, adapter_config=acfg.to_dict(),
                    config_hash=config_hash(cfg), num_rounds=cfg.num_rounds, device=resolve_device(cfg.device))
    start_round = point.last_round if point is not None else 0
    identity = run_identity(point)  # a resumed run keeps its own (summary.json), a new one draws one
    if start_round >= cfg.num_rounds:
        raise ConfigError(f"resume: {run_dir.name} already completed round {start_round} of num-rounds={cfg.num_rounds}; "
                          "raise num-rounds to continue it")
    summary = RunSummary(
        run_dir / "summary.json",
        {
            "run_id": context.run_id,
            "run_identity": identity,
            "run_dir": str(run_dir),
            "config_hash": run.config_hash,
            "classes": class_names,
            "num_rounds": cfg.num_rounds,
            "aggregation": aggregation_method(cfg.aggregation, cfg.generate_only),
            "server_generator": cfg.server_generator.mode,
            "finetune_epochs": cfg.finetune.epochs,
            "adapter_params": n_params,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": versions(),
            "git_commit": git_commit(Path(__file__).parent),
        },
        resumed=point.summary if point is not None else None,
    )
    pipelines = build_pipelines(cfg, run, summary)
    generator_spec = GeneratorSpec.from_config(cfg.generator, *embedding_shape(cfg.audio_encoder))  # what nodes must match
    if point is not None and point.server_bank is not None and pipelines.server_generator is not None:
        pipelines.server_generator.bank = point.server_bank
    strategy = FedA2VStrategy(
        targets=targets,
        round_pipeline=pipelines.round,
        after_round=pipelines.after_round,
        send_generator=pipelines.server_generator if cfg.server_generator.send_to_nodes else None,
        validator=ReplyValidator.for_run(cfg.robust, generator_spec, run.template.state_dict(), class_names, acfg, run_dir,
                                         cfg.privacy),
        min_replies=cfg.min_replies,
        connect_timeout=cfg.connect_timeout,
        round_offset=start_round,
        wire_codec=cfg.wire_codec,
        evaluate_metrics=cfg.robust.evaluate, trim_fraction=cfg.robust.trim_fraction,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_nodes,
        min_evaluate_nodes=cfg.min_nodes if cfg.fraction_evaluate > 0 else 0,
        min_available_nodes=cfg.min_nodes,
    )
    # Nodes get the run's directory *name* (each resolves it under its own output-dir, never a path
    # of this host) and whether a global model exists (the aggregation method says; nodes need no name).
    # and the run's identity: the nodes' carried state of another run of the same name is never restored
    round_config = {RUN_NAME: run_dir.name, RUN_IDENTITY: identity, GLOBAL_MODEL: pipelines.aggregator.global_model}
    initial = (point.arrays if point is not None and point.arrays is not None
               else initial_adapters(cfg, acfg, class_names, adapters))
    try:
        result = strategy.start(
            grid=ResendInFull(PromptGrid(grid, cfg.reply_poll_interval), strategy.holdings.resend),
            initial_arrays=initial,
            num_rounds=cfg.num_rounds - start_round,
            timeout=cfg.round_timeout,
            train_config=ConfigRecord(round_config),
            evaluate_config=ConfigRecord(round_config),
            evaluate_fn=strategy.after_round,
        )
    except Exception as err:
        summary.fail(f"{type(err).__name__}: {err}")
        write_run_report(run_dir)
        raise
    summary.finish(final_metrics(result, start_round))
    write_run_report(run_dir)
    per_round = ", ".join(
        f"r{r + start_round}: {m.get('test_retrieval_acc', float('nan')):.3f}"
        for r, m in sorted(result.evaluate_metrics_clientapp.items())
    )
    log.info("global test retrieval accuracy per round: %s", per_round)
    log.info("summary: %s", run_dir / "summary.json")
