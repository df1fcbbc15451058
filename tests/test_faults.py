"""Surviving a real federation: quorum and connect deadlines, reply validation, tolerant metrics,
resume, node restarts, the privacy floor, bad files and crafted cache indexes."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, Metadata, MetricRecord, RecordDict

from client_app.app import NODE_DATA, evaluate, train
from client_app.node_state import LOCAL_ADAPTERS, ON_DISK
from common.config import ConfigError, config_hash, load_config
from common.data.audio import AudioLoadError, load_clip
from common.errors import redact_paths
from common.models.adapters import AdapterConfig, Adapters
from common.records import CLASS_MEANS, CLASS_MEANS_META, ClassTensors, module_to_arrays
from common.render.flux import check_render_settings
from server_app.pipeline import build_pipelines
from server_app.quorum import QuorumError, required_replies, wait_for_nodes
from server_app.resume import open_run, save_resume_arrays
from server_app.run_context import ServerRun
from server_app.strategy import FedA2VStrategy
from server_app.summary import RunSummary
from server_app.validation import ReplyValidator
from tests.test_client_app import CLASSES, data_root, make_message, run_config, server_content  # noqa: F401

ACFG = AdapterConfig(in_dim=8, in_tokens=2, clip_dim=6, t5_dim=5, t5_tokens=2, hidden_dim=16, heads=2, dropout=0.0)
NAMES = ["dog", "siren", "rain"]


def _meta(src: int, kind=MessageType.TRAIN) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{src}", src_node_id=src, dst_node_id=0, reply_to_message_id="x",
                    group_id="1", created_at=time.time(), ttl=60, message_type=kind)


def reply(pid: int, n: int = 4, src: int | None = None, weights: Adapters | None = None, counts=(1, 3),
          metrics: dict | None = None) -> Message:
    weights = weights or Adapters(ACFG)
    content = RecordDict({"arrays": module_to_arrays(weights),
                          "metrics": MetricRecord({"num-examples": n, "partition_id": pid, **(metrics or {})})})
    ClassTensors(["dog", "siren"], torch.ones(2, 6), torch.ones(2, 2, 5), torch.tensor(list(counts))).to_records(
        content, CLASS_MEANS, CLASS_MEANS_META)
    return Message(content=content, metadata=_meta(100 + pid if src is None else src))


def make_strategy(tmp_path, min_replies=0.5, **cfg_extra):
    targets = ClassTensors(NAMES, torch.randn(3, 6), torch.randn(3, 2, 5))
    cfg = load_config({"num-rounds": 2, **cfg_extra})
    run = ServerRun(run_dir=tmp_path, targets=targets, template=Adapters(ACFG), adapter_config=ACFG.to_dict(),
                    config_hash="abc", num_rounds=2, device=torch.device("cpu"))
    summary = RunSummary(tmp_path / "summary.json", {})
    p = build_pipelines(cfg, run, summary)
    validator = ReplyValidator(run.template.state_dict(), NAMES, 6, (2, 5))
    strategy = FedA2VStrategy(targets=targets, round_pipeline=p.round, after_round=p.after_round, validator=validator,
                              min_replies=min_replies)
    return strategy, summary


# ------------------------------------------------------------------ quorum and deadlines
def test_quorum_counts_and_fractions():
    assert required_replies(0.5, 3) == 2 and required_replies(0.01, 3) == 1 and required_replies(2, 10) == 2


def test_below_quorum_the_round_fails_naming_who_replied(tmp_path):
    strategy, _ = make_strategy(tmp_path)
    strategy.asked["train"] = 3
    failed = Message(Error(code=5, reason="node unavailable"), metadata=_meta(102))
    with pytest.raises(QuorumError, match=r"1 valid replies of 3 nodes asked, quorum is 2.*replied: \[0\].*error code 5"):
        strategy.aggregate_train(1, [reply(0), failed])


def test_zero_replies_is_never_a_silent_success(tmp_path):
    strategy, _ = make_strategy(tmp_path)
    strategy.asked["train"] = 2
    with pytest.raises(QuorumError, match="0 valid replies of 2"):
        strategy.aggregate_train(1, [])


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def test_too_few_nodes_connecting_fails_with_the_count():
    assert wait_for_nodes(FakeGrid([1, 2]), 2, 1.0) == [1, 2]
    with pytest.raises(QuorumError, match=r"1 node\(s\) connected after 0.3s, min-nodes is 2"):
        wait_for_nodes(FakeGrid([1]), 2, 0.3, poll_s=0.05)


def test_round_timeout_and_quorum_keys_reach_the_config():
    cfg = load_config({"round-timeout": 42, "min-replies": 2, "connect-timeout": 7})
    assert (cfg.round_timeout, cfg.min_replies, cfg.connect_timeout) == (42, 2, 7)


# ------------------------------------------------------------------ reply validation
def test_malformed_replies_are_dropped_named_and_recorded(tmp_path):
    strategy, summary = make_strategy(tmp_path, min_replies=2)
    strategy.asked["train"] = 7
    nan = Adapters(ACFG)
    with torch.no_grad():
        next(nan.parameters()).fill_(float("nan"))
    wrong = Adapters(AdapterConfig(in_dim=8, in_tokens=2, clip_dim=7, t5_dim=5, t5_tokens=2, hidden_dim=16, heads=2,
                                   dropout=0.0))
    good0, good1 = Adapters(ACFG), Adapters(ACFG)
    replies = [
        reply(0, weights=good0),
        reply(1, weights=good1),
        reply(2, weights=nan),  # NaN weights
        reply(3, weights=wrong),  # wrong shapes
        reply(4, n=10**9),  # huge num-examples: counts say 4
        reply(1, src=555),  # duplicate partition id: named by its owner
        reply(5, metrics={"train_loss": float("inf")}),  # non-finite metric
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert sorted(strategy.state.replies.nodes) == [0, 1]
    rejected = " | ".join(strategy.state.replies.rejected)
    for expected in ("partition 2): weights unusable", "magnitude nan", "partition 3): weights unusable",
                     "'num-examples' must be an integer in [0, 1000000]", "got 1000000000",
                     "partition id 1 belongs to Flower node 101", "metric 'train_loss' is not finite"):
        assert expected in rejected, (expected, rejected)
    key = "clip.out.1.weight"
    assert torch.allclose(arrays.to_torch_state_dict()[key], (good0.state_dict()[key] + good1.state_dict()[key]) / 2)
    strategy.after_round(1, arrays)
    saved = json.loads((tmp_path / "summary.json").read_text())["rounds"][0]["train"]["rejected"]
    assert len(saved) == 5


def test_a_node_cannot_take_another_partition_id(tmp_path):
    strategy, _ = make_strategy(tmp_path, min_replies=1)
    strategy.asked["train"] = 2
    strategy.aggregate_train(1, [reply(0, src=10), reply(1, src=11)])
    strategy.aggregate_train(2, [reply(1, src=10), reply(1, src=11)])  # node 10 now claims partition 1
    assert list(strategy.state.replies.nodes) == [1] and strategy.state.replies.nodes[1].node_id == 11
    assert "reported partition id 0 before" in strategy.state.replies.rejected[0]
    strategy.connected = {10, 11, 12}
    strategy.aggregate_train(3, [reply(0, src=12), reply(1, src=11)])  # 12 claims node 10's partition: spoof
    assert list(strategy.state.replies.nodes) == [1] and "belongs to Flower node 10" in strategy.state.replies.rejected[0]
    strategy.connected = {11, 12}  # node 10 is gone: 12 is node 10 restarted under a new Flower node id
    strategy.aggregate_train(4, [reply(0, src=12), reply(1, src=11)])
    assert sorted(strategy.state.replies.nodes) == [0, 1] and strategy.state.replies.nodes[0].node_id == 12


def test_bad_generator_metadata_rejects_the_reply(tmp_path):
    strategy, _ = make_strategy(tmp_path, min_replies=1)
    strategy.asked["train"] = 2
    bad = reply(1)
    bad.content["generators"] = ArrayRecord({"unit0.w": torch.zeros(2)})
    bad.content["generators-meta"] = ConfigRecord({"meta": json.dumps({"format": "something-else"})})
    strategy.aggregate_train(1, [reply(0), bad])
    assert list(strategy.state.replies.nodes) == [0]
    assert "generator bank unusable" in strategy.state.replies.rejected[0]


def test_evaluate_tolerates_different_metric_keys_without_losing_any(tmp_path):
    strategy, _ = make_strategy(tmp_path, min_replies=1)
    strategy.asked["evaluate"] = 2
    with_val = MetricRecord({"num-examples": 10, "num_val": 4, "partition_id": 0, "test_retrieval_acc": 1.0,
                             "val_retrieval_acc": 0.5})
    no_val = MetricRecord({"num-examples": 30, "num_val": 0, "partition_id": 1, "test_retrieval_acc": 0.0})
    out = strategy.aggregate_evaluate(1, [Message(content=RecordDict({"metrics": m}), metadata=_meta(100 + i, MessageType.EVALUATE))
                                          for i, m in enumerate((with_val, no_val))])
    assert out["test_retrieval_acc"] == pytest.approx(0.25) and out["val_retrieval_acc"] == pytest.approx(0.5)
    assert out["num-examples"] == 40


# ------------------------------------------------------------------ resume
def test_reusing_a_run_name_without_resume_is_an_error_and_resume_continues(tmp_path):
    cfg = load_config({"run-name": "r", "output-dir": str(tmp_path)})
    run_dir = tmp_path / "r"
    assert open_run(run_dir, cfg.resume, config_hash(cfg), "generator", None) is None  # a new run
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({
        "run": {"config_hash": config_hash(cfg)},
        "rounds": [{"round": 1, "train": {}, "evaluate": {}}, {"round": 2, "train": {}, "evaluate": {}}, {"round": 3, "train": {}}],
    }))
    save_resume_arrays(run_dir, module_to_arrays(Adapters(ACFG)), 2, "h")
    with pytest.raises(ConfigError, match="already holds a run; set resume=true"):
        open_run(run_dir, False, config_hash(cfg), "generator", None)
    point = open_run(run_dir, True, config_hash(cfg), "generator", None)
    assert point.last_round == 2 and [e["round"] for e in point.summary["rounds"]] == [1, 2]  # incomplete round 3 dropped
    assert set(point.arrays.keys()) == set(Adapters(ACFG).state_dict())
    with pytest.raises(ConfigError, match="configuration differs"):
        open_run(run_dir, True, config_hash(cfg.model_copy(update={"seed": 7})), "generator", None)


def test_strategy_round_offset_numbers_rounds_like_the_interrupted_run(tmp_path):
    strategy, summary = make_strategy(tmp_path, min_replies=1)
    strategy.round_offset = 2
    strategy.asked["train"] = 1
    strategy.aggregate_train(1, [reply(0)])
    assert strategy.state.server_round == 3
    strategy.after_round(1, strategy.state.arrays)
    assert [e["round"] for e in summary.data["rounds"]] == [3]
    assert (tmp_path / "checkpoints" / "adapters_round_3.safetensors").is_file()


# ------------------------------------------------------------------ nodes
def test_a_restarted_node_restores_its_own_adapters_and_says_so(data_root, tmp_path):  # noqa: F811
    rc = run_config(data_root, tmp_path, aggregation="none")
    cfg = load_config(rc)
    node_config = {"partition-id": 0, "num-partitions": 2}

    def content(r):
        c = server_content(cfg, r)
        c["config"]["run-name"] = "run-x"
        return c

    ctx = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=rc)
    first = train(make_message(content(1)), ctx)
    assert first.content["metrics"]["state_lost"] == 0
    restarted = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=rc)
    second = train(make_message(content(2)), restarted)
    assert second.content["metrics"]["state_restored"] == 1 and second.content["metrics"]["state_lost"] == 0
    w1 = first.content["arrays"].to_torch_state_dict()
    w2 = second.content["arrays"].to_torch_state_dict()
    w0 = content(2)["arrays"].to_torch_state_dict()
    key = next(iter(w1))
    assert (w2[key] - w1[key]).abs().sum() < (w2[key] - w0[key]).abs().sum()  # continued its own weights
    gone = train(make_message(server_content(cfg, 3)), Context(run_id=1, node_id=7, node_config=node_config,
                                                               state=RecordDict(), run_config=rc))
    assert gone.content["metrics"]["state_lost"] == 1  # another run name: nothing to restore, and it says so


def test_the_context_goes_back_small_and_the_next_messages_read_the_node_disk(data_root, tmp_path):  # noqa: F811
    """Flower moves the whole Context between the SuperNode and each ClientApp process and gives the final
    push 5 s: a node's adapters must travel on its disk, not in the Context (client_app.node_state)."""
    rc = run_config(data_root, tmp_path, aggregation="none")
    cfg = load_config(rc)
    node_config = {"partition-id": 0, "num-partitions": 2}

    def message(r, kind=MessageType.TRAIN):
        c = server_content(cfg, r)
        c["config"]["run-name"] = "run-small"
        return make_message(c, kind)

    def arrays_in(state):
        return sorted(k for k, v in state.items() if isinstance(v, ArrayRecord))

    ctx = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=rc)
    first = train(message(1), ctx)
    assert arrays_in(ctx.state) == [] and dict(ctx.state[ON_DISK]) == {LOCAL_ADAPTERS: True}
    read_back = evaluate(message(1, MessageType.EVALUATE), ctx)  # this round's own adapters, from the disk
    in_memory = Context(run_id=1, node_id=7, node_config=node_config, run_config=rc,
                        state=RecordDict({LOCAL_ADAPTERS: first.content["arrays"]}))
    expected = evaluate(message(1, MessageType.EVALUATE), in_memory)
    for m in (read_back.content["metrics"], expected.content["metrics"]):
        assert m["state_restored"] == 0 and m["state_lost"] == 0
    assert read_back.content["metrics"]["val_loss"] == pytest.approx(expected.content["metrics"]["val_loss"])
    assert arrays_in(ctx.state) == [] and arrays_in(in_memory.state) == [LOCAL_ADAPTERS]  # not on disk: kept
    second = train(message(2), ctx)
    assert second.content["metrics"]["state_restored"] == 0 and second.content["metrics"]["state_lost"] == 0
    bad = server_content(cfg, 3)
    bad["config"]["run-name"] = "run-small"
    bad["targets-meta"] = ConfigRecord({"class-names": ["dog", "rain", "siren"]})  # fails after the disk read
    with pytest.raises(ValueError, match="same data.classes"):
        train(make_message(bad), ctx)
    assert arrays_in(ctx.state) == []  # a failed message sends the Context back small too
    w0, w1, w2 = (m["arrays"].to_torch_state_dict() for m in (message(2).content, first.content, second.content))
    key = next(iter(w1))
    assert (w2[key] - w1[key]).abs().sum() < (w2[key] - w0[key]).abs().sum()  # continued its own weights


