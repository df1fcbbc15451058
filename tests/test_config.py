"""Configuration: strict validation, precedence, and the pyproject/docs mirrors staying in sync."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from common.config import (
    ConfigError,
    FedA2VConfig,
    NodeRuntimeConfig,
    flatten,
    load_config,
    markdown_reference,
    unflatten,
)
from common.data.dataset import explicit_nodes

ROOT = Path(__file__).resolve().parent.parent


def pyproject_run_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def flat_pyproject() -> dict:
    return flatten(pyproject_run_config())


def test_pyproject_defaults_mirror_the_schema():
    assert flat_pyproject() == flatten(FedA2VConfig().model_dump(by_alias=True))


def test_defaults_validate_to_the_embedded_default():
    cfg = load_config(flat_pyproject())
    assert cfg.num_rounds == 5 and cfg.data.num_classes == 10 and cfg.data.clips_per_class == 40
    assert cfg.data.dataset == "synthetic" and cfg.audio_encoder.model == "tiny"
    assert cfg.data.classes == []


def test_unknown_key_is_named():
    run = flat_pyproject() | {"train.local-epoch": 3}
    with pytest.raises(ConfigError, match=r"unknown key 'train.local-epoch'"):
        load_config(run)


def test_wrong_type_is_named():
    run = flat_pyproject() | {"train.batch-size": "big"}
    with pytest.raises(ConfigError, match=r"'train.batch-size'"):
        load_config(run)


def test_bad_literal_is_named():
    with pytest.raises(ConfigError, match=r"'aggregation'"):
        load_config(flat_pyproject() | {"aggregation": "krum"})


def test_classes_from_comma_string():
    cfg = load_config(flat_pyproject() | {"data.classes": "dog, siren,rain"})
    assert cfg.data.classes == ["dog", "siren", "rain"]


def test_config_file_overrides_defaults_and_run_config_overrides_file(tmp_path):
    f = tmp_path / "exp.toml"
    f.write_text('num-rounds = 9\n[train]\nlocal-epochs = 2\nbatch-size = 8\n[data]\nclasses = ["dog", "rain"]\n')
    run = flat_pyproject() | {"config-file": str(f), "train.batch-size": 16}
    cfg = load_config(run)
    assert cfg.num_rounds == 9  # file beats the default
    assert cfg.train.local_epochs == 2
    assert cfg.train.batch_size == 16  # explicit run-config beats the file
    assert cfg.data.classes == ["dog", "rain"]


def test_config_file_errors_name_the_file_and_key(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[train]\nlocal_epochs = 2\n")
    with pytest.raises(ConfigError, match=r"bad.toml.*\n.*unknown key 'train.local_epochs'"):
        load_config(flat_pyproject() | {"config-file": str(f)})
    with pytest.raises(ConfigError, match=r"config-file 'nope.toml' not found"):
        load_config(flat_pyproject() | {"config-file": "nope.toml"})
    f.write_text("[train\n")
    with pytest.raises(ConfigError, match=r"not valid TOML"):
        load_config(flat_pyproject() | {"config-file": str(f)})


def test_explicit_partition_needs_node_tables(tmp_path):
    with pytest.raises(ConfigError, match=r"explicit"):
        load_config(flat_pyproject() | {"data.partition": "explicit"})
    f = tmp_path / "nodes.toml"
    f.write_text('[data]\npartition = "explicit"\n[nodes.0]\nclasses = ["dog"]\n[nodes.1]\nclasses = "rain,siren"\nsamples-per-class = 5\n')
    cfg = load_config(flat_pyproject() | {"config-file": str(f)})
    assert explicit_nodes(cfg.data, cfg.nodes, 2) == ([["dog"], ["rain", "siren"]], [None, 5])
    with pytest.raises(ConfigError, match=r"node\(s\) 2"):
        explicit_nodes(cfg.data, cfg.nodes, 3)


def test_shipped_config_files_validate():
    files = sorted((ROOT / "configs").glob("*.toml"))
    assert files, "configs/ should ship example configurations"
    needs = {"generate_only.toml": {"adapter.init-from": "/runs/run2/checkpoints/adapters.safetensors"}}
    for f in files:
        load_config(flat_pyproject() | needs.get(f.name, {}) | {"config-file": str(f)})


def test_generate_only_and_audio_free_nodes_say_what_they_need(tmp_path):
    with pytest.raises(ConfigError, match="adapter.init-from"):
        load_config({"generate-only": True})
    with pytest.raises(ConfigError, match="generator.mode='generator-training' would train"):
        load_config({"generate-only": True, "adapter.init-from": "a.safetensors", "generator.mode": "generator-training"})
    with pytest.raises(ConfigError, match="render.when"):
        load_config({"generate-only": True, "adapter.init-from": "a.safetensors", "render.when": "off"})
    with pytest.raises(ConfigError, match="render.source='generator' draws from the nodes' pretrained generators"):
        load_config({"generate-only": True, "adapter.init-from": "a.safetensors", "render.source": "generator"})
    with pytest.raises(ConfigError, match="one folder name"):
        load_config({"data.audio-dir": "../elsewhere"})
    cfg = load_config({"generate-only": True, "adapter.init-from": "a.safetensors"})
    assert cfg.node_images_per_class(0) == cfg.render.images_per_class
    (tmp_path / "n.toml").write_text("[nodes.1]\naudio = false\nimages-per-class = 7\n")
    with pytest.raises(ConfigError, match="nodes 1 hold no audio"):
        load_config({"config-file": str(tmp_path / "n.toml")})
    cfg = load_config({"config-file": str(tmp_path / "n.toml"), "generator.mode": "use-pretrained-generators",
                       "generator.init-from-run": "run1"})
    assert not cfg.node_holds_audio(1) and cfg.node_holds_audio(0) and cfg.node_images_per_class(1) == 7


def test_pretrained_generators_name_the_run_that_trained_them():
    """Every run writes its generators to a folder of its own: run 2 says which run's it loads."""
    with pytest.raises(ConfigError, match="set generator.init-from-run to that run's run-name"):
        load_config({"generator.mode": "use-pretrained-generators"})
    with pytest.raises(ConfigError, match="one folder name"):
        load_config({"generator.mode": "use-pretrained-generators", "generator.init-from-run": "../run1"})
    with pytest.raises(ConfigError, match="read only with generator.mode='use-pretrained-generators'"):
        load_config({"generator.mode": "generator-training", "generator.init-from-run": "run1"})
    cfg = load_config({"generator.mode": "use-pretrained-generators", "generator.init-from-run": "run1"})
    assert cfg.generator.init_from_run == "run1"


