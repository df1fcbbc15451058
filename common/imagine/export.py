"""A run folder's pipeline: the run's AST, chosen adapters, text targets, calibration and render model.

Which adapters (``checkpoint``): ``final`` (``checkpoints/adapters.safetensors``, the last round's
global adapters), ``best`` (``adapters_best``: the round with the best global validation accuracy) or
``ema`` (``adapters_ema``: the moving average over rounds). A standalone run (``aggregation = "none"``)
has no global adapters: each node kept its own (``adapters_node{id}``), so ``node`` names one; only
``final`` exists for those.

Everything else comes from the run's ``config.json`` (``audio-encoder``, ``data`` sample rate, clip
length and file-size bound, ``render``, the seed) and ``targets.safetensors``; the ``tiny-trained``
render preset is taken from the cache it was trained in (trained there first if the run never rendered).
``feda2v export`` (:mod:`ops.cli.export`) calls :func:`export_pipeline`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from common.checkpoints import CheckpointError, load_adapters
from common.config import ConfigError, FedA2VConfig
from common.imagine.inputs import AudioSpec
from common.imagine.pipeline import AudioToImagePipeline, EncoderSpec, PipelineError, RenderSpec
from common.models.audio_encoder import AudioEncoder
from common.records import CLASS_TARGETS, ClassTensors
from common.render.jobs import RenderContext

__all__ = ["CHECKPOINTS", "adapters_checkpoint", "export_pipeline", "find_run", "pipeline_from_run"]

log = logging.getLogger(__name__)

CHECKPOINTS = {"final": "adapters", "best": "adapters_best", "ema": "adapters_ema"}


def _node_ids(ckpt: Path) -> list[int]:
    return sorted({int(m.group(1)) for p in ckpt.glob("adapters_node*.safetensors")
                   if (m := re.fullmatch(r"adapters_node(\d+)\.safetensors", p.name))})


def adapters_checkpoint(run_dir: Path, aggregation: str, checkpoint: str = "final", node: int | None = None) -> Path:
    """The adapters file of ``run_dir`` for ``checkpoint`` (and ``node`` in a standalone run); errors say
    what exists instead."""
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"checkpoint must be one of {sorted(CHECKPOINTS)}, got {checkpoint!r}")
    ckpt = Path(run_dir) / "checkpoints"
    if aggregation == "none":
        nodes = _node_ids(ckpt)
        if node is None:
            raise ConfigError(f"'{run_dir}' is a standalone run (aggregation = \"none\"): every node kept its own "
                              f"adapters; choose one with --node (found: {', '.join(map(str, nodes)) or 'none'})")
        if checkpoint != "final":
            raise ConfigError(f"a standalone run keeps only each node's final adapters, not {checkpoint!r}")
        path = ckpt / f"adapters_node{int(node)}.safetensors"
        if not path.is_file():
            raise CheckpointError(f"'{path}' does not exist (nodes with adapters: {', '.join(map(str, nodes)) or 'none'})")
        return path
    if node is not None:
        raise ConfigError(f"--node applies to standalone runs only; '{run_dir}' aggregated its adapters "
                          f"(aggregation = {aggregation!r})")
    path = ckpt / f"{CHECKPOINTS[checkpoint]}.safetensors"
    if not path.is_file():
        hint = " (the run had ema-decay = 0)" if checkpoint == "ema" else ""
        raise CheckpointError(f"'{path}' does not exist{hint}: the run has no {checkpoint!r} adapters")
    return path


def find_run(path: str | Path) -> Path:
    """``path`` if it is a run folder; if it holds run folders (``outputs/``), the completed one written last
    (by its ``summary.json``; a run still going on is passed over while a completed one exists), logged so
    the user sees which."""
    path = Path(path).expanduser()
    if (path / "config.json").is_file():
        return path
    runs = [d for d in path.iterdir() if (d / "config.json").is_file() and (d / "checkpoints").is_dir()] \
        if path.is_dir() else []
    if not runs:
        raise ConfigError(f"'{path}' is not a run folder (no config.json) and holds none")
    def written(d: Path) -> float:
        return (d / "summary.json").stat().st_mtime if (d / "summary.json").is_file() else 0.0

    finished = [d for d in runs if _status(d) == "completed"]
    newest = max(finished or runs, key=lambda d: (written(d), d.name))
    log.info("%s holds %d run(s): using the newest %s, %s", path, len(runs), "completed one" if finished else "one",
             newest)
    return newest


def _status(run_dir: Path) -> str:
    try:
        return str(json.loads((run_dir / "summary.json").read_text())["run"].get("status", ""))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ""


def _run_config(run_dir: Path) -> FedA2VConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"'{run_dir}' is not a run folder (no config.json)")
    try:
        return FedA2VConfig.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not a readable run configuration ({err})") from None


def pipeline_from_run(run_dir: str | Path, checkpoint: str = "final", node: int | None = None,
                      cache_dir: str | Path | None = None, device: str = "cpu") -> AudioToImagePipeline:
    """The run's own pipeline, in this process (what ``export`` saves). ``run_dir``: a run folder, or a folder
    of runs (:func:`find_run`: the newest)."""
    run_dir = find_run(run_dir)
    cfg = _run_config(run_dir)
    path = adapters_checkpoint(run_dir, cfg.aggregation, checkpoint, node)
    adapters, meta = load_adapters(path)
    targets, tmeta = ClassTensors.load(run_dir / "targets.safetensors", CLASS_TARGETS)
    if list(meta.get("class-names", [])) != targets.class_names:
        raise PipelineError(f"'{path}': classes {meta.get('class-names')} differ from the run's targets {targets.class_names}")
    enc = cfg.audio_encoder
    encoder_spec = EncoderSpec(model=enc.model, reduction=enc.reduction, tokens=enc.tokens, dtype=enc.dtype,
                               seed=cfg.seed, batch_size=enc.batch_size, storage_dtype=enc.cache_dtype)
    audio = AudioSpec(cfg.data.sample_rate, cfg.data.clip_seconds, cfg.data.max_file_mb)
    encoder = AudioEncoder.build(enc.model, audio.clip_seconds, sample_rate=audio.sample_rate, reduction=enc.reduction,
                                 tokens=enc.tokens, dtype=enc.dtype, seed=cfg.seed, device=device)
    ctx = RenderContext.of(cfg, Path(cache_dir).expanduser() if cache_dir else None)
    settings = ctx.settings(device, targets)  # tiny-trained: the preset folder (trained now if missing)
    r = cfg.render
    render = RenderSpec(backend=r.backend, model=r.model, resolution=r.resolution, steps=r.steps, guidance=r.guidance,
                        dtype=r.dtype, batch_size=r.batch_size, seed=settings.seed, calibrate=r.calibrate,
                        calibrate_sigma=r.calibrate_sigma, images_per_clip=r.images_per_class)
    provenance = {"run": run_dir.name, "checkpoint": checkpoint if node is None else f"node{node}",
                  "adapters_file": path.name, "round": meta.get("round"), "config_hash": meta.get("config-hash"),
                  "text_encoder": tmeta.get("text-encoder", cfg.text_encoder.model)}
    return AudioToImagePipeline(encoder, adapters, targets, audio, encoder_spec, render, settings.model, provenance,
                                device)


def export_pipeline(run_dir: str | Path, out: str | Path, checkpoint: str = "final", node: int | None = None,
                    cache_dir: str | Path | None = None) -> Path:
    """Write ``run_dir``'s pipeline into ``out`` (:meth:`AudioToImagePipeline.save_pretrained`)."""
    pipe = pipeline_from_run(run_dir, checkpoint, node, cache_dir)
    return pipe.save_pretrained(out)