def test_classes_below_the_privacy_floor_are_withheld_from_class_means(data_root, tmp_path):  # noqa: F811
    NODE_DATA.clear()
    rc = run_config(data_root, tmp_path, **{"privacy.min-class-count": 100})
    out = train(make_message(server_content(load_config(rc), 1)),
                Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                        run_config=rc))
    m = out.content["metrics"]
    assert CLASS_MEANS in out.content and len(out.content[CLASS_MEANS_META]["class-names"]) == 0
    assert m["withheld_classes"] == len(CLASSES) and m["withheld_clips"] == m["num-examples"]


def test_error_replies_carry_no_absolute_host_paths(data_root, tmp_path):  # noqa: F811
    assert redact_paths("file /srv/site/data/a.wav and '/etc/x.toml'") == "file …/a.wav and '…/x.toml'"
    NODE_DATA.clear()
    rc = run_config(tmp_path / "no-such-dataset", tmp_path)
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config=rc)
    with pytest.raises(Exception) as info:
        evaluate(make_message(server_content(load_config(run_config(data_root, tmp_path)), 1), MessageType.EVALUATE), ctx)
    assert str(tmp_path) not in str(info.value) and "no-such-dataset" in str(info.value)


# ------------------------------------------------------------------ bad input
def test_truncated_and_too_short_files_are_skipped_not_padded(tmp_path):
    wav = tmp_path / "ok.wav"
    sf.write(wav, (np.random.default_rng(0).standard_normal(16000) * 0.1).astype("float32"), 16000, subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(wav.read_bytes()[: 44 + 56])  # a valid header, 28 samples
    with pytest.raises(AudioLoadError, match="truncated"):
        load_clip(cut, 16000, 5.0)
    with pytest.raises(AudioLoadError, match="min-clip-seconds"):
        load_clip(wav, 16000, 5.0, min_seconds=2.0)
    assert load_clip(wav, 16000, 5.0, min_seconds=1.0).shape == (80000,)


def test_a_crafted_cache_index_cannot_reach_files_outside_the_cache(tmp_path):
    from common.cache.store import CACHE_FORMAT, EmbeddingStore, IndexCorrupt

    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"precious")
    store_dir = tmp_path / "cache"
    (store_dir / "shards").mkdir(parents=True)
    body = json.dumps({"key": "k", "entries": {"a.wav": [1, 1, "../../victim.safetensors", 0, 0]},
                       "shards": {"../../victim.safetensors": {"rows": 1, "bytes": 8}}}).encode()
    header = json.dumps({"format": CACHE_FORMAT, "sha256": hashlib.sha256(body).hexdigest()}).encode()
    (store_dir / "index.json").write_bytes(header + b"\n" + body + b"\n")
    store = EmbeddingStore(store_dir, "k", None)
    with pytest.raises(IndexCorrupt, match="not plain shard file names"):
        store._read_index_file()  # noqa: SLF001
    store.lookup([None])  # a reader rebuilds the index from the shards that are really there
    report = store.verify(repair=True)
    assert victim.read_bytes() == b"precious" and report is not None


