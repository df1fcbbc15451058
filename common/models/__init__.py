"""Models: the frozen AST audio encoder, FLUX.1 text targets and the trainable adapters.

* :mod:`common.models.audio_encoder` - ``AudioEncoder`` (waveforms -> reduced AST tokens [N, L, H]).
* :mod:`common.models.text_encoders` - ``TextEncoders`` / ``compute_class_targets`` (class prompts ->
  CLIP pooled [C, 768] and T5 [C, n, 4096] targets, as FluxPipeline computes them).
* :mod:`common.models.adapters` - ``Adapters`` (audio tokens -> both conditioning spaces).

Names are imported lazily so that ``import common.models.adapters`` does not pull in transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AudioEncoder": "audio_encoder",
    "ModelLoadError": "audio_encoder",
    "TINY_AST": "audio_encoder",
    "ast_frames": "audio_encoder",
    "audio_encoder_identity": "audio_encoder",
    "ClassTargets": "text_encoders",
    "TextEncoders": "text_encoders",
    "compute_class_targets": "text_encoders",
    "FLUX_CLIP_DIM": "text_encoders",
    "FLUX_T5_DIM": "text_encoders",
    "AdapterConfig": "adapters",
    "Adapters": "adapters",
    "BranchAdapter": "adapters",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
