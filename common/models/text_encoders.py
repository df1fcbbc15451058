"""Per-class target embeddings in FLUX.1's two text-conditioning spaces.

FLUX.1 is conditioned on the CLIP-L text model's ``pooler_output`` (B, 768) and on the T5-XXL encoder's
``last_hidden_state`` (B, seq, 4096). :class:`TextEncoders` reproduces diffusers'
``FluxPipeline._get_clip_prompt_embeds`` / ``_get_t5_prompt_embeds`` exactly (same tokenizer calls, no
attention mask), so the adapters learn to produce what FLUX itself would compute from the class prompt.

``"tiny"`` builds a CLIP text model and a T5 encoder with the *real* output widths (768, 4096) but one
or two narrow layers, plus an offline tokenizer (see :func:`tiny_tokenizer`), with seeded weights.
Anything else is a local FLUX.1 folder in the diffusers layout (``tokenizer/``, ``text_encoder/``,
``tokenizer_2/``, ``text_encoder_2/``) or a hub id whose snapshot is in the local Hugging Face cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.atomic import atomic_path
from common.dtypes import DTYPE_NAMES, torch_dtype
from common.models.audio_encoder import ModelLoadError, hf_offline
from common.models.fingerprint import files_fingerprint
from common.seeds import seeded

log = logging.getLogger(__name__)

__all__ = [
    "FLUX_CLIP_DIM",
    "FLUX_T5_DIM",
    "TINY_CLIP_TEXT",
    "TINY_T5",
    "ClassTargets",
    "ModelLoadError",
    "TextEncoders",
    "class_prompts",
    "compute_class_targets",
    "text_encoder_identity",
    "tiny_tokenizer",
]

FLUX_CLIP_DIM = 768
FLUX_T5_DIM = 4096
FLUX_SUBFOLDERS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")

# Tiny presets: real output widths, few narrow layers, default (transformers) init. Depth was chosen by
# measuring how well random encoders separate the class prompts (they differ in one or two words):
# the CLIP pooled (EOS) vector collapses with depth (10 default classes, max off-diagonal cosine
# ~0.95 with 1 layer, ~0.98 with 2, ~0.99 with 4), so the tiny CLIP has a single layer with CLIP-L's
# head width (12 heads x 64).
TINY_CLIP_TEXT: dict[str, Any] = dict(
    hidden_size=FLUX_CLIP_DIM,
    intermediate_size=512,
    num_hidden_layers=1,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=FLUX_CLIP_DIM,
    hidden_act="quick_gelu",
    attention_dropout=0.0,
    initializer_factor=1.0,
)
TINY_T5: dict[str, Any] = dict(
    d_model=FLUX_T5_DIM,
    d_kv=32,
    d_ff=256,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
    is_encoder_decoder=False,
    use_cache=False,
    tie_word_embeddings=False,
    initializer_factor=1.0,
)
TINY_CLIP_MAX_LENGTH = 77  # FLUX's tokenizer_max_length
TINY_T5_MAX_LENGTH = 512

# Whole-word pieces of the tiny tokenizer: prompt-template words and the ESC-50 / VEGAS class words,
# so typical prompts take one token per word (like T5's sentencepiece), which matters with a 16-token
# T5 budget. Any other text still tokenizes: unknown words fall back to characters, unknown
# characters to UTF-8 bytes. Changing this list changes the tokenizer hash and hence target caches.
TINY_WORDS: tuple[str, ...] = tuple(
    """
    a an the of and or with in on at by for from to is are this that it its there some
    photo picture image painting drawing illustration render sound sounds audio recording clip noise
    people person man woman child children boy girl someone playing making being
    dog rooster pig cow frog cat hen insects insect sheep crow rain sea waves crackling fire crickets
    chirping birds bird water drops wind pouring toilet flush thunderstorm crying baby sneezing
    clapping breathing coughing footsteps laughing brushing teeth snoring drinking sipping door wood
    knock mouse click keyboard typing creaks can opening washing machine vacuum cleaner clock alarm
    tick glass breaking helicopter chainsaw siren car horn engine train church bells airplane
    fireworks hand saw drum printer rail transport flowing gun hammer cough sneeze guitar piano
    violin singing speech music
    """.split()
)


# ----------------------------------------------------------------------------------- tokenizer
def _tiny_tokenizer_json() -> str:
    """Serialized `tokenizers` model shared by both tiny tokenizers (deterministic, offline)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    specials = ["<pad>", "</s>", "<unk>", "<s>"]
    vocab: list[tuple[str, float]] = [(s, 0.0) for s in specials]
    vocab += [(f"<0x{b:02X}>", 0.0) for b in range(256)]  # byte fallback pieces
    chars = ["\u2581"] + list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab += [(c, -10.0) for c in chars]
    vocab += [("\u2581" + w, -1.0) for w in dict.fromkeys(TINY_WORDS)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="\u2581", prepend_scheme="always")])
    return tok.to_str()


