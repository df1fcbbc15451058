"""Class-conditional generators of reduced audio embeddings ``[N, L, H]``: a VAE and a GAN.

A node trains them on its own AST embeddings so that later it (or the server) can train adapters
on synthetic embeddings without audio or AST. Both models share one layout:

* **Standardisation.** ``mean`` / ``std`` buffers of shape ``[L, H]`` (saved with the weights) are
  fitted once on the first training data; the networks see standardised embeddings and ``sample``
  returns embeddings in the original scale. (Per-token means of AST embeddings differ by far more
  than their spread, which an unnormalised MLP spends most of its capacity on.)
* **Token projection, then a flat MLP.** An embedding is ``L`` strongly correlated tokens (adjacent
  pooled AST bands correlate at ~0.84 after removing the class mean), so the models work on the
  whole embedding rather than token by token, but first map every token through one shared linear
  ``H -> token_dim`` (and back with ``token_dim -> H`` on the output side). A few token directions
  hold almost all of the variance, and the projection keeps the parameter count nearly independent
  of ``H`` (a flat ``L*H -> hidden`` input layer grows with the real AST's width). ``token_dim = 0``
  disables the projection (a flat ``L*H`` MLP, which also fit the default data worse).
* **Class conditioning** by a learned class embedding concatenated to the MLP input (encoder,
  decoder, generator); the discriminator is a projection discriminator (Miyato & Koyama 2018).
* **Batched training** (:func:`common.models.generator_training.train_generator`), losses accumulated as Python floats; nothing that
  outlives a step keeps an autograd graph.

``ConditionalVAE``: Gaussian encoder/decoder, ``loss = |x - x_hat|^2 + beta * KL`` summed over
dimensions (a unit-variance Gaussian likelihood in standardised space, up to a factor 2 absorbed
into ``beta``); samples come from a per-class Gaussian fitted to the aggregate posterior after
training (``fit_latent_prior``), not from N(0, I).

``ConditionalGAN``: hinge loss; projection discriminator with lazy R1 on real data; the generator
adds a feature-matching and a per-class moment-matching term, starts from per-class output offsets
at the class means, and is sampled from an EMA of its weights (measured effects in the comments of
``GeneratorTrainSettings`` and the docstring of ``Discriminator``).

The defaults (of the ``generator`` config section and the constants of ``GeneratorTrainSettings``)
were picked on the default federation's node embeddings (3 nodes x ~93 training clips, 10 classes,
L = 12, H = 256) for FD(generated, held-out) / FD(real half, real half), precision/recall and
training time on a 2-core CPU.

Labels everywhere in this module are **model-local** class indices ``0 .. num_classes - 1``;
mapping federation classes to a model's classes is :mod:`common.generator_bank`'s job.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from common.config.choices import GENERATOR_KINDS
from common.seeds import seeded

if TYPE_CHECKING:
    from common.config import GeneratorConfig

__all__ = [
    "GENERATOR_KINDS",
    "ConditionalGAN",
    "ConditionalVAE",
    "GeneratorSpec",
    "GeneratorTrainSettings",
    "build_generator",
]

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------------- spec
@dataclass(kw_only=True)
class GeneratorSpec:
    """Everything needed to rebuild a generator (stored as JSON in its checkpoint).

    The fields that are config keys (``generator.kind``, ``latent-dim``, ``hidden-dim``,
    ``num-layers``, ``token-dim``) and the embedding shape have no default here: build a spec with
    :meth:`from_config`, or read it back from a checkpoint with :meth:`from_dict`.
    """

    kind: Literal["vae", "gan"]
    num_classes: int = 1  # conditioning classes of this model (model-local indices; set per bank unit)
    tokens: int  # L
    dim: int  # H
    latent_dim: int
    hidden_dim: int
    num_layers: int  # hidden layers of every MLP (encoder, decoder, generator, discriminator)
    token_dim: int  # shared per-token projection H -> token_dim; 0 = flat L*H MLP
    class_dim: int = 32  # size of the learned class embedding (not a config key)

    @classmethod
    def from_config(cls, section: "GeneratorConfig", tokens: int, dim: int) -> "GeneratorSpec":
        """The architecture of a generator over ``(tokens, dim)`` embeddings from a ``generator``
        section (the server generator passes a copy with its own ``kind``)."""
        return cls(kind=section.kind, tokens=tokens, dim=dim, latent_dim=section.latent_dim,
                   hidden_dim=section.hidden_dim, num_layers=section.num_layers, token_dim=section.token_dim)

    def __post_init__(self) -> None:
        if self.kind not in GENERATOR_KINDS:
            raise ValueError(f"GeneratorSpec.kind must be one of {GENERATOR_KINDS}, got {self.kind!r}")
        for name in ("num_classes", "tokens", "dim", "latent_dim", "hidden_dim", "num_layers", "class_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GeneratorSpec.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.token_dim, int) or self.token_dim < 0:
            raise ValueError(f"GeneratorSpec.token_dim must be an integer >= 0, got {self.token_dim!r}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.tokens, self.dim)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GeneratorSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GeneratorSpec key(s): {', '.join(unknown)}")
        return cls(**d)


@dataclass(kw_only=True)
class GeneratorTrainSettings:
    """The subset of the config the generator loops need (keeps this module free of config parsing).

    ``epochs`` passes over the data, but at least ``min_steps`` optimiser steps: a per-class model
    sees ~10 clips (one batch per epoch), a unified one ~100, and both should get enough updates.
    The fields that are config keys (``generator.epochs``, ``batch-size``, ``lr``, ``min-steps``)
    and the seed have no default here: build the settings with :meth:`from_config`. The others
    are measured model constants, not configurable.
    """

    epochs: int
    batch_size: int
    lr: float | None  # None: 3e-3 for the VAE, 1e-3 for the GAN generator (measured)
    seed: int
    weight_decay: float = 0.0
    min_steps: int
    # VAE
    beta: float = 3.0  # KL weight
    kl_warmup: float = 0.0  # fraction of the training steps over which beta ramps up from 0
    fit_latent_prior: bool = True  # sample from the class's aggregate posterior, not N(0, I)
    # GAN
    lr_d: float | None = None  # discriminator learning rate (None: 2e-3)
    r1_gamma: float = 10.0  # R1 gradient penalty on real data (discriminator)
    r1_every: int = 4  # lazy R1: apply it (scaled by r1_every) every r1_every discriminator steps
    feature_matching: float = 1.0  # weight of the feature-matching term (generator)
    # weight of the per-class mean/std matching term (generator); per-class GANs on ~10 clips
    # collapsed without it (recall 0.00 -> 0.78 with 10)
    moment_matching: float = 10.0
    d_steps: int = 1  # discriminator steps per generator step
    # decay of the generator-weight moving average used for sampling (0 = off); unified GAN FD
    # ratio 1.30 -> 1.13 with 0.99
    ema: float = 0.99

    @classmethod
    def from_config(cls, section: "GeneratorConfig", seed: int) -> "GeneratorTrainSettings":
        """From a ``generator`` section (``lr`` 0 = the per-kind default); the server's merged
        generator passes a copy with its own epochs, batch size, lr and ``min-steps`` 0."""
        return cls(epochs=section.epochs, batch_size=section.batch_size, lr=section.lr or None, seed=seed,
                   min_steps=section.min_steps)

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.min_steps < 0 or self.d_steps < 1 or self.r1_every < 1:
            raise ValueError(f"invalid GeneratorTrainSettings: {self}")
        if (self.lr is not None and not self.lr > 0) or (self.lr_d is not None and not self.lr_d > 0):
            raise ValueError(f"GeneratorTrainSettings learning rates must be > 0: {self}")
        if not 0.0 <= self.kl_warmup <= 1.0:
            raise ValueError(f"GeneratorTrainSettings.kl_warmup must be in [0, 1], got {self.kl_warmup}")


# ----------------------------------------------------------------------------------- building blocks
def _mlp(in_dim: int, hidden: int, out_dim: int, layers: int, act: type[nn.Module] = nn.SiLU) -> nn.Sequential:
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), act() if act is not nn.LeakyReLU else nn.LeakyReLU(0.2)]
        d = hidden
    mods.append(nn.Linear(d, out_dim))
    return nn.Sequential(*mods)


class _TokenIn(nn.Module):
    """``[B, L, H] -> [B, L * token_dim]`` by a shared linear (or just flatten when token_dim = 0)."""

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__()
        self.proj = nn.Linear(spec.dim, spec.token_dim) if spec.token_dim else None
        self.out_dim = spec.tokens * (spec.token_dim or spec.dim)

    def forward(self, x: Tensor) -> Tensor:
        return (self.proj(x) if self.proj is not None else x).flatten(1)


class _TokenOut(nn.Module):
    """``[B, L * token_dim] -> [B, L, H]`` by a shared linear (or just reshape)."""

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__()
        self.tokens = spec.tokens
        self.proj = nn.Linear(spec.token_dim, spec.dim) if spec.token_dim else None
        self.in_dim = spec.tokens * (spec.token_dim or spec.dim)

    def forward(self, h: Tensor) -> Tensor:
        h = h.view(h.shape[0], self.tokens, -1)
        return self.proj(h) if self.proj is not None else h


class _Base(nn.Module):
    """Spec, standardisation buffers, class embedding and ``sample`` shared by both models."""

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("mean", torch.zeros(spec.tokens, spec.dim))
        self.register_buffer("std", torch.ones(spec.tokens, spec.dim))
        self.register_buffer("normalization_fitted", torch.zeros((), dtype=torch.bool))

    # -- standardisation
    @torch.no_grad()
    def fit_normalization(self, embeddings: Tensor) -> None:
        """Per-dimension mean/std of the training embeddings (std floored at 1e-3 x its mean)."""
        x = embeddings.detach().float().to(self.mean.device)
        self._check_shape(x)
        mean = x.mean(0)
        std = x.std(0, unbiased=len(x) > 1) if len(x) > 1 else torch.ones_like(mean)
        floor = 1e-3 * float(std.mean()) + 1e-8
        self.mean.copy_(mean)
        self.std.copy_(std.clamp(min=floor))
        self.normalization_fitted.fill_(True)

    def standardize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def destandardize(self, x: Tensor) -> Tensor:
        return x * self.std + self.mean

    def _check_shape(self, x: Tensor) -> None:
        if x.ndim != 3 or tuple(x.shape[1:]) != self.spec.shape:
            raise ValueError(f"expected embeddings of shape [N, {self.spec.tokens}, {self.spec.dim}], got {tuple(x.shape)}")

    def _check_labels(self, labels: Tensor) -> Tensor:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.ndim != 1:
            raise ValueError(f"labels must be a 1-D tensor, got shape {tuple(labels.shape)}")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.spec.num_classes):
            raise ValueError(
                f"labels must be model-local class indices in [0, {self.spec.num_classes}), "
                f"got range [{int(labels.min())}, {int(labels.max())}]"
            )
        return labels

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def _decode_std(self, z: Tensor, labels: Tensor) -> Tensor:  # standardised [B, L, H]
        raise NotImplementedError

    def _prior(self, z: Tensor, labels: Tensor) -> Tensor:
        """Standard-normal draws -> latents to decode (identity: the prior is N(0, I))."""
        return z

    @torch.no_grad()
    def sample(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``[N, L, H]`` embeddings (original scale, float32, CPU) for model-local ``labels [N]``.

        Latents are drawn on CPU from ``generator``, so a seed gives the same samples on any device.
        """
        labels = self._check_labels(labels)
        was_training = self.training
        self.eval()
        try:
            z = torch.randn(len(labels), self.spec.latent_dim, generator=generator)
            labels = labels.to(self.device)
            out = self.destandardize(self._decode_std(self._prior(z.to(self.device), labels), labels))
        finally:
            self.train(was_training)
        return out.float().cpu()


