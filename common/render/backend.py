"""Image backends: turn conditioning (adapter outputs or text embeddings) into pictures.

Callers hand a backend a :class:`Conditioning` — named tensors, one row per image — and a seed per
image; they never know which pipeline runs. FLUX.1 reads ``clip_pooled`` ``[B, 768]`` and
``t5_sequence`` ``[B, n, 4096]`` (the two adapter branches). Another backend, e.g. an SD-style
pipeline conditioned on a CLIP token sequence, declares the names it needs in ``requires`` and gets
one line in :mod:`common.render.registry` (name -> factory); nothing upstream changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from PIL import Image

__all__ = ["Conditioning", "RenderBackend", "RenderSettings"]


@dataclass
class Conditioning:
    """Named conditioning tensors with the same number of rows (one row per image)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        sizes = {int(t.shape[0]) for t in self.tensors.values()}
        if len(sizes) > 1:
            raise ValueError(f"conditioning tensors disagree on the number of rows: { {k: tuple(v.shape) for k, v in self.tensors.items()} }")
        return sizes.pop() if sizes else 0

    def rows(self, idx: list[int] | slice) -> "Conditioning":
        return Conditioning({k: v[idx] for k, v in self.tensors.items()})


@dataclass(frozen=True)
class RenderSettings:
    """Everything that changes pixels (recorded per image in the manifest)."""

    model: str = "tiny"
    resolution: int = 64
    steps: int = 4
    guidance: float = 3.5
    dtype: str = "float32"
    batch_size: int = 4
    seed: int = 0
    offload: bool = False  # model CPU offload (needs accelerate): low-memory GPUs
    vae_tiling: bool = False
    calibrate: str = "none"  # what was done to the conditioning rows first (render.calibrate)
    device: str = "cpu"

    def manifest_fields(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("device")
        d.pop("batch_size")
        return d


class RenderBackend(Protocol):
    name: str
    requires: tuple[str, ...]

    def render(self, cond: Conditioning, seeds: list[int]) -> list[Image.Image]:
        """One image per conditioning row, image ``i`` drawn from ``seeds[i]`` alone."""
        ...

