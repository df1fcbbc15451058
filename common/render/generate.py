"""Images from checkpoints, without a federation (the seeds' "generation only" run); ``feda2v generate``.

Inputs: an adapters checkpoint (its metadata names the classes), and a conditioning source:

* ``generator``: a node's (or the server's) generator checkpoints; N samples per class go through
  the adapters;
* ``class-means``: a run's ``class_means.safetensors`` (the federation's mean adapter outputs);
* ``text``: the class text targets themselves (the oracle baseline, no adapters involved).

``--oracle clip|t5|both`` swaps a branch for the class text target in the first two sources. The
text targets default to the run's ``targets.safetensors`` next to ``checkpoints/``. The command line
(:mod:`ops.cli.generate`) only parses arguments and calls :func:`generate_images`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from common.checkpoints import CheckpointError, load_adapters, load_tensors
from common.config import ConfigError, FedA2VConfig
from common.generator_bank import GeneratorBank
from common.records import ClassTensors
from common.render.conditioning import adapter_conditioning, outputs_conditioning
from common.render.images import RenderReport
from common.render.jobs import RenderContext, labels_to_classes, render_job

log = logging.getLogger(__name__)


def _targets(path: Path) -> ClassTensors:
    tensors, meta = load_tensors(path)
    if meta.get("type") != "class-targets" or "clip" not in tensors or "t5" not in tensors:
        raise CheckpointError(f"'{path}' is not a class-targets file (type {meta.get('type')!r})")
    return ClassTensors(list(meta["class-names"]), tensors["clip"].float(), tensors["t5"].float())


SOURCES = ("generator", "class-means", "text")


def generate_images(
    cfg: FedA2VConfig,
    adapters: str | Path,
    out: str | Path,
    *,
    source: str = "generator",
    generators: str | Path = "",
    node_id: int | None = None,
    class_means: str | Path = "",
    targets: str | Path = "",
    classes: list[str] | None = None,
    n: int = 0,
    oracle: str = "",
    progress: bool = True,
) -> RenderReport:
    """Render ``n`` (default ``render.images-per-class``) images per class into ``out``.

    ``cfg`` supplies the ``render.*`` settings; ``classes``, ``n`` and ``oracle`` override
    ``render.classes``, ``render.images-per-class`` and ``render.oracle`` when given (``cfg`` is updated
    in place).
    ``source``: ``generator`` (``generators`` folder, ``node_id`` or ``None`` for the server),
    ``class-means`` (``class_means`` file, default the run's) or ``text``. ``targets`` defaults to the
    run's ``targets.safetensors`` next to ``checkpoints/``. Bad inputs raise ``CheckpointError`` /
    ``ConfigError`` (``FedA2VError`` subclasses) or ``ValueError``.
    """
    if source not in SOURCES:
        raise ConfigError(f"source must be one of {SOURCES}, got {source!r}")
    if n:
        cfg.render.images_per_class = n
    if oracle:
        cfg.render.oracle = oracle
    if classes is not None:
        cfg.render.classes = list(classes)
    adapters_path = Path(adapters)
    adapter_model, meta = load_adapters(adapters_path)
    class_names = list(meta["class-names"])
    unknown = [c for c in cfg.render.classes if c not in class_names]
    if unknown:
        raise ConfigError(f"--classes {unknown}: not classes of '{adapters_path}' ({class_names})")
    targets_path = Path(targets) if targets else adapters_path.resolve().parent.parent / "targets.safetensors"
    need_targets = source == "text" or cfg.render.oracle != "none"
    text_targets = _targets(targets_path) if need_targets or targets_path.is_file() else None
    if text_targets is not None and text_targets.class_names != class_names:
        raise CheckpointError(f"'{targets_path}': classes {text_targets.class_names} differ from the adapters' {class_names}")
    wanted = cfg.render.classes or class_names
    n = cfg.render.images_per_class
    if source == "generator":
        if not generators:
            raise ConfigError("--source generator needs --generators DIR (a node's or the run's generators/ folder)")
        acfg = adapter_model.cfg
        bank = GeneratorBank.from_pretrained(
            generators, base=cfg.generator.checkpoint_base, node_id=node_id,
            classes=[c for c in wanted if c in class_names] if classes is not None else None,
            expected_shape=(acfg.in_tokens, acfg.in_dim))
        counts = {c: n for c in bank.classes if c in wanted}
        x, y = bank.sample_dataset(counts, class_names, seed=cfg.seed)
        cond = adapter_conditioning(adapter_model, x)
        rows = labels_to_classes(y, class_names)
        sources = [f"generator:{'server' if node_id is None else f'node{node_id}'}#{i + 1}" for i in range(len(rows))]
    elif source == "class-means":
        path = Path(class_means) if class_means else adapters_path.resolve().parent.parent / "class_means.safetensors"
        tensors, mmeta = load_tensors(path)
        names = list(mmeta["class-names"])
        reps = torch.tensor([i for i, c in enumerate(names) if c in wanted]).repeat_interleave(n)
        cond = outputs_conditioning(tensors["clip"][reps], tensors["t5"][reps])
        rows = [names[i] for i in reps.tolist()]
        sources = ["class-mean"] * len(rows)
    else:  # text: the class text targets for both branches
        assert text_targets is not None
        reps = torch.tensor([class_names.index(c) for c in wanted]).repeat_interleave(n)
        cond = outputs_conditioning(text_targets.clip[reps], text_targets.t5[reps])
        rows = [class_names[i] for i in reps.tolist()]
        sources = ["text"] * len(rows)
    return render_job(RenderContext.of(cfg), node_id, cond, rows, sources, Path(out), None, text_targets, per_class=n, progress=progress)
