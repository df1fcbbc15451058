"""Site-level differential privacy: the accountant, the noise, the DP-SGD twin, the ledger and the budget."""

from __future__ import annotations

import json
import math

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from scipy.optimize import brentq
from scipy.stats import norm

from client_app.app import NODE_DATA, train
from common.config import ConfigError, load_config
from common.models.adapters import AdapterConfig, Adapters
from common.privacy import Release, calibrate_noise, epsilon, gaussian_release
from common.privacy.dp_adapters import DPTwin
from common.privacy.dp_sgd import DPSGDSettings, train_adapters_dp
from common.records import CLASS_MEANS, CLASS_MEANS_META, CONFIG, RUN_IDENTITY, ClassTensors
from common.training import TrainSettings
from tests.test_client_app import CLASSES, data_root, make_message, run_config, server_content  # noqa: F401

DELTA = 1e-5
SETTINGS = TrainSettings(epochs=2, batch_size=8, lr_clip=1e-3, lr_t5=1e-3, weight_decay=0.01, cosine_weight=0.5,
                         contrastive_weight=1.0, temperature=0.1, proximal_mu=0.0, seed=0, precision="fp32")
TINY = AdapterConfig(in_dim=8, in_tokens=3, clip_dim=6, t5_dim=5, t5_tokens=4, hidden_dim=16, heads=2, dropout=0.1)


def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact epsilon of one Gaussian mechanism of sensitivity 1 and noise ``sigma`` (Balle & Wang 2018)."""
    def delta_of(eps: float) -> float:
        return norm.cdf(-eps * sigma + 1 / (2 * sigma)) - math.exp(eps) * norm.cdf(-eps * sigma - 1 / (2 * sigma))
    return brentq(lambda e: delta_of(e) - delta, 0.0, 100.0)


@pytest.mark.parametrize("sigma,k", [(5.0, 5), (10.0, 5), (2.0, 1)])
def test_the_accountant_matches_the_exact_gaussian_mechanism(sigma, k):
    """k Gaussian releases at sigma are one Gaussian release at sigma / sqrt(k): an exact, independent figure."""
    exact = analytic_gaussian_epsilon(sigma / math.sqrt(k), DELTA)
    releases = [gaussian_release(sigma)] * k
    prv, rdp = epsilon(releases, DELTA, "prv"), epsilon(releases, DELTA, "rdp")
    assert prv == pytest.approx(exact, rel=0.02)
    assert exact <= rdp <= exact * 1.15  # RDP is an upper bound, and a close one here


def test_rdp_and_prv_agree_on_a_subsampled_schedule():
    """DP-SGD on MNIST as TF-Privacy's tutorial runs it (sigma 1.1, q = 256/60000, 60 epochs)."""
    steps = 60 * math.ceil(60000 / 256)
    schedule = [Release("dp-sgd", 1.1, 256 / 60000, steps)]
    rdp, prv = epsilon(schedule, DELTA, "rdp"), epsilon(schedule, DELTA, "prv")
    assert prv <= rdp <= prv * 1.15
    assert 2.0 < rdp < 3.2


def test_calibration_spends_the_budget_with_what_was_spent_before():
    spent = [gaussian_release(3.0)]

    def plan(sigma: float) -> list[Release]:
        return [Release("dp-sgd", sigma, 0.25, 40), gaussian_release(2.0)]

    sigma = calibrate_noise(3.0, DELTA, spent, plan)
    assert epsilon([*spent, *plan(sigma)], DELTA) <= 3.0
    assert epsilon([*spent, *plan(sigma * 0.97)], DELTA) > 3.0  # the smallest noise that fits, within the tolerance
    with pytest.raises(ValueError, match="cannot be met"):
        calibrate_noise(0.5, DELTA, [gaussian_release(0.5)] * 10, plan)


