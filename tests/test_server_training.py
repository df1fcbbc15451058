"""The server's own work: owner-only KD teachers, both branches, config wiring, generator merge,
data-free server generator, fine-tuning anchors, and the privacy rule of train replies."""

from __future__ import annotations

import copy

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

import server_app.aggregators.kd as kd_module
import server_app.finetune as finetune_module
from client_app.app import NODE_DATA, train
from common.config import ConfigError, load_config
from common.generator_bank import GeneratorBank, bank_from_records
from common.models.adapters import AdapterConfig, Adapters
from common.models.generators import GeneratorSpec, GeneratorTrainSettings
from common.records import (
    CLASS_MEANS,
    CLASS_MEANS_META,
    GENERATORS,
    GENERATORS_META,
    ClassTensors,
    module_to_arrays,
)
from common.training import TrainSettings
from server_app.aggregators.kd import distill, holdout_split
from server_app.app import class_targets
from server_app.finetune import finetune
from server_app.pipeline import build_pipelines
from server_app.run_context import ServerRun
from server_app.server_generator import (
    DataFreeSettings,
    merge_generators,
    new_data_free_bank,
    teacher_agreement,
    train_data_free,
)
from server_app.strategy import FedA2VStrategy
from server_app.summary import RunSummary
from server_app.teachers import OwnerTeachers
from tests.test_client_app import CLASSES, data_root, make_message, run_config, server_content  # noqa: F401

TOKENS, DIM = 4, 16
NAMES = ["a", "b", "c", "d"]


def small_adapters(seed: int) -> Adapters:
    torch.manual_seed(seed)
    return Adapters(AdapterConfig(in_dim=DIM, in_tokens=TOKENS, clip_dim=8, t5_dim=12, t5_tokens=3, hidden_dim=16, heads=2, dropout=0.1))


def means_for(classes: list[str], counts: list[int]) -> ClassTensors:
    return ClassTensors(classes, torch.randn(len(classes), 8), torch.randn(len(classes), 3, 12), torch.tensor(counts))


def settings(**kw) -> TrainSettings:
    base = dict(epochs=2, batch_size=8, lr_clip=1e-2, lr_t5=1e-2, weight_decay=0.0, cosine_weight=0.5,
                contrastive_weight=1.0, temperature=0.1, proximal_mu=0.0, seed=0, precision="fp32")
    base.update(kw)
    return TrainSettings(**base)


def test_teacher_target_comes_only_from_owners():
    teachers = {0: small_adapters(0), 1: small_adapters(1), 2: small_adapters(2)}
    means = {0: means_for(["a", "b"], [3, 1]), 1: means_for(["b", "c"], [1, 5]), 2: means_for(["d"], [4])}
    owners = OwnerTeachers.build(NAMES, teachers, means)
    assert owners.owners(0) == [0] and owners.owners(1) == [0, 1] and owners.owners(3) == [2]
    assert torch.allclose(owners.weights[:, 1], torch.tensor([0.5, 0.5, 0.0]))
    x = torch.randn(6, TOKENS, DIM)
    y = torch.tensor([0, 0, 1, 1, 2, 3])
    before = owners.outputs(x, y)
    with torch.no_grad():  # wreck node 2, which owns only class d
        for p in teachers[2].parameters():
            p.add_(torch.randn_like(p) * 10)
    after = owners.outputs(x, y)
    for b, a in zip(before, after):
        assert torch.equal(b[:5], a[:5])  # classes a, b, c: node 2 has zero influence
        assert not torch.equal(b[5], a[5])  # class d: it is the only teacher
    # class b = count-weighted mean of its two owners
    expected = 0.5 * teachers[0](x[2:4])[0] + 0.5 * teachers[1](x[2:4])[0]
    assert torch.allclose(after[0][2:4], expected, atol=1e-6)


def test_kd_trains_both_branches_toward_teachers():
    teachers = {0: small_adapters(0), 1: small_adapters(1)}
    owners = OwnerTeachers.build(NAMES, teachers, {0: means_for(["a", "b"], [2, 2]), 1: means_for(["c", "d"], [2, 2])})
    student = small_adapters(9)
    start = copy.deepcopy(student)
    x, y = torch.randn(64, TOKENS, DIM), torch.arange(4).repeat(16)
    history = distill(student, owners, x, y, settings(epochs=30))
    assert len(history["loss_clip"]) == len(history["loss_t5"]) == 30
    assert history["loss_clip"][-1] < 0.5 * history["loss_clip"][0]
    assert history["loss_t5"][-1] < 0.5 * history["loss_t5"][0]
    for branch, params in student.branch_parameters().items():
        moved = [not torch.equal(p, q) for p, q in zip(params, start.branch_parameters()[branch])]
        assert all(moved), f"{branch} branch: some parameters received no update"


