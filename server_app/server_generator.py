"""The server generator: one class-conditional model covering every class of the federation.

Two ways to train it without any raw client data:

* **merge** — sample the nodes' uploaded generators (each class from the nodes that own it, in
  proportion to their counts) and train a unified generator on those samples: the federation's
  generators merged into one that covers every class.
* **data-free** — no node uploads generators; only adapters and per-class mean outputs. The
  generator ``G(z, y)`` is trained so that the owning teachers' adapter outputs on its samples match
  the class-mean outputs those nodes reported (MSE + cosine, both branches), plus a diversity term
  ``exp(-d(x_i, x_j) * d(z_i, z_j))`` over same-class pairs (FedGen's form) so that it does not
  collapse onto one point per class. In the spirit of DENSE / FedGen; the teachers stay frozen.

Either way it is a :class:`~common.generator_bank.GeneratorBank` (granularity ``unified``), so it
is checkpointed (``{base}_server[_round_{r}]``), validated and sampled like node generators.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from common import seeds
from common.config import ServerGeneratorConfig
from common.generator_bank import GeneratorBank
from common.models.generators import ConditionalGAN, GeneratorSpec, GeneratorTrainSettings
from common.training import retrieval_correct
from server_app.round_state import RoundState
from server_app.run_context import ServerRun
from server_app.synthetic import node_generator_samples
from server_app.teachers import OwnerTeachers

log = logging.getLogger(__name__)

DATA_FREE_LR = 1e-3  # server-generator.lr = 0 means this for data-free training


@dataclass
class DataFreeSettings:
    """The data-free training settings, all from ``[server-generator]`` (+ the adapters' cosine weight)."""

    steps: int
    batch_size: int
    lr: float
    diversity_weight: float
    cosine_weight: float
    seed: int

    @classmethod
    def from_config(cls, sg: ServerGeneratorConfig, cosine_weight: float, seed: int) -> "DataFreeSettings":
        return cls(steps=sg.steps, batch_size=sg.batch_size, lr=sg.lr or DATA_FREE_LR,
                   diversity_weight=sg.diversity_weight, cosine_weight=cosine_weight, seed=seed)


def merge_generators(
    spec: GeneratorSpec,
    class_names: list[str],
    banks: dict[int, GeneratorBank],
    owner_counts: dict[int, dict[str, int]],
    per_class: int,
    settings: GeneratorTrainSettings,
    existing: GeneratorBank | None = None,
) -> tuple[GeneratorBank, dict[str, float]]:
    """Train (or continue) the unified server generator on samples of the nodes' generators."""
    x, y = node_generator_samples(banks, owner_counts, class_names, per_class, settings.seed)
    covered = [class_names[i] for i in sorted(set(y.tolist()))]
    bank = existing if existing is not None and existing.classes == covered else None
    if bank is None:
        bank = GeneratorBank.create(spec, "unified", covered, seed=settings.seed)
    t0 = time.perf_counter()
    bank.train(x, y, class_names, settings)
    return bank, {"server_gen_seconds": time.perf_counter() - t0, "server_gen_train_samples": float(len(y))}


def new_data_free_bank(spec: GeneratorSpec, class_names: list[str], teachers: OwnerTeachers, seed: int) -> GeneratorBank:
    covered = [class_names[i] for i in teachers.covered]
    bank = GeneratorBank.create(spec, "unified", covered, seed=seed)
    for model in bank.models.values():
        model.normalization_fitted.fill_(True)  # no data to fit: N(0, 1) scale, learned offsets
    return bank


def _per_sample_match(out: Tensor, target: Tensor, cosine_weight: float) -> Tensor:
    mse = (out - target).pow(2).flatten(1).mean(1)
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), target.flatten(1), dim=1)
    return mse + cosine_weight * (1.0 - cos)