@pytest.mark.parametrize("mode", ["book-keeping", "per-sample", "ghost"])
def test_the_twin_computes_the_adapters_and_training_keeps_their_keys(mode):
    adapters = Adapters.seeded(TINY, 0).eval()
    twin = DPTwin(adapters).eval()
    x = torch.randn(5, 3, 8)
    with torch.no_grad():
        (a_clip, a_t5), (t_clip, t_t5) = adapters(x), twin(x)
    assert torch.allclose(a_clip, t_clip, atol=1e-6) and torch.allclose(a_t5, t_t5, atol=1e-6)  # t5: 4 query latents
    shapes = {k: v.shape for k, v in adapters.state_dict().items()}
    before = {k: v.clone() for k, v in adapters.state_dict().items()}
    x, y = torch.randn(40, 3, 8), torch.randint(0, 4, (40,))
    train_adapters_dp(adapters, x, y, torch.randn(4, 6), torch.randn(4, 4, 5), SETTINGS,
                      DPSGDSettings.schedule(40, 8, 1, 1.0, 1.0), mode=mode)
    assert {k: v.shape for k, v in adapters.state_dict().items()} == shapes
    for key in ("clip.pos", "clip.latents", "t5.attn.in_proj_weight", "t5.attn.out_proj.weight", "t5.out.1.weight"):
        assert not torch.equal(adapters.state_dict()[key], before[key]), key  # every kind of weight trained
    assert not any(m._forward_hooks or m._backward_hooks for m in adapters.modules())  # no Opacus hooks left


def test_book_keeping_per_sample_and_ghost_clipping_take_the_same_steps(monkeypatch):
    """The three ways of clipping each clip's gradient compute the same clipped sum (same batches, no noise):
    the book-keeping mode against Opacus' two, the independent reference."""
    import common.privacy.dp_sgd as dp_sgd

    monkeypatch.setattr(dp_sgd, "secure_generator", lambda device: torch.Generator(device).manual_seed(0))
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 3, 8, generator=g), torch.randint(0, 4, (40,), generator=g)
    tc, tt = torch.randn(4, 6, generator=g), torch.randn(4, 4, 5, generator=g)
    states = {}
    for mode in dp_sgd.MODES:
        adapters = Adapters.seeded(TINY, 0)
        train_adapters_dp(adapters, x, y, tc, tt, SETTINGS, DPSGDSettings(0.0, 0.05, 0.3, 4), mode=mode)
        states[mode] = adapters.state_dict()
    before = Adapters.seeded(TINY, 0).state_dict()
    assert any(not torch.equal(states["ghost"][k], before[k]) for k in before)
    for key in before:
        for mode in ("book-keeping", "ghost"):
            assert torch.allclose(states["per-sample"][key], states[mode][key], atol=1e-5, rtol=1e-4), (mode, key)


