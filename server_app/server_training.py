"""The server's own work after each round's aggregation: server generator, KD, fine-tuning.

Order within a round (each step optional, all from config):

1. **server generator** (``server-generator.mode``): ``merge`` the nodes' uploaded generators into
   one, or train it ``data-free`` against this round's teachers; checkpoint ``{base}_server``.
2. **synthetic embeddings** for the next steps (``kd.samples-from``): from the owners' uploaded
   generators or from the server generator.
3. **KD** (``aggregation = "kd"``): distil the owner-weighted teachers into the student (this
   round's FedAvg or the previous global).
4. **fine-tuning** (``finetune.epochs > 0``): the global adapters toward text targets and/or teacher
   outputs, anchored at the clients' real class means.

The result replaces the round's global arrays; metrics (``kd_loss_clip``, ``finetune_loss_t5``,
``server_gen_*``...) join the round's train metrics in ``summary.json``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from common.config import FedA2VConfig
from common.factory import embedding_shape, resolve_device
from common.generator_bank import GeneratorBank, save_bank
from common.models.adapters import Adapters
from common.records import ClassTensors, arrays_to_module, module_to_arrays
from common.training import TrainSettings
from server_app.finetune import finetune
from server_app.kd import distill
from server_app.server_generator import (
    DataFreeSettings,
    merge_generators,
    new_data_free_bank,
    teacher_agreement,
    train_data_free,
)
from server_app.synthetic import bank_samples, node_generator_samples
from server_app.teachers import OwnerTeachers

log = logging.getLogger(__name__)


@dataclass
class RoundInputs:
    """What the strategy collected from one round's replies."""

    server_round: int
    fedavg: ArrayRecord | None  # this round's FedAvg of the node adapters
    previous: ArrayRecord | None  # the global adapters sent out this round
    node_arrays: dict[int, ArrayRecord]
    node_means: dict[int, ClassTensors]
    node_banks: dict[int, GeneratorBank] = field(default_factory=dict)
    global_means: ClassTensors | None = None
    encoder_key: str = ""


def _settings(epochs: int, batch_size: int, lr: float, cfg: FedA2VConfig, seed: int) -> TrainSettings:
    t = cfg.train
    return TrainSettings(epochs=epochs, batch_size=batch_size, lr_clip=lr, lr_t5=lr, weight_decay=t.weight_decay,
                         cosine_weight=t.cosine_weight, contrastive_weight=t.contrastive_weight,
                         temperature=t.temperature, seed=seed)