def test_kd_early_stop_holds_samples_out_stops_on_a_plateau_and_keeps_the_best_epoch():
    train_rows, held = holdout_split(100, 0.1, seed=3)
    assert len(held) == 10 and len(train_rows) == 90 and not set(held.tolist()) & set(train_rows.tolist())
    assert torch.equal(holdout_split(100, 0.1, seed=3)[1], held)  # seeded
    assert len(holdout_split(10, 0.1, seed=3)[1]) == 0  # 1 row would be no measurement: nothing held out
    teachers = {0: small_adapters(0), 1: small_adapters(1)}
    owners = OwnerTeachers.build(NAMES, teachers, {0: means_for(["a", "b"], [2, 2]), 1: means_for(["c", "d"], [2, 2])})
    x, y = torch.randn(80, TOKENS, DIM), torch.arange(4).repeat(20)
    # a learning rate this large overshoots: the held-out loss stops improving long before 60 epochs
    student = small_adapters(9)
    history = distill(student, owners, x, y, settings(epochs=60, lr_clip=0.3, lr_t5=0.3), patience=2, holdout=0.2)
    epochs = len(history["loss_clip"])
    assert epochs < 60 and len(history["holdout"]) == epochs
    # the returned student is the best epoch's: its held-out loss is the recorded minimum
    _, held_rows = holdout_split(80, 0.2, seed=0)
    student.eval()
    with torch.no_grad():
        t_clip, t_t5 = owners.outputs(x[held_rows], y[held_rows])
        s_clip, s_t5 = student(x[held_rows])
        from common.training import match_loss
        again = float(match_loss(s_clip, t_clip, 0.5) + match_loss(s_t5, t_t5, 0.5))
    assert again == pytest.approx(min(history["holdout"]), rel=1e-4)
    # patience 0: every epoch runs, nothing held out
    full = distill(small_adapters(9), owners, x, y, settings(epochs=5), patience=0, holdout=0.2)
    assert len(full["loss_clip"]) == 5 and "holdout" not in full


def _bank(kind: str, classes: list[str], seed: int, shift: float) -> GeneratorBank:
    spec = GeneratorSpec(kind=kind, tokens=TOKENS, dim=DIM, latent_dim=4, hidden_dim=16, num_layers=2, token_dim=8)
    bank = GeneratorBank.create(spec, "unified", classes, seed=seed)
    x = torch.randn(10 * len(classes), TOKENS, DIM) + shift
    y = torch.tensor([NAMES.index(c) for c in classes]).repeat_interleave(10)
    bank.train(x, y, NAMES, GeneratorTrainSettings(epochs=3, batch_size=8, lr=None, seed=seed, min_steps=0))
    return bank


def test_merge_covers_every_class_of_the_federation():
    banks = {0: _bank("vae", ["a", "b"], 0, 0.0), 1: _bank("vae", ["c"], 1, 3.0), 2: _bank("gan", ["d"], 2, -3.0)}
    counts = {0: {"a": 10, "b": 10}, 1: {"c": 10}, 2: {"d": 10}}
    spec = GeneratorSpec(kind="vae", tokens=TOKENS, dim=DIM, latent_dim=4, hidden_dim=16, num_layers=2, token_dim=8)
    merged, metrics = merge_generators(spec, NAMES, banks, counts, 12, GeneratorTrainSettings(epochs=2, batch_size=8, lr=None, seed=0, min_steps=0))
    assert merged.classes == NAMES and merged.granularity == "unified" and len(merged.units) == 1
    assert metrics["server_gen_train_samples"] == 48
    assert merged.sample("c", 5, seed=0).shape == (5, TOKENS, DIM)


