"""Config dtype names -> torch dtypes, in one place (AST compute, cache storage, FLUX pipeline)."""

from __future__ import annotations

import torch

__all__ = ["DTYPE_NAMES", "torch_dtype"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES: tuple[str, ...] = tuple(_DTYPES)


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; an unknown name is a ``ValueError`` listing the choices."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_NAMES)}") from None
