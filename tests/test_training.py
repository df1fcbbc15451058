"""Adapter training: per-sample targets, losses, retrieval accuracy, class means."""

from __future__ import annotations

import copy

import pytest
import torch

from common.models.adapters import AdapterConfig, Adapters
from common.training import (
    TrainSettings,
    branch_loss,
    class_mean_outputs,
    evaluate_adapters,
    fit_adapters,
    retrieval_correct,
    train_adapters,
)

C, L, H, N_T5, D_CLIP, D_T5 = 3, 4, 16, 2, 12, 10


def _toy(n_per_class: int = 12, seed: int = 0):
    """Class-distinct inputs and random, distinct class targets."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(C, L, H, generator=g) * 2
    labels = torch.arange(C).repeat_interleave(n_per_class)
    x = centers[labels] + 0.3 * torch.randn(len(labels), L, H, generator=g)
    t_clip = torch.randn(C, D_CLIP, generator=g)
    t_t5 = torch.randn(C, N_T5, D_T5, generator=g)
    perm = torch.randperm(len(labels), generator=g)  # mixed-class order: every batch holds several classes
    return x[perm], labels[perm], t_clip, t_t5


def _adapters(seed: int = 0) -> Adapters:
    torch.manual_seed(seed)
    return Adapters(AdapterConfig(in_dim=H, in_tokens=L, clip_dim=D_CLIP, t5_dim=D_T5, t5_tokens=N_T5, hidden_dim=32, heads=4, dropout=0.0))


def _settings(**kw) -> TrainSettings:
    base = dict(epochs=30, batch_size=8, lr_clip=3e-3, lr_t5=3e-3, weight_decay=0.0, cosine_weight=0.5,
                contrastive_weight=0.0, temperature=0.1, proximal_mu=0.0, seed=0, precision="fp32")
    base.update(kw)
    return TrainSettings(**base)


def test_mixed_batch_loss_uses_each_samples_own_target():
    _, _, t_clip, _ = _toy()
    labels = torch.tensor([0, 1, 2, 1])
    pred = t_clip[labels].clone()  # perfect per-sample prediction
    assert branch_loss(pred, labels, t_clip, cosine_weight=0.5, contrastive_weight=0.0, temperature=0.1).item() == pytest.approx(0.0, abs=1e-6)
    # the earlier code base's collate (every sample toward the first sample's class) would be wrong here
    assert branch_loss(t_clip[labels[:1]].expand_as(pred), labels, t_clip, cosine_weight=0.5,
                       contrastive_weight=0.0, temperature=0.1).item() > 0.1


def test_training_on_mixed_batches_learns_every_class():
    x, y, t_clip, t_t5 = _toy()
    adapters = _adapters()
    before = evaluate_adapters(adapters, x, y, t_clip, t_t5, _settings())
    losses = train_adapters(adapters, x, y, t_clip, t_t5, _settings())
    after = evaluate_adapters(adapters, x, y, t_clip, t_t5, _settings())
    assert after["loss"] < 0.5 * before["loss"]
    assert losses["loss"] == pytest.approx(losses["loss_clip"] + losses["loss_t5"])
    assert after["retrieval_acc_clip"] == 1.0 and after["retrieval_acc_t5"] == 1.0


def test_bf16_precision_runs_forward_passes_under_autocast_and_still_learns(monkeypatch):
    x, y, t_clip, t_t5 = _toy()
    adapters = _adapters()
    before = evaluate_adapters(adapters, x, y, t_clip, t_t5, _settings())
    train_adapters(adapters, x, y, t_clip, t_t5, _settings(precision="bf16"))
    after = evaluate_adapters(adapters, x, y, t_clip, t_t5, _settings())
    assert after["loss"] < 0.5 * before["loss"] and after["retrieval_acc_t5"] == 1.0
    assert all(p.dtype == torch.float32 for p in adapters.parameters())  # weights stay fp32

    seen = []

    def batch_loss(idx):
        seen.append(torch.is_autocast_enabled("cpu"))
        out_clip, _ = adapters(x[idx])
        return out_clip.float().pow(2).mean(), out_clip.float().abs().mean()

    for precision, fast, expected in (("fp32", True, False), ("bf16", False, True), ("auto", True, True),
                                      ("auto", False, False)):
        seen.clear()
        monkeypatch.setattr("common.training.fast_bf16", lambda device, fast=fast: fast)
        fit_adapters(adapters, len(x), batch_loss, _settings(epochs=1, precision=precision))
        assert seen and set(seen) == {expected}, precision
    with pytest.raises(ValueError, match="precision must be one of"):
        fit_adapters(adapters, len(x), batch_loss, _settings(epochs=1, precision="fp8"))


def test_contrastive_term_is_honoured_and_changes_the_loss():
    x, y, t_clip, _ = _toy()
    pred = torch.randn(len(y), D_CLIP)
    plain = branch_loss(pred, y, t_clip, 0.0, contrastive_weight=0.0, temperature=0.1)
    contrast = branch_loss(pred, y, t_clip, 0.0, contrastive_weight=1.0, temperature=0.1)
    assert contrast > plain
    x, y, t_clip, t_t5 = _toy()
    a1, a2 = _adapters(), _adapters()
    l1 = train_adapters(a1, x, y, t_clip, t_t5, _settings(epochs=2, contrastive_weight=0.0))
    l2 = train_adapters(a2, x, y, t_clip, t_t5, _settings(epochs=2, contrastive_weight=1.0))
    assert l1["loss"] != pytest.approx(l2["loss"])


def test_both_branches_receive_gradients_and_step():
    x, y, t_clip, t_t5 = _toy()
    adapters = _adapters()
    w_clip = adapters.clip.out[1].weight.detach().clone()
    w_t5 = adapters.t5.out[1].weight.detach().clone()
    train_adapters(adapters, x, y, t_clip, t_t5, _settings(epochs=1))
    assert not torch.equal(w_clip, adapters.clip.out[1].weight)
    assert not torch.equal(w_t5, adapters.t5.out[1].weight)


def test_training_is_deterministic_for_a_seed():
    x, y, t_clip, t_t5 = _toy()
    a1, a2 = _adapters(), _adapters()
    l1 = train_adapters(a1, x, y, t_clip, t_t5, _settings(epochs=2))
    l2 = train_adapters(a2, x, y, t_clip, t_t5, _settings(epochs=2))
    assert l1 == l2


def test_training_with_dropout_is_seeded_by_its_settings_and_leaves_the_global_rng_alone():
    """Dropout draws from the global RNG: fit_adapters seeds it from settings.seed in a fork."""
    x, y, t_clip, t_t5 = _toy()

    def trained(global_seed: int, seed: int = 0) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        adapters = Adapters(AdapterConfig(in_dim=H, in_tokens=L, clip_dim=D_CLIP, t5_dim=D_T5, t5_tokens=N_T5,
                                          hidden_dim=32, heads=4, dropout=0.3))
        torch.manual_seed(global_seed)  # whatever the caller's RNG holds must not matter
        before = torch.random.get_rng_state()
        train_adapters(adapters, x, y, t_clip, t_t5, _settings(epochs=2, seed=seed))
        assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is untouched
        return adapters.state_dict()

    a, b, c = trained(1), trained(2), trained(1, seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_empty_training_set_is_a_clear_error():
    _, _, t_clip, t_t5 = _toy()
    with pytest.raises(ValueError, match="no training embeddings"):
        train_adapters(_adapters(), torch.empty(0, L, H), torch.empty(0, dtype=torch.long), t_clip, t_t5, _settings())


def test_retrieval_correct_on_known_vectors():
    targets = torch.eye(3)
    outputs = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8], [0.7, 0.6, 0.0]])
    labels = torch.tensor([0, 2, 1])
    assert retrieval_correct(outputs, targets, labels).tolist() == [True, True, False]


def test_class_mean_outputs_match_manual_means():
    x, y, _, _ = _toy(n_per_class=4)
    adapters = _adapters()
    clip_m, t5_m, counts = class_mean_outputs(adapters, x, y, num_classes=C + 1)  # one class absent
    adapters.eval()
    with torch.no_grad():
        out_clip, out_t5 = adapters(x)
    assert counts.tolist() == [4, 4, 4, 0]
    for c in range(C):
        assert torch.allclose(clip_m[c], out_clip[y == c].mean(0), atol=1e-5)
        assert torch.allclose(t5_m[c], out_t5[y == c].mean(0), atol=1e-5)
    assert torch.all(clip_m[C] == 0)


def test_proximal_term_keeps_weights_near_where_training_started():
    x, y, t_clip, t_t5 = _toy()
    start = _adapters()
    initial = [p.detach().clone() for p in start.parameters()]

    def drift(mu: float) -> float:
        adapters = copy.deepcopy(start)
        train_adapters(adapters, x, y, t_clip, t_t5, _settings(epochs=10, proximal_mu=mu))
        return sum((p.detach() - q).pow(2).sum().item() for p, q in zip(adapters.parameters(), initial)) ** 0.5

    free, held = drift(0.0), drift(10.0)
    assert held < 0.5 * free, (free, held)  # FedProx: the anchor pulls each branch back toward the start