def test_render_settings_are_checked_before_the_run():
    check_render_settings(load_config({}).render)
    with pytest.raises(Exception, match="not a local FLUX.1 folder"):
        check_render_settings(load_config({"render.model": "/nonexistent/flux"}).render)
    with pytest.raises(Exception, match="multiple of 4"):
        check_render_settings(load_config({"render.model": "tiny", "render.resolution": 66}).render)
    with pytest.raises(Exception, match="multiple of 8"):  # the default, tiny-trained, has a /4 VAE
        check_render_settings(load_config({"render.resolution": 68}).render)
    check_render_settings(load_config({"render.model": "/nonexistent", "render.when": "off"}).render)


def test_the_serverapp_gives_flower_the_round_deadline_and_its_quorum_settings(tmp_path, monkeypatch):
    """A hung node costs at most round-timeout per phase: the deadline Flower's send_and_receive enforces."""
    from flwr.serverapp.strategy import Result

    import server_app.app as server_app_module

    seen = {}

    def fake_start(self, **kwargs):
        seen.update(kwargs, strategy=self)
        return Result()

    monkeypatch.setattr(FedA2VStrategy, "start", fake_start)
    run_config = {"round-timeout": 12.5, "min-replies": 2, "connect-timeout": 3, "output-dir": str(tmp_path),
                  "run-name": "deadline", "cache-dir": str(tmp_path / "cache"), "num-rounds": 3,
                  "render.model": "tiny"}
    server_app_module.main(FakeGrid([1, 2]), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                                     run_config=run_config))
    assert seen["timeout"] == 12.5 and seen["num_rounds"] == 3
    strategy = seen["strategy"]
    assert (strategy.min_replies, strategy.connect_timeout, strategy.round_offset) == (2, 3, 0)
    assert json.loads((tmp_path / "deadline" / "summary.json").read_text())["run"]["status"] == "completed"


