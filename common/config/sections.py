"""The configuration's sections: one pydantic model per TOML table (``[data]``, ``[train]``, ...).

Why sections: code below the apps' entry points receives the section it needs, not the whole tree.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from common.config.base import Strict, split_list
from common.config.choices import (
    Calibration,
    DatasetName,
    GeneratorKind,
    GeneratorMode,
    Granularity,
    Oracle,
    Precision,
    StorageDtype,
)


class DataConfig(Strict):
    """Which audio, how it is loaded, and how it is split across nodes."""

    dataset: DatasetName = Field(
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

    _split_classes = field_validator("classes", mode="before")(split_list)

    @field_validator("audio_dir")
    @classmethod
    def _one_folder_name(cls, value: str) -> str:
        if value and (value in (".", "..") or "/" in value or "\\" in value):
            raise ValueError(f"data.audio-dir must be one folder name inside the dataset (no '/', not '..'), got {value!r}")
        return value


class NodeSpec(Strict):
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

    _split_classes = field_validator("classes", "generator_classes", mode="before")(split_list)


def _split_groups(value: Any) -> Any:
    """``"animals=dog,rooster;nature=rain"`` (run config) -> {"animals": ["dog", "rooster"], ...}."""
    if isinstance(value, str):
        groups: dict[str, list[str]] = {}
        for part in filter(None, (p.strip() for p in value.split(";"))):
            name, sep, members = part.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"group entry '{part}' must look like 'name=class1,class2'")
            groups[name.strip()] = split_list(members)
        return groups
    return value


class GeneratorConfig(Strict):
    """Node generators of audio embeddings (VAE / GAN) and the two-run workflow."""

    mode: GeneratorMode = Field(
        "off",
        description="'generator-training': nodes train adapters and generators; 'generator-only': generators "
        "only (adapters are sent back unchanged); 'use-pretrained-generators': nodes load their generator "
        "checkpoints and train adapters on sampled embeddings (no AST, no audio unless real-mix-ratio > 0); "
        "'off': no generators.",
    )
    kind: GeneratorKind = Field("vae", description="Generator family (VAE measured best on the default data).")
    granularity: Granularity = Field(
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
        "with few clips, e.g. per_class GANs, which fall far short of their quality at fewer steps).",
    )
    lr: float = Field(0.0, ge=0, description="Learning rate; 0: the per-kind default (VAE 3e-3, GAN 1e-3).")
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


class KDConfig(Strict):
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
        "auto", description="KD forward passes in fp32, or under bfloat16 autocast (fp32 weights; faster per epoch "
        "where the CPU or GPU has bf16 units); 'auto': bf16 where the device has them, else fp32."
    )


class ServerGeneratorConfig(Strict):
    """A class-conditional generator on the server covering every class of the federation."""

    mode: Literal["off", "merge", "data-free"] = Field(
        "off",
        description="'merge': train it on samples of the nodes' uploaded generators; 'data-free': train it so the "
        "owning nodes' adapters map its samples to their reported class means (plus a diversity term); 'off'.",
    )
    kind: GeneratorKind = Field("vae", description="Model family (data-free uses its decoder / generator).")
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


class FinetuneConfig(Strict):
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


class RenderConfig(Strict):
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
    oracle: Oracle = Field(
        "none", description="Replace this branch's adapter output by the class text embedding (a baseline)."
    )
    calibrate: Calibration = Field(
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

    _split_classes = field_validator("classes", mode="before")(split_list)

    def due(self, server_round: int, num_rounds: int) -> bool:
        if self.when == "off":
            return False
        return server_round == num_rounds or (self.when == "every" and server_round % self.every == 0)


class AudioEncoderConfig(Strict):
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
    cache_dtype: StorageDtype = Field(
        "float16",
        description="Storage dtype of embeddings. Nodes train on these rounded values whether a clip was a "
        "cache hit or freshly extracted, so results do not depend on the cache.",
    )


class TextEncoderConfig(Strict):
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


class AdapterConfigSection(Strict):
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


class TrainConfig(Strict):
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


class LoggingConfig(Strict):
    """Extra run logs beyond summary.json and report.html."""

    tensorboard: bool = Field(
        False, description="Also write TensorBoard scalars per round and image grids to <run>/tensorboard (needs the "
        "tensorboard package: pip install 'feda2v[tensorboard]'; without it the run says so and goes on).",
    )


class PrivacyConfig(Strict):
    """What a node may reveal about its data: the class floor and record-level differential privacy."""

    min_class_count: int = Field(
        3, ge=1, description="Classes a node holds fewer training clips of are withheld from its class means and "
        "generator training (a mean of one clip is that clip). With dp, the floor applies to the noisy counts.",
    )
    dp: bool = Field(
        False, description="Clip-level differential privacy at every site: adapters train with DP-SGD (per-clip "
        "clipping, Gaussian noise, Poisson sampling), class means and counts are released through the Gaussian "
        "mechanism, and an accountant on each site composes every release against its budget. A site's "
        "node-config privacy-dp turns it on whatever the server says.",
    )
    epsilon: float = Field(
        8.0, gt=0, description="With dp: the privacy budget (epsilon at privacy.delta) each site may spend in this "
        "run, over all its releases. A site's node-config privacy-epsilon caps what it spends over all runs.",
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="With dp: the delta of the (epsilon, delta) guarantee.")
    noise_multiplier: float = Field(
        0.0, ge=0, description="With dp: the DP-SGD noise multiplier (noise std / clipping norm). 0: calibrated on "
        "each site so that the planned rounds spend its budget (the tighter of the run's and its own).",
    )
    max_grad_norm: float = Field(
        1.0, gt=0, description="With dp: each clip's gradient is clipped to this L2 norm before noise is added.",
    )
    means: Literal["final", "every-round"] = Field(
        "final", description="With dp: when sites release class means: in the last round only (one release; FedAvg "
        "and the median/trimmed mean do not use them during the run), or every round (KD and fine-tuning read them).",
    )
    means_noise_multiplier: float = Field(
        0.0, ge=0, description="With dp: Gaussian-mechanism noise of the class counts (std = this, drawn once per "
        "run) and of each released class sum (std = this x means-clip-norm). 0: the DP-SGD noise multiplier "
        "(calibrated together).",
    )
    means_clip_norm: float = Field(
        10.0, gt=0, description="With dp: each clip's adapter output, in the span of the class text targets (CLIP and "
        "T5 together), is scaled down to at most this L2 norm before it enters a class sum.",
    )
    central_clip_norm: float = Field(
        1.0, gt=0, description="aggregation='dp-fedavg': each site's update (weights minus the weights sent) is clipped "
        "to this L2 norm before the unweighted mean.",
    )
    central_noise_multiplier: float = Field(
        1.0, gt=0, description="aggregation='dp-fedavg': the noise std on the mean update is this x "
        "central-clip-norm / the sites that replied.",
    )
    accountant: Literal["rdp", "prv"] = Field(
        "rdp", description="With dp: the privacy accountant (Renyi DP, or the tighter privacy random variable "
        "accountant).",
    )


class RobustConfig(Strict):
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


