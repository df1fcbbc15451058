"""Procedural class pictures: what the ``tiny-trained`` render preset learns to draw, and what the image
classifier compares renders against.

Why two attributes: a class's picture is a **shape in a colour** on a dark background. The preset is
trained so that the colour follows the CLIP pooled conditioning and the shape follows the T5
sequence (see :mod:`common.render.trained_preset`). A picture therefore shows what *each* branch
said: a render with the right shape in the wrong colour means the CLIP branch pointed elsewhere, and
a swap of the branches on the way into the pipeline cannot go unnoticed.

Class ``i`` gets colour ``i % 10`` and shape ``(i + i // 10) % 10``: up to 10 classes both attributes
name the class alone; up to 100 classes the pair is unique.
"""

from __future__ import annotations

import torch
from torch import Tensor

PALETTE: tuple[tuple[int, int, int], ...] = (  # the RGB cube's corners and edge midpoints: >= 127 apart
    (250, 20, 20),    # red
    (20, 230, 20),    # green
    (20, 40, 255),    # blue
    (250, 245, 20),   # yellow
    (250, 20, 250),   # magenta
    (20, 245, 250),   # cyan
    (255, 128, 0),    # orange
    (128, 0, 255),    # violet
    (250, 250, 250),  # white
    (140, 140, 140),  # grey
)
SHAPES: tuple[str, ...] = ("disc", "half", "triangle", "ring", "cross", "hstripes", "vstripes", "saltire", "checker", "frame")
BACKGROUND = (30, 30, 30)


def class_look(index: int) -> tuple[int, int]:
    """(colour index, shape index) of class ``index``."""
    return index % len(PALETTE), (index + index // len(PALETTE)) % len(SHAPES)


def shape_mask(shape: int, resolution: int) -> Tensor:
    """``[R, R]`` bool mask of shape ``shape``; coarse enough to survive the 4x4-pixel FLUX tokens at 64 px."""
    r = resolution
    coords = (torch.arange(r, dtype=torch.float32) + 0.5) / r * 2 - 1  # [-1, 1]
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    rad = torch.sqrt(x**2 + y**2)
    name = SHAPES[shape]
    if name == "disc":
        return rad < 0.6
    if name == "half":
        return (x > -0.85) & (x < -0.05) & (y.abs() < 0.8)
    if name == "triangle":
        return (y > -0.6) & (y < 0.6) & (x.abs() < (y + 0.6) / 1.2 * 0.65)
    if name == "ring":
        return (rad > 0.45) & (rad < 0.8)
    if name == "cross":
        return ((x.abs() < 0.2) & (y.abs() < 0.75)) | ((y.abs() < 0.2) & (x.abs() < 0.75))
    if name == "hstripes":
        return torch.floor((y + 1) * 2.5).remainder(2) == 0
    if name == "vstripes":
        return torch.floor((x + 1) * 2.5).remainder(2) == 0
    if name == "saltire":  # a diagonal cross
        return (((x - y).abs() < 0.28) | ((x + y).abs() < 0.28)) & (torch.maximum(x.abs(), y.abs()) < 0.8)
    if name == "checker":
        return (torch.floor((x + 1) * 2) + torch.floor((y + 1) * 2)).remainder(2) == 0
    if name == "frame":
        return (torch.maximum(x.abs(), y.abs()) > 0.55) & (torch.maximum(x.abs(), y.abs()) < 0.85)
    raise ValueError(f"unknown shape {shape}")


def picture(colour: int, shape: int, resolution: int) -> Tensor:
    """``[3, R, R]`` in [-1, 1]: shape ``shape`` filled with palette colour ``colour``."""
    mask = shape_mask(shape, resolution).float()
    fg = torch.tensor(PALETTE[colour], dtype=torch.float32)[:, None, None] / 127.5 - 1
    bg = torch.tensor(BACKGROUND, dtype=torch.float32)[:, None, None] / 127.5 - 1
    return fg * mask + bg * (1 - mask)


def class_pictures(num_classes: int, resolution: int) -> Tensor:
    """``[K, 3, R, R]``: the picture of every class."""
    return torch.stack([picture(*class_look(i), resolution) for i in range(num_classes)])


def attribute_count(num_classes: int) -> int:
    """How many distinct colours (= shapes) the classes use."""
    return min(num_classes, len(PALETTE))


def nearest_colour(images: Tensor) -> Tensor:
    """Palette index of each image's foreground (pixels far from the background), ``[B]``."""
    bg = torch.tensor(BACKGROUND, dtype=torch.float32)[None, :, None, None] / 127.5 - 1
    fg = ((images - bg).abs().sum(1, keepdim=True) > 0.5).float()  # [B, 1, R, R]
    mean = (images * fg).sum((2, 3)) / fg.sum((2, 3)).clamp(min=1)  # [B, 3]
    palette = torch.tensor(PALETTE, dtype=torch.float32) / 127.5 - 1
    return torch.cdist(mean, palette).argmin(1)


def nearest_shape(images: Tensor) -> Tensor:
    """Shape index whose mask best matches each image's foreground (IoU), ``[B]``."""
    r = images.shape[-1]
    bg = torch.tensor(BACKGROUND, dtype=torch.float32)[None, :, None, None] / 127.5 - 1
    fg = (images - bg).abs().sum(1) > 0.5  # [B, R, R]
    masks = torch.stack([shape_mask(s, r) for s in range(len(SHAPES))])  # [S, R, R]
    inter = (fg[:, None] & masks[None]).flatten(2).sum(-1).float()
    union = (fg[:, None] | masks[None]).flatten(2).sum(-1).float().clamp(min=1)
    return (inter / union).argmax(1)

