"""How close generated audio embeddings are to real ones: FD, PRDC, diversity.

Every function takes ``[N, D]`` feature matrices (``frechet_distance``, ``prdc``, ``diversity``) or
``[N, L, H]`` embeddings (``embedding_quality``, which turns them into features first) and returns
plain Python floats: nothing here keeps an autograd graph, everything runs in float64 on CPU.

Feature space
-------------
``embedding_quality`` compares **flattened** ``[N, L*H]`` embeddings by default. That is what the
adapters consume, and it keeps the token structure: a token mean cannot see token order at all (a
"generator" that shuffles the training clips' tokens looks perfect through it) and discards a good part
of the variance. High dimension is not a numerical problem here: with ``N < D`` the covariances have
rank < N and the cross term is computed exactly from the ``N x M`` cross-Gram matrix (see
``frechet_distance``), never from a ``D x D`` square root; the statistical noise of a plug-in FD grows
with the effective rank of the data, not with ``D``, and embeddings keep most of their variance in a
few directions.
Pass ``features="token_mean"`` for the ``[N, H]`` token mean.

Reference values
----------------
An FD value has no absolute scale, so ``embedding_quality`` also reports ``fd_real_halves``, the FD
between two random halves of the real data, and ``fd_ratio = fd / fd_real_halves`` (1 = generated
embeddings are as close to the held-out data as real data is to itself). With a ``real_reference``
(e.g. the training embeddings the generator saw) it adds ``fd_reference = FD(reference, held-out)``
and ``fd_ratio_reference``: the FD a perfect copy of the training distribution would get against
the same held-out set. Plug-in FD is biased upward by roughly ``tr(cov) * (1/n1 + 1/n2)``, so compare
values computed from similar sample counts (e.g. sample as many fake embeddings as there are real
training embeddings).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = ["diversity", "embedding_features", "embedding_quality", "frechet_distance", "prdc"]

Features = Literal["flatten", "token_mean"]


def embedding_features(x: Tensor, features: Features = "flatten") -> Tensor:
    """``[N, L, H]`` (or ``[N, D]``) embeddings -> ``[N, D]`` float64 features on CPU."""
    x = x.detach().to("cpu", torch.float64)
    if x.ndim == 2:
        return x
    if x.ndim != 3:
        raise ValueError(f"expected [N, L, H] embeddings or [N, D] features, got shape {tuple(x.shape)}")
    if features == "flatten":
        return x.flatten(1)
    if features == "token_mean":
        return x.mean(1)
    raise ValueError(f"unknown features {features!r}: expected 'flatten' or 'token_mean'")


def _as_features(x: Tensor, name: str, min_rows: int = 1) -> Tensor:
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a [N, D] matrix, got shape {tuple(x.shape)}")
    if len(x) < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} rows, got {len(x)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return x


def _psd_sqrt(m: Tensor) -> Tensor:
    """Square root of a symmetric PSD matrix via ``eigh`` (tiny negative eigenvalues clamped to 0)."""
    m = (m + m.T) / 2
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(x: Tensor, y: Tensor, method: Literal["auto", "eigh", "gram"] = "auto") -> float:
    """Fréchet distance between Gaussians fitted to ``x [N, D]`` and ``y [M, D]``.

    ``FD = |mu_x - mu_y|^2 + tr(S_x) + tr(S_y) - 2 tr((S_x S_y)^{1/2})`` with unbiased covariances.
    ``tr((S_x S_y)^{1/2}) = sum(sqrt(eig(S_x^{1/2} S_y S_x^{1/2})))``, computed in float64 either

    * ``"eigh"``: ``S_x^{1/2}`` by ``eigh``, then the eigenvalues of the symmetric PSD matrix
      ``S_x^{1/2} S_y S_x^{1/2}`` (``O(D^3)``), or
    * ``"gram"``: with centred data ``A = Xc / sqrt(N-1)``, ``B = Yc / sqrt(M-1)`` (so ``S_x = A^T A``,
      ``S_y = B^T B``), the non-zero eigenvalues of ``S_x S_y`` are the squared singular values of the
      ``M x N`` matrix ``B A^T``, so the trace is its nuclear norm (``O(NMD)``, exact, no ``D x D``
      matrix). ``"auto"`` picks it when ``min(N, M) < D``.

    Symmetric in its arguments; 0 for identical sets (up to float64 rounding, clamped at 0).
    """
    x = _as_features(x, "x", min_rows=2)
    y = _as_features(y, "y", min_rows=2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: x has {x.shape[1]}, y has {y.shape[1]}")
    mu_x, mu_y = x.mean(0), y.mean(0)
    a = (x - mu_x) / math.sqrt(len(x) - 1)
    b = (y - mu_y) / math.sqrt(len(y) - 1)
    tr_x, tr_y = (a * a).sum(), (b * b).sum()
    if method == "auto":
        method = "gram" if min(len(x), len(y)) < x.shape[1] else "eigh"
    if method == "gram":
        cross = torch.linalg.svdvals(b @ a.T).sum()
    elif method == "eigh":
        root_x = _psd_sqrt(a.T @ a)
        inner = root_x @ (b.T @ b) @ root_x
        cross = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    else:
        raise ValueError(f"unknown method {method!r}: expected 'auto', 'eigh' or 'gram'")
    fd = ((mu_x - mu_y) ** 2).sum() + tr_x + tr_y - 2 * cross
    return max(float(fd), 0.0)


def _kth_neighbour_radii(x: Tensor, k: int) -> Tensor:
    """Distance from each row to its k-th nearest other row (self excluded)."""
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # the smallest is the row itself (0)


def prdc(real: Tensor, fake: Tensor, k: int = 5) -> dict[str, float]:
    """k-NN precision, recall, density and coverage (Naeem et al. 2020, "Reliable Fidelity and
    Diversity Metrics for Generative Models"), Euclidean distance, exactly as defined there.

    With ``r_R(i)`` the distance of real sample ``i`` to its k-th nearest real neighbour and
    ``r_F(j)`` that of fake sample ``j`` among the fakes, ``B(c, r)`` the closed ball:

    * precision = fraction of fakes inside at least one real ball ``B(X_i, r_R(i))``;
    * recall    = fraction of reals inside at least one fake ball ``B(Y_j, r_F(j))``;
    * density   = ``1/(k M) * sum_j #{i : Y_j in B(X_i, r_R(i))}`` (can exceed 1);
    * coverage  = fraction of reals whose own ball ``B(X_i, r_R(i))`` holds at least one fake.
    """
    real = _as_features(real, "real")
    fake = _as_features(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: real has {real.shape[1]}, fake has {fake.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"prdc with k={k} needs more than k real and fake samples, got {len(real)} real, {len(fake)} fake")
    r_real = _kth_neighbour_radii(real, k)  # [N]
    r_fake = _kth_neighbour_radii(fake, k)  # [M]
    d = torch.cdist(real, fake)  # [N, M]
    in_real_ball = d <= r_real[:, None]  # fake j inside real ball i
    return {
        "precision": in_real_ball.any(0).double().mean().item(),
        "recall": (d <= r_fake[None, :]).any(1).double().mean().item(),
        "density": in_real_ball.double().sum().item() / (k * fake.shape[0]),
        "coverage": (d.min(1).values <= r_real).double().mean().item(),
    }


def diversity(x: Tensor) -> float:
    """Mean Euclidean distance over all distinct pairs of rows (0 for a collapsed set).

    Equals ``sqrt(2 tr(cov))``-ish for a Gaussian; report it next to the same number for real data
    (``embedding_quality`` gives ``diversity_ratio``): mode collapse shows as a ratio well below 1.
    """
    x = _as_features(x, "x", min_rows=2)
    d = torch.cdist(x, x)
    n = len(x)
    return float(d.sum() / (n * (n - 1)))


def embedding_quality(
    real_heldout: Tensor,
    fake: Tensor,
    real_reference: Tensor | None = None,
    k: int = 5,
    features: Features = "flatten",
    seed: int = 0,
    half_splits: int = 5,
) -> dict[str, float]:
    """All quality numbers for generated embeddings ``fake`` against real held-out embeddings.

    Inputs are ``[N, L, H]`` embeddings (or ``[N, D]`` features). Returns floats:

    * ``fd`` = FD(fake, real_heldout); ``fd_real_halves`` = FD between two random halves of all
      real data given (held-out plus reference), averaged over ``half_splits`` random splits drawn
      from ``seed`` (one split of the default node data varies by up to 2x: 149-337 over 5 seeds);
      ``fd_ratio`` = ``fd / fd_real_halves``;
    * with ``real_reference``: ``fd_reference`` = FD(reference, held-out) and ``fd_ratio_reference``;
    * ``precision``, ``recall``, ``density``, ``coverage`` of ``fake`` against the held-out set, with
      ``prdc_k = min(k, n - 1)`` neighbours (few held-out clips per class on a node);
    * ``diversity`` (fake), ``diversity_real`` (held-out) and ``diversity_ratio``;
    * ``n_real``, ``n_fake``.

    A quantity that the sample counts do not allow (FD needs >= 2 rows per side, the halves >= 4
    real rows, PRDC >= 2 rows per side) is ``nan`` rather than an error, so per-class logging on a
    node with very few clips keeps working.
    """
    real = embedding_features(real_heldout, features)
    gen = embedding_features(fake, features)
    ref = embedding_features(real_reference, features) if real_reference is not None else None
    nan = float("nan")
    out: dict[str, float] = {"n_real": float(len(real)), "n_fake": float(len(gen))}

    out["fd"] = frechet_distance(gen, real) if len(gen) >= 2 and len(real) >= 2 else nan
    pool = real if ref is None else torch.cat([real, ref])
    if len(pool) >= 4:
        rng = torch.Generator().manual_seed(seed)
        half = len(pool) // 2
        values = []
        for _ in range(max(1, half_splits)):
            perm = torch.randperm(len(pool), generator=rng)
            values.append(frechet_distance(pool[perm[:half]], pool[perm[half : 2 * half]]))
        out["fd_real_halves"] = sum(values) / len(values)
    else:
        out["fd_real_halves"] = nan
    out["fd_ratio"] = _ratio(out["fd"], out["fd_real_halves"])
    if ref is not None:
        out["fd_reference"] = frechet_distance(ref, real) if len(ref) >= 2 and len(real) >= 2 else nan
        out["fd_ratio_reference"] = _ratio(out["fd"], out["fd_reference"])

    k_eff = min(k, len(real) - 1, len(gen) - 1)
    if k_eff >= 1:
        out.update(prdc(real, gen, k_eff))
    else:
        out.update(precision=nan, recall=nan, density=nan, coverage=nan)
    out["prdc_k"] = float(max(k_eff, 0))

    out["diversity"] = diversity(gen) if len(gen) >= 2 else nan
    out["diversity_real"] = diversity(real) if len(real) >= 2 else nan
    out["diversity_ratio"] = _ratio(out["diversity"], out["diversity_real"])
    return out


def _ratio(num: float, den: float) -> float:
    if math.isnan(num) or math.isnan(den):
        return float("nan")
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return num / den