class ServerTrainer:
    """Holds the server generator across rounds and runs the configured steps each round."""

    def __init__(self, cfg: FedA2VConfig, targets: ClassTensors, template: Adapters, run_dir: Path) -> None:
        self.cfg = cfg
        self.targets = targets
        self.template = template
        self.run_dir = Path(run_dir)
        self.device = resolve_device(cfg)
        self.server_bank: GeneratorBank | None = None
        self.histories: dict[str, dict[str, list[float]]] = {}  # this round's per-epoch losses per step

    @staticmethod
    def needed(cfg: FedA2VConfig) -> bool:
        return cfg.aggregation == "kd" or cfg.server_generator.mode != "off" or cfg.finetune.epochs > 0

    def _adapters(self, arrays: ArrayRecord) -> Adapters:
        return arrays_to_module(arrays, copy.deepcopy(self.template))  # type: ignore[return-value]

    # ------------------------------------------------------------------ steps
    def run(self, inp: RoundInputs) -> tuple[ArrayRecord | None, dict[str, float]]:
        cfg = self.cfg
        names = self.targets.class_names
        metrics: dict[str, float] = {}
        self.histories = {}
        teachers = OwnerTeachers.build(names, {p: self._adapters(a) for p, a in inp.node_arrays.items()}, inp.node_means)
        if not teachers.node_ids:
            log.warning("round %d: no teacher (no node sent adapters and class means): server training skipped",
                        inp.server_round)
            return inp.fedavg, metrics
        seed = cfg.seed * 7919 + inp.server_round
        if cfg.server_generator.mode != "off":
            metrics.update(self._train_server_generator(inp, teachers, seed))
        arrays = inp.fedavg
        if cfg.aggregation == "kd" or cfg.finetune.epochs > 0:
            x, y = self._samples(inp, teachers, seed)
        if cfg.aggregation == "kd":
            init = inp.fedavg if cfg.kd.student_init == "fedavg" or inp.previous is None else inp.previous
            if init is None:
                raise RuntimeError(f"round {inp.server_round}: no student initialisation (FedAvg produced no weights)")
            student = self._adapters(init)
            k = cfg.kd
            history = distill(student, teachers, x, y, _settings(k.epochs, k.batch_size, k.lr, cfg, seed), self.device,
                              log_prefix=f"round {inp.server_round} kd ")
            self.histories["kd"] = history
            metrics.update(_last(history, "kd"))
            metrics["kd_samples"] = float(len(y))
            arrays = module_to_arrays(student)
        if cfg.finetune.epochs > 0 and arrays is not None:
            f = cfg.finetune
            adapters = self._adapters(arrays)
            fx, fy = (x, y) if f.samples_per_class == cfg.kd.samples_per_class else self._samples(inp, teachers, seed + 1, f.samples_per_class)
            history = finetune(
                adapters, fx, fy, self.targets, _settings(f.epochs, f.batch_size, f.lr, cfg, seed), target=f.target,
                anchors=inp.global_means, anchor_weight=f.anchor_weight,
                teachers=teachers if f.target != "text" else None, device=self.device,
            )
            self.histories["finetune"] = history
            metrics.update(_last(history, "finetune"))
            arrays = module_to_arrays(adapters)
        return arrays, metrics

    def _samples(self, inp: RoundInputs, teachers: OwnerTeachers, seed: int, per_class: int | None = None):
        per_class = per_class or self.cfg.kd.samples_per_class
        names = self.targets.class_names
        if self.cfg.sample_source() == "server-generator":
            if self.server_bank is None:
                raise RuntimeError("kd.samples-from='server-generator' but no server generator has been trained")
            return bank_samples(self.server_bank, names, per_class, seed)
        owner_counts = _owner_counts(inp.node_means)
        if not inp.node_banks:
            raise RuntimeError(f"round {inp.server_round}: kd.samples-from='node-generators' but no node uploaded generators")
        return node_generator_samples(inp.node_banks, owner_counts, names, per_class, seed)

    def _train_server_generator(self, inp: RoundInputs, teachers: OwnerTeachers, seed: int) -> dict[str, float]:
        sg = self.cfg.server_generator
        names = self.targets.class_names
        tokens, dim = embedding_shape(self.cfg)
        spec = self.cfg.generator.model_copy(update={"kind": sg.kind}).spec(tokens, dim)
        if sg.mode == "merge":
            if not inp.node_banks:
                log.warning("round %d: server-generator.mode='merge' but no node uploaded generators: skipped",
                            inp.server_round)
                return {}
            gen_settings = self.cfg.generator.model_copy(update={
                "kind": sg.kind, "epochs": sg.epochs, "batch_size": sg.batch_size, "lr": sg.lr, "min_steps": 0,
            }).train_settings(seed)
            self.server_bank, metrics = merge_generators(
                spec, names, inp.node_banks, _owner_counts(inp.node_means), sg.samples_per_class, gen_settings,
                existing=self.server_bank,
            )
        else:
            covered = [names[i] for i in teachers.covered]
            if self.server_bank is None or self.server_bank.classes != covered:
                self.server_bank = new_data_free_bank(spec, names, teachers, seed)
            settings = DataFreeSettings(steps=sg.steps, batch_size=sg.batch_size, lr=sg.lr or 1e-3,
                                        diversity_weight=sg.diversity_weight, cosine_weight=self.cfg.train.cosine_weight,
                                        seed=seed)
            metrics = train_data_free(self.server_bank, teachers, settings, self.device)
        self.server_bank.to("cpu")  # samples are drawn on CPU; the teachers stay on the training device
        metrics["server_gen_teacher_acc"] = teacher_agreement(
            self.server_bank, teachers, self.targets.clip, self.targets.t5, 16, seed
        )
        paths = save_bank(self.server_bank, self.run_dir / "generators", self.cfg.generator.checkpoint_base, None,
                          inp.server_round, sg.checkpoint_frequency, inp.encoder_key)
        log.info("round %d: server generator (%s, %s) covers %d classes; teacher agreement %.3f; saved %s",
                 inp.server_round, sg.mode, sg.kind, len(self.server_bank.classes), metrics["server_gen_teacher_acc"],
                 [p.name for p in paths])
        return metrics


def _owner_counts(node_means: dict[int, ClassTensors]) -> dict[int, dict[str, int]]:
    return {
        pid: {c: int(n) for c, n in zip(m.class_names, m.counts.tolist())} if m.counts is not None else {}
        for pid, m in node_means.items()
    }


def _last(history: dict[str, list[float]], prefix: str) -> dict[str, float]:
    out = {f"{prefix}_{k}": float(v[-1]) for k, v in history.items() if v}
    out[f"{prefix}_loss"] = sum(out.values())
    out[f"{prefix}_epochs"] = float(len(next(iter(history.values()), [])))
    return out