def test_data_free_generator_learns_what_the_owners_recognise():
    teachers = {0: small_adapters(0), 1: small_adapters(1)}
    targets = ClassTensors(NAMES, torch.randn(4, 8), torch.randn(4, 3, 12))
    # the nodes "reported" the class targets as their class means: a good generator makes the
    # owners map its samples of class y onto y's target
    means = {0: ClassTensors(["a", "b"], targets.clip[:2], targets.t5[:2], torch.tensor([5, 5])),
             1: ClassTensors(["c", "d"], targets.clip[2:], targets.t5[2:], torch.tensor([5, 5]))}
    owners = OwnerTeachers.build(NAMES, teachers, means)
    spec = GeneratorSpec(kind="gan", tokens=TOKENS, dim=DIM, latent_dim=4, hidden_dim=32, num_layers=2, token_dim=8)
    bank = new_data_free_bank(spec, NAMES, owners, seed=0)
    before = teacher_agreement(bank, owners, targets.clip, targets.t5, 32, seed=1)
    metrics = train_data_free(bank, owners, DataFreeSettings(steps=300, batch_size=32, lr=1e-2, diversity_weight=0.5, cosine_weight=0.5, seed=0))
    after = teacher_agreement(bank, owners, targets.clip, targets.t5, 32, seed=1)
    assert after >= 0.9 and after > before, (before, after, metrics)
    samples = bank.sample("a", 16, seed=3)
    assert samples.std(0).mean() > 1e-3  # not collapsed onto one point


def test_finetune_anchor_pulls_class_means_and_needs_teachers_for_teacher_target():
    torch.manual_seed(0)  # the data below: the same every time, whichever tests ran before
    targets = ClassTensors(NAMES, torch.randn(4, 8), torch.randn(4, 3, 12))
    anchors = ClassTensors(["a", "c"], torch.full((2, 8), 3.0), torch.full((2, 3, 12), -2.0), torch.tensor([4, 4]))
    y = torch.arange(4).repeat(16)
    x = torch.randn(64, TOKENS, DIM) + y[:, None, None].float()  # the class is visible in the input

    def distance_of_a_to_its_anchor(**anchor) -> float:
        adapters = small_adapters(0)
        finetune(adapters, x, y, targets, settings(epochs=60, contrastive_weight=0.0, cosine_weight=0.0),
                 target="text", **anchor)
        with torch.no_grad():
            out_clip, _ = adapters(x)
        return float((out_clip[y == 0].mean(0) - 3.0).abs().mean())

    free = distance_of_a_to_its_anchor()
    anchored = distance_of_a_to_its_anchor(anchors=anchors, anchor_weight=50.0)
    assert anchored < 0.2 < free and anchored < 0.1 * free, (free, anchored)  # the anchor moved class a's mean
    with pytest.raises(ValueError, match="needs teachers"):
        finetune(small_adapters(0), x, y, targets, settings(), target="teacher")


# ------------------------------------------------------------------ in a round, through the strategy
def _node_replies(data_root, tmp_path, extra: dict):  # noqa: F811
    """Two nodes (disjoint classes) train one round with generators; returns cfg and their replies."""
    rc = run_config(data_root, tmp_path, **{
        "generator.mode": "generator-training", "generator.epochs": 5, "data.partition": "explicit",
        "nodes.0.classes": "dog,siren", "nodes.1.classes": "rain", **extra,
    })
    cfg = load_config(rc)
    NODE_DATA.clear()  # a fresh ClientApp process
    replies = []
    for pid in (0, 1):
        ctx = Context(run_id=1, node_id=7, state=RecordDict(), run_config=rc,
                      node_config={"partition-id": pid, "num-partitions": 2, "checkpoint-dir": str(tmp_path / "ck")})
        replies.append(train(make_message(server_content(cfg, 1)), ctx))
    return cfg, replies


def _strategy(cfg, tmp_path) -> FedA2VStrategy:
    targets = class_targets(cfg, CLASSES)
    acfg = AdapterConfig.from_sections(cfg.adapter, cfg.audio_encoder, cfg.text_encoder, 768, 4096)
    template = Adapters.seeded(acfg, cfg.seed)
    run = ServerRun(run_dir=tmp_path / "run", targets=targets, template=Adapters.seeded(acfg, cfg.seed),
                    adapter_config=acfg.to_dict(), config_hash="h", num_rounds=1, device=torch.device("cpu"))
    summary = RunSummary(tmp_path / "run" / "summary.json", {})
    pipelines = build_pipelines(cfg, run, summary)
    strategy = FedA2VStrategy(targets=targets, round_pipeline=pipelines.round, after_round=pipelines.after_round,
                              send_generator=pipelines.server_generator if cfg.server_generator.send_to_nodes else None)
    strategy.sent_arrays = module_to_arrays(template)
    strategy.summary = summary  # for the assertions below
    return strategy


