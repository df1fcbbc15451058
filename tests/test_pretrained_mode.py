"""Run 2 of the two-run workflow: a node trains on its pretrained generators without AST or audio."""

from __future__ import annotations

import logging

import pytest
import soundfile
import torch
import transformers
from flwr.app import Context, RecordDict

import client_app.node_data as node_data
from client_app.app import NODE_DATA, evaluate, train
from client_app.pretrained import synthetic_train_set as _synthetic_train_set
from client_app.site import NodeSite
from common.config import ConfigError, NodeRuntimeConfig, load_config
from common.generator_bank import GeneratorCheckpointError
from common.models.audio_encoder import AudioEncoder
from common.records import GENERATORS
from tests.test_client_app import CLASSES, data_root, make_message, run_config, server_content  # noqa: F401

NODES = 2
PRETRAINED = {"generator.mode": "use-pretrained-generators", "generator.init-from-run": "run1"}  # run 2 of 'run1'


def synthetic_train_set(cfg, node, state, server_round, memo=None):
    """The node's synthetic training set for a run config and a node-config, as the ClientApp builds it."""
    return _synthetic_train_set(cfg.data, cfg.generator, NodeSite.of(cfg, node), state, server_round, memo=memo)


def _context(rc: dict, ckpt, pid: int = 0) -> Context:
    return Context(run_id=1, node_id=7, state=RecordDict(), run_config=rc,
                   node_config={"partition-id": pid, "num-partitions": NODES, "checkpoint-dir": str(ckpt)})


@pytest.fixture()
def run1(data_root, tmp_path):  # noqa: F811
    """Run 1 (generator-only, unified VAE) named 'run1': checkpoints in ckpt/run1/, embeddings in the cache."""
    ckpt = tmp_path / "ckpt"
    rc = run_config(data_root, tmp_path, **{"generator.mode": "generator-only", "generator.epochs": 20})
    NODE_DATA.clear()  # a fresh ClientApp process
    ctx = _context(rc, ckpt)
    train(make_message(server_content(load_config(rc), 1, run_name="run1")), ctx)
    evaluate(make_message(server_content(load_config(rc), 1, run_name="run1")), ctx)
    NODE_DATA.clear()  # run 2 is a new process
    return rc, ckpt


@pytest.fixture()
def no_ast_no_audio(monkeypatch):
    """Any AST construction or audio read fails the test."""

    def forbidden(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} must not happen in use-pretrained-generators mode")
        return fail

    monkeypatch.setattr(AudioEncoder, "build", classmethod(lambda cls, *a, **k: forbidden("AudioEncoder.build")()))
    monkeypatch.setattr(transformers.ASTModel, "__init__", forbidden("ASTModel()"))
    monkeypatch.setattr(transformers.ASTFeatureExtractor, "__init__", forbidden("ASTFeatureExtractor()"))
    monkeypatch.setattr(soundfile, "read", forbidden("soundfile.read"))
    monkeypatch.setattr(soundfile, "SoundFile", forbidden("soundfile.SoundFile"))


def test_pretrained_mode_trains_and_evaluates_without_ast_or_audio(run1, no_ast_no_audio, caplog):
    rc, ckpt = run1
    rc = {**rc, **PRETRAINED}
    cfg = load_config(rc)
    ctx = _context(rc, ckpt)
    with caplog.at_level(logging.INFO):
        reply = train(make_message(server_content(cfg, 1)), ctx)
        train(make_message(server_content(cfg, 2)), ctx)
    metrics = reply.content["metrics"]
    real = node_data.node_index(cfg.data, NodeSite.of(cfg, NodeRuntimeConfig(partition_id=0, num_partitions=NODES))).train_counts()
    assert metrics["synthetic_samples"] == sum(real.values()) == metrics["num-examples"]  # 'auto' = real counts
    assert metrics["real_samples"] == 0
    assert GENERATORS in reply.content  # the server gets the node's generators in run 2 too
    assert GENERATORS not in ctx.state  # the bank stays in its checkpoints, not in the Context that travels
    assert sum("the AST is not loaded" in r.getMessage() for r in caplog.records) == 1  # said once
    ev = evaluate(make_message(server_content(cfg, 2)), ctx).content["metrics"]
    assert ev["num-examples"] > 0 and 0.0 <= ev["test_retrieval_acc"] <= 1.0  # from the cache alone


