"""Every derived seed of a run, named after what it seeds, and seeded work on torch's global RNG.

Why: a run must be reproducible from its one ``seed`` key, and two streams must never collide by
accident (a node's round-3 training seed equal to another node's round-2 seed, say). Each stream
gets a named function here instead of a formula repeated in the module that uses it; the numbers
are the ones the project has always used.

Model constructors (``nn.Linear`` init, ``torch.randn`` parameters) and dropout draw from torch's
global generators, which take no ``generator=`` argument. Calling ``torch.manual_seed`` to make
them reproducible would silently reseed every later draw of the process (another node's training,
a test's data) and every CUDA device. :func:`seeded` forks the generators it seeds, seeds exactly
those, and restores them on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = [
    "seeded",
    "class_stream",
    "image_seed_base",
    "node_bank_init",
    "node_generator_train",
    "node_render_samples",
    "node_train",
    "owner_class_stream",
    "server_render_samples",
    "server_round",
]

_PRIME = 1_000_003  # spreads one base seed over per-class streams


def node_train(seed: int, server_round: int, partition_id: int) -> int:
    """A node's adapter training (shuffling, augmentation, synthetic samples) in one round."""
    return seed * 1000 + server_round * 31 + partition_id


def node_bank_init(seed: int, partition_id: int) -> int:
    """Initial weights of a node's generator bank."""
    return seed + partition_id


def node_generator_train(seed: int, server_round: int) -> int:
    """A node's generator training in one round."""
    return seed + server_round


def node_render_samples(seed: int, partition_id: int) -> int:
    """Generator samples a node renders images from."""
    return seed * 31 + partition_id


def server_round(seed: int, server_round: int) -> int:
    """The server's own training in one round (server generator, KD, fine-tuning samples)."""
    return seed * 7919 + server_round


def server_render_samples(seed: int, server_round: int) -> int:
    """Server-generator samples the server renders global images from."""
    return seed * 17 + server_round


def class_stream(seed: int, class_index: int) -> int:
    """Samples of one class: adding a class does not change the others' samples."""
    return seed * _PRIME + class_index


def owner_class_stream(seed: int, class_index: int, partition_id: int) -> int:
    """Samples of one class drawn from one owning node's generator."""
    return seed * _PRIME + class_index * 1009 + partition_id


def image_seed_base(seed: int) -> int:
    """The base from which per-image seeds are hashed (see ``common.render.images.image_seed``)."""
    return seed * _PRIME


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the block with the CPU generator (and ``device``'s, if it is a CUDA device) seeded to
    ``seed``; every forked generator is restored afterwards.

    The CPU generator is seeded exactly as ``torch.manual_seed`` seeds it, so weights built inside
    equal those built after ``torch.manual_seed(seed)``.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda: list[int] = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(int(seed))
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(int(seed))
        yield
