"""Embedding-quality metrics on distributions with known answers: FD, PRDC, diversity."""

from __future__ import annotations

import math

import pytest
import torch

from common.metrics import diversity, embedding_features, embedding_quality, frechet_distance, prdc


def _exact_moments(n: int, mean: torch.Tensor, std: torch.Tensor, seed: int) -> torch.Tensor:
    """n samples whose sample mean is exactly ``mean`` and sample covariance exactly ``diag(std^2)``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, len(mean), generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    q, _ = torch.linalg.qr(z)  # orthonormal, still centred columns
    return mean + q * math.sqrt(n - 1) * std


def _gauss(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift


# ----------------------------------------------------------------------------------- FD
def test_fd_is_zero_for_identical_sets():
    x = _gauss(50, 8, 0)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    wide = _gauss(20, 300, 1)  # N < D: the cross-Gram path
    assert frechet_distance(wide, wide) == pytest.approx(0.0, abs=1e-6)


def test_fd_matches_closed_form_for_diagonal_gaussians():
    d = 6
    m1, m2 = torch.arange(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64) * 0.5
    s1 = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    s2 = torch.linspace(1.5, 0.2, d, dtype=torch.float64)
    x, y = _exact_moments(40, m1, s1, 0), _exact_moments(60, m2, s2, 1)
    closed = ((m1 - m2) ** 2).sum() + ((s1 - s2) ** 2).sum()  # |dm|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)
    assert frechet_distance(x, y) == pytest.approx(float(closed), rel=1e-9)
    assert frechet_distance(x, y, method="eigh") == pytest.approx(float(closed), rel=1e-9)
    assert frechet_distance(x, y, method="gram") == pytest.approx(float(closed), rel=1e-9)


def test_fd_is_symmetric_and_methods_agree_for_full_covariances():
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(10, 10, generator=g, dtype=torch.float64)
    x = _gauss(30, 10, 4) @ mix
    y = _gauss(45, 10, 5, shift=0.3) @ mix.T
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-9)
    assert frechet_distance(x, y, method="eigh") == pytest.approx(frechet_distance(x, y, method="gram"), rel=1e-7)
    wide_x, wide_y = _gauss(12, 64, 6), _gauss(15, 64, 7, scale=2.0)  # rank-deficient covariances
    assert frechet_distance(wide_x, wide_y, method="eigh") == pytest.approx(frechet_distance(wide_x, wide_y, method="gram"), rel=1e-6)


def test_fd_of_a_translation_is_the_squared_shift():
    x = _gauss(40, 5, 8)
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5, 3.0], dtype=torch.float64)
    assert frechet_distance(x, x + shift) == pytest.approx(float((shift**2).sum()), rel=1e-8)


def test_fd_large_samples_approach_the_population_value():
    d = 4
    x, y = _gauss(20000, d, 9), _gauss(20000, d, 10, shift=1.0, scale=2.0)
    expected = d * 1.0 + d * (2.0 - 1.0) ** 2  # |dm|^2 + sum (s1 - s2)^2
    assert frechet_distance(x, y) == pytest.approx(expected, rel=0.05)


def test_fd_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(torch.zeros(4, 3), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.full((4, 3), float("nan")), torch.zeros(5, 3))


# ----------------------------------------------------------------------------------- PRDC
def test_prdc_same_distribution_is_high():
    real, fake = _gauss(400, 8, 11), _gauss(400, 8, 12)
    m = prdc(real, fake, k=5)
    assert m["precision"] > 0.8 and m["recall"] > 0.8 and m["coverage"] > 0.8
    assert 0.7 < m["density"] < 1.3


def test_prdc_identical_sets_are_perfect():
    x = _gauss(100, 4, 13)
    m = prdc(x, x, k=3)
    assert m["precision"] == 1.0 and m["recall"] == 1.0 and m["coverage"] == 1.0


def test_prdc_disjoint_distributions_are_zero():
    m = prdc(_gauss(200, 6, 14), _gauss(200, 6, 15, shift=100.0), k=5)
    assert m == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_mode_collapse_keeps_precision_but_loses_recall_and_coverage():
    real = _gauss(200, 4, 16)
    fake = real[:1].repeat(50, 1)  # every fake is one real sample
    m = prdc(real, fake, k=5)
    assert m["precision"] == 1.0
    assert m["recall"] <= 1 / len(real) + 1e-12  # fake balls have radius 0: only that real sample
    assert m["coverage"] < 0.2


def test_density_is_robust_to_a_real_outlier_where_precision_is_not():
    """Naeem et al.'s motivating case: an outlier's huge k-NN ball makes fakes near it 'precise'."""
    real = torch.cat([_gauss(200, 4, 17), torch.full((1, 4), 20.0, dtype=torch.float64)])
    fake = _gauss(100, 4, 18, shift=20.0, scale=0.1)
    m = prdc(real, fake, k=5)
    assert m["precision"] > 0.9
    assert m["density"] < 0.3  # each fake sits in a single real ball: density ~ 1/k
    assert m["coverage"] < 0.05


def test_prdc_needs_more_than_k_samples():
    with pytest.raises(ValueError, match="needs more than k"):
        prdc(_gauss(5, 3, 0), _gauss(20, 3, 1), k=5)


# ----------------------------------------------------------------------------------- diversity
def test_diversity_scales_and_collapses():
    x = _gauss(60, 5, 19)
    assert diversity(x[:1].repeat(10, 1)) == 0.0
    assert diversity(2 * x) == pytest.approx(2 * diversity(x), rel=1e-9)
    # mean pairwise distance of N(0, I_d) ~ sqrt(2 d)
    assert diversity(_gauss(2000, 16, 20)) == pytest.approx(math.sqrt(2 * 16), rel=0.05)


# ----------------------------------------------------------------------------------- combined
def test_embedding_quality_on_token_embeddings():
    g = torch.Generator().manual_seed(21)
    real = torch.randn(120, 3, 4, generator=g)
    ref = torch.randn(120, 3, 4, generator=g)
    good = torch.randn(120, 3, 4, generator=g)
    bad = torch.randn(120, 3, 4, generator=g) * 0.2 + 2.0
    q_good = embedding_quality(real, good, real_reference=ref)
    q_bad = embedding_quality(real, bad, real_reference=ref)
    expected = {"fd", "fd_real_halves", "fd_ratio", "fd_reference", "fd_ratio_reference", "precision", "recall",
                "density", "coverage", "prdc_k", "diversity", "diversity_real", "diversity_ratio", "n_real", "n_fake"}
    assert expected <= set(q_good)
    assert all(isinstance(v, float) for v in q_good.values())
    assert q_good["fd_ratio"] < 2.0 < q_bad["fd_ratio"]
    assert q_good["recall"] > 0.6 > q_bad["recall"]
    assert q_bad["diversity_ratio"] < 0.5 < q_good["diversity_ratio"]


def test_embedding_quality_tiny_sets_give_nan_not_errors():
    q = embedding_quality(torch.randn(3, 2, 4), torch.randn(6, 2, 4), k=5)
    assert math.isnan(q["fd_real_halves"]) and math.isnan(q["fd_ratio"])
    assert q["prdc_k"] == 2.0 and not math.isnan(q["precision"])
    q1 = embedding_quality(torch.randn(1, 2, 4), torch.randn(6, 2, 4))
    assert math.isnan(q1["fd"]) and math.isnan(q1["precision"])


def test_embedding_features():
    x = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    assert embedding_features(x).shape == (2, 12)
    assert torch.equal(embedding_features(x, "token_mean"), x.double().mean(1))
    with pytest.raises(ValueError, match="unknown features"):
        embedding_features(x, "pool")  # type: ignore[arg-type]
