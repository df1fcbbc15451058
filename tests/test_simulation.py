"""End to end: ``flwr run`` of the real app in Flower's simulation runtime (3 SuperNodes, tiny settings).

What this proves that the unit tests cannot: the app bundle builds and installs, the ServerApp and
ClientApps exchange targets, weights, metrics and class means through real Flower messages, and a
run leaves a complete run directory (summary.json with per-node and global metrics, loadable
checkpoints). Each test runs in its own FLWR_HOME with its own local SuperLink on free ports (see
e2e_utils); the synthetic dataset and text targets are generated once per session.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from common.checkpoints import load_adapters, load_tensors
from common.data.esc50 import read_esc50
from common.data.partition import split_dataset
from common.data.readers import scan
from common.data.synth import SYNTH_CLASSES, synthesize_dataset
from e2e_utils import E2EEnv, e2e, e2e_cache, load_summary  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

NUM_NODES = 3
NUM_CLASSES = 4
CLIPS_PER_CLASS = 8  # >= 8 so that each of 3 nodes gets train, val and test clips
FEDERATION = f"num-supernodes={NUM_NODES} client-resources-num-cpus=1"
RUN_TIMEOUT_S = 300
ACC_KEYS = ("test_retrieval_acc", "test_retrieval_acc_clip", "test_retrieval_acc_t5")


def run_config(e2e: E2EEnv, run_name: str, **extra: object) -> str:
    values: dict[str, object] = {
        "output-dir": str(e2e.out),
        "run-name": run_name,
        "num-rounds": 2,
        "train.local-epochs": 2,
        "data.num-classes": NUM_CLASSES,
        "data.clips-per-class": CLIPS_PER_CLASS,
        "min-nodes": NUM_NODES,
        "privacy.min-class-count": 1,  # 8 clips per class over 3 nodes: 1-2 training clips per class and node
        "render.model": "tiny",  # the random preset: the trained one is tested once (test_two_round_simulation)
    }
    values.update(extra)
    return " ".join(f"{k}={_toml(v)}" for k, v in values.items())


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else str(value)


def synthetic_root(cache: Path) -> Path:
    """Where the app generates the dataset for these settings (common.data.dataset.synthetic_root)."""
    root = cache / "data" / f"synthetic-esc50-c{NUM_CLASSES}-n{CLIPS_PER_CLASS}-s0"
    assert root.is_dir(), f"the run did not generate its dataset at {root}"
    return root


def test_two_round_simulation(e2e: E2EEnv) -> None:
    """The default demo's path: train, evaluate, render with the trained preset, score images, write the report."""
    result = e2e.flwr_run(run_config(e2e, "sim", **{"render.model": "tiny-trained"}), federation_config=FEDERATION,
                          timeout=RUN_TIMEOUT_S + 300)  # + the one-time training of the render preset
    e2e.assert_run_completed(result)
    assert "global test retrieval acc" in result.output, result.describe()

    run_dir = e2e.out / "sim"
    summary = load_summary(run_dir)
    classes = list(SYNTH_CLASSES[:NUM_CLASSES])
    assert summary["run"]["classes"] == classes
    assert summary["run"]["num_rounds"] == 2

    # Independent count of the training clips: the dataset on disk, split by the run's seed and fractions.
    clips, _ = read_esc50(synthetic_root(e2e.cache_dir), classes)
    assert len(clips) == NUM_CLASSES * CLIPS_PER_CLASS
    splits = split_dataset(clips, val_fraction=0.1, test_fraction=0.2, seed=42)
    expected_train, expected_test = len(splits["train"]), len(splits["test"])

    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [1, 2], f"rounds in summary.json: {[r['round'] for r in rounds]}"
    node_ids = {str(i) for i in range(NUM_NODES)}
    for entry in rounds:
        where = f"round {entry['round']}"
        for phase in ("train", "evaluate"):
            assert phase in entry, f"{where}: no {phase} section ({sorted(entry)})"
            nodes = entry[phase]["nodes"]
            assert set(nodes) == node_ids, f"{where} {phase}: nodes {sorted(nodes)}"
            for pid, metrics in nodes.items():
                assert metrics["partition_id"] == int(pid), f"{where} {phase}: node {pid} reports {metrics['partition_id']}"
        train_global, eval_global = entry["train"]["global"], entry["evaluate"]["global"]
        assert math.isfinite(train_global["train_loss"]), f"{where}: train_loss {train_global['train_loss']}"
        train_nodes = entry["train"]["nodes"].values()
        assert sum(m["num-examples"] for m in train_nodes) == expected_train, f"{where}: {list(train_nodes)}"
        assert train_global["num-examples"] == expected_train, f"{where}: global train num-examples"
        assert all(m["num-examples"] > 0 for m in train_nodes), f"{where}: a node trained on no clips"
        assert sum(m["num-examples"] for m in entry["evaluate"]["nodes"].values()) == expected_test
        for key in ACC_KEYS:
            assert key in eval_global, f"{where}: global evaluate metrics lack {key}: {sorted(eval_global)}"
            assert 0.0 <= eval_global[key] <= 1.0, f"{where}: {key} = {eval_global[key]}"
            for pid, metrics in entry["evaluate"]["nodes"].items():
                assert 0.0 <= metrics[key] <= 1.0, f"{where}: node {pid} {key} = {metrics[key]}"
    assert summary["final"]["round"] == 2
    assert summary["final"]["test_retrieval_acc"] == rounds[-1]["evaluate"]["global"]["test_retrieval_acc"]

    ckpt_dir = run_dir / "checkpoints"
    for name in ("adapters.safetensors", "adapters_round_1.safetensors", "adapters_round_2.safetensors"):
        assert (ckpt_dir / name).is_file(), f"missing {name}; checkpoints: {sorted(p.name for p in ckpt_dir.glob('*'))}"
    adapters, meta = load_adapters(ckpt_dir / "adapters.safetensors")
    assert meta["round"] == 2
    assert meta["class-names"] == classes
    assert meta["aggregation"] == "fedavg"
    assert sum(p.numel() for p in adapters.parameters()) == summary["run"]["adapter_params"]
    _, meta1 = load_adapters(ckpt_dir / "adapters_round_1.safetensors")
    assert meta1["round"] == 1
    means, means_meta = load_tensors(run_dir / "class_means.safetensors")
    assert means_meta["round"] == 2 and means_meta["class-names"] == classes  # every class has training clips
    assert int(means["counts"].sum()) == rounds[-1]["train"]["global"]["num-examples"]
    targets, targets_meta = load_tensors(run_dir / "targets.safetensors")
    assert targets_meta["class-names"] == classes and targets["clip"].shape == (len(classes), 768)
    assert (run_dir / "config.json").is_file()

    # the demo ends with images: per node and for the server, a contact sheet each, one manifest
    images = run_dir / "images"
    manifest = [json.loads(line) for line in (images / "manifest.jsonl").read_text().splitlines()]
    owners = {e["owner"] for e in manifest}
    assert owners == {f"node_{i}" for i in range(NUM_NODES)} | {"server"}, owners
    for owner in owners:
        assert (images / owner / "contact_sheet.png").is_file(), owner
    for entry in manifest:
        assert (images / entry["path"]).is_file() and entry["round"] == 2
        assert entry["source"].startswith("clip:") if entry["owner"] != "server" else entry["source"] == "class-mean"
    final_eval = rounds[-1]["evaluate"]["global"]
    assert final_eval["images_rendered"] == sum(1 for e in manifest if e["owner"] != "server")

    # image accuracy from sound: every node and the server scored their images with the picture classifier
    assert final_eval["images_scored"] == final_eval["images_rendered"]
    for owner_metrics in [*rounds[-1]["evaluate"]["nodes"].values(), {k[7:]: v for k, v in rounds[-1]["render"].items()
                                                                      if k.startswith("server_")}]:
        for key in ("image_acc", "image_acc_clip", "image_acc_t5"):
            assert 0.0 <= owner_metrics[key] <= 1.0, (key, owner_metrics)
    preset = Path(manifest[0]["render_model"])
    assert preset.parent == e2e.cache_dir / "render" and (preset / "preset.json").is_file()  # trained once, cached

    # the trained preset draws each class from its text targets, the colour from the CLIP branch and
    # the shape from the T5 branch: a swap of the branches on the way into FLUX would show here
    from common.render.scoring import PictureScorer
    from common.render.flux import FluxBackend
    from common.render.backend import Conditioning, RenderSettings

    backend = FluxBackend(RenderSettings(model=str(preset), resolution=64))
    scorer = PictureScorer(NUM_CLASSES, 64)
    own = torch.arange(NUM_CLASSES)
    other = (own + 1) % NUM_CLASSES
    oracle = backend.render(Conditioning({"clip_pooled": targets["clip"], "t5_sequence": targets["t5"]}), list(range(4)))
    assert (scorer.predict(oracle) == own).float().mean() >= 0.75
    crossed = backend.render(Conditioning({"clip_pooled": targets["clip"], "t5_sequence": targets["t5"][other]}),
                             list(range(4)))
    assert scorer.branch_scores(crossed, own)["acc_clip"] >= 0.75  # colour of the CLIP branch's class (swapped: 0)
    assert scorer.branch_scores(crossed, other)["acc_t5"] >= 0.75  # shape of the T5 branch's class (swapped: 0)

    # the run ends with its report
    report = (run_dir / "report.html").read_text()
    assert "feda2v run <code>sim</code>" in report and report.count('alt="contact sheet') == NUM_NODES + 1