class _Mixed(torch.nn.Module):
    """Every case of the clipping rules: a Linear over many tokens with few weights (the clip's own gradient
    measured), one over few tokens (ghost norm), one without bias, LayerNorms over tokens and over [B, d]."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(2)
        self.many = torch.nn.Linear(2, 3)
        self.few = torch.nn.Linear(30, 7, bias=False)
        self.norm_flat = torch.nn.LayerNorm(7)

    def forward(self, x):  # x [B, 10, 2]
        return self.norm_flat(self.few(torch.tanh(self.many(self.norm(x))).flatten(1)))


def test_per_clip_clipping_matches_per_sample_gradients_from_vmap():
    """The book-keeping norms and clipped sums against per-sample gradients computed by torch.func."""
    from torch.func import functional_call, grad, vmap

    from common.privacy.clipping import PerClipClipping

    torch.manual_seed(0)
    model, x = _Mixed(), torch.randn(6, 10, 2)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of(p, xi):
        return functional_call(model, p, (xi[None],)).pow(2).sum()

    per_sample = vmap(grad(loss_of), in_dims=(None, 0))(params, x)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per_sample.values()))
    clipping = PerClipClipping(model)
    sums, got_norms = clipping.clipped_sums(model(x).pow(2).sum(1), max_norm=float(norms.median()))
    assert torch.allclose(got_norms, norms, rtol=1e-4)
    factor = (norms.median() / (norms + 1e-6)).clamp(max=1.0)
    assert (factor < 1).any() and (factor == 1).any()  # some clips clipped, some not
    for name, p in model.named_parameters():
        assert torch.allclose(sums[p], torch.einsum("b,b...->...", factor, per_sample[name]), atol=1e-5), name
    clipping.remove()
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(TypeError, match=r"no per-clip clipping rule for: conv \(Conv1d\)"):
        PerClipClipping(torch.nn.ModuleDict({"conv": torch.nn.Conv1d(1, 1, 1)}))


def test_dp_noise_comes_from_the_os_not_the_run_seed():
    """Two DP trainings with the same seed and data differ (the server cannot recompute the noise)."""
    x, y = torch.randn(40, 3, 8), torch.randint(0, 4, (40,))
    runs = []
    for _ in range(2):
        adapters = Adapters.seeded(TINY, 0)
        train_adapters_dp(adapters, x, y, torch.randn(4, 6, generator=torch.Generator().manual_seed(1)),
                          torch.randn(4, 4, 5, generator=torch.Generator().manual_seed(2)), SETTINGS,
                          DPSGDSettings.schedule(40, 8, 1, 1.0, 1.0))
        runs.append(adapters.state_dict())
    assert any(not torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_dp_with_generators_is_a_config_error_naming_the_keys():
    with pytest.raises(ConfigError, match="privacy.dp.*generator.mode='generator-training'"):
        load_config({"privacy.dp": True, "generator.mode": "generator-training"})
    with pytest.raises(ConfigError, match="train.augment-to"):
        load_config({"privacy.dp": True, "train.augment-to": 8})


def _dp_context(root, cache, run_cfg: dict, node_cfg: dict) -> Context:
    return Context(run_id=1, node_id=7, state=RecordDict(), run_config=run_config(root, cache, **run_cfg),
                   node_config={"partition-id": 0, "num-partitions": 2, **node_cfg})


def _message(cfg, server_round: int, identity: str = "run-a"):
    content = server_content(cfg, server_round, run_name="dp")
    content[CONFIG] = ConfigRecord({**dict(content[CONFIG]), RUN_IDENTITY: identity})
    return make_message(content)


def test_a_dp_site_releases_noisy_counts_once_and_keeps_its_ledger(data_root, tmp_path):  # noqa: F811
    rc = {"privacy.dp": True, "privacy.epsilon": 8.0, "num-rounds": 2, "train.local-epochs": 1}
    cfg = load_config(run_config(data_root, tmp_path, **rc))
    NODE_DATA.clear()
    ctx = _dp_context(data_root, tmp_path, rc, {})
    first = train(_message(cfg, 1), ctx).content
    m1 = first["metrics"]
    assert m1["dp"] == 1 and 0 < m1["dp_epsilon_run"] <= 8.0 and m1["dp_noise_multiplier"] > 0
    assert not {"train_loss", "cache_hits", "cache_misses", "skipped_files"} & set(m1)  # exact counts stay home
    means1 = ClassTensors.from_records(first, CLASS_MEANS, CLASS_MEANS_META)
    assert means1.class_names == []  # privacy.means = "final": no means before the last round
    assert m1["withheld_clips"] == m1["num-examples"]  # what the server's check adds up
    ledger = json.loads(next((tmp_path / "privacy").glob("ledger_*_p0.json")).read_text())
    assert [r["mechanism"] for r in ledger["releases"]] == ["dp-sgd", "gaussian"]  # DP-SGD and the counts
    last = train(_message(cfg, 2), ctx).content
    m2 = last["metrics"]
    assert m2["num-examples"] == m1["num-examples"]  # the run's noisy counts, drawn once
    means2 = ClassTensors.from_records(last, CLASS_MEANS, CLASS_MEANS_META)
    assert int(means2.counts.sum()) + m2["withheld_clips"] == m2["num-examples"]
    assert m1["dp_epsilon_run"] < m2["dp_epsilon_run"] <= 8.0 * (1 + 1e-6)
    ledger = json.loads(next((tmp_path / "privacy").glob("ledger_*_p0.json")).read_text())
    assert [r["round"] for r in ledger["releases"]] == [1, 1, 2, 2]  # round 2: DP-SGD and the class sums


def test_a_site_refuses_the_round_that_would_exceed_its_own_budget(data_root, tmp_path):  # noqa: F811
    """The server asks for no DP at all; the site's node-config turns it on and caps its lifetime epsilon."""
    rc = {"num-rounds": 3, "train.local-epochs": 1, "privacy.noise-multiplier": 2.0, "privacy.epsilon": 1000.0}
    cfg = load_config(run_config(data_root, tmp_path, **rc))

    def run(cache, cap: float, rounds, identity: str = "run-a") -> list[float]:
        NODE_DATA.clear()
        ctx = Context(run_id=1, node_id=7, state=RecordDict(), run_config=run_config(data_root, cache, **rc),
                      node_config={"partition-id": 0, "num-partitions": 2, "privacy-epsilon": cap})
        return [train(_message(cfg, r, identity), ctx).content["metrics"]["dp_epsilon"] for r in rounds]

    free = run(tmp_path / "free", 1000.0, (1, 2, 3))  # what each round spends
    assert free[0] < free[1] < free[2]
    cap = (free[1] + free[2]) / 2
    assert run(tmp_path / "capped", cap, (1, 2)) == pytest.approx(free[:2])
    with pytest.raises(Exception, match=f"over node-config privacy-epsilon={cap:g}"):
        run(tmp_path / "capped", cap, (3,))
    # a later run on the same data starts from the site's ledger: its first round is refused as well
    with pytest.raises(Exception, match="over node-config privacy-epsilon"):
        run(tmp_path / "capped", cap, (1,), identity="run-b")


