"""One validated configuration tree for the whole system.

Why one tree: the earlier code base read keys with ``getattr(cfg, key, None)``, so a typo or a
missing key silently became ``None`` and switched features off. Here every key is declared once,
with a real default, a type and a description; unknown keys and wrong types fail fast with a
message naming the dotted key.

Sources, lowest to highest precedence:

1. the defaults declared below (mirrored in ``pyproject.toml`` ``[tool.flwr.app.config]``; a test
   keeps the two in sync),
2. an optional TOML ``config-file`` (nested tables, e.g. ``[train]``), typically under ``configs/``,
3. Flower's run config (``--run-config 'train.local-epochs=3'``): flat, dotted kebab-case keys.

Flower fuses the pyproject defaults and the ``--run-config`` overrides into one flat dict before
the app sees it, so an override equal to the default cannot be told apart from the default: a
config-file value wins over a run-config value that equals the built-in default.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.errors import FedA2VError
from common.names import folder_name_problem

__all__ = [
    "ConfigError",
    "FedA2VConfig",
    "NodeRuntimeConfig",
    "load_config",
    "flatten",
    "unflatten",
    "config_hash",
    "default_cache_dir",
    "Precision",
]

# Forward passes of a training step: fp32, bf16 autocast (fp32 weights), or bf16 where the device has bf16 units
Precision = Literal["fp32", "bf16", "auto"]


class ConfigError(FedA2VError, ValueError):
    """A configuration problem; the message names the offending key (and file, if any)."""


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class _Strict(BaseModel):
    """Base for every config section: kebab-case keys, unknown keys forbidden, no coercion surprises."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=_kebab,
        populate_by_name=True,
        validate_assignment=True,
        frozen=False,
    )