def test_aggregation_none_keeps_per_node_adapters(e2e: E2EEnv) -> None:
    result = e2e.flwr_run(
        run_config(e2e, "standalone", **{"num-rounds": 1, "aggregation": "none"}),
        federation_config=FEDERATION,
        timeout=RUN_TIMEOUT_S,
    )
    e2e.assert_run_completed(result)

    run_dir = e2e.out / "standalone"
    summary = load_summary(run_dir)
    assert summary["run"]["aggregation"] == "none"
    assert [r["round"] for r in summary["rounds"]] == [1]
    for key in ACC_KEYS:
        assert 0.0 <= summary["rounds"][0]["evaluate"]["global"][key] <= 1.0

    ckpt_dir = run_dir / "checkpoints"
    present = sorted(p.name for p in ckpt_dir.glob("*.safetensors"))
    assert not (ckpt_dir / "adapters.safetensors").exists(), f"global adapters written with aggregation=none: {present}"
    assert not any(name.startswith("adapters_round_") for name in present), present
    classes = list(SYNTH_CLASSES[:NUM_CLASSES])
    for pid in range(NUM_NODES):
        path = ckpt_dir / f"adapters_node{pid}.safetensors"
        assert path.is_file(), f"missing {path.name}; checkpoints: {present}"
        _, meta = load_adapters(path)
        assert (meta["round"], meta["node"], meta["aggregation"]) == (1, pid, "none")
        assert meta["class-names"] == classes


