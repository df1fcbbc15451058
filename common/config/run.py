"""The whole run's configuration (``FedA2VConfig``) and what a SuperNode's ``--node-config`` may carry.

Why here: the cross-section rules (a quorum that can be met, KD with a source of samples, generate-only
with adapters to render) need the whole tree; everything below the entry points takes one section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import Field, ValidationError, field_validator, model_validator

from common.config.base import ConfigError, Strict, default_cache_dir, format_errors
from common.config.choices import AggregationName
from common.config.sections import (
    AdapterConfigSection,
    AudioEncoderConfig,
    DataConfig,
    FinetuneConfig,
    GeneratorConfig,
    KDConfig,
    LoggingConfig,
    NodeSpec,
    PrivacyConfig,
    RenderConfig,
    RobustConfig,
    ServerGeneratorConfig,
    TextEncoderConfig,
    TrainConfig,
)
from common.names import folder_name_problem

__all__ = ["FedA2VConfig", "NodeRuntimeConfig"]


class FedA2VConfig(Strict):
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
    aggregation: AggregationName = Field(
        "fedavg",
        description="'fedavg': sample-weighted average of adapter weights; 'median' / 'trimmed-mean': coordinate-wise "
        "median / trimmed mean over nodes of the adapters and, per class, of the class means (robust to a hostile "
        "node, [robust]); 'kd': distil this round's node adapters (owner-only teachers) into the global one on "
        "synthetic embeddings ([kd]); 'none': standalone nodes, each keeps its own adapters (global metrics are "
        "averages over nodes); 'dp-fedavg': central (site-level) differential privacy, the unweighted mean of the "
        "sites' updates clipped to privacy.central-clip-norm plus Gaussian noise (privacy.central-noise-multiplier).",
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
    def _dp_covers_every_release(self) -> "FedA2VConfig":
        """Generators trained on a site's clips would be a release outside the DP guarantee."""
        if not self.privacy.dp:
            return self
        if self.generator.mode != "off":
            raise ValueError(f"privacy.dp covers adapters and class means only: generator.mode='{self.generator.mode}' "
                             "trains (or samples) generators on the sites' clips without DP; set generator.mode='off'")
        if self.train.augment_to > 0:
            raise ValueError("privacy.dp with train.augment-to > 0: how many samples a thin class gets reveals its "
                             "exact count; set train.augment-to = 0")
        if self.train.proximal_mu > 0:
            raise ValueError("privacy.dp with train.proximal-mu > 0: DP-SGD has no FedProx term; set "
                             "train.proximal-mu = 0")
        if (self.aggregation == "kd" or self.finetune.epochs > 0) and self.privacy.means != "every-round":
            raise ValueError("privacy.dp: aggregation='kd' and finetune.epochs > 0 read the class means every round; "
                             "set privacy.means = 'every-round'")
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

    def node_generator_plan(self, partition_id: int) -> tuple[str, list[str] | None]:
        """This node's generator granularity and class selection (``None`` = all it holds)."""
        spec = self.nodes.get(str(partition_id))
        granularity = (spec.generator_granularity if spec else "") or self.generator.granularity
        return granularity, (list(spec.generator_classes) if spec and spec.generator_classes else None)


class NodeRuntimeConfig(Strict):
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
    privacy_dp: bool = Field(
        False, description="This site releases nothing without differential privacy: DP is on for it even when the "
        "run's privacy.dp is off.",
    )
    privacy_epsilon: float = Field(
        0.0, ge=0, description="This site's lifetime budget: epsilon over every release of its data in every run "
        "(its ledger); it can only lower the run's privacy.epsilon. 0: the run's alone. Setting it turns DP on.",
    )
    privacy_delta: float = Field(
        0.0, ge=0, lt=1, description="This site's delta; it can only lower the run's privacy.delta (0: the run's).",
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
            raise ConfigError(format_errors(err, "node-config")) from None


