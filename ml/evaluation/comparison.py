"""Several models judged on the same folds, seeds and symbols: who beat whom, and by how much.

Rows are one test backtest each: ``{fold, seed, symbol, model, sharpe, ...}``. Passive
baselines (buy-and-hold) have no seed: one row per fold and symbol, paired with every seed's
policies. Two models are compared only on the same fold, seed and symbol.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import bootstrap

from ml.evaluation.backtest import Backtest

PASSIVE = "buy_and_hold"
METRICS = ("sharpe", "total_return", "max_drawdown", "annual_turnover")


def backtest_row(fold: int, seed: int | None, symbol: str, model: str, backtest: Backtest, ppy: float) -> dict:
    """One test backtest as a row: where it ran, which model, and its headline metrics."""
    metrics = backtest.metrics(ppy)
    return {"fold": fold, "seed": seed, "symbol": symbol, "model": model,
            **{name: float(metrics[name]) for name in METRICS}}


def summarize_comparison(rows: list[dict], models: list[str], held_out: str | None = None,
                         metric: str = "sharpe") -> dict:
    """Per symbol: each model's mean ``metric`` and, for every pair (earlier in ``models`` against
    later), how often the first beat the second. Over the symbols not held out: the same counts,
    the mean paired difference with a 95% bootstrap interval, and the seed spread (each seed's mean
    over symbols and folds)."""
    frame = pd.DataFrame(rows)
    policies = frame[frame["model"] != PASSIVE]
    wide = policies.pivot_table(index=["fold", "seed", "symbol"], columns="model", values=metric)
    if PASSIVE in models:
        passive = frame[frame["model"] == PASSIVE].set_index(["fold", "symbol"])[metric]
        wide[PASSIVE] = [passive[(fold, symbol)] for fold, _, symbol in wide.index]
    pairs = [(a, b) for i, a in enumerate(models) for b in models[i + 1:]]

    per_symbol = {}
    for symbol, group in wide.groupby(level="symbol"):
        per_symbol[symbol] = {"held_out": symbol == held_out,
                              metric: {model: float(group[model].mean()) for model in models},
                              "beats": {f"{a}>{b}": _wins(group[a], group[b]) for a, b in pairs}}
    pooled = wide[[symbol != held_out for _, _, symbol in wide.index]]
    by_seed = pooled.groupby(level="seed")[models].mean()
    return {
        "metric": metric,
        "per_symbol": per_symbol,
        "beats": {f"{a}>{b}": _wins(pooled[a], pooled[b]) for a, b in pairs},
        "paired_difference": {f"{a}-{b}": _paired_difference(pooled[a] - pooled[b]) for a, b in pairs},
        "seed_spread": {model: {"mean": float(by_seed[model].mean()),
                                "std": float(by_seed[model].std(ddof=1)) if len(by_seed) > 1 else 0.0,
                                "min": float(by_seed[model].min()), "max": float(by_seed[model].max())}
                        for model in models},
    }


def _wins(a: pd.Series, b: pd.Series) -> str:
    return f"{int((a > b).sum())}/{len(a)}"


def _paired_difference(difference: pd.Series) -> dict:
    """Mean of the paired differences and its 95% percentile-bootstrap interval (scipy).

    Each (fold, seed, symbol) counts as one draw; symbols share a fold's market, so the interval
    is narrower than one over independent years would be."""
    values = difference.to_numpy(dtype="float64")
    out = {"mean": float(values.mean()), "pairs": int(len(values))}
    if len(values) > 1 and np.ptp(values) > 0:
        interval = bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=2000, method="percentile",
                             random_state=0).confidence_interval
        out |= {"ci_low": float(interval.low), "ci_high": float(interval.high)}
    return out
