"""Filling a node's thin classes with samples of the server generator (``train.augment-to``).

When the server sends its generator (``server-generator.send-to-nodes``), a node with fewer than
``augment-to`` training clips of a class — none at all included — adds that many minus its own
count of the generator's samples of the class to this round's adapter training. The class-mean
outputs the node reports are still computed on its own embeddings only.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import RecordDict
from torch import Tensor

from common.generator_bank import bank_from_records
from common.records import SERVER_GENERATOR, SERVER_GENERATOR_META, RecordError

log = logging.getLogger(__name__)


def augment_from_server(
    content: RecordDict,
    embeddings: Tensor,
    labels: Tensor,
    class_names: list[str],
    augment_to: int,
    seed: int,
) -> tuple[Tensor, Tensor, int]:
    """``(embeddings, labels)`` plus server-generator samples for thin classes; returns the count added."""
    if augment_to <= 0 or SERVER_GENERATOR not in content:
        return embeddings, labels, 0
    try:
        bank, _ = bank_from_records(content, "server message", expected_shape=tuple(embeddings.shape[1:]),
                                    name=SERVER_GENERATOR, meta_name=SERVER_GENERATOR_META)
    except (RecordError, ValueError) as err:
        log.warning("server generator in the message is unusable, no augmentation this round: %s", err)
        return embeddings, labels, 0
    counts = torch.bincount(labels, minlength=len(class_names)).tolist()
    wanted = {c: augment_to - counts[i] for i, c in enumerate(class_names) if counts[i] < augment_to and c in bank.classes}
    if not wanted:
        return embeddings, labels, 0
    x, y = bank.sample_dataset(wanted, class_names, seed)
    log.info("augmenting %d thin class(es) with %d server-generator samples: %s", len(wanted), len(y), wanted)
    return torch.cat([embeddings, x]), torch.cat([labels, y]), int(len(y))
