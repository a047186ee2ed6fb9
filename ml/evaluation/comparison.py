"""Several models judged on the same folds, seeds and symbols: who beat whom, and by how much.

Rows are one test backtest each: ``{fold, seed, symbol, model, sharpe, ...}``. Rules that
learn nothing (buy-and-hold, the strategies a rule-selection policy picks from) have no seed:
one row per fold and symbol, paired with every seed's policies. Two models are compared only on
the same fold, seed and symbol; the uncertainty of their difference is judged over folds, the
unit that varies independently.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import bootstrap

from ml.config import STRATEGIES
from ml.evaluation.backtest import Backtest

PASSIVE = "buy_and_hold"
# Per fold and symbol, the rule with the best test result: a choice no one could have made in
# advance, the ceiling a rule-selection policy is measured against.
BEST_RULE = "best_rule_in_hindsight"
RESERVED_NAMES = (*STRATEGIES, BEST_RULE)  # not for a model of the user's
METRICS = ("sharpe", "total_return", "max_drawdown", "annual_turnover")


def backtest_row(fold: int | str, seed: int | None, symbol: str, model: str, backtest: Backtest,
                 ppy: float) -> dict:
    """One test backtest as a row: where it ran, which model, and its headline metrics.

    ``fold`` names the test period: rows with the same one share their test bars' dates."""
    metrics = backtest.metrics(ppy)
    return {"fold": fold, "seed": seed, "symbol": symbol, "model": model,
            **{name: float(metrics[name]) for name in METRICS}}


def summarize_comparison(rows: list[dict], models: list[str], held_out: str | None = None,
                         metric: str = "sharpe") -> dict:
    """Per symbol: each model's mean ``metric`` and, for every pair (earlier in ``models`` against
    later), how often the first was strictly higher on the same fold and seed.

    Over the symbols not held out: the same counts; the mean paired difference with a 95% interval
    from a bootstrap over folds (seeds and symbols of one fold share its test bars and its market,
    so the fold is the unit that varies independently); and the seed spread of each policy: its mean
    per seed, and how far one test result moves with the seed alone (the standard deviation over
    seeds in each fold and symbol, averaged).
    """
    frame = pd.DataFrame(rows)
    seedless = frame["seed"].isna()
    policies = frame[~seedless]
    wide = policies.pivot_table(index=["fold", "seed", "symbol"], columns="model", values=metric)
    trained = [model for model in models if model in wide.columns]
    for model in models:
        if model not in trained:  # a rule: its one row per fold and symbol pairs with every seed
            rule = frame[seedless & (frame["model"] == model)].set_index(["fold", "symbol"])[metric]
            wide[model] = [rule[(fold, symbol)] for fold, _, symbol in wide.index]
    pairs = [(a, b) for i, a in enumerate(models) for b in models[i + 1:]]

    per_symbol = {}
    for symbol, group in wide.groupby(level="symbol"):
        per_symbol[symbol] = {"held_out": symbol == held_out,
                              metric: {model: float(group[model].mean()) for model in models},
                              "beats": {f"{a}>{b}": _wins(group[a], group[b]) for a, b in pairs}}
    pooled = wide[[symbol != held_out for _, _, symbol in wide.index]]
    cells = pooled.groupby(level=["fold", "symbol"])
    return {
        "metric": metric,
        "per_symbol": per_symbol,
        "beats": {f"{a}>{b}": _wins(pooled[a], pooled[b]) for a, b in pairs},
        "paired_difference": {f"{a}-{b}": _fold_bootstrap(pooled[a] - pooled[b]) for a, b in pairs},
        "seed_spread": {model: {"per_seed_mean": {int(seed): float(value) for seed, value
                                                  in pooled.groupby(level="seed")[model].mean().items()},
                                "std_within_cell": float(cells[model].std(ddof=1).mean())
                                if pooled.index.get_level_values("seed").nunique() > 1 else 0.0}
                        for model in trained},
    }


def _wins(a: pd.Series, b: pd.Series) -> str:
    """How often ``a`` was strictly higher (a tie, such as two flat policies, is not a win)."""
    return f"{int((a > b).sum())}/{len(a)}"


def _fold_bootstrap(difference: pd.Series) -> dict:
    """Mean paired difference (over every fold, seed and symbol) and its 95% percentile-bootstrap
    interval (scipy) resampling folds: each fold's mean difference is one draw."""
    by_fold = difference.groupby(level="fold").mean().to_numpy(dtype="float64")
    out = {"mean": float(difference.mean()), "pairs": int(len(difference)), "folds": int(len(by_fold))}
    if len(by_fold) > 1 and np.ptp(by_fold) > 0:
        interval = bootstrap((by_fold,), np.mean, confidence_level=0.95, n_resamples=2000, method="percentile",
                             rng=np.random.default_rng(0)).confidence_interval
        out |= {"ci_low": float(interval.low), "ci_high": float(interval.high)}
    return out
