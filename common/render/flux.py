"""FLUX.1 through diffusers' ``FluxPipeline``, fed with embeddings only.

The pipeline is built **without** its text encoders and tokenizers: the adapters (or the oracle text
targets) already are the conditioning, passed as ``prompt_embeds`` (T5 branch) and
``pooled_prompt_embeds`` (CLIP branch). Real weights load from a local FLUX.1 folder
(``from_pretrained``, bf16 by default on GPU hosts, optional model CPU offload and VAE
tiling/slicing for low memory). ``tiny`` builds a transformer, VAE and scheduler offline from small
configs with a fixed seed and the **real** conditioning widths (768 pooled, 4096 per T5 token), so
the whole image path runs and is tested on a CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from common.dtypes import torch_dtype
from common.models.audio_encoder import ModelLoadError
from common.models.text_encoders import FLUX_CLIP_DIM, FLUX_T5_DIM
from common.render.backend import Conditioning, RenderSettings

log = logging.getLogger(__name__)

# Tiny preset: one double- and one single-stream block, 2 heads x 16 (rope axes 4+6+6 = 16), a
# 2-level VAE (scale factor 2) with 4 latent channels (16 after FLUX's 2x2 packing).
TINY_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=FLUX_T5_DIM, pooled_projection_dim=FLUX_CLIP_DIM, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
)
TINY_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
    sample_size=64, scaling_factor=1.0, shift_factor=0.0,
)
TINY_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)


def build_tiny_pipeline(seed: int = 0):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**TINY_TRANSFORMER)
        vae = AutoencoderKL(**TINY_VAE)
    scheduler = FlowMatchEulerDiscreteScheduler(**TINY_SCHEDULER)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)


def _flux_folder(model: str) -> Path:
    path = Path(model).expanduser()
    missing = [sub for sub in ("transformer", "vae", "scheduler") if not (path / sub).is_dir()]
    if not path.is_dir() or missing:
        raise ModelLoadError(
            f"render.model '{model}': not a local FLUX.1 folder (needs transformer/, vae/, scheduler/; missing "
            f"{missing or 'the folder'}). Copy FLUX.1-dev/-schnell in diffusers layout there, or use 'tiny'."
        )
    return path


TINY_MULTIPLE = 4  # the tiny VAE halves the image once, FLUX packs 2x2 latents
FLUX_MULTIPLE = 16  # the real VAE's /8, FLUX packs 2x2 latents
TRAINED_MULTIPLE = 8  # the tiny-trained preset's VAE halves twice, FLUX packs 2x2 latents


def check_render_settings(render) -> None:
    """Fail at the start of a run, not after its last round: the model folder exists, the resolution fits it.

    ``render``: the ``[render]`` config section. Nothing is loaded; ``when = "off"`` checks nothing.
    """
    if render.when == "off":
        return
    multiple = TINY_MULTIPLE
    if render.model == "tiny-trained":
        multiple = TRAINED_MULTIPLE
    elif render.model != "tiny":
        _flux_folder(render.model)
        multiple = FLUX_MULTIPLE
    if render.resolution % multiple:
        raise ModelLoadError(f"render.resolution {render.resolution} must be a multiple of {multiple} for "
                             f"render.model '{render.model}'")


def load_flux_pipeline(model: str, dtype: torch.dtype):
    """A FLUX.1 folder (diffusers layout) without its text encoders; clear error when unavailable."""
    from diffusers import FluxPipeline

    path = _flux_folder(model)
    try:
        return FluxPipeline.from_pretrained(
            str(path), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
            dtype=dtype, local_files_only=True,
            low_cpu_mem_usage=_has_accelerate(),  # without accelerate diffusers would say so on every load
        )
    except Exception as err:
        raise ModelLoadError(f"render.model '{model}': cannot load FLUX.1 ({type(err).__name__}: {err})") from err


def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


class FluxBackend:
    """FLUX.1 conditioned on ``clip_pooled`` (CLIP branch) and ``t5_sequence`` (T5 branch)."""

    name = "flux"
    requires = ("clip_pooled", "t5_sequence")

    def __init__(self, settings: RenderSettings) -> None:
        self.settings = settings
        dtype = torch_dtype(settings.dtype)
        if settings.model == "tiny":
            self.pipe = build_tiny_pipeline(settings.seed)
            if dtype != torch.float32:
                self.pipe.transformer.to(dtype)
                self.pipe.vae.to(dtype)
        else:
            self.pipe = load_flux_pipeline(settings.model, dtype)
        if settings.offload:
            try:
                self.pipe.enable_model_cpu_offload()
            except (ImportError, RuntimeError) as err:
                raise ModelLoadError(f"render.offload needs the 'accelerate' package and a GPU ({err}); "
                                     "pip install accelerate, or set render.offload=false") from err
        else:
            self.pipe.to(settings.device)
        if settings.vae_tiling:
            self.pipe.vae.enable_tiling()
            self.pipe.vae.enable_slicing()
        self.pipe.set_progress_bar_config(disable=True)
        self.dtype = dtype
        multiple = self.pipe.vae_scale_factor * 2
        if settings.resolution % multiple:
            raise ValueError(f"render.resolution {settings.resolution} must be a multiple of {multiple} for this model")

    def render(self, cond: Conditioning, seeds: list[int]) -> list[Image.Image]:
        missing = [k for k in self.requires if k not in cond.tensors]
        if missing:
            raise ValueError(f"flux backend needs conditioning {list(self.requires)}, missing {missing}")
        n = len(cond)
        if n != len(seeds):
            raise ValueError(f"{n} conditioning rows but {len(seeds)} seeds")
        s = self.settings
        device = self.pipe._execution_device
        # one generator per image: image i depends on seeds[i] only, whatever the batch around it
        generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]
        with torch.inference_mode():
            out = self.pipe(
                prompt_embeds=cond.tensors["t5_sequence"].to(device, self.dtype),
                pooled_prompt_embeds=cond.tensors["clip_pooled"].to(device, self.dtype),
                height=s.resolution, width=s.resolution, num_inference_steps=s.steps, guidance_scale=s.guidance,
                generator=generators, output_type="pil",
            )
        return list(out.images)
