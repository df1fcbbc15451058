"""Seeded work on torch's global generators without changing them for anyone else.

Why: model constructors (``nn.Linear`` init, ``torch.randn`` parameters) and dropout draw from the
global generators, which have no ``generator=`` argument. Calling ``torch.manual_seed`` to make
them reproducible would silently reseed every later draw of the process (another node's training,
a test's data), and ``torch.manual_seed`` also reseeds every CUDA device. :func:`seeded` forks the
generators it seeds, seeds exactly those, and restores them on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["seeded"]


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
