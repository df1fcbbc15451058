"""Plots for the run report, as PNG bytes (matplotlib's object API: no pyplot, no global backend).

Why PNG bytes: the report embeds them as ``data:`` URIs so that one HTML file carries everything and
opens offline; PNG keeps a page with dozens of curves light for a browser, unlike SVG with thousands
of path points.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]

WIDTH, HEIGHT, DPI = 6.4, 3.4, 100


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def line_plot(title: str, series: Series, *, xlabel: str = "round", ylabel: str = "", ylim: tuple[float, float] | None = None,
              markers: bool = True) -> bytes | None:
    """One line per series (``label -> (xs, ys)``); ``None`` when no series has a point."""
    series = {k: v for k, v in series.items() if len(v[0])}
    if not series:
        return None
    fig = Figure(figsize=(WIDTH, HEIGHT))
    ax = fig.add_subplot()
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o" if markers and len(xs) < 40 else None, markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if xlabel.startswith(("round", "epoch")):  # counts: no 1.5th round
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ylabel:
        ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7, ncols=2 if len(series) > 6 else 1)
    return _png(fig)


def stacked_bars(title: str, labels: Sequence[str], stacks: Mapping[str, Sequence[float]], *, xlabel: str = "",
                 ylabel: str = "") -> bytes | None:
    """Stacked bars, one bar per label (e.g. a round), one colour per stack (e.g. hits / misses)."""
    if not labels:
        return None
    fig = Figure(figsize=(WIDTH, HEIGHT))
    ax = fig.add_subplot()
    bottom = [0.0] * len(labels)
    for name, values in stacks.items():
        ax.bar(range(len(labels)), list(values), bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    step = max(1, len(labels) // 30)
    ax.set_xticks(range(0, len(labels), step), [labels[i] for i in range(0, len(labels), step)], fontsize=7)
    ax.set_title(title)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return _png(fig)
