"""Server strategy: replies parsed without modifying them, count-weighted class means, and the
round's side effects (checkpoints, summary) only in the after-round step."""

from __future__ import annotations

import json
import time

import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

from common.checkpoints import load_adapters
from common.config import load_config
from common.models.adapters import AdapterConfig, Adapters
from common.records import CLASS_MEANS, CLASS_MEANS_META, ClassTensors, module_to_arrays
from server_app.pipeline import build_pipelines
from server_app.run_context import ServerRun
from server_app.strategy import FedA2VStrategy
from server_app.summary import RunSummary

ACFG = AdapterConfig(in_dim=8, in_tokens=2, clip_dim=6, t5_dim=5, t5_tokens=2, hidden_dim=16, heads=2, dropout=0.0)
NAMES = ["dog", "siren", "rain"]


def reply(pid: int, weights: Adapters, n: int, means: ClassTensors) -> Message:
    content = RecordDict({"arrays": module_to_arrays(weights), "metrics": MetricRecord({"num-examples": n, "partition_id": pid, "train_loss": float(pid)})})
    means.to_records(content, CLASS_MEANS, CLASS_MEANS_META)
    meta = Metadata(run_id=1, message_id=f"r{pid}", src_node_id=100 + pid, dst_node_id=0, reply_to_message_id="x",
                    group_id="1", created_at=time.time(), ttl=60, message_type=MessageType.TRAIN)
    return Message(content=content, metadata=meta)


def make_strategy(tmp_path, aggregation="fedavg", rounds=2):
    targets = ClassTensors(NAMES, torch.randn(3, 6), torch.randn(3, 2, 5))
    summary = RunSummary(tmp_path / "summary.json", {"classes": NAMES})
    cfg = load_config({"aggregation": aggregation, "num-rounds": rounds, "checkpoint-every": 1})
    run = ServerRun(run_dir=tmp_path, targets=targets, template=Adapters(ACFG), adapter_config=ACFG.to_dict(),
                    config_hash="abc", num_rounds=rounds, device=torch.device("cpu"))
    pipelines = build_pipelines(cfg, run, summary)
    assert pipelines.round.step_names == ["aggregate adapters"]
    return FedA2VStrategy(targets=targets, round_pipeline=pipelines.round, after_round=pipelines.after_round)


def test_aggregate_train_merges_class_means_by_count_and_checkpoints(tmp_path):
    strategy = make_strategy(tmp_path)
    torch.manual_seed(0)
    a, b = Adapters(ACFG), Adapters(ACFG)
    m0 = ClassTensors(["dog", "siren"], torch.ones(2, 6), torch.ones(2, 2, 5), torch.tensor([1, 3]))
    m1 = ClassTensors(["siren"], 5 * torch.ones(1, 6), 5 * torch.ones(1, 2, 5), torch.tensor([1]))
    replies = [reply(0, a, 4, m0), reply(1, b, 1, m1)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    # weighted FedAvg of the weights (4:1)
    key = "clip.out.1.weight"
    expected = (4 * a.state_dict()[key] + 1 * b.state_dict()[key]) / 5
    assert torch.allclose(arrays.to_torch_state_dict()[key], expected, atol=1e-6)
    assert metrics["num-examples"] == 5
    # class means: dog only from node 0; siren = (3*1 + 1*5) / 4 = 2; rain absent
    means = strategy.state.global_means
    assert means.class_names == ["dog", "siren"]
    assert means.counts.tolist() == [1, 4]
    assert torch.allclose(means.clip[1], torch.full((6,), 2.0))
    assert torch.allclose(means.clip[0], torch.ones(6))
    # the replies are left as they came; aggregation wrote nothing
    assert all(CLASS_MEANS in r.content for r in replies)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "summary.json").exists()
    assert strategy.after_round(1, arrays) is None  # side effects: checkpoint, summary (no render in round 1 of 2)
    adapters, meta = load_adapters(tmp_path / "checkpoints" / "adapters_round_1.safetensors", ACFG.to_dict())
    assert meta["round"] == 1 and meta["class-names"] == NAMES and meta["config-hash"] == "abc"
    assert (tmp_path / "checkpoints" / "adapters.safetensors").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds"][0]["train"]["nodes"]["1"]["train_loss"] == 1.0
    assert summary["rounds"][0]["class_counts"] == {"dog": 1, "siren": 4}
    assert summary["rounds"][0]["node_class_counts"] == {"0": {"dog": 1, "siren": 3}, "1": {"siren": 1}}


