"""Data layer: where clips come from and which node sees which clip.

Modules (imported directly, so that light users such as the synthetic generator do not pay for torch):

- ``esc50``     -- read an ESC-50-format folder (``meta/esc50.csv`` + ``audio/``) into :class:`Clip` records.
- ``synth``     -- generate a synthetic, learnable dataset in the exact ESC-50 layout (no downloads needed).
- ``audio``     -- decode clip files into fixed-length mono float32 tensors at the model's sample rate.
- ``partition`` -- deterministic train/val/test split and assignment of clips to federated nodes.
"""