def test_node_runtime_config():
    node = NodeRuntimeConfig.from_node_config({"partition-id": 1, "num-partitions": 2, "data-root": "/d"})
    assert node.partition_id == 1 and node.data_root == "/d"
    with pytest.raises(ConfigError, match=r"partition-id"):
        NodeRuntimeConfig.from_node_config({"partition-id": 2, "num-partitions": 2})
    with pytest.raises(ConfigError, match=r"unknown key 'data-dir'"):
        NodeRuntimeConfig.from_node_config({"partition-id": 0, "num-partitions": 2, "data-dir": "/d"})


def test_unflatten_conflict():
    with pytest.raises(ConfigError, match="'train'"):
        unflatten({"train": 1, "train.batch-size": 2})


def test_readme_configuration_reference_is_current():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert markdown_reference() in page, "docs/configuration.md's reference is stale: run python tools/sync_config_docs.py"


@pytest.mark.parametrize("bad", ["..", ".", "a/b", "/abs", "../up", "a\\b", "x\0y", "C:x", " x", "x" * 129])
def test_run_name_must_be_one_plain_folder_name(bad):
    """<output-dir>/<run-name> on the server and every node: a path there would write somewhere else."""
    with pytest.raises(ConfigError, match="'run-name'"):
        load_config({"run-name": bad})


def test_plain_run_names_and_the_empty_one_pass():
    for name in ("", "run-1", "exp_2024.01", "ablation v2", "x" * 128):
        assert load_config({"run-name": name}).run_name == name


def test_node_min_class_count_is_a_count():
    node = {"partition-id": 0, "num-partitions": 1}
    assert NodeRuntimeConfig.from_node_config(node).min_class_count == 0  # no floor of its own by default
    assert NodeRuntimeConfig.from_node_config({**node, "min-class-count": 5}).min_class_count == 5
    with pytest.raises(ConfigError, match="min-class-count"):
        NodeRuntimeConfig.from_node_config({**node, "min-class-count": -1})


@pytest.mark.parametrize(("overrides", "named"), [
    (['data.dataset="vegas"'], "data.root"),  # a simulation's nodes have no data-root of their own
    (['data.dataset="esc50" data.root="/no/such/folder"'], "data.root '/no/such/folder'"),
    (["min-nodes=4"], "min-nodes=4"),
])
def test_feda2v_run_refuses_a_federation_that_cannot_work_before_starting_it(overrides, named):
    """`feda2v run` checks what the submitting host can know before it starts a SuperLink, naming the key."""
    from ops.cli.run import check_federation

    with pytest.raises(ConfigError, match=re.escape(named)):
        check_federation(ROOT, overrides, 3)
    check_federation(ROOT, [], 3)  # the embedded default passes
