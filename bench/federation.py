"""An in-process federation for the benchmarks: the real ServerApp strategy and round pipeline, and real
ClientApp handlers (``client_app.app.train`` / ``evaluate``), one round at a time, no Flower runtime.

Why: the benches that compare configurations or tamper with replies (``bench/adversarial.py``,
``bench/privacy.py``) need each node's reply in hand and many federations in one process; a ``flwr run``
per variant would cost its start-up and hide the replies.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from flwr.app import Message, MessageType

from client_app.app import evaluate as node_evaluate
from client_app.app import train as node_train
from common.config import flatten, load_config
from common.data.dataset import resolve_classes
from common.models.adapters import AdapterConfig, Adapters
from common.models.audio_encoder import embedding_shape
from common.models.generators import GeneratorSpec
from common.records import METRICS, RUN_IDENTITY, RUN_NAME, module_to_arrays
from common.wire import WIRE, encode, received, wire_config
from ops.local_run import node_context, server_content, server_message
from server_app.app import class_targets
from server_app.pipeline import build_pipelines
from server_app.run_context import ServerRun
from server_app.strategy import FedA2VStrategy
from server_app.summary import RunSummary
from server_app.validation import ReplyValidator

__all__ = ["InProcessFederation"]


class InProcessFederation:
    """``nodes`` real node handlers and the real strategy of the run config ``overrides`` (rendering off)."""

    def __init__(self, overrides: dict, work: Path, name: str, nodes: int) -> None:
        flat = {**flatten(load_config({}).model_dump(by_alias=True)), "render.when": "off", "device": "cpu",
                "run-name": name, "output-dir": str(work / "outputs"), **overrides}
        self.cfg = cfg = load_config(flat)
        self.run_config = flatten(cfg.model_dump(by_alias=True))
        class_names = resolve_classes(cfg.data, None)
        self.targets = class_targets(cfg, class_names)
        acfg = AdapterConfig.from_sections(cfg.adapter, cfg.audio_encoder, cfg.text_encoder,
                                           clip_dim=self.targets.clip.shape[1], t5_dim=self.targets.t5.shape[2])
        template = Adapters.seeded(acfg, cfg.seed)
        run_dir = work / "outputs" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        run = ServerRun(run_dir=run_dir, targets=self.targets, template=template, adapter_config=acfg.to_dict(),
                        config_hash="bench", num_rounds=cfg.num_rounds, device=torch.device("cpu"))
        pipelines = build_pipelines(cfg, run, RunSummary(run_dir / "summary.json", {"classes": class_names}))
        spec = GeneratorSpec.from_config(cfg.generator, *embedding_shape(cfg.audio_encoder))
        validator = ReplyValidator.for_run(cfg.robust, spec, template.state_dict(), class_names, acfg, run_dir,
                                           cfg.privacy)
        self.strategy = FedA2VStrategy(targets=self.targets, round_pipeline=pipelines.round,
                                       after_round=pipelines.after_round, validator=validator,
                                       min_replies=cfg.min_replies, wire_codec=cfg.wire_codec,
                                       evaluate_metrics=cfg.robust.evaluate, trim_fraction=cfg.robust.trim_fraction)
        self.arrays = module_to_arrays(template)
        self.template, self.aggregator, self.class_names = template, pipelines.aggregator, class_names
        self.nodes = nodes
        self.contexts = [node_context(self.run_config, {"partition-id": p, "num-partitions": nodes, "num-threads": 1})
                         for p in range(nodes)]
        self.name = name
        self.server_seconds: list[float] = []

    def message(self, server_round: int, node: int, kind: str) -> Message:
        content = server_content(self.targets, encode(self.arrays, self.cfg.wire_codec), server_round)
        content[WIRE] = wire_config(self.cfg.wire_codec, delta=False)
        content["config"][RUN_NAME] = self.name
        content["config"][RUN_IDENTITY] = f"bench-{self.name}"
        return server_message(content, kind, dst_node_id=100 + node)

    def prepare(self) -> None:
        """What the strategy's configure step records before it asks the nodes."""
        self.strategy.sent_arrays = self.arrays
        self.strategy.sent_base = received(self.arrays, self.cfg.wire_codec)
        self.strategy.asked = {"train": self.nodes, "evaluate": self.nodes}

    def train_replies(self, server_round: int) -> list[Message]:
        return [node_train(self.message(server_round, node, MessageType.TRAIN), self.contexts[node])
                for node in range(self.nodes)]

    def aggregate(self, server_round: int, replies: list[Message]) -> None:
        t0 = time.perf_counter()
        self.arrays, _ = self.strategy.aggregate_train(server_round, replies)
        self.server_seconds.append(time.perf_counter() - t0)

    def evaluate_replies(self, server_round: int) -> list[Message]:
        return [node_evaluate(self.message(server_round, node, MessageType.EVALUATE), self.contexts[node])
                for node in range(self.nodes)]

    @staticmethod
    def true_accuracy(evaluations: list[Message]) -> float:
        """The test-clip-weighted global test accuracy of the nodes' own evaluations."""
        metrics = [dict(reply.content[METRICS]) for reply in evaluations]
        n = sum(m["num-examples"] for m in metrics)
        return sum(m["test_retrieval_acc"] * m["num-examples"] for m in metrics) / n
