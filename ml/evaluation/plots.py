"""Figures of a walk-forward report, written as PNG files.

Each function takes plain data (a DataFrame of equity curves or the dict
written to report.json), writes one PNG and returns its path. The Agg
backend is selected first so that plotting works on headless workers.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402

from ml.evaluation.metrics import drawdown  # noqa: E402

POLICY = "policy"
POLICY_COLOR = "#d62728"
# Fixed colours per baseline, so every figure of a report reads the same way.
BASELINE_COLORS = {
    "buy_and_hold": "#1f77b4",
    "cash": "#7f7f7f",
    "ma_crossover": "#2ca02c",
    "momentum": "#9467bd",
    "random": "#bcbd22",
    "equal_weight": "#1f77b4",  # the portfolio-mode benchmark takes buy-and-hold's colour
}
_FALLBACK_COLORS = ["#8c564b", "#e377c2", "#17becf", "#ff7f0e"]
DPI = 110
PERCENT_METRICS = {"total_return", "annualized_return", "max_drawdown", "costs_paid", "annualized_volatility"}


def _color(name: str, index: int) -> str:
    if name == POLICY:
        return POLICY_COLOR
    return BASELINE_COLORS.get(name, _FALLBACK_COLORS[index % len(_FALLBACK_COLORS)])


def _label(name: str) -> str:
    return {"buy_and_hold": "buy-and-hold", "sharpe": "Sharpe"}.get(name, name.replace("_", " "))


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)  # figures are not freed otherwise, and a report draws several
    return path


def _finite(value) -> float:
    """Bars for inf or missing values are left out rather than drawn off the chart."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def plot_equity_and_drawdown(curves: pd.DataFrame, path, title: str | None = None) -> Path:
    """Equity (top) and drawdown from the running peak (bottom) of each strategy.

    ``curves`` holds a ``timestamp`` column and one NAV column per strategy;
    the policy is drawn thick and on top, the baselines thin behind it.
    """
    if "timestamp" not in curves.columns:
        raise ValueError("curves needs a 'timestamp' column")
    names = [c for c in curves.columns if c != "timestamp"]
    if not names:
        raise ValueError("curves has no NAV columns to plot")
    names.sort(key=lambda name: name == POLICY)  # draw the policy last, on top
    when = pd.to_datetime(curves["timestamp"])

    fig, (equity_ax, drawdown_ax) = plt.subplots(
        2, 1, figsize=(10, 6.5), sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
    for index, name in enumerate(names):
        nav = curves[name].to_numpy(dtype="float64")
        is_policy = name == POLICY
        style = {"color": _color(name, index), "linewidth": 2.2 if is_policy else 1.0,
                 "alpha": 1.0 if is_policy else 0.75, "zorder": 3 if is_policy else 2}
        # Normalized to the start so strategies that began at different NAVs compare.
        equity_ax.plot(when, nav / nav[0], label=_label(name), **style)
        drawdown_ax.plot(when, 100.0 * drawdown(nav), **style)
    equity_ax.axhline(1.0, color="black", linewidth=0.6, linestyle=":")
    equity_ax.set_ylabel("NAV (start = 1)")
    equity_ax.set_title(title or "Test equity and drawdown")
    handles, labels = equity_ax.get_legend_handles_labels()
    order = [labels.index(_label(POLICY))] if POLICY in names else []
    order += [i for i in range(len(labels)) if i not in order]  # policy first in the legend
    equity_ax.legend([handles[i] for i in order], [labels[i] for i in order],
                     loc="upper left", fontsize=8, ncol=3)
    equity_ax.grid(alpha=0.3)
    drawdown_ax.set_ylabel("drawdown (%)")
    drawdown_ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    return _save(fig, path)


def _fold_label(fold: dict) -> str:
    test = fold.get("test") or {}
    start, end = str(test.get("start", ""))[:10], str(test.get("end", ""))[:10]
    return f"fold {fold['index']}\n{start} – {end}" if start else f"fold {fold['index']}"


def plot_fold_bars(report: dict, path, metric: str = "sharpe") -> Path:
    """Per-fold test ``metric`` of the policy beside each baseline, as grouped bars.

    When the metric is the Sharpe and the report carries bootstrap bounds
    (``sharpe_ci_low``/``sharpe_ci_high``), the policy's bar gets them as an error bar.
    """
    folds = report["folds"]
    if not folds:
        raise ValueError("the report has no folds")
    names = [POLICY] + list(folds[0]["baselines"])
    width = 0.8 / len(names)
    x = np.arange(len(folds))

    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(folds) + 3), 4.5))
    for k, name in enumerate(names):
        rows = [f[POLICY]["test"] if name == POLICY else f["baselines"].get(name, {}) for f in folds]
        heights = np.array([_finite(row.get(metric)) for row in rows])
        offsets = x - 0.4 + width * (k + 0.5)
        ax.bar(offsets, heights, width, label=_label(name), color=_color(name, k),
               edgecolor="black" if name == POLICY else "none", linewidth=1.0)
        if name == POLICY and metric == "sharpe" and all("sharpe_ci_low" in r for r in rows):
            low = np.array([_finite(r["sharpe_ci_low"]) for r in rows])
            high = np.array([_finite(r["sharpe_ci_high"]) for r in rows])
            # Clipped at zero so a bound on the wrong side of the estimate cannot break the plot.
            errors = np.vstack([np.maximum(heights - low, 0), np.maximum(high - heights, 0)])
            ax.errorbar(offsets, heights, yerr=errors, fmt="none", ecolor="black", capsize=3,
                        label="policy 95% interval")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, [_fold_label(f) for f in folds], fontsize=8)
    ax.set_ylabel(_label(metric))
    if metric in PERCENT_METRICS:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_title(f"Test {_label(metric)} per fold: policy vs baselines")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside, never over a bar
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_exposure_histogram(report: dict, path) -> Path:
    """Share of test bars on which the policy chose each exposure level, per fold.

    A single tall bar is the picture of a collapsed policy.
    """
    folds = report["folds"]
    if not folds:
        raise ValueError("the report has no folds")
    histograms = [f[POLICY].get("test_exposure_histogram", {}) for f in folds]
    levels = sorted({level for h in histograms for level in h}, key=float)
    if not levels:
        raise ValueError("the report has no test exposure histogram")
    width = 0.8 / len(folds)
    x = np.arange(len(levels))

    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(levels) + 3), 4.0))
    cmap = plt.get_cmap("viridis")
    for k, (fold, histogram) in enumerate(zip(folds, histograms)):
        shares = [100.0 * float(histogram.get(level, 0.0)) for level in levels]
        shade = cmap(0.15 + 0.7 * k / max(1, len(folds) - 1))
        ax.bar(x - 0.4 + width * (k + 0.5), shares, width, color=shade, label=f"fold {fold['index']}")
    ax.set_xticks(x, levels)
    ax.set_xlabel("target exposure (fraction of NAV)")
    ax.set_ylabel("share of test decisions (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Policy exposure on the test window")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_mean_weights(report: dict, path) -> Path:
    """Portfolio mode: the policy's mean target weight per asset and cash on each fold's test window."""
    folds = report["folds"]
    if not folds:
        raise ValueError("the report has no folds")
    names = list(folds[0][POLICY]["test_mean_weights"])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(folds) + 3), 4.0))
    bottom = np.zeros(len(folds))
    cmap = plt.get_cmap("tab10")
    for k, name in enumerate(names):
        shares = np.array([100.0 * f[POLICY]["test_mean_weights"][name] for f in folds])
        color = BASELINE_COLORS["cash"] if name == "cash" else cmap(k % 10)
        ax.bar([f"fold {f['index']}" for f in folds], shares, 0.6, bottom=bottom, color=color, label=name)
        bottom += shares
    ax.set_ylabel("mean target weight on test bars (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Policy allocation on the test window")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
