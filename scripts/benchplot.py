"""Plots for the benchmarks: each scripts/bench_*.py writes a PNG next to its JSON.

matplotlib comes with the ``bench`` extra (installed by scripts/setup.sh); without it the
benchmarks still run and say that no plot was drawn. Drawing is off-screen (Agg).

    plt = benchplot.pyplot()            # None without matplotlib
    fig, ax = plt.subplots(...) ; ...   # draw
    return benchplot.save(fig, png)     # tight layout, write, close

or, for one bar chart: ``benchplot.bars(png, title, labels, values, ylabel)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any


def pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def png_next_to(json_path: str | os.PathLike[str]) -> str:
    return os.path.splitext(os.fspath(json_path))[0] + ".png"


def save(fig: Any, png: str, dpi: int = 100) -> str:
    plt = pyplot()
    fig.tight_layout()
    fig.savefig(png, dpi=dpi)
    if plt is not None:
        plt.close(fig)
    return png


def bars(
    png: str,
    title: str,
    labels: Sequence[str],
    values: Sequence[float],
    ylabel: str,
    *,
    second: Sequence[float] | None = None,
    legend: tuple[str, str] | None = None,
    rotate: int = 0,
    log: bool = False,
) -> str | None:
    """One bar chart (``second``: a second series drawn beside the first); None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 2), 3.6))
    x = list(range(len(labels)))
    width = 0.4 if second is not None else 0.7
    ax.bar([i - (width / 2 if second is not None else 0) for i in x], values, width, color="#37c",
           label=legend[0] if legend else None)
    if second is not None:
        ax.bar([i + width / 2 for i in x], second, width, color="#c84", label=legend[1] if legend else None)
    ax.set_xticks(x, labels, rotation=rotate, ha="right" if rotate else "center")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    if legend:
        ax.legend()
    return save(fig, png)


def rps_and_p50(png: str, title: str, median: dict[str, dict[str, float]]) -> str | None:
    """Two panels per path: median req/s and p50 latency (``{path: {"rps", "p50_us"}}``)."""
    plt = pyplot()
    if plt is None:
        return None
    paths = list(median)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(7.0, 1.6 * len(paths) + 3), 3.6))
    a1.bar(paths, [median[p]["rps"] for p in paths], color="#37c")
    a1.set_ylabel("req/s (median)")
    a2.bar(paths, [median[p]["p50_us"] for p in paths], color="#c84")
    a2.set_ylabel("p50 latency (µs, median)")
    for ax in (a1, a2):
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(title)
    return save(fig, png)