def test_a_run_that_spends_the_budget_meanwhile_makes_the_other_refuse_at_commit(data_root, tmp_path, monkeypatch):  # noqa: F811
    """Two runs on one host share the site's ledger: the budget is checked again under its lock before a release
    is recorded, so a run that planned its round before another one spent the rest of the budget refuses."""
    from client_app import privacy as site_privacy
    from client_app.ledger import PrivacyLedger

    rc = {"num-rounds": 1, "train.local-epochs": 1, "privacy.noise-multiplier": 2.0, "privacy.epsilon": 1000.0}
    cfg = load_config(run_config(data_root, tmp_path, **rc))
    ctx = Context(run_id=1, node_id=7, state=RecordDict(), run_config=run_config(data_root, tmp_path, **rc),
                  node_config={"partition-id": 0, "num-partitions": 2, "privacy-epsilon": 5.0})
    trained = site_privacy.PrivateTraining.train

    def train_while_another_run_spends(self, *args, **kwargs):
        other = PrivacyLedger(self.ledger.path, self.ledger.dataset, self.ledger.partition_id)
        other.append("run-b", "other", 1, [gaussian_release(1.0)] * 3)  # lands while this run trains
        return trained(self, *args, **kwargs)

    monkeypatch.setattr(site_privacy.PrivateTraining, "train", train_while_another_run_spends)
    NODE_DATA.clear()
    with pytest.raises(Exception, match="over node-config privacy-epsilon=5"):
        train(_message(cfg, 1), ctx)
    ledger = json.loads(next((tmp_path / "privacy").glob("ledger_*_p0.json")).read_text())
    assert {r["run_identity"] for r in ledger["releases"]} == {"run-b"}  # the refused round recorded nothing