@pytest.mark.parametrize("layout", ["vegas", "vggsound"])
def test_simulation_on_each_dataset_layout(e2e: E2EEnv, layout: str) -> None:
    """The VEGAS and VGGSound readers under a real run (datasets written by the synthetic writer; 10-s
    VGGSound clips drive the AST to 998 frames)."""
    seconds = 10.0 if layout == "vggsound" else 5.0
    root = synthesize_dataset(e2e.out / layout, list(SYNTH_CLASSES[:NUM_CLASSES]), clips_per_class=CLIPS_PER_CLASS + 2,
                              clip_seconds=seconds, layout=layout)
    result = e2e.flwr_run(run_config(e2e, layout, **{"data.dataset": layout, "data.root": str(root),
                                                     "data.clip-seconds": seconds}),
                          federation_config=FEDERATION, timeout=RUN_TIMEOUT_S)
    e2e.assert_run_completed(result)
    summary = load_summary(e2e.out / layout)
    index = scan(layout, root)
    assert summary["run"]["classes"] == index.class_names[:NUM_CLASSES]
    accuracy = [r["evaluate"]["global"]["test_retrieval_acc"] for r in summary["rounds"]]
    assert len(accuracy) == 2 and all(0.0 <= a <= 1.0 for a in accuracy), accuracy
    tested = sum(m["num-examples"] for m in summary["rounds"][-1]["evaluate"]["nodes"].values())
    if layout == "vggsound":  # the official test split, whole
        assert tested == sum(c.split == "test" for c in index.clips)
    print(f"{layout}: test retrieval accuracy per round {accuracy}")