def test_train_reply_privacy_rule_with_generators(data_root, tmp_path):  # noqa: F811
    """Every record of a train reply: adapter weights, per-class means + counts, generator weights,
    scalar metrics. Nothing has one row per clip."""
    cfg, replies = _node_replies(data_root, tmp_path, {})
    reply = replies[0]
    content = reply.content
    assert set(content.keys()) == {"arrays", "metrics", CLASS_MEANS, CLASS_MEANS_META, GENERATORS, GENERATORS_META, "held"}
    n_train = int(content["metrics"]["num-examples"])
    adapters = Adapters.seeded(AdapterConfig.from_sections(cfg.adapter, cfg.audio_encoder, cfg.text_encoder, 768, 4096), cfg.seed)
    weights = content["arrays"].to_torch_state_dict()
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in adapters.state_dict().items()}
    means = content[CLASS_MEANS].to_torch_state_dict()
    assert set(means) == {"clip", "t5", "counts"} and all(v.shape[0] == 2 for v in means.values())
    assert int(means["counts"].sum()) == n_train
    bank, meta = bank_from_records(content, "reply")
    expected = {f"unit{i}.{k}": v.shape for i, u in enumerate(bank.units) for k, v in bank.models[u.name].state_dict().items()}
    assert {k: v.shape for k, v in content[GENERATORS].to_torch_state_dict().items()} == expected
    assert set(meta) >= {"granularity", "units", "encoder-key"} and "clip-ids" not in str(meta)
    assert all(isinstance(v, (int, float)) for v in content["metrics"].values())
    assert set(content[CLASS_MEANS_META].keys()) == {"class-names"}
    for record in content.values():  # no tensor anywhere has one row per training clip (n_train = 19 here)
        if isinstance(record, ArrayRecord):
            for name, value in record.to_torch_state_dict().items():
                assert value.ndim == 0 or value.shape[0] != n_train or name.endswith("counts"), name


