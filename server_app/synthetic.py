"""Synthetic audio embeddings on the server, from the nodes' uploaded generators or its own.

No raw data reaches the server: every embedding the server trains on (KD, fine-tuning, the merged
server generator) is sampled here. From node generators, a class's samples are split over the
nodes that own it in proportion to their real counts, each drawn from that node's own generator.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

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
                xs.append(banks[pid].sample(cls, n, seed * 1_000_003 + j * 1009 + pid))
                ys.append(torch.full((n,), j, dtype=torch.long))
    if skipped:
        log.warning("no uploaded generator covers class(es) %s: no synthetic samples for them", skipped)
    if not xs:
        raise ValueError("no node generator covers any class: nothing to sample")
    return torch.cat(xs), torch.cat(ys)


def bank_samples(bank: GeneratorBank, class_names: list[str], per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    """``per_class`` embeddings of every class ``bank`` covers (labels index ``class_names``)."""
    return bank.sample_dataset({c: per_class for c in bank.classes}, class_names, seed)