def _split_list(value: Any) -> Any:
    """Flower run-config values are scalars, so lists travel as comma-separated strings."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class DataConfig(_Strict):
    """Which audio, how it is loaded, and how it is split across nodes."""

    dataset: Literal["synthetic", "esc50", "vegas", "vggsound"] = Field(
        "synthetic",
        description="'synthetic' generates an ESC-50-format dataset on first use; 'esc50' reads the "
        "official layout (meta/esc50.csv + audio/); 'vegas' reads <class>/audios/video_*.wav; 'vggsound' "
        "reads vggsound.csv (no header) + audio/ and keeps its official train/test split.",
    )
    root: str = Field(
        "",
        description="Dataset directory. Empty: for 'synthetic', <cache-dir>/data/synthetic-<params>; "
        "required otherwise. A node's node-config 'data-root' overrides it on that node.",
    )
    audio_dir: str = Field(
        "", description="Name of the audio folder inside the dataset (empty: the layout's own: 'audio' for "
        "esc50/vggsound, 'audios' in each VEGAS class folder).",
    )
    classes: list[str] = Field(
        default_factory=list,
        description="Class names (comma-separated in run config). Empty: the first data.num-classes "
        "classes of the dataset.",
    )
    num_classes: int = Field(10, ge=1, description="Used when data.classes is empty.")
    clips_per_class: int = Field(40, ge=3, description="Clips per class written by the synthetic generator.")
    synth_seed: int = Field(0, description="Seed of the synthetic dataset generator.")
    clip_seconds: float = Field(5.0, gt=0, le=60, description="Clip length after pad/trim; sets AST max_length.")
    min_clip_seconds: float = Field(
        1.0, ge=0, description="Files with less audio than this (or fewer frames than their header declares) are "
        "skipped and counted, not padded with silence.",
    )
    max_file_mb: float = Field(
        256.0, gt=0, description="Audio files larger than this (MiB) are skipped and counted (skipped_files) before "
        "anything is decoded; of the others only the frames the clip needs are read.",
    )
    sample_rate: int = Field(16000, ge=8000, description="Sample rate the AST expects (16 kHz for AudioSet ASTs).")
    partition: Literal["iid", "explicit", "dirichlet", "pathological"] = Field(
        "iid",
        description="'iid': every node gets a stratified share of every class; 'explicit': node "
        "classes and sample caps from the [nodes.<id>] tables; 'dirichlet': label skew with "
        "data.dirichlet-alpha; 'pathological': data.classes-per-node classes per node (both flwr-datasets "
        "partitioners over the train clips).",
    )
    dirichlet_alpha: float = Field(0.5, gt=0, description="Dirichlet concentration for data.partition='dirichlet' "
                                   "(0.1: most nodes hold one or two classes; 1.0: mild skew).")
    classes_per_node: int = Field(2, ge=1, description="Classes per node for data.partition='pathological'.")
    min_partition_size: int = Field(2, ge=0, description="data.partition='dirichlet' redraws until every node has at "
                                    "least this many train clips.")
    val_fraction: float = Field(0.1, ge=0, lt=0.5, description="Per-class fraction of clips held out for validation.")
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="Per-class fraction of clips held out for test "
                                 "(unused by datasets with an official split: VGGSound's test set is its own).")

    _split_classes = field_validator("classes", mode="before")(_split_list)

    @field_validator("audio_dir")
    @classmethod
    def _one_folder_name(cls, value: str) -> str:
        if value and (value in (".", "..") or "/" in value or "\\" in value):
            raise ValueError(f"data.audio-dir must be one folder name inside the dataset (no '/', not '..'), got {value!r}")
        return value


class NodeSpec(_Strict):
    """Per-node data assignment for ``data.partition = "explicit"``."""

    classes: list[str] = Field(default_factory=list, description="Class names this node owns.")
    samples_per_class: int = Field(0, ge=0, description="Cap on training clips per class (0 = all of its share).")
    generator_granularity: Literal["", "unified", "per_class", "per_group"] = Field(
        "", description="This node's generator granularity ('' = generator.granularity)."
    )
    generator_classes: list[str] = Field(
        default_factory=list,
        description="Classes this node trains / loads generators for (empty = every class it holds).",
    )
    images_per_class: int = Field(0, ge=0, description="Images per class this node renders (0: render.images-per-class).")
    audio: bool = Field(
        True, description="False: this site holds no audio (generator.mode='use-pretrained-generators' only): its "
        "classes and counts come from its generator checkpoints and it evaluates nothing.",
    )

    _split_classes = field_validator("classes", "generator_classes", mode="before")(_split_list)


def _split_groups(value: Any) -> Any:
    """``"animals=dog,rooster;nature=rain"`` (run config) -> {"animals": ["dog", "rooster"], ...}."""
    if isinstance(value, str):
        groups: dict[str, list[str]] = {}
        for part in filter(None, (p.strip() for p in value.split(";"))):
            name, sep, members = part.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"group entry '{part}' must look like 'name=class1,class2'")
            groups[name.strip()] = _split_list(members)
        return groups
    return value


class GeneratorConfig(_Strict):
    """Node generators of audio embeddings (VAE / GAN) and the two-run workflow."""

    mode: Literal["off", "generator-training", "generator-only", "use-pretrained-generators"] = Field(
        "off",
        description="'generator-training': nodes train adapters and generators; 'generator-only': generators "
        "only (adapters are sent back unchanged); 'use-pretrained-generators': nodes load their generator "
        "checkpoints and train adapters on sampled embeddings (no AST, no audio unless real-mix-ratio > 0); "
        "'off': no generators.",
    )
    kind: Literal["vae", "gan"] = Field("vae", description="Generator family (VAE measured best on the default data).")
    granularity: Literal["unified", "per_class", "per_group"] = Field(
        "unified", description="One conditional model for all classes, one per class, or one per class group."
    )
    class_groups: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Semantic groups for 'per_group' (a [generator.class-groups] table in a config file); a "
        "class in no group goes to 'other'.",
    )
    checkpoint_dir: str = Field(
        "", description="Where nodes write generator checkpoints, one folder per run (<dir>/<run-name>/). Empty: "
        "<cache-dir>/generators. Node-config 'checkpoint-dir' wins on that node.",
    )
    checkpoint_base: str = Field("generator", description="File-name base: {base}_node{id}[_class_{c}|_group_{g}].")
    checkpoint_frequency: int = Field(5, ge=1, description="Also keep a _round_{r} copy every k rounds.")
    latent_dim: int = Field(32, ge=1, description="Latent size.")
    hidden_dim: int = Field(128, ge=1, description="MLP width.")
    num_layers: int = Field(2, ge=1, description="Hidden layers of every MLP.")
    token_dim: int = Field(64, ge=0, description="Shared per-token projection H -> token-dim (0: flat MLP).")
    epochs: int = Field(300, ge=1, description="Generator epochs per round on the node's training embeddings.")
    batch_size: int = Field(32, ge=1, description="Generator mini-batch size.")
    min_steps: int = Field(
        600, ge=0, description="At least this many optimiser steps per model and round (raises epochs for models "
        "with few clips, e.g. per_class: measured GAN per-class FD ratio 5.8 at 300 steps, 1.3 at 600).",
    )
    lr: float = Field(0.0, ge=0, description="Learning rate; 0: the measured per-kind default (VAE 3e-3, GAN 1e-3).")
    synthetic_samples_per_class: int | Literal["auto"] = Field(
        "auto",
        description="use-pretrained-generators: embeddings sampled per class and round ('auto' = the node's "
        "real training count of that class).",
    )
    real_mix_ratio: float = Field(
        0.0, ge=0, le=1,
        description="use-pretrained-generators: fraction of the node's real training clips mixed in with the "
        "samples (0 = samples only; > 0 reads real embeddings from the cache, else the AST).",
    )
    pretrained_round: int = Field(
        0, ge=0, description="use-pretrained-generators: load the _round_{r} checkpoints (0 = the latest files)."
    )
    init_from_run: str = Field(
        "", description="use-pretrained-generators (required there): the run-name of the run that trained the "
        "generators; each node loads them from <its checkpoint dir>/<that run-name>/.",
    )

    _split_groups = field_validator("class_groups", mode="before")(_split_groups)

    @model_validator(mode="after")
    def _pretrained_names_its_run(self) -> "GeneratorConfig":
        """Why required: every run writes its generators to a folder of its own, so 'the latest files' of a
        shared folder (once another benchmark's) is never what a run loads."""
        run = self.init_from_run
        if run in (".", "..") or "/" in run or "\\" in run:
            raise ValueError(f"generator.init-from-run must be a run-name (one folder name), got {run!r}")
        if self.mode == "use-pretrained-generators" and not run:
            raise ValueError("generator.mode='use-pretrained-generators' loads the generators an earlier run trained: "
                             "set generator.init-from-run to that run's run-name")
        if run and self.mode != "use-pretrained-generators":
            raise ValueError(f"generator.init-from-run={run!r} is read only with generator.mode="
                             f"'use-pretrained-generators' (mode is {self.mode!r})")
        return self


class KDConfig(_Strict):
    """Knowledge-distillation aggregation (``aggregation = "kd"``) on the server."""

    student_init: Literal["fedavg", "previous"] = Field(
        "fedavg", description="Student starts from this round's FedAvg of the node adapters, or the previous global."
    )
    samples_from: Literal["auto", "node-generators", "server-generator"] = Field(
        "auto",
        description="Synthetic embeddings for KD and fine-tuning: the uploaded generators of the nodes that own a "
        "class, or the server generator; 'auto': the server generator when server-generator.mode is on.",
    )
    samples_per_class: int = Field(64, ge=1, description="Synthetic embeddings per class for each KD run.")
    epochs: int = Field(20, ge=1, description="KD epochs over the synthetic set per round (at most, with kd.patience).")
    patience: int = Field(
        3, ge=0, description="Stop KD once the loss on held-out samples has not improved by 1% for this many epochs, "
        "keeping the best epoch's weights (0: always kd.epochs)."
    )
    holdout: float = Field(0.1, ge=0, lt=0.5, description="Fraction of the KD samples held out for kd.patience.")
    lr: float = Field(1e-3, gt=0, description="KD learning rate (both branches).")
    batch_size: int = Field(64, ge=1, description="KD mini-batch size.")
    precision: Precision = Field(
        "auto", description="KD forward passes in fp32, or under bfloat16 autocast (fp32 weights; ~2.3x faster per "
        "epoch where the CPU or GPU has bf16 units); 'auto': bf16 where the device has them, else fp32."
    )


class ServerGeneratorConfig(_Strict):
    """A class-conditional generator on the server covering every class of the federation."""

    mode: Literal["off", "merge", "data-free"] = Field(
        "off",
        description="'merge': train it on samples of the nodes' uploaded generators; 'data-free': train it so the "
        "owning nodes' adapters map its samples to their reported class means (plus a diversity term); 'off'.",
    )
    kind: Literal["vae", "gan"] = Field("vae", description="Model family (data-free uses its decoder / generator).")
    samples_per_class: int = Field(64, ge=1, description="merge: samples drawn per class from the owning nodes.")
    epochs: int = Field(100, ge=1, description="merge: epochs over the drawn samples per round.")
    steps: int = Field(300, ge=1, description="data-free: optimiser steps per round.")
    lr: float = Field(0.0, ge=0, description="Learning rate; 0: per-kind default (merge) / 1e-3 (data-free).")
    batch_size: int = Field(64, ge=2, description="Mini-batch size.")
    diversity_weight: float = Field(1.0, ge=0, description="data-free: weight of the sample-diversity term.")
    checkpoint_frequency: int = Field(5, ge=1, description="Also keep {base}_server_round_{r} every k rounds.")
    send_to_nodes: bool = Field(
        False, description="Send it to the nodes, which then fill classes with fewer than train.augment-to clips."
    )


class FinetuneConfig(_Strict):
    """Fine-tuning of the global adapters on the server after aggregation."""

    epochs: int = Field(0, ge=0, description="Fine-tuning epochs per round (0 = off).")
    lr: float = Field(1e-4, gt=0, description="Fine-tuning learning rate (both branches).")
    batch_size: int = Field(64, ge=1, description="Fine-tuning mini-batch size.")
    precision: Precision = Field(
        "fp32", description="Fine-tuning forward passes in fp32, or under bfloat16 autocast (fp32 weights); 'auto': "
        "bf16 where the device has bf16 units."
    )
    samples_per_class: int = Field(64, ge=1, description="Synthetic embeddings per class (source: kd.samples-from).")
    target: Literal["text", "teacher", "both"] = Field(
        "text", description="Toward the class text targets, the owning teachers' outputs, or both."
    )
    anchor_weight: float = Field(
        1.0, ge=0, description="Weight of the anchor term: per-class mean outputs stay near the clients' real class means."
    )


class RenderConfig(_Strict):
    """Images from sound: FLUX.1 renders adapter outputs (nodes: their classes; server: global)."""

    when: Literal["off", "final", "every"] = Field(
        "final", description="Render in the final round only, every render.every rounds, or never."
    )
    every: int = Field(1, ge=1, description="With when='every': render every k rounds (and the final one).")
    backend: Literal["flux"] = Field("flux", description="Image backend (FLUX.1 via diffusers).")
    model: str = Field(
        "tiny-trained",
        description="'tiny-trained' (offline preset trained once per class list to draw each class's picture: colour "
        "from the CLIP branch, shape from the T5 branch; cached in <cache-dir>/render), 'tiny' (random weights, "
        "noise) or a local FLUX.1 folder (diffusers layout).",
    )
    resolution: int = Field(64, ge=16, description="Image width and height in pixels (FLUX.1: multiples of 16).")
    steps: int = Field(4, ge=1, description="Denoising steps.")
    guidance: float = Field(3.5, ge=0, description="Guidance scale (FLUX.1-dev's embedded guidance).")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Pipeline dtype (bfloat16 on GPUs).")
    batch_size: int = Field(4, ge=1, description="Images per pipeline call.")
    seed: int = Field(0, ge=0, description="Base seed of the per-image seeds (0: the run seed).")
    offload: bool = Field(False, description="Model CPU offload (needs accelerate) for low-memory GPUs.")
    vae_tiling: bool = Field(False, description="VAE tiling + slicing for large images on small GPUs.")
    images_per_class: int = Field(2, ge=1, description="Images per class and owner (node or server).")
    classes: list[str] = Field(default_factory=list, description="Classes to render (empty: every class the owner has).")
    source: Literal["clips", "generator"] = Field(
        "clips", description="Nodes: adapters on held-out clips, or on samples of the node's generators."
    )
    oracle: Literal["none", "clip", "t5", "both"] = Field(
        "none", description="Replace this branch's adapter output by the class text embedding (a baseline)."
    )
    calibrate: Literal["none", "target-radius", "target-span", "target-soft"] = Field(
        "target-soft", description="Before rendering (needs the class text targets): 'target-radius' rescales each "
        "adapter output's offset from the targets' centre to their mean radius (adapters shrink toward the mean on "
        "ambiguous clips); 'target-span' first keeps only the offset's part in the targets' span; 'target-soft' "
        "replaces each output by a mix of the class targets weighted by its whitened distance to each (for a "
        "picture model that knows only these prompts, the tiny-trained preset); 'none' renders the outputs as they "
        "are.",
    )
    calibrate_sigma: float = Field(
        0.25, gt=0, description="target-soft: width of the weights, as a fraction of the mean distance between two "
        "class targets (whitened): smaller snaps to the nearest prompt, larger blends more."
    )
    server: bool = Field(True, description="The server also renders global images (global adapters).")
    output_dir: str = Field("", description="Where images go. Empty: <run dir>/images (node-config 'image-dir' wins).")
    clip_metric_model: str = Field(
        "", description="Local CLIP folder for the zero-shot image metric (accuracy, balanced accuracy, macro-F1); "
        "empty: skipped.",
    )

    _split_classes = field_validator("classes", mode="before")(_split_list)

    def due(self, server_round: int, num_rounds: int) -> bool:
        if self.when == "off":
            return False
        return server_round == num_rounds or (self.when == "every" and server_round % self.every == 0)


class AudioEncoderConfig(_Strict):
    """The frozen AST that turns audio into embeddings."""

    model: str = Field(
        "tiny",
        description="'tiny' (random small AST, fixed seed) or a hub id / local folder loaded with "
        "from_pretrained, e.g. MIT/ast-finetuned-audioset-10-10-0.4593.",
    )
    reduction: Literal["cls", "pool"] = Field(
        "pool", description="'cls': the CLS token only (L=1); 'pool': adaptive-pool patch tokens to L tokens."
    )
    tokens: int = Field(
        12, ge=1, le=1024, description="L, the token count of a reduced embedding ('pool' only; 12 = one per AST frequency row)."
    )
    batch_size: int = Field(32, ge=1, description="Clips per AST forward pass.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="AST compute dtype.")
    cache: bool = Field(
        True,
        description="Keep embeddings in the persistent cache <cache-dir>/embeddings (shared by runs and the "
        "nodes of a host; keyed by model, sample rate, clip length, reduction and dtypes).",
    )
    cache_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16",
        description="Storage dtype of embeddings. Nodes train on these rounded values whether a clip was a "
        "cache hit or freshly extracted, so results do not depend on the cache.",
    )


class TextEncoderConfig(_Strict):
    """The diffusion model's own text encoders, used once to compute per-class targets."""

    model: str = Field(
        "tiny",
        description="'tiny' (small random CLIP-L/T5 with FLUX's real 768/4096 dims) or a local FLUX.1 "
        "folder (diffusers layout: text_encoder, tokenizer, text_encoder_2, tokenizer_2).",
    )
    prompt_template: str = Field("a photo of a {label}", description="Class prompt; {label} is the class name.")
    t5_tokens: int = Field(16, ge=1, le=512, description="n, the T5 sequence length of targets and adapter output.")

    @field_validator("prompt_template")
    @classmethod
    def _has_label(cls, value: str) -> str:
        if "{label}" not in value:
            raise ValueError("must contain '{label}'")
        return value


class AdapterConfigSection(_Strict):
    """Adapter architecture (token-wise MLP + learned-latent attention pooling per branch)."""

    hidden_dim: int = Field(512, ge=8, description="Width of the token-wise MLP and the latents.")
    heads: int = Field(8, ge=1, description="Attention heads of the latent pooling.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout inside the adapters.")
    init_from: str = Field(
        "", description="Start from these global adapters (an adapters*.safetensors of an earlier run; a path on the "
        "ServerApp's host, best absolute) instead of a fresh initialisation; its dims and classes must match.",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> "AdapterConfigSection":
        if self.hidden_dim % self.heads:
            raise ValueError(f"adapter.hidden-dim ({self.hidden_dim}) must be divisible by adapter.heads ({self.heads})")
        return self


class TrainConfig(_Strict):
    """Local adapter training on each node."""

    local_epochs: int = Field(12, ge=1, description="Epochs over the node's training clips per round.")
    batch_size: int = Field(32, ge=1, description="Mini-batch size.")
    precision: Precision = Field(
        "fp32", description="Local training forward passes in fp32, or under bfloat16 autocast (fp32 weights); "
        "'auto': bf16 where the device has bf16 units."
    )
    lr_clip: float = Field(1e-3, gt=0, description="AdamW learning rate of the CLIP branch.")
    lr_t5: float = Field(1e-3, gt=0, description="AdamW learning rate of the T5 branch.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    cosine_weight: float = Field(0.5, ge=0, description="Weight of the (1 - cosine) term added to the MSE loss.")
    contrastive_weight: float = Field(
        1.0, ge=0, description="Weight of the class-contrastive term (cross-entropy over cosine to every class target)."
    )
    temperature: float = Field(0.05, gt=0, description="Temperature of the class-contrastive term.")
    proximal_mu: float = Field(
        0.0, ge=0, description="FedProx: weight mu of the proximal term mu/2 * ||w - w_global||^2 that keeps a node's "
        "adapters near the round's global ones (0 = plain local training).",
    )
    augment_to: int = Field(
        0, ge=0, description="With a server generator in the message (server-generator.send-to-nodes): classes with "
        "fewer training clips than this are filled up to it with its samples (0 = off).",
    )


class LoggingConfig(_Strict):
    """Extra run logs beyond summary.json and report.html."""

    tensorboard: bool = Field(
        False, description="Also write TensorBoard scalars per round and image grids to <run>/tensorboard (needs the "
        "tensorboard package: pip install 'feda2v[tensorboard]'; without it the run says so and goes on).",
    )


class PrivacyConfig(_Strict):
    """What a node may reveal about its data beyond adapter weights."""

    min_class_count: int = Field(
        3, ge=1, description="Classes a node holds fewer training clips of are withheld from its class means and "
        "generator training (a mean of one clip is that clip).",
    )


class RobustConfig(_Strict):
    """How much one site's reply may weigh, claim and allocate on the server, and how replies are combined
    when a site may be buggy or hostile (the recommended setting: docs/robustness.md)."""

    max_reply_mb: float = Field(
        1024.0, gt=0, description="A reply larger than this (MiB, every record counted as Flower counts it) is "
        "rejected before anything in it is decoded.",
    )
    max_abs_value: float = Field(
        1e4, gt=0, description="Every weight, class-mean value and generator weight a node sends must be finite and "
        "at most this in magnitude (a finite 1e38 overflows later, e.g. in distillation).",
    )
    max_examples: int = Field(
        1_000_000, ge=1, description="Most clips one node may claim: num-examples and every count a node reports "
        "(num_val, images_scored, class-mean counts, ...). A reply claiming more is rejected. The server cannot "
        "verify a site's data, so this is the operator's per-node ceiling; robust aggregation does not weigh by it.",
    )
    clip_norm: float | Literal["off", "median"] = Field(
        "off", description="Clip each node's update (its weights minus the weights sent) to this L2 norm before "
        "aggregation: a number, 'median' (the median norm of the round's updates) or 'off'.",
    )
    trim_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="aggregation='trimmed-mean': fraction of nodes cut from each end, per "
        "coordinate (adapters) and per class (class means).",
    )
    pin_partitions: bool = Field(
        False, description="A partition belongs to the Flower node that first claimed it (or that `feda2v owners` "
        "assigned), recorded in <run>/partition_owners.json and kept across resume: another node claiming it is "
        "rejected, even while the owner is offline. Use with SuperNode authentication (node ids are then bound to "
        "registered keys and survive restarts). Off: a restarted node may take over a disconnected node's partition.",
    )
    partition_owners: dict[str, int] = Field(
        default_factory=dict, description="The operator's mapping of partition ids to Flower node ids (with "
        "SuperNode authentication: the ids `flwr supernode register` gave each site's key), as "
        "a [robust.partition-owners] table in a config file: '0' = 1234; it overrides <run>/partition_owners.json "
        "and implies pinned partitions.",
    )
    evaluate: Literal["weighted", "trimmed", "median"] = Field(
        "weighted", description="The global evaluation metric: the mean weighted by each node's test clips; "
        "'trimmed': the same after cutting robust.trim-fraction of the nodes from each end of each metric (one node "
        "cannot move it beyond the honest nodes' range); or the median over nodes. summary.json always has the "
        "median too.",
    )


    @field_validator("partition_owners")
    @classmethod
    def _owner_keys_are_partitions(cls, value: dict[str, int]) -> dict[str, int]:
        for key, node in value.items():
            if not key.isdigit():
                raise ValueError(f"partition id '{key}' must be a whole number (0, 1, ...)")
            if node < 0:
                raise ValueError(f"partition {key}: Flower node id {node} must be >= 0")
        return value


class FedA2VConfig(_Strict):
    """The complete run configuration of a feda2v federation."""

    config_file: str = Field("", description="Optional TOML file whose values override the defaults.")
    seed: int = Field(42, description="Seed for splits, model init and training.")
    output_dir: str = Field("outputs", description="Where runs write summary.json and checkpoints.")
    run_name: str = Field("", description="Sub-directory of output-dir for this run: one plain folder name (no '/', "
                          "'\\', '..'). Empty: a timestamp.")
    cache_dir: str = Field(
        "", description="Cache for datasets, text targets and AST embeddings. Empty: $FEDA2V_CACHE, else the user cache dir."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' uses CUDA when available.")
    num_rounds: int = Field(5, ge=1, description="Federated rounds.")
    aggregation: Literal["fedavg", "median", "trimmed-mean", "none", "kd"] = Field(
        "fedavg",
        description="'fedavg': sample-weighted average of adapter weights; 'median' / 'trimmed-mean': coordinate-wise "
        "median / trimmed mean over nodes of the adapters and, per class, of the class means (robust to a hostile "
        "node, [robust]); 'kd': distil this round's node adapters (owner-only teachers) into the global one on "
        "synthetic embeddings ([kd]); 'none': standalone nodes, each keeps its own adapters (global metrics are "
        "averages over nodes).",
    )
    fraction_train: float = Field(1.0, gt=0, le=1, description="Fraction of nodes sampled for training each round.")
    fraction_evaluate: float = Field(1.0, ge=0, le=1, description="Fraction of nodes sampled for evaluation.")
    min_nodes: int = Field(2, ge=1, description="Nodes that must be connected before a round starts.")
    connect_timeout: float = Field(
        300.0, gt=0, description="Seconds to wait for min-nodes nodes to be connected (at the start and before every "
        "round); fewer after that fails the run with the count.",
    )
    round_timeout: float = Field(
        1800.0, gt=0, description="Deadline in seconds per phase (train, evaluate) of a round: a node that has not "
        "replied by then is left out of that round.",
    )
    wire_codec: Literal["float32", "float16", "int8"] = Field(
        "int8", description="How adapter weights travel: int8 with a scale per row (uploads as the difference from the "
        "weights received; class means then travel as float16), float16, or float32 (as trained).",
    )
    reply_poll_interval: float = Field(
        0.1, gt=0, le=3, description="Seconds between the server's pulls for node replies (Flower's deployment Grid "
        "waits 3 s; a shorter wait ends each phase sooner after its last reply).",
    )
    min_replies: float = Field(
        0.5, gt=0, description="Quorum per phase: valid replies needed for the round to count; >= 1 is a count, < 1 "
        "a fraction of the nodes asked. Below it the run stops with an error naming who replied.",
    )
    resume: bool = Field(
        False, description="Continue the run in output-dir/run-name from its last completed round (same config). "
        "Without it, an existing run-name is an error, never overwritten.",
    )
    checkpoint_every: int = Field(1, ge=1, description="Save global adapters every k rounds (and at the end).")
    ema_decay: float = Field(
        0.7, ge=0, lt=1, description="Also keep checkpoints/adapters_ema.safetensors, an exponential moving average "
        "of the global adapters over rounds (the past's weight; 0 = off). Never sent to nodes: it smooths the "
        "round-to-round swings of the global model for whoever uses the checkpoint.",
    )
    generate_only: bool = Field(
        False, description="Nobody trains: the global adapters of adapter.init-from pass through unchanged, nodes "
        "render their classes (from their pretrained generators with render.source='generator') and the server "
        "renders global images. The third run of the generators -> adapters -> images workflow.",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    nodes: dict[str, NodeSpec] = Field(
        default_factory=dict, description="Per-node tables keyed by partition id: classes and caps for "
        "data.partition='explicit', generator settings, images-per-class, audio."
    )
    audio_encoder: AudioEncoderConfig = Field(default_factory=AudioEncoderConfig)
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    adapter: AdapterConfigSection = Field(default_factory=AdapterConfigSection)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    kd: KDConfig = Field(default_factory=KDConfig)
    server_generator: ServerGeneratorConfig = Field(default_factory=ServerGeneratorConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    render: RenderConfig = Field(default_factory=RenderConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    robust: RobustConfig = Field(default_factory=RobustConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @field_validator("run_name")
    @classmethod
    def _run_name_is_one_folder(cls, value: str) -> str:
        """The server and every node build ``<output-dir>/<run-name>``: a path here would write elsewhere."""
        problem = folder_name_problem(value) if value else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("nodes")
    @classmethod
    def _node_ids_are_ints(cls, value: dict[str, NodeSpec]) -> dict[str, NodeSpec]:
        for key in value:
            if not key.isdigit():
                raise ValueError(f"node id '{key}' must be a partition id (0, 1, ...)")
        return value

    @model_validator(mode="after")
    def _quorum_is_reachable(self) -> "FedA2VConfig":
        if self.min_replies >= 1 and (self.min_replies != int(self.min_replies) or self.min_replies > self.min_nodes):
            raise ValueError(f"min-replies={self.min_replies:g} must be a whole count <= min-nodes={self.min_nodes} "
                             "(or a fraction below 1): a larger quorum can never be met")
        return self

    @model_validator(mode="after")
    def _explicit_needs_nodes(self) -> "FedA2VConfig":
        if self.data.partition == "explicit" and not self.nodes:
            raise ValueError("data.partition='explicit' needs [nodes.<id>] tables with 'classes'")
        return self

    @model_validator(mode="after")
    def _server_training_has_samples(self) -> "FedA2VConfig":
        """KD, fine-tuning and the merged server generator need a source of synthetic embeddings."""
        nodes_upload = self.generator.mode != "off"
        if self.server_generator.mode == "merge" and not nodes_upload:
            raise ValueError("server-generator.mode='merge' needs node generators: set generator.mode")
        if self.server_generator.mode != "off" and self.aggregation == "none":
            raise ValueError("server-generator.mode needs teachers or generators from a global run; aggregation='none' has none")
        needs = [k for k, on in (("aggregation='kd'", self.aggregation == "kd"), ("finetune.epochs > 0", self.finetune.epochs > 0)) if on]
        source = self.sample_source()
        for what in needs:
            if source == "node-generators" and not nodes_upload:
                raise ValueError(f"{what} samples embeddings from the nodes' generators (kd.samples-from), but "
                                 "generator.mode='off': set generator.mode or server-generator.mode")
            if source == "server-generator" and self.server_generator.mode == "off":
                raise ValueError(f"{what} uses kd.samples-from='server-generator' but server-generator.mode='off'")
        if self.finetune.epochs > 0 and self.aggregation == "none":
            raise ValueError("finetune.epochs > 0 needs global adapters; aggregation='none' has none")
        return self

    @model_validator(mode="after")
    def _generate_only_has_what_it_renders(self) -> "FedA2VConfig":
        if not self.generate_only:
            return self
        if not self.adapter.init_from:
            raise ValueError("generate-only needs trained adapters: set adapter.init-from to an adapters checkpoint")
        if self.render.when == "off":
            raise ValueError("generate-only renders images: render.when must not be 'off'")
        if self.generator.mode not in ("off", "use-pretrained-generators"):
            raise ValueError(f"generate-only trains nothing: generator.mode='{self.generator.mode}' would train "
                             "generators (use 'use-pretrained-generators' or 'off')")
        if self.aggregation == "none":
            raise ValueError("generate-only renders with the global adapters of adapter.init-from; aggregation='none' "
                             "has no global adapters")
        if self.render.source == "generator" and self.generator.mode != "use-pretrained-generators":
            raise ValueError("generate-only with render.source='generator' draws from the nodes' pretrained "
                             "generators: set generator.mode='use-pretrained-generators'")
        return self

    @model_validator(mode="after")
    def _audio_free_nodes_use_pretrained_generators(self) -> "FedA2VConfig":
        silent = sorted(k for k, spec in self.nodes.items() if not spec.audio)
        if silent and (self.generator.mode != "use-pretrained-generators" or self.generator.real_mix_ratio > 0):
            raise ValueError(f"nodes {', '.join(silent)} hold no audio (nodes.<id>.audio = false): that needs "
                             "generator.mode='use-pretrained-generators' with generator.real-mix-ratio = 0")
        return self

    def node_holds_audio(self, partition_id: int) -> bool:
        spec = self.nodes.get(str(partition_id))
        return spec.audio if spec else True

    def node_images_per_class(self, partition_id: int) -> int:
        """Images per class node ``partition_id`` renders (``nodes.<id>.images-per-class`` wins)."""
        spec = self.nodes.get(str(partition_id))
        return (spec.images_per_class if spec else 0) or self.render.images_per_class

    def sample_source(self) -> str:
        """Where the server's synthetic embeddings come from (``kd.samples-from`` with 'auto' resolved)."""
        if self.kd.samples_from != "auto":
            return self.kd.samples_from
        return "server-generator" if self.server_generator.mode != "off" else "node-generators"

    # ------------------------------------------------------------------ derived values
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()

    def node_classes(self, num_nodes: int) -> list[list[str]] | None:
        """Explicit per-node class lists, validated against the number of nodes."""
        if self.data.partition != "explicit":
            return None
        missing = [str(i) for i in range(num_nodes) if str(i) not in self.nodes]
        if missing:
            raise ConfigError(f"data.partition='explicit' but no [nodes.<id>] table for node(s) {', '.join(missing)}")
        return [list(self.nodes[str(i)].classes) for i in range(num_nodes)]

    def node_samples_per_class(self, num_nodes: int) -> list[int | None] | None:
        if self.data.partition != "explicit":
            return None
        return [self.nodes[str(i)].samples_per_class or None for i in range(num_nodes)]

    def node_generator_plan(self, partition_id: int) -> tuple[str, list[str] | None]:
        """This node's generator granularity and class selection (``None`` = all it holds)."""
        spec = self.nodes.get(str(partition_id))
        granularity = (spec.generator_granularity if spec else "") or self.generator.granularity
        return granularity, (list(spec.generator_classes) if spec and spec.generator_classes else None)


class NodeRuntimeConfig(_Strict):
    """What a SuperNode's ``--node-config`` may carry (simulation fills the first two)."""

    partition_id: int = Field(..., ge=0, description="This node's index in the partitioning.")
    num_partitions: int = Field(..., ge=1, description="Number of nodes in the partitioning.")
    data_root: str = Field("", description="Dataset directory on this host (overrides data.root).")
    cache_dir: str = Field("", description="Cache directory on this host (overrides cache-dir).")
    checkpoint_dir: str = Field("", description="Generator checkpoint directory on this host (overrides generator.checkpoint-dir).")
    image_dir: str = Field("", description="Where this node writes its images (overrides render.output-dir).")
    num_threads: int = Field(
        0, ge=0, description="torch CPU threads of this node's ClientApp (0: torch's default). Set it when "
        "several SuperNodes share one host, or they oversubscribe the cores.",
    )
    min_class_count: int = Field(
        0, ge=0, description="This site's own privacy floor: classes it holds fewer training clips of are withheld "
        "from its class means and generator training even when the run's privacy.min-class-count is lower "
        "(the larger of the two applies; 0: the run's alone).",
    )

    @model_validator(mode="after")
    def _id_in_range(self) -> "NodeRuntimeConfig":
        if self.partition_id >= self.num_partitions:
            raise ValueError(f"partition-id {self.partition_id} must be < num-partitions {self.num_partitions}")
        return self

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "NodeRuntimeConfig":
        try:
            return cls.model_validate(dict(node_config))
        except ValidationError as err:
            raise ConfigError(_format_errors(err, "node-config")) from None


# ---------------------------------------------------------------------------- helpers
def default_cache_dir() -> Path:
    """``$FEDA2V_CACHE`` or the platform's user cache dir: never a hard-coded absolute path."""
    env = os.environ.get("FEDA2V_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("feda2v"))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> Flower-style flat dict with dotted keys (lists become comma strings)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if value:
                flat.update(flatten(value, dotted + "."))
        elif isinstance(value, (list, tuple)):
            flat[dotted] = ",".join(str(v) for v in value)
        else:
            flat[dotted] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Flat dotted keys -> nested dict; a key that is both a value and a table is an error."""
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        parts = dotted.split(".")
        node = tree
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' is a value, but '{dotted}' uses it as a table")
            node = child
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(f"config key '{dotted}' is a table, not a value")
        node[parts[-1]] = value
    return tree


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}'")
        elif not item["loc"]:  # a cross-key rule: its message names the keys
            lines.append(f"  {str(item['msg']).removeprefix('Value error, ')}")
        else:
            lines.append(f"  '{key}': {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def _defaults_flat() -> dict[str, Any]:
    return flatten(FedA2VConfig().model_dump(by_alias=True))


def _read_config_file(path_str: str, search_dirs: tuple[Path, ...]) -> tuple[dict[str, Any], Path]:
    path = Path(path_str).expanduser()
    candidates = [path] if path.is_absolute() else [d / path for d in search_dirs] + [path]
    for candidate in candidates:
        if candidate.is_file():
            try:
                return tomllib.loads(candidate.read_text()), candidate.resolve()
            except tomllib.TOMLDecodeError as err:
                raise ConfigError(f"config-file '{candidate}': not valid TOML: {err}") from None
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"config-file '{path_str}' not found (tried: {tried})")


def load_config(
    run_config: Mapping[str, Any] | None = None,
    search_dirs: tuple[Path, ...] = (),
) -> FedA2VConfig:
    """Build the validated config from Flower's flat run config (+ its optional config-file).

    ``search_dirs``: where a relative ``config-file`` is looked up (the app directory, so that
    ``configs/x.toml`` works wherever the ServerApp process runs), then the current directory.
    """
    run_config = dict(run_config or {})
    defaults = _defaults_flat()
    try:
        run_tree = unflatten(run_config)
    except ConfigError:
        raise
    file_tree: dict[str, Any] = {}
    file_path: Path | None = None
    config_file = run_config.get("config-file", "")
    if config_file:
        file_tree, file_path = _read_config_file(str(config_file), search_dirs + (_app_root(),))
        if "config-file" in file_tree:
            raise ConfigError(f"config-file '{file_path}': may not set 'config-file' itself")
    # Run-config values equal to the built-in default do not override the file (see module doc).
    file_flat = flatten(file_tree)
    explicit = {k: v for k, v in run_config.items() if not (k in file_flat and defaults.get(k) == v)}
    merged = _deep_merge(file_tree, unflatten(explicit)) if file_tree else run_tree
    source = f"run config + {file_path}" if file_path else "run config"
    try:
        cfg = FedA2VConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    return cfg


def _app_root() -> Path:
    """The directory holding configs/ (the repo root or the unpacked FAB)."""
    return Path(__file__).resolve().parent.parent


RUN_HASH_EXCLUDES = {"config_file", "output_dir", "run_name", "cache_dir", "resume", "num_rounds", "round_timeout",
                     "reply_poll_interval", "connect_timeout", "min_replies", "min_nodes"}


def config_hash(cfg: FedA2VConfig) -> str:
    """Stable short hash of the settings that define a run's results (stored in checkpoint metadata; a
    resumed run must match it). Where files go, how long to wait and how many rounds are not part of it."""
    payload = cfg.model_dump(by_alias=True, exclude=RUN_HASH_EXCLUDES)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def json_schema() -> dict[str, Any]:
    return FedA2VConfig.model_json_schema(by_alias=True)


def _walk_fields(model: type[BaseModel], prefix: str = ""):
    """Yield (dotted key, annotation text, default, description) for every leaf field."""
    for name, field in model.model_fields.items():
        key = prefix + _kebab(name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _walk_fields(ann, key + ".")
            continue
        if name == "nodes":
            for sub_name, sub_field in NodeSpec.model_fields.items():
                yield (
                    f"nodes.<id>.{_kebab(sub_name)}",
                    _type_text(sub_field.annotation),
                    sub_field.get_default(call_default_factory=True),
                    sub_field.description or "",
                )
            continue
        yield key, _type_text(ann), field.get_default(call_default_factory=True), field.description or ""


def _type_text(ann: Any) -> str:
    import types
    import typing

    if isinstance(ann, types.UnionType) or typing.get_origin(ann) is typing.Union:
        return " \\| ".join(_type_text(a) for a in typing.get_args(ann))
    text = str(ann) if getattr(ann, "__origin__", None) is list else (getattr(ann, "__name__", None) or str(ann))
    if str(ann).startswith("typing.Literal"):
        text = " \\| ".join(repr(a) for a in ann.__args__)
    return text.replace("typing.", "")


def markdown_reference() -> str:
    """The configuration reference table in README.md (a test checks that README matches it)."""
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for key, type_text, default, description in _walk_fields(FedA2VConfig):
        if isinstance(default, list):
            default = ",".join(default)
        lines.append(f"| `{key}` | {type_text} | `{json.dumps(default)}` | {description} |")
    return "\n".join(lines)