def test_kd_round_through_the_strategy_honours_config(data_root, tmp_path, monkeypatch):  # noqa: F811
    extra = {"aggregation": "kd", "kd.epochs": 3, "kd.samples-per-class": 5, "kd.batch-size": 4, "kd.lr": 0.0123,
             "finetune.epochs": 2, "finetune.lr": 0.0007, "finetune.samples-per-class": 7, "finetune.target": "both"}
    cfg, replies = _node_replies(data_root, tmp_path, extra)
    calls = {}

    def spy(name, fn):
        def wrapped(adapters, *args, **kwargs):
            calls[name] = (args, kwargs)
            return fn(adapters, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(kd_module, "distill", spy("kd", kd_module.distill))
    monkeypatch.setattr(finetune_module, "finetune", spy("finetune", finetune_module.finetune))
    strategy = _strategy(cfg, tmp_path)
    arrays, metrics = strategy.aggregate_train(1, replies)
    teachers, x, y, kd_settings = calls["kd"][0][:4]
    assert (kd_settings.epochs, kd_settings.batch_size, kd_settings.lr_clip, kd_settings.lr_t5) == (3, 4, 0.0123, 0.0123)
    assert len(y) == 5 * 3 and sorted(set(y.tolist())) == [0, 1, 2]  # every class, from its owner's generator
    assert teachers.owners(CLASSES.index("rain")) == [1] and teachers.owners(0) == [0]
    ft_x, ft_y, _, ft_settings = calls["finetune"][0][:4]
    assert (ft_settings.epochs, ft_settings.lr_clip) == (2, 0.0007) and len(ft_y) == 7 * 3
    assert calls["finetune"][1]["target"] == "both" and calls["finetune"][1]["teachers"] is teachers
    for key in ("kd_loss_clip", "kd_loss_t5", "finetune_loss_clip", "finetune_loss_t5"):
        assert key in metrics and metrics[key] > 0
    assert metrics["kd_epochs"] == 3
    fedavg = replies[0].content["arrays"].to_torch_state_dict()  # the global weights are KD's, not an average
    new = arrays.to_torch_state_dict()
    assert any(not torch.equal(new[k], fedavg[k]) for k in new)
    strategy.after_round(1, arrays)
    summary = strategy.summary.data["rounds"][0]["server_training"]
    assert len(summary["kd"]["loss_t5"]) == 3 and len(summary["finetune"]["loss_clip"]) == 2


def test_server_generator_merge_is_checkpointed_and_sent_to_nodes(data_root, tmp_path, monkeypatch):  # noqa: F811
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what a ServerApp process has; messages need it
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    extra = {"aggregation": "kd", "server-generator.mode": "merge", "server-generator.epochs": 3,
             "server-generator.checkpoint-frequency": 1,
             "server-generator.send-to-nodes": True, "kd.epochs": 1, "train.augment-to": 20}
    cfg, replies = _node_replies(data_root, tmp_path, extra)
    assert cfg.sample_source() == "server-generator"
    strategy = _strategy(cfg, tmp_path)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert strategy.state.server_bank.classes == CLASSES
    strategy.after_round(1, arrays)
    assert (tmp_path / "run" / "generators" / "generator_server.safetensors").is_file()
    assert (tmp_path / "run" / "generators" / "generator_server_round_1.safetensors").is_file()
    assert 0.0 <= metrics["server_gen_teacher_acc"] <= 1.0

    class Grid:  # the two nodes of the test
        def get_node_ids(self):
            return [1, 2]

    messages = list(strategy.configure_train(2, replies[0].content["arrays"], ConfigRecord({}), Grid()))
    assert messages and "server-generator" in messages[0].content
    # a node holding only 'rain' fills dog and siren up to train.augment-to with the server's samples
    rc = run_config(data_root, tmp_path, **{"train.augment-to": 20, "data.partition": "explicit",
                                            "nodes.0.classes": "dog,siren", "nodes.1.classes": "rain"})
    ctx = Context(run_id=1, node_id=7, state=RecordDict(), run_config=rc, node_config={"partition-id": 1, "num-partitions": 2})
    content = server_content(load_config(rc), 2)
    for name in ("server-generator", "server-generator-meta"):
        content[name] = messages[0].content[name]
    reply = train(make_message(content), ctx)
    assert reply.content["metrics"]["augmented_samples"] == 20 + 20 + (20 - reply.content["metrics"]["num-examples"])


def test_kd_without_a_sample_source_is_a_config_error(data_root, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="aggregation='kd'.*generator.mode='off'"):
        load_config(run_config(data_root, tmp_path, aggregation="kd"))
    with pytest.raises(ConfigError, match="server-generator.mode='merge' needs node generators"):
        load_config(run_config(data_root, tmp_path, **{"server-generator.mode": "merge"}))
    cfg = load_config(run_config(data_root, tmp_path, aggregation="kd", **{"server-generator.mode": "data-free"}))
    assert cfg.sample_source() == "server-generator"


def test_data_free_kd_round_needs_no_uploaded_generators(data_root, tmp_path):  # noqa: F811
    extra = {"generator.mode": "off", "aggregation": "kd", "server-generator.mode": "data-free", "server-generator.kind": "gan",
             "server-generator.steps": 20, "server-generator.checkpoint-frequency": 1, "kd.epochs": 2,
             "kd.samples-per-class": 4}
    cfg, replies = _node_replies(data_root, tmp_path, extra)
    assert all(GENERATORS not in r.content for r in replies)
    strategy = _strategy(cfg, tmp_path)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["kd_samples"] == 4 * 3
    assert "server_gen_match" in metrics and 0.0 <= metrics["server_gen_teacher_acc"] <= 1.0
    strategy.after_round(1, arrays)
    assert (tmp_path / "run" / "generators" / "generator_server_round_1.safetensors").is_file()
    assert strategy.state.server_bank.classes == CLASSES


def test_best_checkpoint_follows_validation_accuracy(tmp_path) -> None:
    """adapters_best.safetensors: the round with the best global validation accuracy, kept across a resume."""
    from common.checkpoints import load_adapters
    from common.config import load_config
    from common.models.adapters import AdapterConfig, Adapters
    from common.records import module_to_arrays
    from server_app.checkpoint import CheckpointStep
    from server_app.round_state import NodeReplies, RoundState
    from server_app.run_context import ServerRun

    cfg = load_config({"adapter.hidden-dim": 16, "adapter.heads": 2, "text-encoder.t5-tokens": 2})
    names = ["dog", "rain"]
    targets = ClassTensors(names, torch.randn(2, 768), torch.randn(2, 2, 4096))
    acfg = AdapterConfig.from_sections(cfg.adapter, cfg.audio_encoder, cfg.text_encoder, 768, 4096)
    run = ServerRun(run_dir=tmp_path, targets=targets, template=Adapters.seeded(acfg, cfg.seed), adapter_config=acfg.to_dict(),
                    config_hash="h", num_rounds=4, device=torch.device("cpu"))

    def round_state(r: int, val: float | None) -> RoundState:
        state = RoundState(r, None, NodeReplies(), arrays=module_to_arrays(Adapters.seeded(acfg, cfg.seed)))
        if val is not None:
            state.evaluate_metrics = {"val_retrieval_acc": val, "test_retrieval_acc": 1.0 - val}
        return state

    step = CheckpointStep(run, "kd", True, 1, "generator", 5)
    best = tmp_path / "checkpoints" / "adapters_best.safetensors"
    step(round_state(1, None))
    assert not best.exists()  # no validation clips: nothing to select by
    for r, val in ((2, 0.5), (3, 0.4), (4, 0.5)):
        step(round_state(r, val))
    _, meta = load_adapters(best)
    assert meta["round"] == 2 and meta["val_retrieval_acc"] == 0.5  # ties keep the earlier round
    resumed = CheckpointStep(run, "kd", True, 1, "generator", 5)  # a resumed run competes with the earlier best
    resumed(round_state(5, 0.45))
    assert load_adapters(best)[1]["round"] == 2
    resumed(round_state(6, 0.75))
    assert load_adapters(best)[1]["round"] == 6


def test_ema_checkpoint_averages_rounds_and_survives_resume(tmp_path) -> None:
    from common.checkpoints import load_adapters
    from common.config import load_config
    from common.models.adapters import AdapterConfig, Adapters
    from common.records import module_to_arrays
    from server_app.checkpoint import CheckpointStep
    from server_app.round_state import NodeReplies, RoundState
    from server_app.run_context import ServerRun

    cfg = load_config({"adapter.hidden-dim": 16, "adapter.heads": 2, "text-encoder.t5-tokens": 2})
    targets = ClassTensors(["dog", "rain"], torch.randn(2, 768), torch.randn(2, 2, 4096))
    acfg = AdapterConfig.from_sections(cfg.adapter, cfg.audio_encoder, cfg.text_encoder, 768, 4096)
    run = ServerRun(run_dir=tmp_path, targets=targets, template=Adapters.seeded(acfg, cfg.seed), adapter_config=acfg.to_dict(),
                    config_hash="h", num_rounds=3, device=torch.device("cpu"))
    models = [Adapters.seeded(acfg, cfg.seed) for _ in range(3)]
    for i, m in enumerate(models):
        for p in m.parameters():
            torch.nn.init.constant_(p, float(i + 1))  # round r's global adapters: every weight = r
    step = CheckpointStep(run, "fedavg", True, 1, "generator", 5, ema_decay=0.5)
    step(RoundState(1, None, NodeReplies(), arrays=module_to_arrays(models[0])))
    step(RoundState(2, None, NodeReplies(), arrays=module_to_arrays(models[1])))
    ema, meta = load_adapters(tmp_path / "checkpoints" / "adapters_ema.safetensors")
    assert meta["round"] == 2 and meta["ema-decay"] == 0.5
    assert all(torch.allclose(p, torch.full_like(p, 1.5)) for p in ema.parameters())  # 0.5 * 1 + 0.5 * 2
    resumed = CheckpointStep(run, "fedavg", True, 1, "generator", 5, ema_decay=0.5)  # continues the average
    resumed(RoundState(3, None, NodeReplies(), arrays=module_to_arrays(models[2])))
    ema, _ = load_adapters(tmp_path / "checkpoints" / "adapters_ema.safetensors")
    assert all(torch.allclose(p, torch.full_like(p, 2.25)) for p in ema.parameters())  # 0.5 * 1.5 + 0.5 * 3
    off = CheckpointStep(ServerRun(run_dir=tmp_path / "off", targets=targets, template=Adapters.seeded(acfg, cfg.seed),
                                   adapter_config=acfg.to_dict(), config_hash="h", num_rounds=1, device=torch.device("cpu")),
                         "fedavg", True, 1, "generator", 5, ema_decay=0.0)
    off(RoundState(1, None, NodeReplies(), arrays=module_to_arrays(models[0])))
    assert not (tmp_path / "off" / "checkpoints" / "adapters_ema.safetensors").exists()
