"""``render.model = "tiny-trained"``: a small FLUX.1 transformer and VAE, trained once offline so that
a class's text targets draw that class's picture (:mod:`common.render.pictures`).

Why: real FLUX.1 weights cannot be fetched on an offline machine, and the random ``tiny`` preset draws
noise, so nothing a user sees would show that sound reached the picture. This preset is trained on
the federation's own class text targets, so the images rendered from *adapter outputs* show the class
the adapters heard: the colour comes from the CLIP pooled branch, the shape from the T5 branch.

How (seeded, deterministic on one machine, a few CPU minutes for 10 classes):

1. the VAE (the tiny architecture) learns to reconstruct every colour x shape picture;
2. the transformer learns rectified flow (FLUX's objective) on those latents, conditioned on
   ``pooled = clip_target[a]`` and ``sequence = t5_target[b]`` for random class pairs, with the picture
   "colour of a, shape of b"; the conditioning is perturbed toward other classes and with noise
   scaled to the spread between classes, so that an adapter output that is *nearest* to a class's
   target draws that class. The input layers read each branch through a :class:`Preconditioner`
   (the span of the class targets), folded into their weights after training.

The result is saved as a diffusers FLUX.1 folder (``transformer/``, ``vae/``, ``scheduler/``) under
``<cache-dir>/render/tiny-trained-<key>/`` and loaded by the same ``FluxPipeline.from_pretrained`` code
as real weights. The key hashes the targets, the class names, the recipe and the architectures, so a
new class list or text encoder trains a new preset; processes sharing a cache train it once (file
lock).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from filelock import FileLock
from torch import Tensor

from common.atomic import atomic_write_json, fsync_dir
from common.records import ClassTensors
from common.render.flux import TINY_SCHEDULER
from common.render.pictures import PALETTE, SHAPES, attribute_count, class_look, picture

log = logging.getLogger(__name__)

PRESET = "tiny-trained"
VERSION = 2  # bump when the pictures or the training change what is drawn

# A 3-level VAE (/4) so a 64-px image is 8x8 FLUX tokens: 4x cheaper to train than the tiny preset's /2.
TRAINED_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
    sample_size=64, mid_block_add_attention=False, scaling_factor=1.0, shift_factor=0.0,
)
TRAINED_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=4,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
)


@dataclass(frozen=True)
class Recipe:
    """Everything the training does (part of the cache key)."""

    resolution: int = 64
    vae_steps: int = 0  # 0: 400 + 40 per colour (800 for 10 classes)
    vae_lr: float = 2e-3
    steps: int = 0  # 0: 200 per colour, at least 800 (2,000 for 10 classes, 800 for 4)
    lr: float = 1e-3
    batch_size: int = 16
    mix: float = 0.45  # conditioning moves up to this fraction of the way toward another class's target
    noise: float = 0.5  # Gaussian noise, in units of the per-dimension spread between class targets
    precondition: bool = True  # the input layers see the targets' span, whitened (folded into their weights)
    min_scale: float = 0.05  # whitening amplifies no direction beyond 1 / (this x the largest spread); measured
    # on the default federation: 0.05 -> image accuracy 0.75 from sound, 0.97 oracle; 1 (no whitening) -> 0.68, 0.95
    seed: int = 0

    def step_counts(self, num_classes: int) -> tuple[int, int]:
        """(VAE steps, transformer steps): fewer classes have fewer colour x shape pairs to learn."""
        colours = attribute_count(num_classes)
        return self.vae_steps or 400 + 40 * colours, self.steps or max(800, 200 * colours)


def preset_key(targets: ClassTensors, recipe: Recipe) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": VERSION, "classes": list(targets.class_names), "recipe": dataclasses.asdict(recipe),
                         "transformer": TRAINED_TRANSFORMER, "vae": TRAINED_VAE, "scheduler": TINY_SCHEDULER,
                         "palette": PALETTE, "shapes": SHAPES}, sort_keys=True, default=str).encode())
    h.update(targets.clip.float().contiguous().numpy().tobytes())
    h.update(targets.t5.float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def preset_dir(cache_dir: str | Path, targets: ClassTensors, recipe: Recipe) -> Path:
    return Path(cache_dir).expanduser() / "render" / f"{PRESET}-{preset_key(targets, recipe)}"


def ensure_preset(cache_dir: str | Path, targets: ClassTensors, recipe: Recipe = Recipe()) -> Path:
    """The trained preset's folder for these targets, training it first when the cache lacks it."""
    folder = preset_dir(cache_dir, targets, recipe)
    done = folder / "preset.json"
    if done.is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if done.is_file():  # another process trained it while we waited
            return folder
        log.info("render preset %s: training for %d classes (once per class list and text encoder; cached in %s)",
                 PRESET, len(targets.class_names), folder)
        t0 = time.perf_counter()
        pipe, stats = train_preset(targets, recipe)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            pipe.save_pretrained(str(tmp), safe_serialization=True)
            stats["train_seconds"] = round(time.perf_counter() - t0, 1)
            atomic_write_json(tmp / "preset.json", {"preset": PRESET, "version": VERSION, "classes": targets.class_names,
                                                    "recipe": dataclasses.asdict(recipe), **stats})
            if folder.exists():  # a half-written folder of a killed process
                shutil.rmtree(folder)
            tmp.rename(folder)
            fsync_dir(folder.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("render preset %s trained in %.0fs: %s", PRESET, stats["train_seconds"], stats)
    return folder


def preset_stats(folder: str | Path) -> dict[str, Any]:
    """The training record of a preset folder (seconds, final losses)."""
    return json.loads((Path(folder) / "preset.json").read_text())


# ------------------------------------------------------------------------------------------ training
def _pairs(num_classes: int, gen: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
    return torch.randint(num_classes, (n,), generator=gen), torch.randint(num_classes, (n,), generator=gen)


def _look_pictures(num_classes: int, resolution: int) -> Tensor:
    """``[A, A, 3, R, R]``: colour a x shape s for every attribute the classes use."""
    a = attribute_count(num_classes) if num_classes <= len(PALETTE) else len(PALETTE)
    return torch.stack([torch.stack([picture(c, s, resolution) for s in range(a)]) for c in range(a)])


def _perturb(targets: Tensor, labels: Tensor, spread: Tensor, recipe: Recipe, gen: torch.Generator) -> Tensor:
    """Targets of ``labels`` moved toward another class's target and jittered (``spread``: per-dim std)."""
    other = torch.randint(len(targets), labels.shape, generator=gen)
    lam = torch.rand(labels.shape, generator=gen) * recipe.mix
    lam = lam.view(-1, *([1] * (targets.dim() - 1)))
    base = targets[labels] + lam * (targets[other] - targets[labels])
    return base + torch.randn(base.shape, generator=gen) * spread * recipe.noise


@dataclass
class Preconditioner:
    """``x -> ((x - centre) @ basis / scale) @ basis.T``: the offset from the targets' centre, projected onto
    the span of the class targets and scaled there (still in the input's own dimension).

    Why: the preset knows only the federation's prompts. Its input layers should read the few
    directions in which those prompts differ, and nothing else: adapter outputs carry noise in every
    direction, most of it outside that span, and the tiny text encoders' targets can differ from each
    other by a small fraction of their length. ``scale`` is the spread along each direction, floored at
    ``min_scale`` x the largest: a floor of 1 keeps the span's own geometry (the one cosine retrieval
    uses), lower floors whiten it, so that the span's weak directions weigh about as much as its strong
    ones. The map is linear, so after
    training it is folded into the first layer that reads each input (:meth:`fold`): the saved weights
    are plain FLUX.1 weights, fed raw conditioning by the same ``FluxPipeline`` code path.
    """

    centre: Tensor  # [D]
    basis: Tensor  # [D, k], orthonormal columns
    scale: Tensor  # [k], the spread along each column (floored)

    @classmethod
    def fit(cls, rows: Tensor, min_scale: float) -> "Preconditioner":
        """From target rows ``[N, D]`` (a T5 table's rows are its token vectors)."""
        rows = rows.float()
        centre = rows.mean(0)
        _, sv, vh = torch.linalg.svd(rows - centre, full_matrices=False)
        keep = sv > sv[0] * 1e-5
        scale = sv[keep] / max(1, len(rows)) ** 0.5
        return cls(centre, vh[keep].T.contiguous(), scale.clamp_min(float(scale[0]) * min_scale))

    def coords(self, x: Tensor) -> Tensor:
        """``[..., k]``: the offset from the centre in the span's whitened coordinates."""
        return (x - self.centre) @ self.basis / self.scale

    def __call__(self, x: Tensor) -> Tensor:
        return self.coords(x) @ self.basis.T

    def fold(self, linear: torch.nn.Linear) -> None:
        """Make ``linear(x)`` compute what ``linear(self(x))`` computed."""
        with torch.no_grad():
            w = linear.weight.float()  # [out, D]
            folded = ((w @ self.basis) / self.scale) @ self.basis.T
            linear.bias.copy_(linear.bias - folded @ self.centre)
            linear.weight.copy_(folded)


def _step(opt, sched, loss: Tensor, what: str, step: int, total: int, every: int, clip_params=None) -> None:
    """One optimiser step (optionally with gradient clipping), with a progress line every ``every`` steps."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    opt.step()
    sched.step()
    if (step + 1) % every == 0:
        log.info("preset %s step %d/%d: loss %.4f", what, step + 1, total, loss.item())


def train_preset(targets: ClassTensors, recipe: Recipe):
    """Train the VAE, then the transformer; returns ``(FluxPipeline, stats)``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    num_classes = len(targets.class_names)
    looks = [class_look(i) for i in range(num_classes)]
    colours = torch.tensor([c for c, _ in looks])
    shapes = torch.tensor([s for _, s in looks])
    gen = torch.Generator().manual_seed(recipe.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        vae = AutoencoderKL(**TRAINED_VAE)
        transformer = FluxTransformer2DModel(**TRAINED_TRANSFORMER)
    grid = _look_pictures(num_classes, recipe.resolution)  # [A, A, 3, R, R]
    pictures = grid.flatten(0, 1)
    vae_steps, steps = recipe.step_counts(num_classes)
    stats: dict[str, Any] = {"num_classes": num_classes, "vae_steps": vae_steps, "steps": steps}

    # 1. the VAE reconstructs every colour x shape picture (convolutional: trained on half-size crops, 4x cheaper)
    opt = torch.optim.Adam(vae.parameters(), lr=recipe.vae_lr)
    vae_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, vae_steps)
    vae.train()
    crop = recipe.resolution // 2
    for step in range(vae_steps):
        idx = torch.randint(len(pictures), (16,), generator=gen)
        top, left = (int(v) * 4 for v in torch.randint((recipe.resolution - crop) // 4 + 1, (2,), generator=gen))
        x = pictures[idx, :, top : top + crop, left : left + crop]
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.mean).sample
        loss = F.mse_loss(recon, x) + 1e-6 * post.kl().mean()
        _step(opt, vae_sched, loss, "vae", step, vae_steps, every=200)
    stats["vae_loss"] = round(loss.item(), 5)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(pictures[i : i + 32]).latent_dist.mean for i in range(0, len(pictures), 32)])
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale, shift_factor=0.0)
    latents = (latents * scale).view(grid.shape[0], grid.shape[1], *latents.shape[1:])  # [A, A, C, h, w]

    # 2. rectified flow on packed latents, colour from the pooled (CLIP) branch, shape from the T5 sequence
    c, h, w = latents.shape[2:]
    img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(targets.t5.shape[1], 3)
    clip_t, t5_t = targets.clip.float(), targets.t5.float()
    clip_spread, t5_spread = clip_t.std(0, keepdim=True).squeeze(0), t5_t.std(0, keepdim=True).squeeze(0)
    if recipe.precondition:
        pre_clip = Preconditioner.fit(clip_t, recipe.min_scale)
        pre_t5 = Preconditioner.fit(t5_t.reshape(-1, t5_t.shape[-1]), recipe.min_scale)
        stats["precondition_rank"] = [int(pre_clip.basis.shape[1]), int(pre_t5.basis.shape[1])]
    else:
        pre_clip = pre_t5 = lambda x: x  # noqa: E731
    opt = torch.optim.AdamW(transformer.parameters(), lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    transformer.train()
    for step in range(steps):
        a, b = _pairs(num_classes, gen, recipe.batch_size)
        x0 = latents[colours[a], shapes[b]]
        x0 = FluxPipeline._pack_latents(x0, len(a), c, h, w)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(len(a), generator=gen))  # logit-normal timesteps, as for FLUX
        xt = (1 - t)[:, None, None] * x0 + t[:, None, None] * noise
        pred = transformer(
            hidden_states=xt, timestep=t, guidance=torch.full((len(a),), 3.5),
            pooled_projections=pre_clip(_perturb(clip_t, a, clip_spread, recipe, gen)),
            encoder_hidden_states=pre_t5(_perturb(t5_t, b, t5_spread, recipe, gen)),
            txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )[0]
        loss = F.mse_loss(pred, noise - x0)
        _step(opt, sched, loss, "transformer", step, steps, every=500, clip_params=transformer.parameters())
    stats["flow_loss"] = round(loss.item(), 5)
    transformer.eval().requires_grad_(False)
    if recipe.precondition:  # plain FLUX.1 weights: the raw conditioning goes in, the first layers precondition it
        pre_clip.fold(transformer.time_text_embed.text_embedder.linear_1)
        pre_t5.fold(transformer.context_embedder)
    scheduler = FlowMatchEulerDiscreteScheduler(**TINY_SCHEDULER)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    return pipe, stats