def test_aggregation_none_keeps_no_global_weights_and_saves_node_adapters(tmp_path):
    strategy = make_strategy(tmp_path, aggregation="none", rounds=1)
    a, b = Adapters(ACFG), Adapters(ACFG)
    m = ClassTensors(["dog"], torch.ones(1, 6), torch.ones(1, 2, 5), torch.tensor([2]))
    arrays, metrics = strategy.aggregate_train(1, [reply(0, a, 2, m), reply(1, b, 2, m)])
    assert arrays is None and metrics is not None
    strategy.after_round(1, module_to_arrays(a))
    for pid in (0, 1):
        assert (tmp_path / "checkpoints" / f"adapters_node{pid}.safetensors").is_file()
    assert not (tmp_path / "checkpoints" / "adapters.safetensors").exists()


def test_all_nodes_failing_stops_the_run(tmp_path):
    strategy = make_strategy(tmp_path)
    from flwr.app import Error

    meta = Metadata(run_id=1, message_id="e", src_node_id=5, dst_node_id=0, reply_to_message_id="x", group_id="1",
                    created_at=time.time(), ttl=60, message_type=MessageType.TRAIN)
    failed = Message(Error(code=0, reason="boom: dataset missing"), metadata=meta)
    with pytest.raises(RuntimeError, match="all 1 nodes failed in train.*dataset missing"):
        strategy.aggregate_train(1, [failed])


def test_generate_only_round_keeps_the_sent_adapters(tmp_path):
    """generate-only: the 'keep' step passes the round's global adapters through; means still merge."""
    targets = ClassTensors(NAMES, torch.randn(3, 6), torch.randn(3, 2, 5))
    cfg = load_config({"generate-only": True, "adapter.init-from": "x.safetensors", "aggregation": "kd",
                       "generator.mode": "use-pretrained-generators", "generator.init-from-run": "run1",
                       "finetune.epochs": 3, "render.when": "final",
                       "render.server": False, "num-rounds": 1})
    run = ServerRun(run_dir=tmp_path, targets=targets, template=Adapters(ACFG), adapter_config=ACFG.to_dict(),
                    config_hash="abc", num_rounds=1, device=torch.device("cpu"))
    pipelines = build_pipelines(cfg, run, RunSummary(tmp_path / "summary.json", {"classes": NAMES}))
    assert pipelines.round.step_names == ["aggregate adapters"]  # no distillation, no fine-tuning
    strategy = FedA2VStrategy(targets=targets, round_pipeline=pipelines.round, after_round=pipelines.after_round)
    torch.manual_seed(1)
    sent = module_to_arrays(Adapters(ACFG))
    strategy.sent_arrays = sent
    m = ClassTensors(["dog"], torch.ones(1, 6), torch.ones(1, 2, 5), torch.tensor([2]))
    arrays, _ = strategy.aggregate_train(1, [reply(0, Adapters(ACFG), 4, m), reply(1, Adapters(ACFG), 2, m)])
    assert arrays is sent
    assert strategy.state.global_means.counts.tolist() == [4]
    strategy.after_round(1, arrays)
    _, meta = load_adapters(tmp_path / "checkpoints" / "adapters.safetensors", ACFG.to_dict())
    assert meta["aggregation"] == "keep"


