"""Adapters: reduced audio embeddings [B, L, H] -> FLUX.1 conditioning (CLIP pooled, T5 sequence).

Each branch is the same small network:

1. token-wise MLP  (LayerNorm, Linear, GELU, Dropout, Linear): [B, L, in_dim] -> [B, L, hidden]
   plus a learned position embedding per input token (the pooled AST tokens are frequency bands, and
   attention pooling alone would be blind to which band is which);
2. learned-latent attention pooling: K query latents attend over the L tokens
   (``nn.MultiheadAttention``, pre-LayerNorm), then a residual MLP -> [B, K, hidden];
3. LayerNorm + Linear to the output space -> [B, K, out_dim].

The CLIP branch uses K = 1 (a pooled vector), the T5 branch K = ``t5_tokens``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from common.config import AdapterConfigSection, AudioEncoderConfig, TextEncoderConfig
from common.models.audio_encoder import embedding_shape
from common.models.text_encoders import FLUX_CLIP_DIM, FLUX_T5_DIM
from common.seeds import seeded

__all__ = ["AdapterConfig", "Adapters", "BranchAdapter"]


@dataclass
class AdapterConfig:
    """The adapters' architecture: the config's ``adapter.*`` section plus the dims it is derived from.

    No field has a default: build it with :meth:`from_sections` (input dims from the audio encoder,
    output dims from the text targets, ``t5_tokens`` from ``text-encoder.t5-tokens``, the rest from
    ``adapter.*``) or read it back from a checkpoint with :meth:`from_dict`.
    """

    in_dim: int
    in_tokens: int
    clip_dim: int
    t5_dim: int
    t5_tokens: int
    hidden_dim: int
    heads: int
    dropout: float

    def __post_init__(self) -> None:
        for name in ("in_dim", "in_tokens", "clip_dim", "t5_dim", "t5_tokens", "hidden_dim", "heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"AdapterConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_dim % self.heads:
            raise ValueError(f"AdapterConfig.hidden_dim ({self.hidden_dim}) must be divisible by heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdapterConfig.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_sections(cls, adapter: AdapterConfigSection, audio_encoder: AudioEncoderConfig,
                      text_encoder: TextEncoderConfig, clip_dim: int = FLUX_CLIP_DIM,
                      t5_dim: int = FLUX_T5_DIM) -> "AdapterConfig":
        """The one place the architecture is built from the config's sections (output dims: FLUX.1's
        spaces unless the class targets say otherwise)."""
        tokens, hidden = embedding_shape(audio_encoder)
        return cls(in_dim=hidden, in_tokens=tokens, clip_dim=clip_dim, t5_dim=t5_dim,
                   t5_tokens=text_encoder.t5_tokens, hidden_dim=adapter.hidden_dim, heads=adapter.heads,
                   dropout=adapter.dropout)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdapterConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown AdapterConfig key(s): {', '.join(unknown)}")
        return cls(**d)


class BranchAdapter(nn.Module):
    """[B, L, in_dim] -> [B, num_latents, out_dim] (token MLP, latent attention pooling, projection)."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_latents: int,
        heads: int,
        dropout: float,
        in_tokens: int | None = None,
    ) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.num_latents, self.in_tokens = in_dim, out_dim, num_latents, in_tokens
        self.token_mlp = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
        )
        self.pos = nn.Parameter(torch.randn(in_tokens, hidden_dim) * 0.02) if in_tokens else None
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_dim) * 0.02)
        # Input-conditioned queries: a linear summary of all tokens (in order) is added to every latent.
        self.summary = nn.Linear(in_tokens * hidden_dim, hidden_dim) if in_tokens else None
        self.norm_q = nn.LayerNorm(hidden_dim)
        self.norm_kv = nn.LayerNorm(hidden_dim)
        self.attn = nn.MultiheadAttention(hidden_dim, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(
            nn.LayerNorm(hidden_dim),
            nn.Linear(hidden_dim, 2 * hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(2 * hidden_dim, hidden_dim),
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 3 or x.shape[-1] != self.in_dim:
            raise ValueError(f"expected [B, L, {self.in_dim}] input, got {tuple(x.shape)}")
        h = self.token_mlp(x)
        if self.pos is not None:
            if h.shape[1] != self.pos.shape[0]:
                raise ValueError(f"expected {self.pos.shape[0]} input tokens, got {h.shape[1]}")
            h = h + self.pos
        q = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        if self.summary is not None:
            q = q + self.summary(h.flatten(1)).unsqueeze(1)
        kv = self.norm_kv(h)
        z = q + self.attn(self.norm_q(q), kv, kv, need_weights=False)[0]
        z = z + self.mlp(z)
        return self.out(z)


class Adapters(nn.Module):
    """Both branches: ``forward(x [B, L, H]) -> (clip [B, clip_dim], t5 [B, t5_tokens, t5_dim])``."""

    def __init__(self, cfg: AdapterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        common = dict(in_dim=cfg.in_dim, hidden_dim=cfg.hidden_dim, heads=cfg.heads, dropout=cfg.dropout, in_tokens=cfg.in_tokens)
        self.clip = BranchAdapter(out_dim=cfg.clip_dim, num_latents=1, **common)
        self.t5 = BranchAdapter(out_dim=cfg.t5_dim, num_latents=cfg.t5_tokens, **common)

    @classmethod
    def seeded(cls, cfg: AdapterConfig, seed: int) -> "Adapters":
        """Adapters with a seeded init, so every node and the server start from the same weights; the init
        runs in a fork of the global RNG, so the caller's RNG is left as it was."""
        with seeded(seed):
            return cls(cfg)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.ndim == 2:  # [B, H] (e.g. a CLS embedding stored without its L=1 axis)
            x = x.unsqueeze(1)
        return self.clip(x)[:, 0], self.t5(x)

    def branch_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {"clip": list(self.clip.parameters()), "t5": list(self.t5.parameters())}
