"""Generators (VAE, GAN), granularity planning, checkpoint names, metadata checks, round trips."""

from __future__ import annotations

import shutil

import pytest
import torch
from flwr.app import RecordDict

from common.checkpoints import load_tensors
from common.generator_bank import (
    GeneratorBank,
    GeneratorCheckpointError,
    Unit,
    bank_from_records,
    bank_to_records,
    checkpoint_name,
    plan_units,
)
from common.metrics import frechet_distance
from common.models.generator_training import train_generator
from common.models.generators import (
    ConditionalGAN,
    ConditionalVAE,
    GeneratorSpec,
    GeneratorTrainSettings,
    build_generator,
)

L, H = 2, 4
NAMES = ["dog", "rooster", "siren", "rain"]
GROUPS = {"animals": ["dog", "rooster"], "mechanical": ["siren"]}
KEY = "ast-tiny-L2-H4-abc123"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models are step-overhead bound: a second OpenMP thread only adds spin-waiting, which
    made these tests ~10x slower on a 2-core machine running other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _spec(kind: str = "vae", num_classes: int = 2, **kw) -> GeneratorSpec:
    base = dict(kind=kind, num_classes=num_classes, tokens=L, dim=H, latent_dim=4, hidden_dim=32, num_layers=2, token_dim=0, class_dim=8)
    base.update(kw)
    return GeneratorSpec(**base)


def _settings(**kw) -> GeneratorTrainSettings:
    """Generator training settings for these tiny tests (batch 32, per-kind lr, seed 0, no step floor)."""
    base = dict(batch_size=32, lr=None, seed=0, min_steps=0)
    return GeneratorTrainSettings(**{**base, **kw})


