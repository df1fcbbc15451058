"""FedA2V strategy: Flower's FedAvg plus the federation's class targets and class-mean bookkeeping.

What it adds to FedAvg, and why:

* ``configure_train`` / ``configure_evaluate`` attach the class targets (computed once on the
  server) to every message, so sites never load FLUX's text encoders.
* ``aggregate_train`` pops each reply's extra records (per-class mean adapter outputs and counts)
  *before* FedAvg's aggregation, which requires exactly one ArrayRecord and one MetricRecord per
  reply, and keeps count-weighted global class means per round (teacher ownership, fine-tuning anchors,
  global images).
* ``aggregation = "kd"`` and the server's own training (server generator, fine-tuning) run after
  FedAvg through :class:`~server_app.server_training.ServerTrainer`, whose result replaces the
  round's global weights; the reply adapters are kept as this round's teachers.
* ``aggregation = "none"``: nodes keep their own adapters; no global weights are produced and
  per-node adapters are checkpointed instead.
* Per-node and global metrics go to ``summary.json``; global adapters are checkpointed every
  ``checkpoint-every`` rounds and at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.checkpoints import save_adapters, save_tensors
from common.models.adapters import Adapters
from common.records import (
    ARRAYS,
    CLASS_MEANS,
    CLASS_MEANS_META,
    GENERATORS,
    METRICS,
    TARGETS,
    TARGETS_META,
    ClassTensors,
    RecordError,
    SERVER_GENERATOR,
    SERVER_GENERATOR_META,
    arrays_to_module,
    bank_from_records,
    bank_to_records,
)
from common.generator_bank import save_bank
from server_app.render import GlobalRenderer
from server_app.server_training import RoundInputs, ServerTrainer
from server_app.summary import RunSummary

log = logging.getLogger(__name__)

ID_KEYS = ("partition_id",)
SUMMED = ("num_val", "skipped_files", "images_rendered", "images_skipped")  # counts: summed over nodes


def aggregate_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Weighted average of each metric; ``val_*`` weighted by ``num_val``, ids left out.

    FedAvg's default weights every metric by ``num-examples`` (here: test clips) and would also
    average node ids into nonsense.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        for key, value in metrics.items():
            if key in ID_KEYS or not isinstance(value, (int, float)):
                continue
            weight_key = "num_val" if key.startswith("val_") and "num_val" in metrics else weighted_by_key
            w = float(metrics.get(weight_key, 0))
            if key in (weighted_by_key, *SUMMED):
                sums[key] = sums.get(key, 0.0) + float(value)  # counts are summed, not averaged
                weights[key] = 1.0
                continue
            sums[key] = sums.get(key, 0.0) + w * float(value)
            weights[key] = weights.get(key, 0.0) + w
    # A metric no node had data for (weight 0) is left out rather than reported as 0.
    return MetricRecord({k: sums[k] / weights[k] for k in sums if weights[k]})


class FedA2VStrategy(FedAvg):
    def __init__(
        self,
        *,
        targets: ClassTensors,
        aggregation: str,
        template: Adapters,
        adapter_config: dict[str, Any],
        run_dir: Path,
        summary: RunSummary,
        num_rounds: int,
        checkpoint_every: int,
        config_hash: str,
        generator_base: str = "generator",
        server_trainer: ServerTrainer | None = None,
        send_server_generator: bool = False,
        renderer: GlobalRenderer | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(evaluate_metrics_aggr_fn=aggregate_metrics, train_metrics_aggr_fn=aggregate_metrics, **fedavg_kwargs)
        if aggregation not in ("fedavg", "none", "kd"):
            raise ValueError(f"aggregation '{aggregation}' is not supported by FedA2VStrategy")
        if aggregation == "kd" and server_trainer is None:
            raise ValueError("aggregation 'kd' needs a ServerTrainer")
        self.targets = targets
        self.aggregation = aggregation
        self.template = template
        self.adapter_config = adapter_config
        self.run_dir = Path(run_dir)
        self.run_summary = summary
        self.num_rounds = num_rounds
        self.checkpoint_every = checkpoint_every
        self.config_hash = config_hash
        self.generator_base = generator_base
        self.server_trainer = server_trainer
        self.send_server_generator = send_server_generator
        self.renderer = renderer
        self.sent_arrays: ArrayRecord | None = None  # the global adapters of the round in progress
        # latest round only: round -> count-weighted global means / partition id -> the node's means
        self.class_means: dict[int, ClassTensors] = {}
        self.node_class_means: dict[int, dict[int, ClassTensors]] = {}
        self.node_extras: dict[int, dict[int, dict[str, Any]]] = {}  # round -> partition id -> extra records
        self.history: dict[int, dict[str, float]] = {}

    # ------------------------------------------------------------------ configure
    def _attach_targets(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for message in messages:  # FedAvg shares one RecordDict between messages; setting twice is harmless
            self.targets.to_records(message.content, TARGETS, TARGETS_META)
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.sent_arrays = arrays
        messages = self._attach_targets(super().configure_train(server_round, arrays, config, grid))
        bank = self.server_trainer.server_bank if self.server_trainer is not None else None
        if self.send_server_generator and bank is not None:
            for message in messages:  # nodes fill thin classes with its samples (train.augment-to)
                bank_to_records(bank, message.content, "", None, server_round - 1, SERVER_GENERATOR, SERVER_GENERATOR_META)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self._attach_targets(super().configure_evaluate(server_round, arrays, config, grid))

    # ------------------------------------------------------------------ aggregate
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._fail_if_all_failed(server_round, replies, "train")
        node_means: dict[int, ClassTensors] = {}
        node_metrics: dict[str, dict[str, Any]] = {}
        round_extras: dict[int, dict[str, Any]] = {}
        node_arrays: dict[int, ArrayRecord] = {}
        for msg in replies:
            if msg.has_error():
                continue
            content = msg.content
            pid = self._partition_id(msg)
            if ARRAYS in content:
                node_arrays[pid] = content[ARRAYS]  # type: ignore[assignment]
            try:
                means = ClassTensors.from_records(content, CLASS_MEANS, CLASS_MEANS_META)
            except RecordError as err:
                log.warning("round %d: reply of node %s has no usable class means (%s)", server_round, pid, err)
            else:
                node_means[pid] = means
            # FedAvg accepts exactly one ArrayRecord + one MetricRecord: every other record (class means
            # now; generator weights and the like later) is taken off the reply and kept per node.
            extras = {name: content[name] for name in list(content.keys()) if name not in (ARRAYS, METRICS)}
            for name in extras:
                del content[name]
            round_extras[pid] = extras
            node_metrics[str(pid)] = dict(content[METRICS]) if METRICS in content else {}
        arrays, metrics = super().aggregate_train(server_round, replies)
        # Only the latest round is kept: per-round tensors held forever would grow memory every round.
        self.node_extras = {server_round: round_extras}
        self.node_class_means = {server_round: node_means}
        if node_means:
            self.class_means = {server_round: self._merge_class_means(node_means)}
        banks, encoder_key = self._store_generators(server_round, round_extras)
        global_metrics = dict(metrics) if metrics is not None else {}
        if self.server_trainer is not None and self.aggregation != "none" and node_arrays:
            inputs = RoundInputs(
                server_round, arrays, self.sent_arrays, node_arrays, node_means, banks,
                self.class_means.get(server_round), encoder_key,
            )
            arrays, server_metrics = self.server_trainer.run(inputs)
            global_metrics.update(server_metrics)
            metrics = MetricRecord(global_metrics)
            self.run_summary.set(server_round, "server_training", self.server_trainer.histories)
        if self.renderer is not None and self.renderer.due(server_round) and self.aggregation != "none":
            bank = self.server_trainer.server_bank if self.server_trainer is not None else None
            global_metrics.update(self.renderer(server_round, arrays, self.class_means.get(server_round), bank))
            metrics = MetricRecord(global_metrics)
        self.run_summary.record(server_round, "train", global_metrics, node_metrics)
        if self.class_means.get(server_round) is not None:
            means = self.class_means[server_round]
            self.run_summary.set(server_round, "class_counts", dict(zip(means.class_names, means.counts.tolist())))
        if self.aggregation == "none":
            self._checkpoint_nodes(server_round, replies)
            return None, metrics
        if arrays is not None and self._is_checkpoint_round(server_round):
            self.save_global(arrays, server_round)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self._fail_if_all_failed(server_round, replies, "evaluate")
        node_metrics = {
            str(self._partition_id(m)): dict(m.content[METRICS]) for m in replies if not m.has_error() and METRICS in m.content
        }
        metrics = super().aggregate_evaluate(server_round, replies)
        global_metrics = dict(metrics) if metrics is not None else {}
        self.run_summary.record(server_round, "evaluate", global_metrics, node_metrics)
        self.history[server_round] = global_metrics
        if global_metrics:
            log.info(
                "[round %d/%d] global test retrieval acc %.4f (clip %.4f, t5 %.4f) | test loss %.4f | %d nodes",
                server_round, self.num_rounds,
                global_metrics.get("test_retrieval_acc", float("nan")),
                global_metrics.get("test_retrieval_acc_clip", float("nan")),
                global_metrics.get("test_retrieval_acc_t5", float("nan")),
                global_metrics.get("test_loss", float("nan")),
                len(node_metrics),
            )
        return metrics

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _fail_if_all_failed(server_round: int, replies: list[Message], phase: str) -> None:
        """Stop the run when every node failed: continuing would only repeat the error N rounds."""
        if replies and all(m.has_error() for m in replies):
            reason = replies[0].error.reason.strip().splitlines()
            raise RuntimeError(
                f"round {server_round}: all {len(replies)} nodes failed in {phase}; first error: "
                + (reason[-1] if reason else "unknown")
            )

    @staticmethod
    def _partition_id(msg: Message) -> int:
        metrics = msg.content[METRICS] if METRICS in msg.content else {}
        return int(metrics.get("partition_id", msg.metadata.src_node_id))  # type: ignore[union-attr]

    def _merge_class_means(self, node_means: dict[int, ClassTensors]) -> ClassTensors:
        """Count-weighted mean per class over the nodes that own it."""
        names = self.targets.class_names
        clip = torch.zeros(len(names), *self.targets.clip.shape[1:])
        t5 = torch.zeros(len(names), *self.targets.t5.shape[1:])
        counts = torch.zeros(len(names), dtype=torch.int64)
        index = {n: i for i, n in enumerate(names)}
        for pid, means in node_means.items():
            for row, name in enumerate(means.class_names):
                if name not in index:
                    log.warning("node %s reported class '%s' that is not in the federation; ignored", pid, name)
                    continue
                c = int(means.counts[row]) if means.counts is not None else 0
                i = index[name]
                clip[i] += means.clip[row] * c
                t5[i] += means.t5[row] * c
                counts[i] += c
        denom = counts.clamp(min=1).float()
        present = counts > 0
        idx = present.nonzero().flatten().tolist()
        return ClassTensors(
            [names[i] for i in idx], (clip / denom[:, None])[idx], (t5 / denom[:, None, None])[idx], counts[idx]
        )

    def _is_checkpoint_round(self, server_round: int) -> bool:
        return server_round % self.checkpoint_every == 0 or server_round == self.num_rounds

    def save_global(self, arrays: ArrayRecord, server_round: int) -> Path:
        adapters = arrays_to_module(arrays, self.template)
        ckpt_dir = self.run_dir / "checkpoints"
        path = save_adapters(
            ckpt_dir / f"adapters_round_{server_round}.safetensors", adapters, self.adapter_config,
            self.targets.class_names, server_round, self.config_hash, {"aggregation": self.aggregation},
        )
        save_adapters(
            ckpt_dir / "adapters.safetensors", adapters, self.adapter_config,
            self.targets.class_names, server_round, self.config_hash, {"aggregation": self.aggregation},
        )
        log.info("round %d: global adapters saved to %s", server_round, path)
        return path

    def _checkpoint_nodes(self, server_round: int, replies: list[Message]) -> None:
        if not self._is_checkpoint_round(server_round):
            return
        for msg in replies:
            if msg.has_error() or "arrays" not in msg.content:
                continue
            pid = self._partition_id(msg)
            adapters = arrays_to_module(msg.content["arrays"], self.template)  # type: ignore[arg-type]
            for name in (f"adapters_node{pid}_round_{server_round}", f"adapters_node{pid}"):
                save_adapters(
                    self.run_dir / "checkpoints" / f"{name}.safetensors", adapters, self.adapter_config,
                    self.targets.class_names, server_round, self.config_hash, {"aggregation": "none", "node": pid},
                )

    def _store_generators(self, server_round: int, round_extras: dict[int, dict[str, Any]]) -> tuple[dict[int, Any], str]:
        """Keep every node's uploaded generators under ``<run>/generators`` (same names as on the node);
        returns the parsed banks and their encoder key (for the server generator's checkpoints)."""
        banks: dict[int, Any] = {}
        key = ""
        for pid, extras in round_extras.items():
            if GENERATORS not in extras:
                continue
            try:
                bank, meta = bank_from_records(extras, source=f"reply of node {pid}")
            except (RecordError, ValueError) as err:
                log.warning("round %d: generators of node %s not stored: %s", server_round, pid, err)
                continue
            key = str(meta.get("encoder-key", ""))
            save_bank(
                bank, self.run_dir / "generators", self.generator_base, pid, server_round, self.checkpoint_every, key,
            )
            banks[pid] = bank
        return banks, key

    def save_class_means(self) -> Path | None:
        if not self.class_means:
            return None
        last = max(self.class_means)
        means = self.class_means[last]
        return save_tensors(
            self.run_dir / "class_means.safetensors",
            {"clip": means.clip, "t5": means.t5, "counts": means.counts},
            {"type": "class-means", "class-names": means.class_names, "round": last},
        )
