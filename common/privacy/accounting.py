"""Privacy accounting: what a list of releases costs, and the noise that keeps a plan within a budget.

A release is one use of a subsampled Gaussian mechanism: DP-SGD steps (``sample_rate`` = the Poisson
sampling rate, ``steps`` = how many) or one Gaussian-mechanism release of statistics
(``sample_rate`` = 1). Opacus' accountants compose them: ``rdp`` (Renyi DP, Mironov 2017) and ``prv``
(the privacy random variable accountant of Gopi et al. 2021, tighter). A site's ledger
(:mod:`client_app.ledger`) is such a list, kept across rounds and runs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from opacus.accountants import PRVAccountant, RDPAccountant


__all__ = ["ACCOUNTANTS", "Release", "calibrate_noise", "epsilon"]

ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}
MAX_NOISE = 1e3  # a calibration that needs more noise than this is an error, not a run
# Renyi orders the RDP accountant tries: Opacus' defaults (up to 63) and larger ones, which give the tighter
# bound when the noise is large against the budget (small epsilons, a site's means). Each order gives a
# valid bound; the accountant reports the smallest.
RDP_ALPHAS = [*RDPAccountant.DEFAULT_ALPHAS, 80, 96, 128, 192, 256, 384, 512, 1024]


@dataclass(frozen=True)
class Release:
    """``steps`` uses of the Gaussian mechanism with ``noise_multiplier`` (noise std / sensitivity), each on
    a Poisson sample of rate ``sample_rate`` of the site's clips."""

    mechanism: str  # "dp-sgd", "gaussian" or "central" (for the record; the accountant needs the numbers only)
    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"release: noise multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"release: sample rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise ValueError(f"release: steps must be >= 0, got {self.steps}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Release":
        return cls(str(d["mechanism"]), float(d["noise_multiplier"]), float(d["sample_rate"]), int(d["steps"]))


def epsilon(releases: Sequence[Release], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of all ``releases`` composed (0 for none)."""
    history = [(r.noise_multiplier, r.sample_rate, r.steps) for r in releases if r.steps > 0]
    if not history:
        return 0.0
    acct = ACCOUNTANTS[accountant]()
    acct.history = history
    with warnings.catch_warnings():  # the PRV accountant's log(0) at q = 1 is handled inside it
        warnings.simplefilter("ignore", RuntimeWarning)
        if accountant == "rdp":
            # the bound at the largest order is still a bound (calibration probes MAX_NOISE, where it is ~0)
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)
            return float(acct.get_epsilon(delta, alphas=RDP_ALPHAS))
        return float(acct.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, delta: float, spent: Sequence[Release],
                    plan: Callable[[float], Sequence[Release]], accountant: str = "rdp", tolerance: float = 0.01) -> float:
    """The smallest noise multiplier ``sigma`` such that ``spent`` + ``plan(sigma)`` cost at most ``target_epsilon``
    at ``delta`` (``plan``: the releases still planned, as a function of the noise multiplier).

    Raises ``ValueError`` naming the shortfall when even :data:`MAX_NOISE` does not fit (for example when
    ``spent`` or the releases of ``plan`` whose noise is fixed already exceed the budget)."""

    def cost(sigma: float) -> float:
        return epsilon([*spent, *plan(sigma)], delta, accountant)

    floor = cost(MAX_NOISE)
    if floor > target_epsilon:
        raise ValueError(f"epsilon {target_epsilon:g} at delta {delta:g} cannot be met: what was released already "
                         f"and the planned releases of fixed noise alone cost {floor:.3f}")
    low, high = 0.0, 1.0
    while cost(high) > target_epsilon:
        low, high = high, min(high * 2, MAX_NOISE)
    while high - low > tolerance * max(high, 1e-3):
        mid = (low + high) / 2
        if mid > 0 and cost(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
    return high