def test_init_from_checks_dims_and_classes(tmp_path):
    from common.checkpoints import save_adapters
    from common.config import ConfigError
    from server_app.app import initial_adapters

    torch.manual_seed(2)
    trained = Adapters(ACFG)
    path = save_adapters(tmp_path / "adapters.safetensors", trained, ACFG.to_dict(), NAMES, 3, "abc")
    cfg = load_config({"adapter.init-from": str(path)})
    arrays = initial_adapters(cfg, ACFG, NAMES, Adapters(ACFG))
    assert torch.equal(arrays.to_torch_state_dict()["clip.out.1.weight"], trained.state_dict()["clip.out.1.weight"])
    with pytest.raises(ConfigError, match=r"class-names \['dog', 'siren', 'rain'\], this run has \['dog', 'rain'\]"):
        initial_adapters(cfg, ACFG, ["dog", "rain"], Adapters(ACFG))
    wider = AdapterConfig(**{**ACFG.to_dict(), "hidden_dim": 32})
    with pytest.raises(ConfigError, match=r"adapter-config.hidden_dim is 16, expected 32"):
        initial_adapters(cfg, wider, NAMES, Adapters(wider))
    with pytest.raises(ConfigError, match="is not a file"):
        initial_adapters(load_config({"adapter.init-from": str(tmp_path / "nope.safetensors")}), ACFG, NAMES, Adapters(ACFG))


def test_int8_difference_replies_are_added_back_to_what_the_server_sent(tmp_path):
    from common.wire import WIRE, encode, received, wire_config

    strategy = make_strategy(tmp_path)
    strategy.wire_codec = "int8"
    torch.manual_seed(1)
    start, a, b = Adapters(ACFG), Adapters(ACFG), Adapters(ACFG)
    strategy.sent_base = received(module_to_arrays(start), "int8")  # what configure_train sent, as the nodes decode it
    m = ClassTensors(["dog"], torch.ones(1, 6), torch.ones(1, 2, 5), torch.tensor([2]))
    replies = [reply(0, a, 3, m), reply(1, b, 1, m)]
    for r, model in zip(replies, (a, b)):
        r.content["arrays"] = encode(module_to_arrays(model), "int8", base=strategy.sent_base)
        r.content[WIRE] = wire_config("int8", delta=True)
    arrays, _ = strategy.aggregate_train(1, replies)
    key = "t5.summary.weight"
    expected = (3 * a.state_dict()[key] + b.state_dict()[key]) / 4
    got = arrays.to_torch_state_dict()[key]
    assert torch.allclose(got, expected, atol=2 * float((a.state_dict()[key] - start.state_dict()[key]).abs().max()) / 254)
    # a difference the server cannot place (it sent nothing this round) is rejected, naming why
    strategy.sent_base = None
    lone = reply(0, a, 3, m)
    lone.content["arrays"] = encode(module_to_arrays(a), "int8", base=received(module_to_arrays(start), "int8"))
    lone.content[WIRE] = wire_config("int8", delta=True)
    with pytest.raises(Exception) as err:
        strategy.aggregate_train(2, [lone])
    assert "did not send" in str(err.value)


def test_nodes_get_the_class_targets_bit_exact_under_a_compact_codec(tmp_path):
    """The targets key node caches (e.g. the trained render preset): a node must hash what the server hashed."""
    from common.records import TARGETS, TARGETS_META

    strategy = make_strategy(tmp_path)
    strategy.wire_codec = "int8"
    content = RecordDict({"arrays": module_to_arrays(Adapters(ACFG))})
    meta = Metadata(run_id=1, message_id="", src_node_id=0, dst_node_id=5, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=60, message_type=MessageType.TRAIN)
    [msg] = strategy._attach_targets([Message(content=content, metadata=meta)])
    got = ClassTensors.from_records(msg.content, TARGETS, TARGETS_META)
    assert torch.equal(got.clip, strategy.targets.clip) and torch.equal(got.t5, strategy.targets.t5)
    assert dict(msg.content["wire"]) == {"codec": "int8", "delta": False}