def test_a_run_with_privacy_dp_rejects_replies_made_without_it(tmp_path):
    from server_app.round_state import parse_train_reply
    from server_app.validation import Rejected
    from tests.hostile_replies import as_reply, honest_content, server

    strategy = server(tmp_path)
    strategy.validator.dp_epsilon = 3.0  # what ReplyValidator.for_run sets from privacy.dp / privacy.epsilon

    def parse(metrics: dict):
        return parse_train_reply(as_reply(honest_content(0, metrics=metrics), 100), strategy.validator, set(), None,
                                 strategy._decode_reply)

    with pytest.raises(Rejected, match="not made under DP"):
        parse({})
    with pytest.raises(Rejected, match="over privacy.epsilon=3"):
        parse({"dp": 1, "dp_epsilon_run": 3.5, "dp_epsilon": 3.5})
    assert parse({"dp": 1, "dp_epsilon_run": 2.9, "dp_epsilon": 4.0}).partition_id == 0  # lifetime is the site's


def test_a_restarted_site_continues_its_accounting_and_its_counts(data_root, tmp_path):  # noqa: F811
    """A resumed run (same run identity) on a fresh node process: the ledger, not memory, carries the run."""
    rc = {"privacy.dp": True, "privacy.epsilon": 8.0, "num-rounds": 3, "train.local-epochs": 1}
    cfg = load_config(run_config(data_root, tmp_path, **rc))
    NODE_DATA.clear()
    first = train(_message(cfg, 1), _dp_context(data_root, tmp_path, rc, {})).content["metrics"]
    NODE_DATA.clear()  # the SuperNode restarted: a new process, a new Context
    second = train(_message(cfg, 2), _dp_context(data_root, tmp_path, rc, {})).content["metrics"]
    assert second["num-examples"] == first["num-examples"]  # the counts drawn in round 1, read back
    assert second["dp_epsilon_run"] > first["dp_epsilon_run"]  # composed with round 1, not restarted
    ledger = json.loads(next((tmp_path / "privacy").glob("ledger_*_p0.json")).read_text())
    assert [r["round"] for r in ledger["releases"]] == [1, 1, 2]  # round 2 drew no new counts


def test_central_dp_clips_every_site_to_the_bound_and_adds_noise_of_its_scale(tmp_path):
    """dp-fedavg: unweighted mean of updates clipped to C, plus N(0, (z C / m)^2) per coordinate."""
    from flwr.app import ArrayRecord

    from common.config import PrivacyConfig
    from server_app.aggregators import AGGREGATORS
    from server_app.round_state import RoundState

    sent = {"w": torch.zeros(20000)}
    big = torch.zeros(20000)
    big[0] = 100.0  # a site that tries to move the model by 100: clipped to C = 1
    small = torch.zeros(20000)
    small[1] = 0.5  # within the bound: unchanged
    privacy = PrivacyConfig(central_clip_norm=1.0, central_noise_multiplier=2.0)
    aggregator = AGGREGATORS["dp-fedavg"](None, privacy=privacy)

    class Replies:
        arrays = {0: ArrayRecord({"w": big}), 1: ArrayRecord({"w": small})}

    state = RoundState.__new__(RoundState)
    state.sent, state.replies, state.metrics = ArrayRecord(sent), Replies(), {}
    out = aggregator.aggregate(state).to_torch_state_dict()["w"]
    std = 2.0 * 1.0 / 2  # z * C / m
    assert state.metrics["central_noise_std"] == pytest.approx(std)
    assert state.metrics["central_clipped_updates"] == 1
    noise = out.clone()
    noise[0] -= 0.5  # the clipped update 1.0, over m = 2 sites
    noise[1] -= 0.25
    assert float(noise.std()) == pytest.approx(std, rel=0.05)  # 20000 coordinates: the noise scale
    assert abs(float(noise.mean())) < 0.05
    assert state.metrics["central_epsilon"] > 0
