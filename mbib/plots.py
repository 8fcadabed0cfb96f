"""Every plot mbib draws (PNG, matplotlib's Agg backend): training, study and reproduction figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol, Sequence


class TrialRow(Protocol):
    """What the study plots read of a trial (mbib.study.results.TrialRow has it); a Protocol keeps plots below study."""

    number: int
    score: float
    state: str
    params: dict[str, Any]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def per_class_plot(per_class_acc: Sequence[float], class_counts: Sequence[int], path: str | Path,
                   title: str = "per-class accuracy vs training-set size") -> Path:
    """Accuracy of each class against its number of training images (log x), the long-tail picture."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.scatter(class_counts, per_class_acc, s=14, alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training images in class")
    ax.set_ylabel("test accuracy (%)")
    ax.axvline(20, color="grey", lw=0.8, ls="--")
    ax.axvline(100, color="grey", lw=0.8, ls="--")
    ax.set_title(title)
    ax.set_ylim(-2, 102)
    return _save(fig, plt, Path(path))


def plot_history(rows: list[TrialRow], path: Path, title: str) -> Path:
    """Best accuracy so far against trial number, every trial's best accuracy marked by how it ended."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    xs = [r.number for r in rows if _finite(r.score)]
    ys = [r.score for r in rows if _finite(r.score)]
    best = [max(ys[: i + 1]) for i in range(len(ys))]
    ax.step(xs, best, where="post", color="C3", label="best so far")
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        pts = [(r.number, r.score) for r in rows if r.state == state and _finite(r.score)]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color="C0", label=state.lower())
    ax.set(xlabel="trial", ylabel="selection-split accuracy (%)", title=title)
    ax.legend()
    return _save(fig, plt, path)


def plot_beta(rows: list[TrialRow], path: Path, title: str) -> Path:
    """Accuracy against beta (the paper's Figure 3): every trial, and the mean per unit-wide beta bin."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    pts = sorted((r.params["beta"], r.score, r.state) for r in rows if _finite(r.score))
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        sel = [(b, a) for b, a, s in pts if s == state]
        if sel:
            ax.scatter(*zip(*sel), marker=marker, color="C0", label=state.lower())
    bins: dict[int, list[float]] = {}
    for b, a, s in pts:
        if s == "COMPLETE":
            bins.setdefault(min(int(round(b)), 5), []).append(a)
    if bins:
        ks = sorted(bins)
        ax.plot(ks, [sum(bins[k]) / len(bins[k]) for k in ks], "-s", color="C3", label="mean, beta rounded")
    ax.set(xlabel="beta", ylabel="selection-split accuracy (%)", xlim=(-0.2, 5.2), title=title)
    ax.legend()
    return _save(fig, plt, path)


def plot_ab_heatmap(rows: list[TrialRow], path: Path, title: str, bins: int = 5) -> Path:
    """Mean accuracy of full-budget trials in a bins x bins grid over (a, b) (the paper's Figure 4), trials on top."""
    import numpy as np

    plt = _plt()
    total, count = np.zeros((bins, bins)), np.zeros((bins, bins))
    for r in rows:
        if r.state == "COMPLETE" and _finite(r.score):
            i, j = (min(int(r.params[k] * bins), bins - 1) for k in ("b", "a"))
            total[i, j] += r.score
            count[i, j] += 1
    grid = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
    im = ax.imshow(grid, origin="lower", extent=(0, 1, 0, 1), cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax, label="mean selection-split accuracy (%)")
    for r in rows:
        if _finite(r.score):
            full = r.state == "COMPLETE"  # an "x" has no edge: matplotlib warns when given one
            ax.scatter(r.params["a"], r.params["b"], marker="o" if full else "x", color="w", edgecolors="k" if full else None)
    ax.set(xlabel="a", ylabel="b", title=title)
    return _save(fig, plt, path)


def plot_importances(importances: dict[str, float], basis: str, path: Path, title: str,
                     names: Sequence[str] = ()) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=110)
    names = list(importances) or list(names)  # no importances: every searched name at 0
    ax.barh(names[::-1], [importances.get(n, 0.0) for n in names[::-1]], color="C2")
    ax.set(xlabel="importance (Optuna)", title=f"{title}\n({basis})")
    return _save(fig, plt, path)


def plot_posterior(done: dict[str, list[float]], png: Path) -> Path:
    """Appendix D: mean positive posterior per class for each method, and the differences it plots."""
    plt = _plt()
    diffs = [(a, b) for a, b in (("bib", "ce"), ("bib", "bsce"), ("mbib", "bib")) if a in done and b in done]
    fig, axes = plt.subplots(2, max(len(done), len(diffs), 1), figsize=(4 * max(len(done), 3), 6), dpi=100,
                             squeeze=False)
    for ax, (m, v) in zip(axes[0], done.items()):
        ax.bar(range(len(v)), [x or 0.0 for x in v], width=1.0)
        ax.set_title(f"{m.upper()}: q̄(y_i|x)")
        ax.set_ylim(0, 1)
    for ax, (a, b) in zip(axes[1], diffs):
        d = [(x or 0.0) - (y or 0.0) for x, y in zip(done[a], done[b])]
        ax.bar(range(len(d)), d, width=1.0, color=["tab:green" if x >= 0 else "tab:red" for x in d])
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(f"{a.upper()} − {b.upper()}")
    for ax in axes.flat:
        ax.set_xlabel("class (most training images left)")
        if not ax.has_data():
            ax.axis("off")
    return _save(fig, plt, png)


def plot_beta_ablation(series: dict[str, list[float | None]], betas: Sequence[float], png: Path, title: str) -> Path:
    """Figure 3: overall accuracy against beta, MBIB solid and BIB dashed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for m, style in (("mbib", "-"), ("bib", "--")):  # Figure 3: solid MBIB, dashed BIB
        pts = [(b, v) for b, v in zip(betas, series[m]) if v is not None]
        if pts:
            ax.plot(*zip(*pts), style, marker="o", label=m.upper())
    ax.set_xlabel("β")
    ax.set_ylabel("overall accuracy (%)")
    ax.set_title(title)
    ax.legend()
    return _save(fig, plt, png)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
