"""Which torch device a run computes on (``device``: auto, cpu or cuda)."""

from __future__ import annotations

import torch

from common.config import ConfigError

__all__ = ["resolve_device"]


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when there is one; asking for CUDA without one is a config error naming the key."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
