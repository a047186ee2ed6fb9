"""Does the edge survive scrutiny? Everything the report says beyond the fold metrics.

Per fold, from the test backtest only: the trade ledger and its statistics,
beta and alpha to the benchmark, results per market regime, and the same
decisions replayed at several cost multiples; the probability of backtest
overfitting over every checkpoint and seed the selection scored on
validation. Per run: the named stress windows inside test segments, the cost
multiple at which the edge disappears, Hansen's SPA test against the whole
baseline set, and the probabilistic Sharpe of the active return. None of it
feeds back into selection: it is computed after the test window was read once.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ml.config import PipelineConfig
from ml.env.action_space import ActionSpace
from ml.env.risk import RiskOverlay
from ml.evaluation.backtest import Backtest, run_baselines
from ml.evaluation.costs import edge_disappears_at, replay_at_cost_multiples, scaled_costs
from ml.evaluation.exposure_stats import beta_alpha, equal_weight_index, regime_results
from ml.evaluation.metrics import bar_returns
from ml.evaluation.overfitting import probability_of_backtest_overfitting, spa_test
from ml.evaluation.splits import Fold
from ml.evaluation.statistics import probabilistic_sharpe_ratio
from ml.evaluation.stress import stress_results
from ml.evaluation.trades import segment_prices, trade_ledger, trade_statistics
from ml.market.calendar import periods_per_year
from ml.market.series import MarketSeries

COST_MULTIPLES = (0.0, 1.0, 2.0, 5.0)
REGIME_WINDOW = 60  # bars of trailing volatility and return that label a regime


def benchmark_close(series: MarketSeries) -> np.ndarray:
    """The level the benchmark holds: the asset itself, or the equal-weight index of a portfolio."""
    close = series.close.double().cpu().numpy()
    return close[:, 0] if close.shape[1] == 1 else equal_weight_index(close)


def fold_robustness(test: Backtest, baselines: dict[str, Backtest], series: MarketSeries, fold: Fold,
                    config: PipelineConfig, space: ActionSpace,
                    validation_returns: np.ndarray | None) -> tuple[dict, pd.DataFrame]:
    """One fold's extra sections, and its trade ledger."""
    ppy = periods_per_year(config.data.interval, config.data.calendar)
    ledger = trade_ledger(test, *segment_prices(series, fold.test))
    policy_returns, benchmark_returns = bar_returns(test.nav), bar_returns(baselines[space.benchmark].nav)
    risk = RiskOverlay.from_config(config, series.n_assets)
    replays = replay_at_cost_multiples(test.decision, series, fold.test, config.costs, space, COST_MULTIPLES, ppy,
                                       risk)
    benchmark_replays = {m: run_baselines(series, fold.test, scaled_costs(config.costs, m), space, fold.index,
                                          names=(space.benchmark,), periods_per_year=ppy,
                                          risk=risk)[space.benchmark]
                         for m in COST_MULTIPLES}
    metrics = {m: replays[m].metrics(ppy) for m in COST_MULTIPLES}
    extras = {
        "trades": trade_statistics(ledger),
        "beta_alpha": beta_alpha(policy_returns, benchmark_returns, ppy),
        "regimes": regime_results(pd.Series(policy_returns, index=test.timestamps.iloc[1:].to_numpy()),
                                  benchmark_close(series), series.timestamps, REGIME_WINDOW, ppy),
        "cost_sensitivity": {
            f"{m:g}x": {"policy_sharpe": metrics[m]["sharpe"], "policy_total_return": metrics[m]["total_return"],
                        "benchmark_sharpe": benchmark_replays[m].metrics(ppy)["sharpe"]}
            for m in COST_MULTIPLES},
        "pbo": (probability_of_backtest_overfitting(validation_returns.T)
                if validation_returns is not None and validation_returns.shape[0] >= 2 else None),
    }
    return extras, ledger


def run_robustness(folds: list[dict], curves: list[pd.DataFrame], tests: list[Backtest],
                   baselines: list[dict[str, Backtest]], config: PipelineConfig, space: ActionSpace) -> dict:
    """The run's stress windows, cost sensitivity, PBO, SPA and active-return PSR, from the folds' test results."""
    ppy = periods_per_year(config.data.interval, config.data.calendar)
    multiples = [f"{m:g}x" for m in COST_MULTIPLES]

    def mean_over_folds(key: str, multiple: str) -> float:
        return float(np.mean([f["cost_sensitivity"][multiple][key] for f in folds]))

    policy = {float(m[:-1]): mean_over_folds("policy_sharpe", m) for m in multiples}
    benchmark = {float(m[:-1]): mean_over_folds("benchmark_sharpe", m) for m in multiples}
    cost_sensitivity = {
        "multiples": multiples, "mean_test_sharpe": {"policy": dict(zip(multiples, policy.values())),
                                                     space.benchmark: dict(zip(multiples, benchmark.values())),
                                                     "cash": dict.fromkeys(multiples, 0.0)},
        "edge_disappears_at": {space.benchmark: edge_disappears_at(policy, benchmark),
                               "cash": edge_disappears_at(policy, dict.fromkeys(policy, 0.0))},
    }
    fold_pbos = [f["pbo"] for f in folds if f.get("pbo")]
    pbo = ({"value": float(np.mean([p["pbo"] for p in fold_pbos])), "folds": len(fold_pbos),
            "trials": int(sum(p["n_trials"] for p in fold_pbos)),
            "per_fold": [p["pbo"] for p in fold_pbos]} if fold_pbos else None)
    # Every test bar of every fold, back to back: the policy against the whole baseline set.
    policy_returns = np.concatenate([bar_returns(t.nav) for t in tests])
    baseline_returns = {name: np.concatenate([bar_returns(b[name].nav) for b in baselines]) for name in baselines[0]}
    active = policy_returns - baseline_returns[space.benchmark]
    trades = [f["trades"] for f in folds]
    return {
        "stress": stress_results(curves, ppy),
        "cost_sensitivity": cost_sensitivity,
        "pbo": pbo,
        "spa": spa_test(policy_returns, baseline_returns, seed=0),
        "active_return": {"benchmark": space.benchmark, "bars": int(active.size),
                          "annualized_mean": float(active.mean() * ppy),
                          "psr": probabilistic_sharpe_ratio(active)},
        "trades": {"count": int(sum(t["count"] for t in trades)),
                   "win_rate": _weighted(trades, "win_rate"), "average_holding_bars":
                   _weighted(trades, "average_holding_bars")},
    }


def _weighted(trades: list[dict], key: str) -> float | None:
    """Mean of a per-fold trade statistic, weighted by the folds' trade counts."""
    counts = np.array([t["count"] for t in trades], dtype="float64")
    if counts.sum() == 0:
        return None
    return float(np.sum([t[key] * c for t, c in zip(trades, counts) if c]) / counts.sum())
