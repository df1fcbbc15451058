"""ClientApp and node data, called directly (no Flower runtime): splits, replies, privacy rule."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

import client_app.node_data as node_data
from client_app.app import NODE_DATA, evaluate, train
from client_app.site import NodeSite
from common.config import FedA2VConfig, NodeRuntimeConfig, flatten, load_config
from common.data.synth import synthesize_dataset
from common.models.adapters import AdapterConfig, Adapters
from common.records import CLASS_MEANS, CLASS_MEANS_META, ClassTensors, module_to_arrays
from ops.local_run import server_content as local_server_content
from ops.local_run import server_message
from server_app.aggregators import AGGREGATORS
from server_app.app import class_targets

CLASSES = ["dog", "siren", "rain"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return synthesize_dataset(tmp_path_factory.mktemp("d") / "esc", CLASSES, clips_per_class=12, seed=1, clip_seconds=1.0)


def run_config(root: Path, cache: Path, **extra) -> dict:
    flat = flatten(FedA2VConfig().model_dump(by_alias=True))
    flat.update({
        "data.dataset": "esc50", "data.root": str(root), "data.classes": ",".join(CLASSES), "data.clip-seconds": 1.0,
        "cache-dir": str(cache), "train.local-epochs": 2, "text-encoder.t5-tokens": 4, "adapter.hidden-dim": 64,
        "device": "cpu", "render.model": "tiny",
    })
    flat.update(extra)
    return flat


def make_message(content: RecordDict, message_type: str = MessageType.TRAIN) -> Message:
    return server_message(content, message_type)


def server_content(cfg, server_round: int = 1, run_name: str = "") -> RecordDict:
    targets = class_targets(cfg, CLASSES)
    adapters = Adapters.seeded(AdapterConfig.from_sections(cfg.adapter, cfg.audio_encoder, cfg.text_encoder, targets.clip.shape[1], targets.t5.shape[2]), cfg.seed)
    global_model = AGGREGATORS[cfg.aggregation].global_model  # what the server's aggregation method says
    return local_server_content(targets, module_to_arrays(adapters), server_round, global_model, run_name=run_name)


def test_node_partitions_are_disjoint_and_test_clips_never_trained(data_root, tmp_path):
    cfg = load_config(run_config(data_root, tmp_path))
    nodes = [node_data.load_node_data(cfg.data, NodeSite.of(cfg, NodeRuntimeConfig(partition_id=i, num_partitions=3))) for i in range(3)]
    trains = [set(n.splits["train"].clip_ids) for n in nodes]
    held_out = set().union(*(set(n.splits["test"].clip_ids) | set(n.splits["val"].clip_ids) for n in nodes))
    for i in range(3):
        for j in range(i + 1, 3):
            assert not trains[i] & trains[j]
    assert not set().union(*trains) & held_out
    assert sum(len(t) for t in trains) + len(held_out) == 36
    emb = nodes[0].splits["train"].embeddings
    assert emb.ndim == 3 and emb.shape[1] == cfg.audio_encoder.tokens
    assert nodes[0].class_names == CLASSES


def test_bad_file_is_skipped_counted_and_named(data_root, tmp_path, caplog):
    root = tmp_path / "esc"
    shutil.copytree(data_root, root)
    victim = sorted((root / "audio").glob("*.wav"))[0]
    victim.write_bytes(b"this is not a wav file")
    cfg = load_config(run_config(root, tmp_path))
    with caplog.at_level(logging.WARNING):
        data = node_data.load_node_data(cfg.data, NodeSite.of(cfg, NodeRuntimeConfig(partition_id=0, num_partitions=1)))
    assert data.skipped_files == 1
    assert victim.name in caplog.text
    total = sum(len(s) for s in data.splits.values())
    assert total == 35


def test_file_over_max_file_mb_is_skipped_counted_and_named(data_root, tmp_path, caplog):
    import numpy as np
    import soundfile as sf

    root = tmp_path / "esc"
    shutil.copytree(data_root, root)
    victim = sorted((root / "audio").glob("*.wav"))[0]
    sf.write(victim, np.zeros((44100 * 30, 1), dtype=np.float32), 44100, subtype="PCM_16")  # 2.5 MiB of audio
    cfg = load_config(run_config(root, tmp_path, **{"data.max-file-mb": 1.0}))
    with caplog.at_level(logging.WARNING):
        data = node_data.load_node_data(cfg.data, NodeSite.of(cfg, NodeRuntimeConfig(partition_id=0, num_partitions=1)))
    assert data.skipped_files == 1
    assert victim.name in caplog.text and "data.max-file-mb=1" in caplog.text
    assert sum(len(s) for s in data.splits.values()) == 35


def test_train_reply_records_and_privacy_rule(data_root, tmp_path):
    cfg = load_config(run_config(data_root, tmp_path))
    NODE_DATA.clear()  # a fresh ClientApp process
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                  run_config=run_config(data_root, tmp_path))
    reply = train(make_message(server_content(cfg)), ctx)
    content = reply.content
    # Only weights, scalar metrics, per-class means with counts, and the hashes of what the node holds
    # of the server's own records (client_app.held) leave the node.
    assert set(content.keys()) == {"arrays", "metrics", CLASS_MEANS, CLASS_MEANS_META, "held"}
    assert all(isinstance(v, str) for v in content["held"].values())
    metrics = content["metrics"]
    n_train = metrics["num-examples"]
    assert n_train > 0 and metrics["skipped_files"] == 0 and metrics["partition_id"] == 0
    means = ClassTensors.from_records(content, CLASS_MEANS, CLASS_MEANS_META)
    assert means.class_names == CLASSES
    assert int(means.counts.sum()) == n_train
    assert means.clip.shape == (3, 768) and means.t5.shape == (3, 4, 4096)
    adapters = Adapters.seeded(AdapterConfig.from_sections(cfg.adapter, cfg.audio_encoder, cfg.text_encoder, 768, 4096), cfg.seed)
    # every array is either an adapter weight (same keys and shapes as the model) ...
    weights = content["arrays"].to_torch_state_dict()
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in adapters.state_dict().items()}
    # ... or a per-class mean / count: one row per class, never one row per clip
    per_class = content[CLASS_MEANS].to_torch_state_dict()
    assert set(per_class) == {"clip", "t5", "counts"}
    assert all(v.shape[0] == len(CLASSES) for v in per_class.values())
    assert [k for k, r in content.items() if isinstance(r, ArrayRecord)] == ["arrays", CLASS_MEANS]
    adapters.load_state_dict(weights)


def test_evaluate_reports_retrieval_accuracy_per_branch(data_root, tmp_path):
    cfg = load_config(run_config(data_root, tmp_path))
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(),
                  run_config=run_config(data_root, tmp_path))
    reply = evaluate(make_message(server_content(cfg), MessageType.EVALUATE), ctx)
    m = reply.content["metrics"]
    for key in ("test_retrieval_acc", "test_retrieval_acc_clip", "test_retrieval_acc_t5", "val_retrieval_acc", "test_loss"):
        assert key in m
    assert 0.0 <= m["test_retrieval_acc"] <= 1.0
    assert m["test_retrieval_acc"] == pytest.approx((m["test_retrieval_acc_clip"] + m["test_retrieval_acc_t5"]) / 2)
    assert m["num-examples"] > 0


def test_aggregation_none_keeps_the_nodes_own_adapters(data_root, tmp_path):
    rc = run_config(data_root, tmp_path, aggregation="none")
    cfg = load_config(rc)
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config=rc)
    first = train(make_message(server_content(cfg, 1)), ctx)
    assert "local-adapters" in ctx.state["on-disk"]  # kept, on the node's disk (client_app.node_state)
    second_msg = make_message(server_content(cfg, 2))  # carries the untouched initial weights
    second = train(second_msg, ctx)
    w_init = second_msg.content["arrays"].to_torch_state_dict()
    w_first = first.content["arrays"].to_torch_state_dict()
    w_second = second.content["arrays"].to_torch_state_dict()
    key = next(iter(w_first))
    # round 2 continued from the node's own round-1 weights, not from the server's arrays
    assert (w_second[key] - w_first[key]).abs().sum() < (w_second[key] - w_init[key]).abs().sum()


def test_target_class_mismatch_is_a_clear_error(data_root, tmp_path):
    cfg = load_config(run_config(data_root, tmp_path))
    content = server_content(cfg)
    content["targets-meta"] = ConfigRecord({"class-names": ["dog", "rain", "siren"]})
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                  run_config=run_config(data_root, tmp_path))
    with pytest.raises(ValueError, match="same data.classes"):
        train(make_message(content), ctx)


def test_generator_training_mode_checkpoints_on_node_and_ships_bank_to_server(data_root, tmp_path):
    from common.generator_bank import GeneratorBank, bank_from_records
    from common.records import GENERATORS, GENERATORS_META
    from server_app.pipeline import build_pipelines
    from server_app.run_context import ServerRun
    from server_app.strategy import FedA2VStrategy
    from server_app.summary import RunSummary

    ckpt = tmp_path / "node-ckpt"
    rc = run_config(data_root, tmp_path, **{
        "generator.mode": "generator-training", "generator.granularity": "per_class", "generator.epochs": 3,
        "generator.checkpoint-frequency": 1,
    })
    cfg = load_config(rc)
    ctx = Context(run_id=1, node_id=7, state=RecordDict(), run_config=rc,
                  node_config={"partition-id": 0, "num-partitions": 2, "checkpoint-dir": str(ckpt)})
    reply = train(make_message(server_content(cfg, 1, run_name="gen-run")), ctx)
    names = sorted(p.name for p in (ckpt / "gen-run").glob("*.safetensors"))  # the run's own folder
    for cls in CLASSES:
        assert f"generator_node0_class_{cls}.safetensors" in names
        assert f"generator_node0_class_{cls}_round_1.safetensors" in names
    assert GENERATORS in reply.content and GENERATORS_META in reply.content
    assert "gen_train_seconds" in reply.content["metrics"]
    bank, meta = bank_from_records(reply.content, source="reply")
    assert sorted(bank.classes) == sorted(CLASSES) and meta["granularity"] == "per_class"
    # round 2 continues from the node state and the latest file is replaced
    train(make_message(server_content(cfg, 2, run_name="gen-run")), ctx)
    loaded = GeneratorBank.from_pretrained(ckpt / "gen-run", base="generator", node_id=0, granularity="per_class",
                                           classes=CLASSES, expected_shape=tuple(bank.shape), encoder_key=meta["encoder-key"])
    assert sorted(loaded.classes) == sorted(CLASSES)
    # the server stores every node's generators under its run directory
    targets = class_targets(cfg, CLASSES)
    acfg = AdapterConfig.from_sections(cfg.adapter, cfg.audio_encoder, cfg.text_encoder, 768, 4096)
    run = ServerRun(run_dir=tmp_path / "run", targets=targets, template=Adapters.seeded(acfg, cfg.seed),
                    adapter_config=acfg.to_dict(), config_hash="h", num_rounds=1, device=torch.device("cpu"))
    server_cfg = cfg.model_copy(update={"num_rounds": 1, "render": cfg.render.model_copy(update={"when": "off"})})
    pipelines = build_pipelines(server_cfg, run, RunSummary(tmp_path / "run" / "summary.json", {}))
    strategy = FedA2VStrategy(targets=targets, round_pipeline=pipelines.round, after_round=pipelines.after_round)
    arrays, _ = strategy.aggregate_train(1, [reply])
    strategy.after_round(1, arrays)  # the round's side effects: checkpoints (node generators included)
    stored = sorted(p.name for p in (tmp_path / "run" / "generators").glob("*.safetensors"))
    assert "generator_node0_class_dog.safetensors" in stored


def test_generator_only_mode_leaves_adapters_untouched(data_root, tmp_path):
    rc = run_config(data_root, tmp_path, **{"generator.mode": "generator-only", "generator.epochs": 2})
    cfg = load_config(rc)
    ctx = Context(run_id=1, node_id=7, state=RecordDict(), run_config=rc,
                  node_config={"partition-id": 1, "num-partitions": 2, "checkpoint-dir": str(tmp_path / "c")})
    msg = make_message(server_content(cfg, 1, run_name="run1"))
    sent = msg.content["arrays"].to_torch_state_dict()
    back = train(msg, ctx).content["arrays"].to_torch_state_dict()
    assert all(torch.equal(sent[k], back[k]) for k in sent)
    assert (tmp_path / "c" / "run1" / "generator_node1.safetensors").is_file()


def test_node_image_dir_comes_from_the_run_name_not_a_server_path(tmp_path):
    """node-config image-dir > render.output-dir > <output-dir>/<run-name>/images, resolved on the node."""
    from client_app.app import node_run_dir
    from common.render.jobs import images_dir

    cfg = load_config({"output-dir": str(tmp_path / "out")})
    run_dir = node_run_dir(cfg.output_dir, "run-1")
    assert run_dir == (tmp_path / "out" / "run-1").resolve()
    assert images_dir(cfg.render, run_dir) == run_dir / "images"
    assert node_run_dir(cfg.output_dir, "") is None
    own = load_config({"output-dir": str(tmp_path / "out"), "render.output-dir": str(tmp_path / "imgs")})
    assert images_dir(own.render, node_run_dir(own.output_dir, "run-1")) == tmp_path / "imgs"
    assert images_dir(own.render, node_run_dir(own.output_dir, "run-1"), str(tmp_path / "node")) == tmp_path / "node"


def test_site_floor_withholds_classes_the_server_would_share(data_root, tmp_path):
    """node-config min-class-count is the site's own floor: with the server's privacy.min-class-count = 1 the
    node still withholds every class it holds fewer training clips of, from class means and generators."""
    from common.generator_bank import bank_from_records
    from common.records import GENERATORS

    root = Path(shutil.copytree(data_root, tmp_path / "esc"))
    rain = sorted(p for p in (root / "audio").glob("*.wav") if _category(root, p.name) == "rain")
    for path in rain[:6]:  # fewer rain clips than the other classes: a floor between the counts
        path.unlink()
    rc = run_config(root, tmp_path, **{"privacy.min-class-count": 1, "generator.mode": "generator-training",
                                       "generator.granularity": "per_class", "generator.epochs": 1})
    cfg = load_config(rc)
    node = {"partition-id": 0, "num-partitions": 1, "checkpoint-dir": str(tmp_path / "ckpt")}
    data = node_data.load_node_data(cfg.data, NodeSite.of(cfg, NodeRuntimeConfig.from_node_config(node)))
    counts = dict(zip(CLASSES, torch.bincount(data.splits["train"].labels, minlength=len(CLASSES)).tolist()))
    floor = counts["rain"] + 1
    assert all(counts[c] >= floor for c in ("dog", "siren")), counts

    for own, withheld in ((0, []), (floor, ["rain"])):
        ctx = Context(run_id=1, node_id=7, node_config={**node, "min-class-count": own}, state=RecordDict(),
                      run_config=rc)
        reply = train(make_message(server_content(cfg)), ctx)
        shared = [c for c in CLASSES if c not in withheld]
        means = ClassTensors.from_records(reply.content, CLASS_MEANS, CLASS_MEANS_META)
        assert means.class_names == shared
        metrics = reply.content["metrics"]
        assert metrics["withheld_classes"] == len(withheld)
        assert metrics["withheld_clips"] == sum(counts[c] for c in withheld)
        assert GENERATORS in reply.content
        bank, _ = bank_from_records(reply.content, source="reply")
        assert sorted(bank.classes) == sorted(shared)


def _category(root: Path, filename: str) -> str:
    """The class of an ESC-50-layout file, from meta/esc50.csv."""
    import csv

    with (root / "meta" / "esc50.csv").open(newline="") as handle:
        return next(row["category"] for row in csv.DictReader(handle) if row["filename"] == filename)


@pytest.mark.parametrize("bad", ["..", "../escape", "/tmp/escape", "a\\b", "x\0y", "C:escape"])
def test_a_run_name_from_the_server_that_is_a_path_is_refused(data_root, tmp_path, bad):
    """The node builds its state and image folders from the server's run-name: a path is an error naming
    the key, raised before any folder is made from it."""
    from client_app.app import node_run_dir
    from common.records import CONFIG, RUN_NAME

    rc = run_config(data_root, tmp_path / "cache", **{"output-dir": str(tmp_path / "out")})
    cfg = load_config(rc)
    content = server_content(cfg)
    content[CONFIG][RUN_NAME] = bad
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                  run_config=rc)
    for handler, kind in ((train, MessageType.TRAIN), (evaluate, MessageType.EVALUATE)):
        with pytest.raises(ValueError, match="run-name .* in the server's round config is refused"):
            handler(make_message(content, kind), ctx)
    assert not (tmp_path / "cache" / "node-state").exists()  # nothing was made from it
    with pytest.raises(ValueError, match="run-name"):
        node_run_dir(cfg.output_dir, bad)
    content[CONFIG][RUN_NAME] = "run-1"  # a plain name passes
    assert train(make_message(content), ctx).content["metrics"]["num-examples"] > 0