def _mixture(n_per_class: int = 64, num_classes: int = 2, seed: int = 0, offset: float = 0.0):
    """Well separated classes in (L, H) with a large common offset (exercises standardisation)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, L, H, generator=g) * 3 + offset
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = means[labels] + 0.5 * torch.randn(len(labels), L, H, generator=g)
    perm = torch.randperm(len(labels), generator=g)
    return x[perm], labels[perm], means


def _bank(granularity: str, kind: str = "vae", epochs: int = 2) -> GeneratorBank:
    x, y, _ = _mixture(n_per_class=6, num_classes=len(NAMES))
    bank = GeneratorBank.create(_spec(kind), granularity, NAMES, GROUPS if granularity == "per_group" else None, seed=0)
    bank.train(x, y, NAMES, _settings(epochs=epochs, batch_size=8))
    return bank


# ----------------------------------------------------------------------------------- spec
def test_spec_round_trips_and_rejects_unknown_keys():
    spec = _spec("gan", num_classes=3)
    assert GeneratorSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown GeneratorSpec key.*colour.*size"):
        GeneratorSpec.from_dict({**spec.to_dict(), "size": 1, "colour": 2})
    with pytest.raises(ValueError, match="kind"):
        _spec("diffusion")
    with pytest.raises(ValueError, match="latent_dim"):
        _spec(latent_dim=0)


# ----------------------------------------------------------------------------------- training
@pytest.mark.parametrize("kind", ["vae", "gan"])
def test_training_reduces_loss_and_moves_class_samples_to_their_means(kind):
    x, y, means = _mixture(offset=50.0)
    torch.manual_seed(0)
    model = build_generator(_spec(kind), seed=0)
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(2).repeat_interleave(200)

    # Untrained samples sit at the data mean, not at a class. Fitting the standardisation here also
    # skips the GAN's class-offset initialisation (train_generator does it only with the first
    # fit), so the class separation below is learned by the generator itself.
    model.fit_normalization(x)
    before = model.sample(labels, torch.Generator().manual_seed(1))
    history = train_generator(model, x, y, _settings(epochs=60 if kind == "vae" else 100, batch_size=32, seed=0))
    after = model.sample(labels, g)

    if kind == "vae":
        assert history["loss"][-1] < 0.5 * history["loss"][0]
        assert history["recon"][-1] < history["recon"][0]
    else:  # adversarial losses oscillate by design; the generator's moment term must fall
        assert sum(history["mm"][-5:]) < 0.5 * sum(history["mm"][:5])
        assert set(history) == {"loss_d", "loss_g", "r1", "fm", "mm", "seconds"}
    assert all(isinstance(v, float) for values in history.values() for v in values)

    for c in range(2):
        own = (after[labels == c].mean(0) - means[c]).norm()
        other = (after[labels == c].mean(0) - means[1 - c]).norm()
        was = (before[labels == c].mean(0) - means[c]).norm()
        assert own < 0.5 * other and own < 0.5 * was, (kind, c, float(own), float(other), float(was))
    fd_before = frechet_distance(before.flatten(1), x.flatten(1))
    fd_after = frechet_distance(after.flatten(1), x.flatten(1))
    assert fd_after < 0.5 * fd_before


def test_sample_is_in_original_scale_and_reproducible():
    x, y, _ = _mixture(offset=100.0)
    model = build_generator(_spec(), seed=0)
    train_generator(model, x, y, _settings(epochs=2, batch_size=32))
    assert torch.allclose(model.mean, x.mean(0)) and bool(model.normalization_fitted)
    labels = torch.tensor([0, 1, 1])
    a = model.sample(labels, torch.Generator().manual_seed(5))
    b = model.sample(labels, torch.Generator().manual_seed(5))
    assert a.shape == (3, L, H) and torch.equal(a, b)
    assert (a.mean() - 100.0).abs() < 20.0
    with pytest.raises(ValueError, match="model-local class indices"):
        model.sample(torch.tensor([2]))
    with pytest.raises(ValueError, match=r"\[N, 2, 4\]"):
        train_generator(model, torch.zeros(4, 3, 4), torch.zeros(4, dtype=torch.long), _settings(epochs=1))


def test_normalization_is_kept_when_training_continues():
    x, y, _ = _mixture()
    model = build_generator(_spec(), seed=0)
    train_generator(model, x, y, _settings(epochs=1))
    mean = model.mean.clone()
    train_generator(model, x + 10.0, y, _settings(epochs=1))
    assert torch.equal(model.mean, mean)


def test_model_classes_match_kind():
    assert isinstance(build_generator(_spec("vae")), ConditionalVAE)
    assert isinstance(build_generator(_spec("gan")), ConditionalGAN)
    with pytest.raises(ValueError, match="kind 'vae'"):
        ConditionalVAE(_spec("gan"))


# ----------------------------------------------------------------------------------- units
def test_plan_units_for_each_granularity():
    assert plan_units("unified", NAMES) == [Unit("unified", "unified", NAMES)]
    assert [(u.name, u.kind, u.classes) for u in plan_units("per_class", NAMES)] == [(c, "class", [c]) for c in NAMES]
    groups = plan_units("per_group", NAMES, GROUPS)
    assert [(u.name, u.classes) for u in groups] == [("animals", ["dog", "rooster"]), ("mechanical", ["siren"]), ("other", ["rain"])]
    # a node holding only some classes: groups without its classes get no model
    partial = plan_units("per_group", ["siren"], {"animals": ["dog"], "mechanical": ["siren"]}, known_classes=NAMES)
    assert [(u.name, u.classes) for u in partial] == [("mechanical", ["siren"])]


def test_plan_units_errors_name_group_and_class():
    with pytest.raises(ValueError, match="class-groups.animals: unknown class 'cat'"):
        plan_units("per_group", NAMES, {"animals": ["dog", "cat"]})
    with pytest.raises(ValueError, match="'dog' is in two groups, 'animals' and 'pets'"):
        plan_units("per_group", NAMES, {"animals": ["dog"], "pets": ["dog"]})
    with pytest.raises(ValueError, match="granularity 'per_node'"):
        plan_units("per_node", NAMES)
    with pytest.raises(ValueError, match="same file name part"):
        plan_units("per_class", ["car horn", "car_horn"])


# ----------------------------------------------------------------------------------- file names
def test_checkpoint_names_follow_the_seed_convention():
    unit_c, unit_g = Unit("dog", "class", ["dog"]), Unit("animals", "group", ["dog"])
    assert checkpoint_name("vae", 0, Unit("unified", "unified")) == "vae_node0.safetensors"
    assert checkpoint_name("vae", 3, unit_c) == "vae_node3_class_dog.safetensors"
    assert checkpoint_name("vae", 3, unit_g, round=5) == "vae_node3_group_animals_round_5.safetensors"
    assert checkpoint_name("vae", None, Unit("unified", "unified"), 2) == "vae_server_round_2.safetensors"
    assert checkpoint_name("g", 1, Unit("church bells", "class", [])) == "g_node1_class_church_bells.safetensors"
    with pytest.raises(ValueError, match="base name"):
        checkpoint_name("a/b", 0, unit_c)


@pytest.mark.parametrize(
    "granularity, parts",
    [
        ("unified", [""]),
        ("per_class", ["_class_dog", "_class_rooster", "_class_siren", "_class_rain"]),
        ("per_group", ["_group_animals", "_group_mechanical", "_group_other"]),
    ],
)
def test_saved_files_per_granularity_and_round_frequency(tmp_path, granularity, parts):
    bank = _bank(granularity, epochs=1)
    written = []
    for rnd in range(1, 5):
        written += _save(bank, tmp_path, "gen", 2, rnd, 2, KEY)
    expected = {f"gen_node2{p}.safetensors" for p in parts}
    expected |= {f"gen_node2{p}_round_{r}.safetensors" for p in parts for r in (2, 4)}
    assert {p.name for p in tmp_path.iterdir()} == expected
    assert {p.name for p in written} == expected
    for p in parts:  # the file without a suffix is the latest round
        _, meta = load_tensors(tmp_path / f"gen_node2{p}.safetensors")
        assert meta["round"] == 4
    # frequency 0: only the latest files
    other = tmp_path / "f0"
    _save(bank, other, "gen", 2, 4, 0, KEY)
    assert {p.name for p in other.iterdir()} == {f"gen_node2{p}.safetensors" for p in parts}


def test_checkpoint_metadata(tmp_path):
    bank = _bank("per_group", kind="gan", epochs=1)
    _save(bank, tmp_path, "gen", 1, 3, 1, KEY)
    tensors, meta = load_tensors(tmp_path / "gen_node1_group_animals.safetensors")
    assert meta["type"] == "gan" and meta["granularity"] == "per_group"
    assert (meta["unit-kind"], meta["unit-name"], meta["classes"]) == ("group", "animals", ["dog", "rooster"])
    assert meta["embedding-shape"] == [L, H] and meta["encoder-key"] == KEY
    assert GeneratorSpec.from_dict(meta["generator-spec"]) == bank.models["animals"].spec
    assert meta["round"] == 3 and meta["node-id"] == 1 and meta["created"]
    assert meta["class-counts"] == {"dog": 6, "rooster": 6}
    assert "mean" in tensors and "std" in tensors  # standardisation travels with the weights


# ----------------------------------------------------------------------------------- load + checks
@pytest.mark.parametrize("granularity", ["unified", "per_class", "per_group"])
@pytest.mark.parametrize("kind", ["vae", "gan"])
def test_save_load_round_trip_gives_identical_samples(tmp_path, granularity, kind):
    bank = _bank(granularity, kind=kind)
    _save(bank, tmp_path, "gen", 0, 1, 1, KEY)
    groups = GROUPS if granularity == "per_group" else None
    loaded = _load(tmp_path, "gen", 0, granularity, NAMES, (L, H), KEY, class_groups=groups)
    from_round = _load(tmp_path, "gen", 0, granularity, NAMES, (L, H), KEY, class_groups=groups, round=1)
    content = RecordDict()
    bank_to_records(bank, content, KEY, 0, 1)
    via_record, _ = bank_from_records(content, "record", (L, H), expected_granularity=granularity, expected_encoder_key=KEY)
    for cls in NAMES:
        ref = bank.sample(cls, 7, seed=11)
        for other in (loaded, from_round, via_record):
            assert torch.equal(other.sample(cls, 7, seed=11), ref)
    assert loaded.classes == bank.classes and loaded.class_counts == bank.class_counts
    assert not torch.equal(bank.sample("dog", 7, seed=11), bank.sample("dog", 7, seed=12))


def test_per_group_load_without_groups_finds_the_group_files(tmp_path):
    bank = _bank("per_group")
    _save(bank, tmp_path, "gen", 0, 2, 1, KEY)  # also writes _round_2 copies, which must be ignored
    loaded = _load(tmp_path, "gen", 0, "per_group", NAMES, (L, H), KEY)
    assert sorted(u.name for u in loaded.units) == ["animals", "mechanical", "other"]
    assert torch.equal(loaded.sample("rain", 3, 0), bank.sample("rain", 3, 0))


def test_granularity_mismatch_names_file_and_field(tmp_path):
    _save(_bank("per_class"), tmp_path, "gen", 0, 1, 0, KEY)
    with pytest.raises(GeneratorCheckpointError) as err:
        _load(tmp_path, "gen", 0, "unified", NAMES, (L, H), KEY)
    msg = str(err.value)
    assert "gen_node0.safetensors" in msg and "granularity is 'per_class', expected 'unified'" in msg
    # a file at the expected name but written with another granularity
    shutil.copy(tmp_path / "gen_node0_class_dog.safetensors", tmp_path / "gen_node0.safetensors")
    with pytest.raises(GeneratorCheckpointError, match=r"gen_node0\.safetensors': granularity is 'per_class', expected 'unified'"):
        _load(tmp_path, "gen", 0, "unified", NAMES, (L, H), KEY)


def test_missing_class_names_class_and_files(tmp_path):
    _save(_bank("per_class"), tmp_path, "gen", 0, 1, 0, KEY)
    (tmp_path / "gen_node0_class_siren.safetensors").unlink()
    with pytest.raises(GeneratorCheckpointError, match=r"missing generator for class\(es\) 'siren'.*gen_node0_class_siren\.safetensors"):
        _load(tmp_path, "gen", 0, "per_class", NAMES, (L, H), KEY)
    # a unified model that does not cover a selected class
    other = tmp_path / "u"
    _save(_bank("unified"), other, "gen", 0, 1, 0, KEY)
    with pytest.raises(GeneratorCheckpointError, match=r"'cat'.*gen_node0\.safetensors"):
        _load(other, "gen", 0, "unified", NAMES + ["cat"], (L, H), KEY)
    # a subset of the classes loads fine
    assert _load(tmp_path, "gen", 0, "per_class", ["dog", "rain"], (L, H), KEY).classes == ["dog", "rain"]


@pytest.mark.parametrize(
    "override, field, found, expected",
    [
        ({"expected_shape": (12, 768)}, "embedding-shape", "[2, 4]", "[12, 768]"),
        ({"encoder_key": "ast-real-L12-H768"}, "encoder-key", f"'{KEY}'", "'ast-real-L12-H768'"),
        ({"kind": "gan"}, "type", "'vae'", "'gan'"),
    ],
)
def test_metadata_mismatch_names_file_field_found_expected(tmp_path, override, field, found, expected):
    _save(_bank("unified"), tmp_path, "gen", 0, 1, 0, KEY)
    kwargs = dict(granularity="unified", classes=NAMES, expected_shape=(L, H), encoder_key=KEY)
    kwargs.update(override)
    with pytest.raises(GeneratorCheckpointError) as err:
        GeneratorBank.from_pretrained(tmp_path, base="gen", node_id=0, **kwargs)
    assert str(err.value) == f"generator checkpoint '{tmp_path / 'gen_node0.safetensors'}': {field} is {found}, expected {expected}"


def test_record_round_trip_checks_metadata():
    content = RecordDict()
    bank_to_records(_bank("per_class"), content, KEY, 4, 2)
    _, meta = bank_from_records(content, "reply of node 4")
    assert meta["granularity"] == "per_class" and len(meta["units"]) == len(NAMES)
    with pytest.raises(GeneratorCheckpointError, match="node 4.*encoder-key"):
        bank_from_records(content, "reply of node 4", expected_encoder_key="other")
    with pytest.raises(GeneratorCheckpointError, match="granularity is 'per_class', expected 'unified'"):
        bank_from_records(content, "record", expected_granularity="unified")


# ----------------------------------------------------------------------------------- bank
def test_bank_sampling_and_training_errors():
    bank = _bank("per_group")
    x, y = bank.sample_dataset({"rain": 3, "dog": 2, "siren": 0}, NAMES, seed=0)
    assert x.shape == (5, L, H) and y.tolist() == [3, 3, 3, 0, 0]
    assert bank.unit_for("rooster").name == "animals"
    with pytest.raises(KeyError, match="no generator for class 'cat'"):
        bank.sample("cat", 1, 0)
    fresh = GeneratorBank.create(_spec(), "per_class", NAMES)
    xs, ys, _ = _mixture(n_per_class=4, num_classes=3)  # no 'rain' clips
    with pytest.raises(ValueError, match="no training embeddings for generator class\\(es\\): rain"):
        fresh.train(xs, ys, NAMES, _settings(epochs=1))


def test_bank_evaluate_reports_per_class_and_pooled_quality():
    x, y, _ = _mixture(n_per_class=12, num_classes=len(NAMES), seed=1)
    bank = GeneratorBank.create(_spec(), "unified", NAMES, seed=0)
    bank.train(x[:32], y[:32], NAMES, _settings(epochs=5, batch_size=16))
    quality = bank.evaluate(x[32:], y[32:], NAMES, reference=x[:32], reference_labels=y[:32], k=2)
    assert set(quality) == set(NAMES) | {"all"}
    assert quality["all"]["n_real"] == 16 and quality["all"]["n_fake"] == 32
    assert all(q["fd"] >= 0 and 0 <= q["precision"] <= 1 for q in quality.values())


def _save(bank, directory, base, node_id, rnd, every, key):
    return bank.save_pretrained(directory, base=base, node_id=node_id, round=rnd, checkpoint_every=every, encoder_key=key)


def _load(directory, base, node_id, granularity, classes, shape, key, **kwargs):
    return GeneratorBank.from_pretrained(directory, base=base, node_id=node_id, granularity=granularity, classes=classes,
                                         expected_shape=shape, encoder_key=key, **kwargs)