# ----------------------------------------------------------------------------------- VAE
class ConditionalVAE(_Base):
    """``q(z | x, y)`` and ``p(x | z, y)`` MLPs over the token-projected, flattened embedding."""

    def __init__(self, spec: GeneratorSpec) -> None:
        if spec.kind != "vae":
            raise ValueError(f"ConditionalVAE needs a spec of kind 'vae', got {spec.kind!r}")
        super().__init__(spec)
        self.class_embed = nn.Embedding(spec.num_classes, spec.class_dim)
        self.enc_in = _TokenIn(spec)
        self.encoder = _mlp(self.enc_in.out_dim + spec.class_dim, spec.hidden_dim, 2 * spec.latent_dim, spec.num_layers)
        self.dec_out = _TokenOut(spec)
        self.decoder = _mlp(spec.latent_dim + spec.class_dim, spec.hidden_dim, self.dec_out.in_dim, spec.num_layers)
        # Sampling prior per class: N(prior_mean[c], prior_scale[c] prior_scale[c]^T); N(0, I) until
        # fit_latent_prior replaces it by the class's aggregate posterior (see there).
        self.register_buffer("prior_mean", torch.zeros(spec.num_classes, spec.latent_dim))
        self.register_buffer("prior_scale", torch.eye(spec.latent_dim).repeat(spec.num_classes, 1, 1))

    def _prior(self, z: Tensor, labels: Tensor) -> Tensor:
        return self.prior_mean[labels] + (self.prior_scale[labels] @ z.unsqueeze(-1)).squeeze(-1)

    @torch.no_grad()
    def fit_latent_prior(self, embeddings: Tensor, labels: Tensor, batch_size: int = 256) -> None:
        """Ex-post class-conditional prior (Ghosh et al. 2020, "From variational to deterministic
        autoencoders"): per class, a Gaussian with the mean and covariance of the posterior means
        plus the mean posterior variance, i.e. the moments of the aggregate posterior q(z | c).

        Why: on ~10 clips per class the decoder averages over overlapping posteriors, and samples
        from N(0, I) land where no training clip's posterior was: such samples keep only part of the
        real within-class spread, and a probe trained on them does worse on real clips. Only class-level moments are stored
        (``[C, d]`` and ``[C, d, d]``), never per-clip latents.
        """
        was_training = self.training
        self.eval()
        mus, variances = [], []
        for start in range(0, len(embeddings), batch_size):
            x = embeddings[start : start + batch_size].to(self.device).float()
            mu, logvar = self.encode(self.standardize(x), labels[start : start + batch_size].to(self.device))
            mus.append(mu)
            variances.append(logvar.exp())
        mu_all, var_all = torch.cat(mus).double(), torch.cat(variances).double()
        labels = labels.to(self.device)
        eye = torch.eye(self.spec.latent_dim, dtype=torch.float64, device=self.device)
        for c in range(self.spec.num_classes):
            mask = labels == c
            if not bool(mask.any()):
                continue  # no clip of this class: keep its current prior
            m = mu_all[mask]
            centred = m - m.mean(0)
            cov = centred.T @ centred / max(len(m) - 1, 1) + torch.diag(var_all[mask].mean(0)) + 1e-6 * eye
            self.prior_mean[c] = m.mean(0).float()
            self.prior_scale[c] = torch.linalg.cholesky(cov).float()
        self.train(was_training)

    def encode(self, x_std: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(torch.cat([self.enc_in(x_std), self.class_embed(labels)], dim=1))
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)

    def _decode_std(self, z: Tensor, labels: Tensor) -> Tensor:
        return self.dec_out(self.decoder(torch.cat([z, self.class_embed(labels)], dim=1)))

    def losses(self, x: Tensor, labels: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample summed reconstruction error and KL (means over the batch), standardised space."""
        x_std = self.standardize(x)
        mu, logvar = self.encode(x_std, labels)
        z = mu + torch.exp(0.5 * logvar) * eps
        recon = ((self._decode_std(z, labels) - x_std) ** 2).flatten(1).sum(1).mean()
        kl = (0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)).sum(1).mean()
        return recon, kl


# ----------------------------------------------------------------------------------- GAN
class Discriminator(nn.Module):
    """Projection discriminator (Miyato & Koyama 2018): ``D(x, y) = w . phi(x) + <e_y, phi(x)>``.

    Regularised by R1 only, no spectral norm: on the default node data spectral norm made the
    discriminator too weak to see the generator's off-manifold noise (FD ratio 1.48 vs 1.35) and
    cost ~40% of the step time (the weight normalisation's backward).

    On ~10 clips per class this discriminator memorises the real clips and a per-class generator
    collapsed to a point (fake spread 6-8% of real, recall 0), with or without a minibatch-std
    feature (Karras et al. 2018, tried and dropped: no measurable gain, 3 extra reductions per
    step); the generator's moment-matching term fixed it (``GeneratorTrainSettings.moment_matching``)."""

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__()
        self.inp = _TokenIn(spec)
        self.features = _mlp(self.inp.out_dim, spec.hidden_dim, spec.hidden_dim, spec.num_layers - 1, act=nn.LeakyReLU)
        self.act = nn.LeakyReLU(0.2)
        self.linear = nn.Linear(spec.hidden_dim, 1)
        self.class_embed = nn.Embedding(spec.num_classes, spec.hidden_dim)

    def forward(self, x_std: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        phi = self.act(self.features(self.inp(x_std)))
        score = self.linear(phi).squeeze(1) + (self.class_embed(labels) * phi).sum(1)
        return score, phi


class ConditionalGAN(_Base):
    """Generator ``G(z, y)`` (``sample``) plus its discriminator ``D`` (kept for further training)."""

    def __init__(self, spec: GeneratorSpec) -> None:
        if spec.kind != "gan":
            raise ValueError(f"ConditionalGAN needs a spec of kind 'gan', got {spec.kind!r}")
        super().__init__(spec)
        self.class_embed = nn.Embedding(spec.num_classes, spec.class_dim)
        self.gen_out = _TokenOut(spec)
        self.generator = _mlp(spec.latent_dim + spec.class_dim, spec.hidden_dim, self.gen_out.in_dim, spec.num_layers)
        # Per-class output offset, initialised to the standardised class means of the first training
        # data: the generator then learns the within-class variation around them.
        self.class_offset = nn.Parameter(torch.zeros(spec.num_classes, spec.tokens, spec.dim))
        self.discriminator = Discriminator(spec)

    def _decode_std(self, z: Tensor, labels: Tensor) -> Tensor:
        return self.class_offset[labels] + self.gen_out(self.generator(torch.cat([z, self.class_embed(labels)], dim=1)))

    @torch.no_grad()
    def init_class_offsets(self, embeddings: Tensor, labels: Tensor) -> None:
        """Offsets = standardised class means; ``train_generator`` calls it together with the first
        ``fit_normalization`` (a later training call keeps the learned offsets)."""
        x_std = self.standardize(embeddings.float().to(self.device))
        labels = labels.to(self.device)
        for c in range(self.spec.num_classes):
            mask = labels == c
            if bool(mask.any()):
                self.class_offset[c] = x_std[mask].mean(0)

    def generator_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("discriminator.")]


def build_generator(spec: GeneratorSpec, seed: int | None = None) -> ConditionalVAE | ConditionalGAN:
    """A fresh model for ``spec``; with ``seed`` its initial weights are reproducible (and the global
    RNG is left untouched)."""
    cls = ConditionalVAE if spec.kind == "vae" else ConditionalGAN
    if seed is None:
        return cls(spec)
    with seeded(seed):
        return cls(spec)