def test_sample_counts_fixed_number_and_fresh_samples_per_round(run1, no_ast_no_audio):
    rc, ckpt = run1
    rc = {**rc, **PRETRAINED, "generator.synthetic-samples-per-class": 7}
    cfg = load_config(rc)
    node = NodeRuntimeConfig(partition_id=0, num_partitions=NODES, checkpoint_dir=str(ckpt))
    state = RecordDict()
    first, bank = synthetic_train_set(cfg, node, state, server_round=1)
    assert first.counts == {c: 7 for c in bank.classes} and len(first) == 7 * len(bank.classes)
    second, _ = synthetic_train_set(cfg, node, state, server_round=2)
    assert not torch.equal(first.embeddings, second.embeddings)
    again, _ = synthetic_train_set(cfg, node, RecordDict(), server_round=1)
    assert torch.equal(first.embeddings, again.embeddings)  # seeded


def test_real_mix_ratio_adds_a_share_of_real_clips(run1):
    rc, ckpt = run1
    rc = {**rc, **PRETRAINED, "generator.real-mix-ratio": 0.5}
    cfg = load_config(rc)
    node = NodeRuntimeConfig(partition_id=0, num_partitions=NODES, checkpoint_dir=str(ckpt))
    synth, _ = synthetic_train_set(cfg, node, RecordDict(), server_round=1)
    real_counts = node_data.node_index(cfg.data, NodeSite.of(cfg, node)).train_counts()
    assert synth.real == sum(max(1, round(0.5 * n)) for n in real_counts.values())
    assert len(synth) == synth.synthetic + synth.real


def test_checkpoints_that_do_not_match_the_config_are_named_errors(run1):
    rc, ckpt = run1
    base = {**rc, **PRETRAINED}
    node = NodeRuntimeConfig(partition_id=0, num_partitions=NODES, checkpoint_dir=str(ckpt))
    with pytest.raises(GeneratorCheckpointError, match=r"generator_node0.safetensors': granularity is 'unified', expected 'per_class'"):
        synthetic_train_set(load_config({**base, "generator.granularity": "per_class"}), node, RecordDict(), 1)
    with pytest.raises(GeneratorCheckpointError, match=r"type is 'vae', expected 'gan'"):
        synthetic_train_set(load_config({**base, "generator.kind": "gan"}), node, RecordDict(), 1)
    with pytest.raises(GeneratorCheckpointError, match=r"embedding-shape is \[12, 256\], expected \[6, 256\]"):
        synthetic_train_set(load_config({**base, "audio-encoder.tokens": 6}), node, RecordDict(), 1)
    with pytest.raises(GeneratorCheckpointError, match=r"encoder-key is '[0-9a-f]+', expected '[0-9a-f]+'"):
        synthetic_train_set(load_config({**base, "audio-encoder.cache-dtype": "bfloat16"}), node, RecordDict(), 1)
    with pytest.raises(ConfigError, match=r"init-from-run='run1': node 0 has no generator checkpoints .*runs there: none"):
        synthetic_train_set(load_config(base), node.model_copy(update={"checkpoint_dir": str(ckpt / "nowhere")}), RecordDict(), 1)


def test_node_overrides_granularity_and_generator_classes(data_root, tmp_path):  # noqa: F811
    ckpt = tmp_path / "ckpt"
    rc = run_config(data_root, tmp_path, **{
        "generator.mode": "generator-only", "generator.epochs": 2, "generator.granularity": "unified",
        "data.partition": "explicit", "nodes.0.classes": "dog,siren,rain", "nodes.1.classes": "dog,siren,rain",
        "nodes.0.generator-granularity": "per_class", "nodes.0.generator-classes": "dog,rain",
    })
    NODE_DATA.clear()  # a fresh ClientApp process
    train(make_message(server_content(load_config(rc), 1, run_name="run1")), _context(rc, ckpt, pid=0))
    train(make_message(server_content(load_config(rc), 1, run_name="run1")), _context(rc, ckpt, pid=1))
    names = sorted(p.name for p in (ckpt / "run1").glob("*.safetensors") if "_round_" not in p.name)
    assert names == ["generator_node0_class_dog.safetensors", "generator_node0_class_rain.safetensors",
                     "generator_node1.safetensors"]
    bad = {**rc, "nodes.0.generator-classes": "dog,cat"}
    with pytest.raises(ConfigError, match=r"nodes.0.generator-classes: unknown class\(es\) \['cat'\]"):
        train(make_message(server_content(load_config(bad), 1)), _context(bad, ckpt, pid=0))
    # run 2 of node 0 finds exactly its per-class files
    rc2 = {**rc, **PRETRAINED}
    synth, bank = synthetic_train_set(load_config(rc2), NodeRuntimeConfig(partition_id=0, num_partitions=NODES, checkpoint_dir=str(ckpt)), RecordDict(), 1)
    assert bank.granularity == "per_class" and sorted(bank.classes) == ["dog", "rain"]


