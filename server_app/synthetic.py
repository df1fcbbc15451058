"""Synthetic audio embeddings on the server, from the nodes' uploaded generators or its own.

No raw data reaches the server: every embedding the server trains on (KD, fine-tuning, the merged
server generator) is sampled here. From node generators, a class's samples are split over the
nodes that own it in proportion to their real counts, each drawn from that node's own generator.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from common import seeds
from common.generator_bank import GeneratorBank

log = logging.getLogger(__name__)


def split_count(total: int, weights: list[float]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainder; sums to ``total``)."""
    s = float(sum(weights))
    if total <= 0 or s <= 0:
        return [0] * len(weights)
    exact = [total * w / s for w in weights]
    out = [int(e) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: exact[i] - out[i], reverse=True)[: total - sum(out)]:
        out[i] += 1
    return out


def node_generator_samples(
    banks: dict[int, GeneratorBank],
    owner_counts: dict[int, dict[str, int]],
    class_names: list[str],
    per_class: int,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """``per_class`` embeddings of every class some owner uploaded a generator for.

    ``owner_counts[pid][class]``: the real clip counts each node reported (class means). A class
    whose owners sent no generator for it is skipped with a warning naming it.
    """
    xs, ys, skipped = [], [], []
    for j, cls in enumerate(class_names):
        owners = [pid for pid, counts in sorted(owner_counts.items()) if counts.get(cls, 0) > 0]
        if not owners:
            continue
        owners = [pid for pid in owners if pid in banks and cls in banks[pid].classes]
        if not owners:
            skipped.append(cls)
            continue
        for pid, n in zip(owners, split_count(per_class, [owner_counts[pid][cls] for pid in owners])):
            if n:
                xs.append(banks[pid].sample(cls, n, seeds.owner_class_stream(seed, j, pid)))
                ys.append(torch.full((n,), j, dtype=torch.long))
    if skipped:
        log.warning("no uploaded generator covers class(es) %s: no synthetic samples for them", skipped)
    if not xs:
        raise ValueError("no node generator covers any class: nothing to sample")
    return torch.cat(xs), torch.cat(ys)


def bank_samples(bank: GeneratorBank, class_names: list[str], per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    """``per_class`` embeddings of every class ``bank`` covers (labels index ``class_names``)."""
    return bank.sample_dataset({c: per_class for c in bank.classes}, class_names, seed)


class SampleSource:
    """Where the server's synthetic embeddings come from this round (``kd.samples-from``, resolved)."""

    name = ""

    def __init__(self, class_names: list[str]) -> None:
        self.class_names = list(class_names)

    def draw(self, state, per_class: int, seed: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class NodeGeneratorSamples(SampleSource):
    """Each class from the generators its owners uploaded this round, split by their real counts."""

    name = "node-generators"

    def draw(self, state, per_class: int, seed: int) -> tuple[Tensor, Tensor]:
        banks = state.replies.banks
        if not banks:
            raise RuntimeError(f"round {state.server_round}: kd.samples-from='node-generators' but no node uploaded generators")
        return node_generator_samples(banks, state.replies.owner_counts(), self.class_names, per_class, seed)


class ServerGeneratorSamples(SampleSource):
    """Every class from the server generator (trained earlier in the round)."""

    name = "server-generator"

    def draw(self, state, per_class: int, seed: int) -> tuple[Tensor, Tensor]:
        if state.server_bank is None:
            raise RuntimeError("kd.samples-from='server-generator' but no server generator has been trained")
        return bank_samples(state.server_bank, self.class_names, per_class, seed)


SAMPLE_SOURCES: dict[str, type[SampleSource]] = {s.name: s for s in (NodeGeneratorSamples, ServerGeneratorSamples)}
