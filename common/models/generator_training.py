"""Training of the embedding generators: the VAE's and the GAN's loops, batched, seeded, bounded.

Why apart from the models: a bank trains its models through :func:`train_generator`; everything else
(sampling, checkpoints, the server's use) needs only the models of :mod:`common.models.generators`.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from common.models.generators import ConditionalGAN, ConditionalVAE, GeneratorTrainSettings

__all__ = ["train_generator"]

log = logging.getLogger(__name__)

DEFAULT_LR = {"vae": 3e-3, "gan": 1e-3, "gan_d": 2e-3}  # used where GeneratorTrainSettings leaves lr None


def train_generator(
    model: ConditionalVAE | ConditionalGAN,
    embeddings: Tensor,
    labels: Tensor,
    settings: GeneratorTrainSettings,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Train ``model`` on ``embeddings [N, L, H]`` with model-local ``labels [N]``.

    Fits the standardisation on the first call (later calls, e.g. the next federated round, keep
    it so the weights stay meaningful). Returns per-epoch mean losses as lists of floats
    (VAE: ``loss``, ``recon``, ``kl``; GAN: ``loss_d``, ``loss_g``, ``r1``, ``fm``) plus ``seconds``.
    """
    if len(embeddings) == 0:
        raise ValueError("no embeddings to train the generator on")
    if len(embeddings) != len(labels):
        raise ValueError(f"{len(embeddings)} embeddings but {len(labels)} labels")
    model._check_shape(embeddings)
    labels = model._check_labels(labels)
    device = torch.device(device)
    model.to(device).train()
    x_all = embeddings.detach().to(device).float()
    y_all = labels.to(device)
    if not bool(model.normalization_fitted):
        model.fit_normalization(x_all)
        if isinstance(model, ConditionalGAN):
            model.init_class_offsets(x_all, y_all)
    rng = torch.Generator().manual_seed(settings.seed)
    n = len(x_all)
    steps_per_epoch = math.ceil(n / settings.batch_size)
    epochs = max(settings.epochs, math.ceil(settings.min_steps / steps_per_epoch))
    start = time.perf_counter()
    if isinstance(model, ConditionalVAE):
        history = _train_vae(model, x_all, y_all, settings, rng, epochs)
        if settings.fit_latent_prior:
            model.fit_latent_prior(x_all, y_all)
    elif isinstance(model, ConditionalGAN):
        history = _train_gan(model, x_all, y_all, settings, rng, epochs)
    else:
        raise TypeError(f"train_generator: unsupported model {type(model).__name__}")
    model.eval()
    for key, values in history.items():
        if values and not math.isfinite(values[-1]):
            raise FloatingPointError(f"generator training diverged: {key} = {values[-1]}")
    history["seconds"] = [time.perf_counter() - start]
    return history


def _fused(device: torch.device) -> dict[str, bool]:
    """Fused Adam kernels: ~3x faster optimiser steps on CPU, where small models are step-bound."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


def _batches(n: int, batch_size: int, rng: torch.Generator):
    order = torch.randperm(n, generator=rng)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def _train_vae(
    model: ConditionalVAE, x_all: Tensor, y_all: Tensor, s: GeneratorTrainSettings, rng: torch.Generator, epochs: int
) -> dict[str, list[float]]:
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr or DEFAULT_LR["vae"], weight_decay=s.weight_decay, **_fused(x_all.device))
    n, d = len(x_all), x_all[0].numel()
    total_steps = epochs * math.ceil(n / s.batch_size)
    warmup = s.kl_warmup * total_steps
    step = 0
    history: dict[str, list[float]] = {"loss": [], "recon": [], "kl": []}
    for _ in range(epochs):
        sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0}
        for idx in _batches(n, s.batch_size, rng):
            x, y = x_all[idx.to(x_all.device)], y_all[idx.to(y_all.device)]
            eps = torch.randn(len(idx), model.spec.latent_dim, generator=rng).to(x.device)
            recon, kl = model.losses(x, y, eps)
            beta = s.beta * min(1.0, (step + 1) / warmup) if warmup > 0 else s.beta
            loss = recon + beta * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            b = len(idx)
            # per standardised dimension, so values are comparable across L x H
            sums["loss"] += (recon.item() + s.beta * kl.item()) / d * b
            sums["recon"] += recon.item() / d * b
            sums["kl"] += kl.item() * b
        for key, value in sums.items():
            history[key].append(value / n)
    return history


def _class_moments(x: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class mean and std ``[C, D]`` of standardised training data (no graph)."""
    with torch.no_grad():
        means = torch.zeros(num_classes, x.shape[1], device=x.device)
        stds = torch.ones(num_classes, x.shape[1], device=x.device)
        for c in range(num_classes):
            xc = x[y == c]
            if len(xc):
                means[c] = xc.mean(0)
            if len(xc) > 1:
                stds[c] = xc.std(0)
    return means, stds