def test_a_resumed_run_keeps_its_identity_and_a_new_run_of_the_same_name_gets_another(tmp_path, monkeypatch):
    """Nodes tag their carried state with the run identity of the round config (client_app.node_state): a
    resumed run (a new flwr run id) must send the same one, a new run after ``rm -rf outputs`` another."""
    import shutil

    from flwr.serverapp.strategy import Result

    import server_app.app as server_app_module

    sent = []
    monkeypatch.setattr(FedA2VStrategy, "start", lambda self, **kw: sent.append(dict(kw["train_config"])) or Result())
    run_config = {"output-dir": str(tmp_path / "out"), "run-name": "run1", "cache-dir": str(tmp_path / "cache"),
                  "num-rounds": 2, "render.model": "tiny", "connect-timeout": 1}

    def serve(run_id: int, **extra) -> str:
        server_app_module.main(FakeGrid([1]), Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                                                      run_config={**run_config, **extra}))
        identity = json.loads((tmp_path / "out" / "run1" / "summary.json").read_text())["run"]["run_identity"]
        assert sent[-1]["run-identity"] == identity and sent[-1]["run-name"] == "run1"
        return identity

    first = serve(1)
    assert serve(2, resume=True) == first
    shutil.rmtree(tmp_path / "out")
    assert serve(3) != first