def _anchor_tables(teachers: OwnerTeachers, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """Per teacher: its reported class means indexed by federation class (zeros where it owns none)."""
    tables = []
    index = {c: i for i, c in enumerate(teachers.class_names)}
    for means, model in zip(teachers.node_means, teachers.adapters):
        assert means is not None
        clip = torch.zeros(len(index), means.clip.shape[1], device=device)
        t5 = torch.zeros(len(index), *means.t5.shape[1:], device=device)
        for row, name in enumerate(means.class_names):
            if name in index:
                clip[index[name]] = means.clip[row].to(device)
                t5[index[name]] = means.t5[row].to(device)
        tables.append((clip, t5))
    return tables


def diversity_loss(x: Tensor, z: Tensor, labels: Tensor) -> Tensor:
    """mean over same-class pairs of ``exp(-d_x * d_z)`` (FedGen); 0 when no pair shares a class."""
    same = (labels[:, None] == labels[None, :]).triu(diagonal=1)
    if not bool(same.any()):
        return x.sum() * 0.0
    dx = torch.cdist(x.flatten(1), x.flatten(1)).pow(2) / x[0].numel()
    dz = torch.cdist(z, z).pow(2) / z.shape[1]
    return torch.exp(-(dx * dz)[same]).mean()


def train_data_free(
    bank: GeneratorBank,
    teachers: OwnerTeachers,
    settings: DataFreeSettings,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Optimise the unified bank's decoder/generator against the frozen owner teachers."""
    device = torch.device(device)
    (model,) = bank.models.values()
    unit = bank.units[0]
    fed_index = torch.tensor([teachers.class_names.index(c) for c in unit.classes], device=device)
    model.to(device).train()
    teachers.to(device)
    anchors = _anchor_tables(teachers, device)
    params = model.generator_parameters() if isinstance(model, ConditionalGAN) else [
        p for n, p in model.named_parameters() if not n.startswith(("encoder", "prior"))
    ]
    opt = torch.optim.Adam(params, lr=settings.lr, betas=(0.5, 0.999))
    rng = torch.Generator().manual_seed(settings.seed)
    t0 = time.perf_counter()
    last = {"match": float("nan"), "diversity": float("nan")}
    for step in range(settings.steps):
        local = torch.randint(len(unit.classes), (settings.batch_size,), generator=rng).to(device)
        z = torch.randn(settings.batch_size, model.spec.latent_dim, generator=rng).to(device)
        x_std = model._decode_std(z, local)
        x = model.destandardize(x_std)
        y = fed_index[local]
        match = x.new_zeros(())
        for row, teacher in enumerate(teachers.adapters):
            w = teachers.weights[row, y]
            mask = w > 0
            if not bool(mask.any()):
                continue
            out_clip, out_t5 = teacher(x[mask])
            a_clip, a_t5 = anchors[row]
            per = (_per_sample_match(out_clip, a_clip[y[mask]], settings.cosine_weight)
                   + _per_sample_match(out_t5, a_t5[y[mask]], settings.cosine_weight))
            match = match + (w[mask] * per).sum() / len(y)
        div = diversity_loss(x_std, z, local)
        loss = match + settings.diversity_weight * div
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = {"match": float(match.item()), "diversity": float(div.item())}
        if (step + 1) % max(1, settings.steps // 5) == 0:
            log.info("data-free generator step %d/%d: match %.4f diversity %.4f", step + 1, settings.steps,
                     last["match"], last["diversity"])
    model.eval()
    if not all(torch.isfinite(torch.tensor(list(last.values())))):
        raise FloatingPointError(f"data-free generator training diverged: {last}")
    return {"server_gen_seconds": time.perf_counter() - t0, "server_gen_match": last["match"],
            "server_gen_diversity": last["diversity"]}


@torch.no_grad()
def teacher_agreement(bank: GeneratorBank, teachers: OwnerTeachers, targets_clip: Tensor, targets_t5: Tensor,
                      per_class: int, seed: int) -> float:
    """Share of samples whose owner-teacher output retrieves the sample's own class (both branches
    averaged): does the generator produce what the owners recognise as that class?"""
    names = teachers.class_names
    x, y = bank.sample_dataset({c: per_class for c in bank.classes}, names, seed)
    device = teachers.weights.device
    out_clip, out_t5 = teachers.outputs(x.to(device), y.to(device))
    acc_clip = retrieval_correct(out_clip.cpu(), targets_clip, y).float().mean()
    acc_t5 = retrieval_correct(out_t5.cpu(), targets_t5, y).float().mean()
    return float((acc_clip + acc_t5) / 2)


# ----------------------------------------------------------------------------------- pipeline steps
class ServerGeneratorStep:
    """The 'server generator' step: continue training the one server generator, report how the
    owners' teachers recognise its samples. The bank lives here across rounds and is put on the
    round state for the steps after it (samples, checkpoint, render, the next train message)."""

    name = "server generator"
    mode = ""

    def __init__(self, run: ServerRun, sg: ServerGeneratorConfig, spec: GeneratorSpec, seed: int) -> None:
        self.run, self.sg, self.spec, self.seed = run, sg, spec, seed
        self.bank: GeneratorBank | None = None

    def train(self, state: RoundState, teachers: OwnerTeachers, seed: int) -> dict[str, float] | None:
        raise NotImplementedError

    def __call__(self, state: RoundState) -> None:
        teachers = state.teachers(self.run)
        if not teachers.node_ids:
            log.warning("round %d: no teacher (no node sent adapters and class means): server generator not trained",
                        state.server_round)
            state.server_bank = self.bank
            return
        seed = seeds.server_round(self.seed, state.server_round)
        metrics = self.train(state, teachers, seed)
        state.server_bank = self.bank
        if metrics is None or self.bank is None:
            return
        self.bank.to("cpu")  # samples are drawn on CPU; the teachers stay on the training device
        metrics["server_gen_teacher_acc"] = teacher_agreement(
            self.bank, teachers, self.run.targets.clip, self.run.targets.t5, 16, seed
        )
        state.metrics.update(metrics)
        log.info("round %d: server generator (%s, %s) covers %d classes; teacher agreement %.3f", state.server_round,
                 self.mode, self.sg.kind, len(self.bank.classes), metrics["server_gen_teacher_acc"])


class MergeServerGenerator(ServerGeneratorStep):
    """``merge``: trained on samples of the nodes' uploaded generators."""

    mode = "merge"

    def __init__(self, run: ServerRun, sg: ServerGeneratorConfig, spec: GeneratorSpec, seed: int,
                 train_settings) -> None:
        super().__init__(run, sg, spec, seed)
        self.train_settings = train_settings  # seed -> GeneratorTrainSettings

    def train(self, state: RoundState, teachers: OwnerTeachers, seed: int) -> dict[str, float] | None:
        banks = state.replies.banks
        if not banks:
            log.warning("round %d: server-generator.mode='merge' but no node uploaded generators: skipped",
                        state.server_round)
            return None
        self.bank, metrics = merge_generators(
            self.spec, self.run.class_names, banks, state.replies.owner_counts(), self.sg.samples_per_class,
            self.train_settings(seed), existing=self.bank,
        )
        return metrics


class DataFreeServerGenerator(ServerGeneratorStep):
    """``data-free``: trained against the owners' teachers and their reported class means."""

    mode = "data-free"

    def __init__(self, run: ServerRun, sg: ServerGeneratorConfig, spec: GeneratorSpec, seed: int,
                 cosine_weight: float) -> None:
        super().__init__(run, sg, spec, seed)
        self.cosine_weight = cosine_weight

    def train(self, state: RoundState, teachers: OwnerTeachers, seed: int) -> dict[str, float] | None:
        names = self.run.class_names
        covered = [names[i] for i in teachers.covered]
        if self.bank is None or self.bank.classes != covered:
            self.bank = new_data_free_bank(self.spec, names, teachers, seed)
        settings = DataFreeSettings.from_config(self.sg, self.cosine_weight, seed)
        return train_data_free(self.bank, teachers, settings, self.run.device)


SERVER_GENERATORS: dict[str, type[ServerGeneratorStep]] = {
    s.mode: s for s in (MergeServerGenerator, DataFreeServerGenerator)
}
