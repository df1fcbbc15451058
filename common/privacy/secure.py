"""Randomness the server cannot reproduce: generators seeded from the operating system's entropy.

Why not the run seed: every seed of a run comes from ``seed`` in the run config, which the server
chose; noise drawn from it could be recomputed and subtracted. Opacus' ``secure_mode`` needs
torchcsprng, which has no build for torch 2.11. What is used instead: a fresh ``torch.Generator``
(Philox on CUDA, Mersenne Twister on CPU) seeded with 64 bits from :func:`secrets.randbits` (the
OS CSPRNG) for every release. What that gives: the seed is unknown to everyone, so the noise
cannot be recomputed from anything the server or another site knows. What it does not give: the
generator itself is not a cryptographic PRNG, so an adversary who saw enough of its raw output could
in principle recover its state; a release shows only noisy sums of its output, never raw draws.
"""

from __future__ import annotations

import secrets

import torch

__all__ = ["secure_generator"]


def secure_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A new generator on ``device`` seeded with 64 bits of OS entropy (never from the run seed)."""
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(secrets.randbits(64))
    return gen