# Run 3 of the seed workflow: per-node image counts and a site without audio travel in a config file.
GENERATE_TOML = """
[nodes.0]
images-per-class = 3
[nodes.2]
audio = false
"""


def test_three_run_workflow_generators_adapters_then_images(e2e: E2EEnv) -> None:
    """Run 1 trains per-class generators on every node; run 2 trains adapters from them alone; run 3
    (generate-only) starts from run 2's adapters, trains nothing and only renders: each node from its
    pretrained generators (node 2 holds no audio at all), the server its global images. Runs 2 and 3
    name run 1 (generator.init-from-run), whose generators live in the checkpoint dir's run1/ folder."""
    gen = {"generator.granularity": "per_class", "generator.epochs": 20,
           "generator.checkpoint-dir": str(e2e.out / "node-generators")}
    run1 = e2e.flwr_run(run_config(e2e, "run1", **gen, **{"num-rounds": 1, "generator.mode": "generator-only"}),
                        federation_config=FEDERATION, timeout=RUN_TIMEOUT_S)
    e2e.assert_run_completed(run1)
    classes = list(SYNTH_CLASSES[:NUM_CLASSES])
    assert not list((e2e.out / "node-generators").glob("*.safetensors"))  # one folder per run, nothing shared
    node_files = sorted(p.name for p in (e2e.out / "node-generators" / "run1").glob("*.safetensors"))
    server_files = sorted(p.name for p in (e2e.out / "run1" / "generators").glob("*.safetensors"))
    for pid in range(NUM_NODES):
        mine = [n for n in node_files if n.startswith(f"generator_node{pid}_class_") and "_round_" not in n]
        assert mine and all(n.removeprefix(f"generator_node{pid}_class_").removesuffix(".safetensors") in classes for n in mine)
        assert set(mine) <= set(server_files), f"server lacks node {pid}'s generators: {server_files}"

    run2 = e2e.flwr_run(run_config(e2e, "run2", **gen, **{"num-rounds": 1, "generator.mode": "use-pretrained-generators",
                                                          "generator.init-from-run": "run1", "render.when": "off"}),
                        federation_config=FEDERATION, timeout=RUN_TIMEOUT_S)
    e2e.assert_run_completed(run2)
    summary1, summary2 = load_summary(e2e.out / "run1"), load_summary(e2e.out / "run2")
    real = summary1["rounds"][0]["train"]["nodes"]
    for pid, metrics in summary2["rounds"][0]["train"]["nodes"].items():
        assert metrics["real_samples"] == 0 and metrics["cache_misses"] == 0
        assert metrics["synthetic_samples"] == metrics["num-examples"] == real[pid]["num-examples"]  # 'auto'
    final = summary2["final"]
    assert 0.0 <= final["test_retrieval_acc"] <= 1.0
    assert final["num-examples"] == summary1["final"]["num-examples"]  # every test clip served by the cache

    trained = e2e.out / "run2" / "checkpoints" / "adapters.safetensors"
    config_file = e2e.out / "generate.toml"
    config_file.write_text(GENERATE_TOML)
    run3 = e2e.flwr_run(run_config(e2e, "run3", **gen, **{
        "num-rounds": 1, "generate-only": True, "adapter.init-from": str(trained), "config-file": str(config_file),
        "generator.mode": "use-pretrained-generators", "generator.init-from-run": "run1",
        "render.source": "generator"}),
        federation_config=FEDERATION, timeout=RUN_TIMEOUT_S)
    e2e.assert_run_completed(run3)
    # nobody trained: the run's adapters are run 2's, bit for bit
    before, _ = load_tensors(trained)
    after, meta = load_tensors(e2e.out / "run3" / "checkpoints" / "adapters.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert meta["aggregation"] == "keep" and meta["round"] == 1
    summary3 = load_summary(e2e.out / "run3")
    evaluate = summary3["rounds"][0]["evaluate"]["nodes"]
    assert evaluate["2"]["num-examples"] == 0 and "test_retrieval_acc" not in evaluate["2"]  # no audio, no evaluation
    assert evaluate["0"]["num-examples"] > 0
    train = summary3["rounds"][0]["train"]["nodes"]
    assert train["2"]["synthetic_samples"] == real["2"]["num-examples"]  # counts from its checkpoints' metadata
    images = e2e.out / "run3" / "images"
    for pid, per_class in ((0, 3), (1, 2), (2, 2)):
        held = {n.removeprefix(f"generator_node{pid}_class_").removesuffix(".safetensors")
                for n in node_files if n.startswith(f"generator_node{pid}_class_") and "_round_" not in n}
        pngs = sorted(p.name for p in (images / f"node_{pid}").glob("*_[0-9][0-9][0-9][0-9].png"))
        assert pngs == sorted(f"{c}_{i:04d}.png" for c in held for i in range(1, per_class + 1)), (pid, pngs)
        assert evaluate[str(pid)]["images_rendered"] == len(pngs)
    assert sorted(p.name for p in (images / "server").glob("*_0001.png")) == sorted(f"{c}_0001.png" for c in classes)
    assert not list((e2e.out / "run3").glob("generators/generator_node*"))  # pretrained banks stayed on the nodes


# One node holds only "dog" and, with one validation clip per class, gets none: evaluation replies then
# differ in their val_* keys. Node 1 holds 2 dog clips, under privacy.min-class-count=3: its class mean
# is withheld. Per-node tables travel in a config file (Flower's run config takes declared keys only).
UNEVEN_TOML = """
[data]
partition = "explicit"
[nodes.0]
classes = ["dog"]
[nodes.1]
classes = ["dog"]
[nodes.2]
classes = ["rooster", "siren", "engine"]
"""


def test_resume_continues_a_stopped_run_to_the_same_result(e2e: E2EEnv) -> None:
    uneven_file = e2e.out / "uneven.toml"
    uneven_file.parent.mkdir(parents=True, exist_ok=True)
    uneven_file.write_text(UNEVEN_TOML)
    UNEVEN = {"config-file": str(uneven_file), "privacy.min-class-count": 3, "render.when": "off"}
    full = e2e.flwr_run(run_config(e2e, "full", **UNEVEN, **{"num-rounds": 3}), federation_config=FEDERATION,
                        timeout=RUN_TIMEOUT_S)
    e2e.assert_run_completed(full)
    part = e2e.flwr_run(run_config(e2e, "part", **UNEVEN, **{"num-rounds": 2}), federation_config=FEDERATION,
                        timeout=RUN_TIMEOUT_S)
    e2e.assert_run_completed(part)
    again = e2e.flwr_run(run_config(e2e, "part", **UNEVEN, **{"num-rounds": 3}), federation_config=FEDERATION,
                         timeout=RUN_TIMEOUT_S)  # same run-name, no resume: refused, nothing overwritten
    status = e2e.run_status(e2e.run_id(again))
    assert status["status"] != "finished:completed" and "already holds a run" in str(status.get("status-details")) + again.output
    assert [r["round"] for r in load_summary(e2e.out / "part")["rounds"]] == [1, 2]
    resumed = e2e.flwr_run(run_config(e2e, "part", **UNEVEN, **{"num-rounds": 3, "resume": True}),
                           federation_config=FEDERATION, timeout=RUN_TIMEOUT_S)
    e2e.assert_run_completed(resumed)

    reference, summary = load_summary(e2e.out / "full"), load_summary(e2e.out / "part")
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]  # every round exactly once
    assert summary["run"]["resumed"][0]["after_round"] == 2 and summary["final"]["round"] == 3
    test_clips = reference["final"]["num-examples"]
    assert abs(summary["final"]["test_retrieval_acc"] - reference["final"]["test_retrieval_acc"]) <= 1 / test_clips
    evaluate = summary["rounds"][-1]["evaluate"]["nodes"]
    assert evaluate["0"]["num_val"] == 0 and "val_retrieval_acc" not in evaluate["0"]
    assert "val_retrieval_acc" in summary["rounds"][-1]["evaluate"]["global"]
    train_nodes = summary["rounds"][-1]["train"]["nodes"]
    assert train_nodes["1"]["withheld_classes"] == 1 and summary["rounds"][-1]["class_counts"].get("dog", 0) >= 3