def test_cache_only_evaluation_without_cached_clips_is_a_logged_skip(run1, no_ast_no_audio, tmp_path, caplog):
    rc, ckpt = run1
    rc = {**rc, **PRETRAINED, "cache-dir": str(tmp_path / "empty-cache")}
    cfg = load_config(rc)
    with caplog.at_level(logging.WARNING):
        metrics = evaluate(make_message(server_content(cfg, 1)), _context(rc, ckpt)).content["metrics"]
    assert metrics["num-examples"] == 0 and "test_retrieval_acc" not in metrics
    assert any("not in the embedding cache" in r.getMessage() for r in caplog.records)


def test_node_without_audio_takes_classes_and_counts_from_its_checkpoints(run1, no_ast_no_audio, tmp_path, caplog):
    rc, ckpt = run1
    cfg_with_audio = load_config({**rc, **PRETRAINED})
    real = node_data.node_index(cfg_with_audio.data, NodeSite.of(cfg_with_audio, NodeRuntimeConfig(partition_id=0, num_partitions=NODES))).train_counts()
    # the site has no dataset at all: data.root points nowhere, nodes.0.audio = false
    rc = {**rc, **PRETRAINED, "nodes.0.audio": False,
          "data.root": str(tmp_path / "no-such-dataset")}
    cfg = load_config(rc)
    ctx = _context(rc, ckpt)
    reply = train(make_message(server_content(cfg, 1)), ctx).content["metrics"]
    assert reply["synthetic_samples"] == sum(real.values())  # 'auto' = the counts its checkpoints recorded
    with caplog.at_level(logging.INFO):
        ev = evaluate(make_message(server_content(cfg, 1)), ctx).content["metrics"]
    assert ev["num-examples"] == 0 and "test_retrieval_acc" not in ev
    skips = [r.getMessage() for r in caplog.records if "evaluation skipped" in r.getMessage()]
    assert skips == ["node 0 holds no audio (nodes.0.audio = false): val and test evaluation skipped"]
    empty = {**rc, "generator.checkpoint-dir": str(tmp_path / "empty")}
    with pytest.raises(ConfigError, match="node 0 has no generator checkpoints of that run"):
        train(make_message(server_content(load_config(empty), 1)),
              Context(run_id=1, node_id=7, state=RecordDict(), run_config=empty,
                      node_config={"partition-id": 0, "num-partitions": NODES}))


def test_run_2_loads_the_generators_of_the_run_it_names_and_no_other(run1, no_ast_no_audio):
    """Every run keeps its generators in a folder of its own (<checkpoint-dir>/<run-name>/), and run 2 names
    the run it continues (generator.init-from-run), never "the latest files" of a folder runs share."""
    import shutil

    rc, ckpt = run1
    node = NodeRuntimeConfig(partition_id=0, num_partitions=NODES, checkpoint_dir=str(ckpt))
    assert not list(ckpt.glob("*.safetensors"))  # nothing at the top: run 1's files are in ckpt/run1/
    shutil.copytree(ckpt / "run1", ckpt / "copy")
    shutil.rmtree(ckpt / "run1")
    copied = load_config({**rc, "generator.mode": "use-pretrained-generators", "generator.init-from-run": "copy"})
    _, bank = synthetic_train_set(copied, node, RecordDict(), 1)
    assert bank.granularity == "unified"
    gone = load_config({**rc, **PRETRAINED})
    with pytest.raises(ConfigError, match=r"init-from-run='run1': node 0 has no generator checkpoints of that run .*"
                                          r"runs there: \['copy'\]"):
        synthetic_train_set(gone, node, RecordDict(), 1)


def test_a_new_run_of_the_same_name_removes_the_earlier_runs_generator_files(data_root, tmp_path):  # noqa: F811
    """After ``rm -rf outputs`` a new 'run1' trains other classes: the first run1's files of this node go, so
    run 2 never loads a mix of two runs' generators."""
    ckpt = tmp_path / "ckpt"
    rc = run_config(data_root, tmp_path, **{"generator.mode": "generator-only", "generator.epochs": 1,
                                             "generator.min-steps": 0, "generator.granularity": "per_class",
                                             "nodes.0.generator-classes": "dog,rain"})

    def run(identity: str, rc: dict) -> list[str]:
        content = server_content(load_config(rc), 1, run_name="run1")
        content["config"]["run-identity"] = identity
        train(make_message(content), _context(rc, ckpt))
        return sorted(p.name for p in (ckpt / "run1").glob("*.safetensors") if "_round_" not in p.name)

    assert run("first", rc) == ["generator_node0_class_dog.safetensors", "generator_node0_class_rain.safetensors"]
    assert run("second", {**rc, "nodes.0.generator-classes": "dog"}) == ["generator_node0_class_dog.safetensors"]