def _moment_loss(fake: Tensor, y: Tensor, means: Tensor, stds: Tensor) -> Tensor:
    """Mean squared error of the fake batch's per-class mean and std to the training data's, over
    classes with >= 2 fakes in the batch: a direct penalty on mode collapse."""
    num_classes = means.shape[0]
    counts = torch.bincount(y, minlength=num_classes)
    valid = counts >= 2
    if not bool(valid.any()):
        return fake.new_zeros(())
    n = counts.clamp(min=1).to(fake.dtype)[:, None]
    total = fake.new_zeros(num_classes, fake.shape[1]).index_add(0, y, fake)
    mean = total / n
    sq = fake.new_zeros(num_classes, fake.shape[1]).index_add(0, y, (fake - mean[y]) ** 2)
    std = (sq / (n - 1).clamp(min=1) + 1e-6).sqrt()
    err = (mean - means) ** 2 + (std - stds) ** 2
    return err[valid].mean()


def _train_gan(
    model: ConditionalGAN, x_all: Tensor, y_all: Tensor, s: GeneratorTrainSettings, rng: torch.Generator, epochs: int
) -> dict[str, list[float]]:
    betas = (0.5, 0.99)
    fused = _fused(x_all.device)
    opt_g = torch.optim.Adam(model.generator_parameters(), lr=s.lr or DEFAULT_LR["gan"], betas=betas, weight_decay=s.weight_decay, **fused)
    opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=s.lr_d or DEFAULT_LR["gan_d"], betas=betas, **fused)
    disc = model.discriminator
    n = len(x_all)
    latent = model.spec.latent_dim
    history: dict[str, list[float]] = {"loss_d": [], "loss_g": [], "r1": [], "fm": [], "mm": []}
    d_step = g_step = 0
    last_r1 = 0.0
    moments = _class_moments(model.standardize(x_all).flatten(1), y_all, model.spec.num_classes) if s.moment_matching > 0 else None
    g_params = model.generator_parameters()
    ema = [p.detach().clone() for p in g_params] if s.ema > 0 else None
    for _ in range(epochs):
        sums = {"loss_d": 0.0, "loss_g": 0.0, "fm": 0.0, "mm": 0.0}
        r1_sum, r1_n = 0.0, 0
        for idx in _batches(n, s.batch_size, rng):
            x = model.standardize(x_all[idx.to(x_all.device)])
            y = y_all[idx.to(y_all.device)]
            b = len(idx)
            # One generator pass per step: its detached output trains D, then (after the D update)
            # the same output, re-scored, trains G. Saves a G forward and a D forward per step
            # (~25% of the step time on CPU, where these small models are op-overhead bound).
            z = torch.randn(b, latent, generator=rng).to(x.device)
            fake = model._decode_std(z, y)
            # -- discriminator: hinge loss + lazy R1 on real data
            for k in range(s.d_steps):
                if k == 0:
                    fake_d = fake.detach()
                else:
                    with torch.no_grad():
                        fake_d = model._decode_std(torch.randn(b, latent, generator=rng).to(x.device), y)
                do_r1 = s.r1_gamma > 0 and d_step % s.r1_every == 0
                d_step += 1
                x_req = x.detach().requires_grad_(do_r1)
                real_score, phi_real = disc(x_req, y)
                fake_score, _ = disc(fake_d, y)
                loss_d = F.relu(1.0 - real_score).mean() + F.relu(1.0 + fake_score).mean()
                penalty = torch.zeros((), device=x.device)
                if do_r1:
                    (grad,) = torch.autograd.grad(real_score.sum(), x_req, create_graph=True)
                    r1 = grad.pow(2).flatten(1).sum(1).mean()
                    penalty = 0.5 * s.r1_gamma * s.r1_every * r1
                    r1_sum += r1.item() * b
                    r1_n += b
                opt_d.zero_grad(set_to_none=True)
                (loss_d + penalty).backward()
                opt_d.step()
            # -- generator: hinge adversarial term + feature matching (batch means of phi, real
            # side from the last D step) + per-class moment matching
            disc.requires_grad_(False)  # no weight gradients for D in the G step
            fake_score, phi_fake = disc(fake, y)
            disc.requires_grad_(True)
            loss_g = -fake_score.mean()
            fm = torch.zeros((), device=x.device)
            if s.feature_matching > 0:
                fm = (phi_real.detach().mean(0) - phi_fake.mean(0)).pow(2).mean()
            mm = _moment_loss(fake.flatten(1), y, *moments) if moments is not None else torch.zeros((), device=x.device)
            opt_g.zero_grad(set_to_none=True)
            (loss_g + s.feature_matching * fm + s.moment_matching * mm).backward()
            opt_g.step()
            g_step += 1
            if ema is not None:  # decay ramps up so that short runs (per-class units) forget the init
                decay = min(s.ema, (1 + g_step) / (10 + g_step))
                with torch.no_grad():
                    torch._foreach_lerp_(ema, [p.detach() for p in g_params], 1.0 - decay)
            sums["loss_d"] += loss_d.item() * b
            sums["loss_g"] += loss_g.item() * b
            sums["fm"] += fm.item() * b
            sums["mm"] += mm.item() * b
        for key, value in sums.items():
            history[key].append(value / n)
        last_r1 = r1_sum / r1_n if r1_n else last_r1  # lazy R1 may skip a whole (short) epoch
        history["r1"].append(last_r1)
    if ema is not None:  # sample from the averaged generator (smooths the adversarial oscillation)
        with torch.no_grad():
            for p, avg in zip(g_params, ema):
                p.copy_(avg)
    return history
