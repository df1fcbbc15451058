"""Frozen Audio Spectrogram Transformer (AST): waveforms -> reduced token embeddings [N, L, H].

The encoder is never trained. It wraps ``ASTFeatureExtractor`` (kaldi fbank, 128 mel bins, 10 ms hop)
and ``ASTModel`` and reduces the patch tokens to a small, fixed number of tokens so that embeddings can
be cached and exchanged cheaply.

Clip length drives ``max_length`` (frames): a 5-s clip has 498 fbank frames, so the model is adapted to
498 frames instead of padding every clip to the 1024 frames (10.24 s) the checkpoints were trained on.
Pretrained position embeddings are kept, cropped (or linearly interpolated) along the *time* axis of the
(frequency x time) patch grid; they are never re-initialised.

Reductions (``reduction``):

* ``"cls"``  -> L = 1: the CLS token (token 0) of the last layer (after the final LayerNorm).
* ``"pool"`` -> L = ``tokens``: the patch tokens (CLS/distillation excluded), in the model's own
  sequence order, adaptively average-pooled to ``tokens`` tokens. AST's sequence is frequency-major
  (index = f * T + t), so each pooled token summarises a band of frequencies over the whole clip.
  Chosen by measurement (linear probe on the default synthetic federation, 280 train / 80 test
  clips, tiny AST): sequence pooling to 8-16 tokens 0.85-0.875; frequency-rows (time-averaged)
  0.85; 2-D grid pools (4x2, 4x4, 6x2, 12x2) 0.71-0.80; time segments (frequency-averaged) 0.54;
  CLS alone 0.65. Spectral shape is what separates sound classes; averaging over frequency first
  throws most of it away.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from common.config import AudioEncoderConfig
from common.dtypes import torch_dtype
from common.errors import FedA2VError
from common.models.fingerprint import files_fingerprint
from common.seeds import seeded

if TYPE_CHECKING:  # transformers is imported where a model is built: a fully cached node never pays for it
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

log = logging.getLogger(__name__)

__all__ = [
    "EXTRACTION_VERSION",
    "TINY_AST",
    "AudioEncoder",
    "ModelLoadError",
    "ast_frames",
    "audio_encoder_identity",
    "build_tiny_ast",
    "embedding_shape",
    "hf_offline",
    "resize_time_positions",
]

# Small AST for tests and the demo: real feature pipeline (128 mel bins, 16x16 patches, stride 10),
# so the sequence is as long as the real model's (12 x 49 + 2 = 590 tokens for 5 s), but narrow/shallow.
TINY_AST: dict[str, Any] = dict(
    hidden_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=512,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    patch_size=16,
    frequency_stride=10,
    time_stride=10,
    num_mel_bins=128,
)

# Bump when code that shapes an embedding changes without any identity field changing (audio decoding
# or resampling, fbank settings, the reduction): every embedding cache is then invalidated.
EXTRACTION_VERSION = 1

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ModelLoadError(FedA2VError, ValueError):
    """A model (or its tokenizer/feature extractor) cannot be loaded from what is available offline."""


def embedding_shape(section: AudioEncoderConfig) -> tuple[int, int]:
    """(L, H) of a reduced AST embedding, known without loading AST weights."""
    tokens = 1 if section.reduction == "cls" else section.tokens
    if section.model == "tiny":
        return tokens, int(TINY_AST["hidden_size"])
    from transformers import ASTConfig

    try:
        hidden = ASTConfig.from_pretrained(section.model).hidden_size
    except OSError as err:
        raise ModelLoadError(
            f"audio-encoder.model '{section.model}': config not available offline ({err}). "
            "Point it at a local folder, set HF_HOME to a cache holding it, or use 'tiny'."
        ) from None
    return tokens, int(hidden)


def hf_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(
        os.environ.get(k, "").strip().lower() in {"1", "true", "yes", "on"}
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _load_hint(model: str) -> str:
    return (
        f"Cannot load '{model}' offline. Point the model setting at a local folder holding the weights "
        "(config.json + *.safetensors), or pre-populate the Hugging Face cache (HF_HOME) and set "
        "HF_HUB_OFFLINE=1, or use 'tiny' for the small random-weight preset."
    )


def ast_frames(clip_seconds: float, sample_rate: int) -> int:
    """Number of kaldi fbank frames (25 ms window, 10 ms shift, snip_edges) of a clip: 5 s -> 498, 10 s -> 998 at 16 kHz."""
    if clip_seconds <= 0 or sample_rate <= 0:
        raise ValueError(f"clip_seconds and sample_rate must be positive, got {clip_seconds}, {sample_rate}")
    num_samples = int(round(clip_seconds * sample_rate))
    window = int(sample_rate * 25.0 * 0.001)  # same expressions as torchaudio.compliance.kaldi
    shift = int(sample_rate * 10.0 * 0.001)
    if num_samples < window:
        raise ValueError(f"a {clip_seconds}-s clip at {sample_rate} Hz is shorter than one 25-ms fbank window")
    return 1 + (num_samples - window) // shift


def _patch_grid(config: ASTConfig) -> tuple[int, int]:
    """(frequency, time) size of the patch grid; same formula as ``ASTEmbeddings.get_shape``."""
    f = (config.num_mel_bins - config.patch_size) // config.frequency_stride + 1
    t = (config.max_length - config.patch_size) // config.time_stride + 1
    return f, t


def build_tiny_ast(max_length: int, seed: int = 0) -> ASTModel:
    """The ``tiny`` preset: ``ASTConfig(**TINY_AST, max_length)`` with seeded random weights.

    CLS, distillation and position embeddings (zeros in the transformers init) get N(0, 0.02) like the
    original AST, so the tiny model has positional information and position-embedding surgery is
    observable. The global RNG state is left untouched.
    """
    from transformers import ASTConfig, ASTModel

    config = ASTConfig(**TINY_AST, max_length=int(max_length))
    with seeded(seed):
        model = ASTModel(config)
        emb = model.embeddings
        with torch.no_grad():
            for p in (emb.cls_token, emb.distillation_token, emb.position_embeddings):
                p.normal_(0.0, config.initializer_range)
    return model.eval()


@torch.no_grad()
def resize_time_positions(model: ASTModel, max_length: int) -> None:
    """Adapt an AST to ``max_length`` fbank frames in place, keeping its trained position embeddings.

    The patch position embeddings form a (freq x time) grid (frequency-major, as produced by the patch
    Conv2d + flatten). Shorter: keep the first time columns of every frequency row - exactly the
    positions a short clip zero-padded to the original length would occupy. Longer: linear
    interpolation along time. CLS and distillation embeddings are kept as they are.
    """
    config = model.config
    emb = model.embeddings
    if config.max_length == max_length:
        return
    f_old, t_old = _patch_grid(config)
    f_new, t_new = f_old, (int(max_length) - config.patch_size) // config.time_stride + 1
    if t_new < 1:
        raise ValueError(f"max_length={max_length} frames is shorter than one AST patch ({config.patch_size})")
    pos = emb.position_embeddings.data  # [1, 2 + F*T, H]
    hidden = pos.shape[-1]
    if pos.shape[1] != 2 + f_old * t_old:
        raise ValueError(f"position embeddings have {pos.shape[1]} entries, expected 2 + {f_old}x{t_old}")
    special, grid = pos[:, :2], pos[:, 2:].reshape(f_old, t_old, hidden)
    if t_new <= t_old:
        grid = grid[:, :t_new]
    else:
        grid = F.interpolate(
            grid.permute(0, 2, 1).float(), size=t_new, mode="linear", align_corners=False
        ).permute(0, 2, 1).to(pos.dtype)
    new_pos = torch.cat([special, grid.reshape(1, f_new * t_new, hidden)], dim=1).contiguous()
    emb.position_embeddings = torch.nn.Parameter(new_pos, requires_grad=emb.position_embeddings.requires_grad)
    config.max_length = int(max_length)
    if getattr(emb, "config", None) is not None and emb.config is not config:
        emb.config.max_length = int(max_length)


class AudioEncoder:
    """Frozen AST + feature extractor + reduction. Build it with :meth:`build`."""

    def __init__(
        self,
        model: ASTModel,
        feature_extractor: ASTFeatureExtractor,
        *,
        model_id: str,
        clip_seconds: float,
        sample_rate: int,
        reduction: str,
        tokens: int,
        dtype: str,
        device: str,
        seed: int | None,
    ) -> None:
        if reduction not in ("cls", "pool"):
            raise ValueError(f"reduction must be 'cls' or 'pool', got {reduction!r}")
        self.model = model
        self.feature_extractor = feature_extractor
        self.model_id = model_id
        self.clip_seconds = float(clip_seconds)
        self.sample_rate = int(sample_rate)
        self.reduction = reduction
        self.dtype = dtype
        self.device = torch.device(device)
        self.seed = seed
        self.max_length = int(model.config.max_length)
        self.hidden_size = int(model.config.hidden_size)
        self.grid = _patch_grid(model.config)  # (freq, time) patches
        if reduction == "pool" and not 1 <= tokens <= self.grid[0] * self.grid[1]:
            raise ValueError(
                f"tokens={tokens} must be between 1 and the {self.grid[0] * self.grid[1]} patches of a "
                f"{clip_seconds}-s clip"
            )
        self.tokens = int(tokens)
        self.num_tokens = 1 if reduction == "cls" else self.tokens

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        model: str,
        clip_seconds: float,
        *,
        sample_rate: int,
        reduction: str,
        tokens: int,
        dtype: str,
        seed: int,
        device: str = "cpu",
    ) -> "AudioEncoder":
        """``model``: ``"tiny"``, a local folder (``save_pretrained`` layout) or a hub id in the local cache.

        No setting has a default here: they come from the config (``audio-encoder.*``, ``data.*``,
        ``seed``) through :meth:`common.cache.embed.ExtractionSettings.of`.
        """
        compute_dtype = torch_dtype(dtype)
        max_length = ast_frames(clip_seconds, sample_rate)
        model = str(model)
        if model == "tiny":
            from transformers import ASTFeatureExtractor

            ast = build_tiny_ast(max_length, seed)
            fe = ASTFeatureExtractor()
            used_seed: int | None = seed
        else:
            ast, fe = _load_pretrained(model)
            resize_time_positions(ast, max_length)
            used_seed = None
        fe.max_length = ast.config.max_length
        fe.sampling_rate = int(sample_rate)
        fe.num_mel_bins = ast.config.num_mel_bins
        ast.requires_grad_(False)
        ast.to(device=device, dtype=compute_dtype).eval()
        return cls(
            ast,
            fe,
            model_id=model,
            clip_seconds=clip_seconds,
            sample_rate=sample_rate,
            reduction=reduction,
            tokens=tokens,
            dtype=dtype,
            device=device,
            seed=used_seed,
        )

    # ------------------------------------------------------------------ encoding
    def _reduce(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.float()
        if self.reduction == "cls":
            return hidden[:, :1]
        patches = hidden[:, 2:]  # [B, F*T, H], frequency-major
        return F.adaptive_avg_pool1d(patches.transpose(1, 2), self.tokens).transpose(1, 2)

    def encode(self, waveforms: torch.Tensor, batch_size: int, progress: bool = False) -> torch.Tensor:
        """[N, S] mono waveforms at ``sample_rate`` -> [N, L, H] float32 CPU embeddings."""
        wav = torch.as_tensor(waveforms)
        if wav.ndim == 1:
            wav = wav.unsqueeze(0)
        if wav.ndim != 2:
            raise ValueError(f"waveforms must be [N, samples], got shape {tuple(wav.shape)}")
        wav = wav.detach().to("cpu", torch.float32)
        n = wav.shape[0]
        out = torch.empty(n, self.num_tokens, self.hidden_size, dtype=torch.float32)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc="AST embeddings", unit="clip")
        model_dtype = torch_dtype(self.dtype)
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                chunk = wav[start : start + batch_size].numpy()
                feats = self.feature_extractor(
                    list(chunk), sampling_rate=self.sample_rate, return_tensors="pt"
                )["input_values"]
                hidden = self.model(feats.to(self.device, model_dtype)).last_hidden_state
                out[start : start + chunk.shape[0]] = self._reduce(hidden).cpu()
                if bar is not None:
                    bar.update(chunk.shape[0])
        if bar is not None:
            bar.close()
        return out

    # ------------------------------------------------------------------ identity / saving
    def identity(self) -> dict[str, Any]:
        """JSON-able description of everything that changes the embedding (embedding-cache key fields).

        Equal to :func:`audio_encoder_identity` with this encoder's settings, so a cache can be keyed
        before any encoder exists. (:meth:`weights_sha256` hashes the loaded tensors instead, when an
        exact check of the weights in memory is wanted.)
        """
        return audio_encoder_identity(
            self.model_id,
            self.clip_seconds,
            self.sample_rate,
            self.reduction,
            self.tokens,
            self.dtype,
            self.seed if self.seed is not None else 0,
        )

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Save model (safetensors, at its adapted max_length) and feature extractor into ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.feature_extractor.save_pretrained(path)

    def __repr__(self) -> str:
        return (
            f"AudioEncoder(model={self.model_id!r}, hidden={self.hidden_size}, max_length={self.max_length}, "
            f"reduction={self.reduction!r}, L={self.num_tokens}, dtype={self.dtype}, device={self.device})"
        )


def _load_pretrained(model: str) -> tuple[ASTModel, ASTFeatureExtractor]:
    """ASTModel with its original config (+ extractor) from a local folder or the local HF cache."""
    from transformers import ASTFeatureExtractor, ASTModel

    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"'{model}' exists but has no config.json: not an AST model folder. " + _load_hint(model))
        source, local_only = str(path), True
    elif _HUB_ID.match(model) and not model.startswith((".", "~")):
        source, local_only = model, hf_offline()
    else:
        raise ModelLoadError(f"audio encoder path '{model}' does not exist. " + _load_hint(model))
    try:
        ast = ASTModel.from_pretrained(source, dtype=torch.float32, local_files_only=local_only)
    except Exception as err:  # hub/IO errors come in many types; keep the original as __cause__
        raise ModelLoadError(f"{_load_hint(model)} ({type(err).__name__}: {err})") from err
    fe: ASTFeatureExtractor
    if path.exists():
        fe = (
            ASTFeatureExtractor.from_pretrained(source)
            if (path / "preprocessor_config.json").is_file()
            else ASTFeatureExtractor()
        )
    else:
        try:
            fe = ASTFeatureExtractor.from_pretrained(source, local_files_only=local_only)
        except Exception as err:
            log.warning("no feature-extractor config for %s (%s); using ASTFeatureExtractor defaults", model, err)
            fe = ASTFeatureExtractor()
    return ast, fe


# Files of an AST checkpoint that from_pretrained reads: configs and weights (not READMEs, .gitattributes).
_MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin")


def _resolve_ast_folder(model: str) -> Path:
    """Local folder of an AST checkpoint: the path itself, or its snapshot in the local HF cache.

    Same resolution rules as :func:`_load_pretrained`, but nothing is loaded. The local cache is tried
    first, so a cached hub id never touches the network; only when it is absent and the hub is allowed
    (no HF_HUB_OFFLINE) are the config and weight files downloaded - from_pretrained would need them
    anyway on the first cache miss.
    """
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"'{model}' exists but has no config.json: not an AST model folder. " + _load_hint(model))
        return path.resolve()
    if not (_HUB_ID.match(model) and not model.startswith((".", "~"))):
        raise ModelLoadError(f"audio encoder path '{model}' does not exist. " + _load_hint(model))
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors"]
    try:
        return Path(snapshot_download(model, allow_patterns=patterns, local_files_only=True))
    except Exception as err:  # not in the local cache (the hub raises several error types)
        if hf_offline():
            raise ModelLoadError(f"{_load_hint(model)} ({type(err).__name__}: {err})") from err
    try:
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as err:
        raise ModelLoadError(f"{_load_hint(model)} ({type(err).__name__}: {err})") from err


_FE_DEFAULT_KEYS = ("num_mel_bins", "mean", "std", "do_normalize")
_FE_MODULE = ("models", "audio_spectrogram_transformer", "feature_extraction_audio_spectrogram_transformer.py")


@functools.lru_cache(maxsize=1)
def _feature_extractor_defaults() -> dict[str, Any]:
    """The ASTFeatureExtractor defaults that shape fbanks (nothing is built).

    Why two ways: this is part of the cache key, computed in every fresh ClientApp process, and
    importing transformers there would cost more than the rest of a cached message. The defaults are read from the installed source file's
    ``__init__`` signature (literals only); if that file cannot be read that way, from the imported
    class's signature, which gives the same values (tested).
    """
    try:
        return _feature_extractor_defaults_from_source()
    except (OSError, SyntaxError, ValueError, LookupError, StopIteration) as err:
        log.debug("ASTFeatureExtractor defaults not read from source (%s): importing transformers", err)
        return _feature_extractor_defaults_from_class()


def _feature_extractor_defaults_from_class() -> dict[str, Any]:
    import inspect

    from transformers import ASTFeatureExtractor

    params = inspect.signature(ASTFeatureExtractor.__init__).parameters
    return {k: params[k].default for k in _FE_DEFAULT_KEYS if k in params}


def _feature_extractor_defaults_from_source() -> dict[str, Any]:
    import ast as pyast
    import importlib.util

    spec = importlib.util.find_spec("transformers")  # a top-level spec: transformers is not imported
    if spec is None or not spec.submodule_search_locations:
        raise LookupError("transformers is not installed")
    source = Path(list(spec.submodule_search_locations)[0]).joinpath(*_FE_MODULE)
    tree = pyast.parse(source.read_text(encoding="utf-8"), filename=str(source))
    cls = next(n for n in tree.body if isinstance(n, pyast.ClassDef) and n.name == "ASTFeatureExtractor")
    init = next(n for n in cls.body if isinstance(n, pyast.FunctionDef) and n.name == "__init__")
    args = init.args.args[len(init.args.args) - len(init.args.defaults):]
    defaults = {a.arg: pyast.literal_eval(d) for a, d in zip(args, init.args.defaults)}
    return {k: defaults[k] for k in _FE_DEFAULT_KEYS if k in defaults}


def audio_encoder_identity(
    model: str,
    clip_seconds: float,
    sample_rate: int,
    reduction: str,
    tokens: int,
    dtype: str,
    seed: int,
) -> dict[str, Any]:
    """Everything that determines an embedding, computed *without building the AST* (JSON-able).

    Why without building: this is the embedding-cache key, and a fully cached node must not pay for
    constructing (or even reading) the model. ``tiny``: its config and seed (the weights are a pure
    function of both). A folder or a cached hub snapshot: the model string plus a fingerprint of its
    config and weight files (see :mod:`common.models.fingerprint`); the seed plays no role there.
    The feature-extractor defaults are included because a folder without ``preprocessor_config.json``
    uses them. :meth:`AudioEncoder.identity` returns the same dict for a built encoder.
    """
    if reduction not in ("cls", "pool"):
        raise ValueError(f"reduction must be 'cls' or 'pool', got {reduction!r}")
    torch_dtype(dtype)  # an unknown name is a ValueError listing the choices
    model = str(model)
    ident: dict[str, Any] = {
        "encoder": "ast",
        "extraction_version": EXTRACTION_VERSION,
        "model": model,
        "sample_rate": int(sample_rate),
        "clip_seconds": float(clip_seconds),
        "max_length": ast_frames(clip_seconds, sample_rate),
        "reduction": reduction,
        "tokens": 1 if reduction == "cls" else int(tokens),
        "dtype": dtype,
        "feature_extractor_defaults": dict(_feature_extractor_defaults()),
    }
    if model == "tiny":
        ident["tiny_config"] = dict(TINY_AST)
        ident["seed"] = int(seed)
    else:
        root = _resolve_ast_folder(model)
        files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in _MODEL_FILE_SUFFIXES)
        if not any(p.suffix in (".safetensors", ".bin") for p in files):
            raise ModelLoadError(f"'{model}' ({root}) holds no weight file (*.safetensors / *.bin). " + _load_hint(model))
        ident["files_sha256"] = files_fingerprint(root, files)
    return ident