def tiny_tokenizer(kind: str):
    """Offline tokenizer for the tiny encoders, wrapped as a transformers fast tokenizer.

    ``kind="clip"``: ``<s> ... </s>``, padded to 77 like CLIP; ``kind="t5"``: ``... </s>`` like T5.
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_tiny_tokenizer_json())
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    if kind == "clip":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
        )
        max_len = TINY_CLIP_MAX_LENGTH
    elif kind == "t5":
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
        )
        max_len = TINY_T5_MAX_LENGTH
    else:
        raise ValueError(f"kind must be 'clip' or 't5', got {kind!r}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=max_len,
        padding_side="right",
    )


# ----------------------------------------------------------------------------------- identity
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _resolve_flux_folder(model: str) -> Path:
    """Local folder of a FLUX.1 checkpoint: the path itself, or a hub snapshot in the local cache."""
    path = Path(model).expanduser()
    if not path.exists():
        if path.is_absolute() or model.startswith((".", "~")) or model.count("/") != 1:
            raise ModelLoadError(
                f"text-encoder path '{model}' does not exist. Use a local FLUX.1 folder (diffusers layout: "
                f"{', '.join(FLUX_SUBFOLDERS)}), a hub id cached under HF_HOME with HF_HUB_OFFLINE=1, or 'tiny'."
            )
        try:
            from huggingface_hub import snapshot_download

            path = Path(
                snapshot_download(
                    model,
                    allow_patterns=[f"{s}/*" for s in FLUX_SUBFOLDERS] + ["model_index.json"],
                    local_files_only=hf_offline(),
                )
            )
        except Exception as err:
            raise ModelLoadError(
                f"text encoders '{model}' are not available offline ({type(err).__name__}: {err}). Point the "
                "setting at a local FLUX.1 folder, pre-populate HF_HOME and set HF_HUB_OFFLINE=1, or use 'tiny'."
            ) from err
    for sub in FLUX_SUBFOLDERS:
        if not (path / sub).is_dir():
            raise ModelLoadError(
                f"'{path}' is not a FLUX.1 folder: subfolder '{sub}/' is missing (needs {', '.join(FLUX_SUBFOLDERS)})"
            )
    return path


def text_encoder_identity(model: str, seed: int = 0, dtype: str | None = None) -> dict[str, Any]:
    """Identity of the text encoders *without loading them* (so a target-cache hit stays cheap).

    tiny: the two configs, the tokenizer's sha256 and the seed. Folder: its resolved path and a
    fingerprint of every file under the four subfolders (full hash of small files, size + first/last
    MiB of weight shards).
    """
    if model == "tiny":
        return {
            "model": "tiny",
            "seed": int(seed),
            "dtype": dtype or "float32",
            "clip_config": dict(TINY_CLIP_TEXT),
            "t5_config": dict(TINY_T5),
            "tokenizer_sha256": _sha256(_tiny_tokenizer_json().encode()),
        }
    root = _resolve_flux_folder(model)
    files = [f for sub in FLUX_SUBFOLDERS for f in sorted(p for p in (root / sub).rglob("*") if p.is_file())]
    return {"model": str(model), "path": str(root.resolve()), "dtype": dtype or "auto",
            "files_sha256": files_fingerprint(root, files)}


# ----------------------------------------------------------------------------------- encoders

class TextEncoders:
    """CLIP-L (pooled) + T5 (sequence) text encoders, used the way FluxPipeline uses them."""

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, *, model: str, seed: int,
                 dtype: str | None, device: str = "cpu") -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2.eval().requires_grad_(False)
        self.model = model
        self.seed = seed
        self.dtype = dtype
        self.device = torch.device(device)
        self._identity: dict[str, Any] | None = None

    @classmethod
    def build(cls, model: str, seed: int = 0, dtype: str | None = None, device: str = "cpu") -> "TextEncoders":
        """``"tiny"`` or a FLUX.1 folder / cached hub id. ``dtype`` None keeps the checkpoint's dtype."""
        if dtype is not None and dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)} or None, got {dtype!r}")
        model = str(model)
        if model == "tiny":
            enc = cls._build_tiny(seed, device)
            if dtype is not None and dtype != "float32":
                enc.text_encoder.to(torch_dtype(dtype))
                enc.text_encoder_2.to(torch_dtype(dtype))
                enc.dtype = dtype
            return enc
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        root = _resolve_flux_folder(model)
        load_dtype: Any = torch_dtype(dtype) if dtype else "auto"

        def load(sub: str, fn):
            try:
                return fn(str(root / sub))
            except Exception as err:
                raise ModelLoadError(
                    f"cannot load '{sub}' from FLUX.1 folder '{root}' ({type(err).__name__}: {err})"
                ) from err

        # AutoTokenizer resolves tokenizer_config.json's class (CLIPTokenizer / T5Tokenizer in FLUX.1
        # folders, PreTrainedTokenizerFast for a saved tiny preset).
        tok = load("tokenizer", lambda p: AutoTokenizer.from_pretrained(p, local_files_only=True))
        clip = load("text_encoder", lambda p: CLIPTextModel.from_pretrained(p, dtype=load_dtype, local_files_only=True))
        tok2 = load("tokenizer_2", lambda p: AutoTokenizer.from_pretrained(p, local_files_only=True))
        t5 = load("text_encoder_2", lambda p: T5EncoderModel.from_pretrained(p, dtype=load_dtype, local_files_only=True))
        if clip.config.hidden_size != FLUX_CLIP_DIM or t5.config.d_model != FLUX_T5_DIM:
            log.warning(
                "text encoders in %s have widths %d/%d, FLUX.1 uses %d/%d",
                root, clip.config.hidden_size, t5.config.d_model, FLUX_CLIP_DIM, FLUX_T5_DIM,
            )
        return cls(tok, clip.to(device), tok2, t5.to(device), model=model, seed=seed, dtype=dtype, device=device)

    @classmethod
    def _build_tiny(cls, seed: int, device: str) -> "TextEncoders":
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        tok, tok2 = tiny_tokenizer("clip"), tiny_tokenizer("t5")
        ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        clip_cfg = CLIPTextConfig(vocab_size=len(tok), **TINY_CLIP_TEXT, **ids)
        t5_cfg = T5Config(
            vocab_size=len(tok2), **TINY_T5, pad_token_id=tok2.pad_token_id,
            eos_token_id=tok2.eos_token_id, decoder_start_token_id=tok2.pad_token_id,
        )
        with seeded(seed):
            clip = CLIPTextModel(clip_cfg)
            t5 = T5EncoderModel(t5_cfg)
        return cls(tok, clip.to(device), tok2, t5.to(device), model="tiny", seed=seed, dtype="float32", device=device)

    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            self._identity = text_encoder_identity(self.model, self.seed, self.dtype)
        return self._identity

    def _warn_truncated(self, tokenizer, prompts: list[str], max_length: int, what: str) -> None:
        lengths = [len(ids) for ids in tokenizer(prompts, truncation=False)["input_ids"]]
        cut = [p for p, n in zip(prompts, lengths) if n > max_length]
        if cut:
            log.warning("%s truncates %d prompt(s) to %d tokens, e.g. %r", what, len(cut), max_length, cut[:3])

    def encode(self, prompts: list[str], t5_tokens: int, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (pooled CLIP [B, 768], T5 [B, t5_tokens, 4096]), float32 on CPU; as FluxPipeline computes them."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        clip_len = int(self.tokenizer.model_max_length)
        self._warn_truncated(self.tokenizer, prompts, clip_len, "CLIP")
        self._warn_truncated(self.tokenizer_2, prompts, t5_tokens, "T5")
        clips, t5s = [], []
        with torch.inference_mode():
            for i in range(0, len(prompts), batch_size):
                chunk = prompts[i : i + batch_size]
                ids = self.tokenizer(
                    chunk, padding="max_length", max_length=clip_len, truncation=True,
                    return_overflowing_tokens=False, return_length=False, return_tensors="pt",
                ).input_ids
                pooled = self.text_encoder(ids.to(self.device), output_hidden_states=False).pooler_output
                ids2 = self.tokenizer_2(
                    chunk, padding="max_length", max_length=t5_tokens, truncation=True,
                    return_length=False, return_overflowing_tokens=False, return_tensors="pt",
                ).input_ids
                seq = self.text_encoder_2(ids2.to(self.device), output_hidden_states=False)[0]
                clips.append(pooled.float().cpu())
                t5s.append(seq.float().cpu())
        return torch.cat(clips), torch.cat(t5s)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the diffusers FLUX.1 layout (tokenizer/, text_encoder/, tokenizer_2/, text_encoder_2/)."""
        path = Path(path)
        self.tokenizer.save_pretrained(path / "tokenizer")
        self.text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
        self.tokenizer_2.save_pretrained(path / "tokenizer_2")
        self.text_encoder_2.save_pretrained(path / "text_encoder_2", safe_serialization=True)


# ----------------------------------------------------------------------------------- targets
@dataclass
class ClassTargets:
    """Per-class targets: ``clip`` [C, 768] pooled CLIP, ``t5`` [C, n, 4096]; row i is ``class_names[i]``."""

    class_names: list[str]
    clip: torch.Tensor
    t5: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)  # encoder identity, template, prompts

    def __post_init__(self) -> None:
        c = len(self.class_names)
        if self.clip.ndim != 2 or self.clip.shape[0] != c:
            raise ValueError(f"clip targets must be [{c}, D], got {tuple(self.clip.shape)}")
        if self.t5.ndim != 3 or self.t5.shape[0] != c:
            raise ValueError(f"t5 targets must be [{c}, n, D], got {tuple(self.t5.shape)}")

    @property
    def t5_tokens(self) -> int:
        return int(self.t5.shape[1])

    def save(self, path: str | os.PathLike) -> None:
        """safetensors + JSON metadata, written atomically (:func:`common.atomic.atomic_path`)."""
        path = Path(path)
        metadata = {
            "format": "feda2v.class_targets/1",
            "class_names": json.dumps(list(self.class_names)),
            "clip_dim": str(self.clip.shape[1]),
            "t5_dim": str(self.t5.shape[2]),
            "t5_tokens": str(self.t5.shape[1]),
            "meta": json.dumps(self.meta, sort_keys=True, default=str),
        }
        with atomic_path(path) as tmp:
            save_file(
                {"clip": self.clip.detach().float().contiguous().cpu(), "t5": self.t5.detach().float().contiguous().cpu()},
                str(tmp), metadata=metadata,
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ClassTargets":
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            if "class_names" not in md:
                raise ValueError(f"{path}: not a class-targets file (no class_names metadata)")
            clip, t5 = f.get_tensor("clip"), f.get_tensor("t5")
        return cls(json.loads(md["class_names"]), clip, t5, json.loads(md.get("meta", "{}")))


def class_prompts(class_names: list[str], template: str) -> list[str]:
    """``template.format(label=...)`` with underscores as spaces: 'clock_tick' -> 'a photo of a clock tick'."""
    return [template.format(label=name.replace("_", " ")) for name in class_names]


def compute_class_targets(
    model: str,
    class_names: list[str],
    template: str,
    t5_tokens: int,
    cache_dir: Path | None,
    seed: int = 0,
    dtype: str | None = None,
    device: str = "cpu",
) -> ClassTargets:
    """Targets for ``class_names``; cached in ``cache_dir`` by (encoder identity, template, names, t5_tokens).

    A cache hit reads one safetensors file and never builds the text encoders.
    """
    class_names = list(class_names)
    identity = text_encoder_identity(str(model), seed, dtype)
    key_src = {"encoder": identity, "template": template, "class_names": class_names, "t5_tokens": int(t5_tokens)}
    key = _sha256(json.dumps(key_src, sort_keys=True).encode())
    cache_file = Path(cache_dir) / f"class-targets-{key[:20]}.safetensors" if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        try:
            targets = ClassTargets.load(cache_file)
            if targets.class_names == class_names and targets.t5_tokens == t5_tokens:
                log.info("class targets: cache hit %s", cache_file)
                return targets
            log.warning("class targets cache %s does not match its key; recomputing", cache_file)
        except Exception as err:  # corrupt/partial file: recompute and overwrite
            log.warning("class targets cache %s unreadable (%s); recomputing", cache_file, err)
    prompts = class_prompts(class_names, template)
    encoders = TextEncoders.build(str(model), seed=seed, dtype=dtype, device=device)
    clip, t5 = encoders.encode(prompts, t5_tokens)
    targets = ClassTargets(
        class_names, clip, t5,
        meta={"encoder": identity, "template": template, "prompts": prompts, "key": key},
    )
    if cache_file is not None:
        targets.save(cache_file)
    return targets
