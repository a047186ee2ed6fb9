"""One walk-forward fold: train on its train window, select on validation, report on test.

Selection (which update's weights to keep) reads the validation backtest
only; the test backtest runs once, after training, for the report.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np

from ml.config import PipelineConfig
from ml.env import TradingEnv
from ml.evaluation.backtest import Backtest, baseline_exposures, exposure_series_policy, run_backtest
from ml.evaluation.metrics import bar_returns, periods_per_year
from ml.evaluation.statistics import deflated_sharpe_ratio, probabilistic_sharpe_ratio, sharpe_ci
from ml.evaluation.splits import Fold
from ml.market import MarketSeries
from ml.policy import ActorCritic
from ml.ppo import TrainResult, seed_everything, train

COLLAPSE_SHARE = 0.98  # deterministic policy choosing one exposure this often has collapsed


def policy_decide(agent: ActorCritic):
    return lambda features, position, _t: agent.decide(features, position)


def backtest_policy(agent: ActorCritic, series: MarketSeries, segment: tuple[int, int],
                    config: PipelineConfig) -> Backtest:
    return run_backtest(policy_decide(agent), series.ohlcv, series.features, segment,
                        series.timestamps, config.costs, series.fill_at_open)


def selection_score(backtest: Backtest, config: PipelineConfig) -> float:
    metrics = backtest.metrics(periods_per_year(config.data.interval, config.data.calendar))
    return float(metrics[config.selection_metric])


def train_fold(series: MarketSeries, fold: Fold, config: PipelineConfig,
               log: Callable[[dict, int], None] | None = None, checkpoint_path=None) -> TrainResult:
    ppo = config.ppo
    seed_everything(ppo.seed, ppo.deterministic)  # the initial weights are part of the seeded run
    agent = ActorCritic(series.feature_module.n_features, ppo.exposure_levels, ppo.hidden,
                        ppo.action_mode, ppo.min_exposure, ppo.max_exposure)
    mean, std = series.feature_stats(fold.train)
    agent.set_normalization(mean.cpu(), std.cpu())
    env_config = replace(config.env, periods_per_year=periods_per_year(config.data.interval, config.data.calendar))
    env = TradingEnv(series.ohlcv, series.features, ppo.num_envs, config.costs, env_config, series.fill_at_open)

    def validate(candidate: ActorCritic) -> float:
        return selection_score(backtest_policy(candidate, series, fold.validation, config), config)

    return train(ppo, env, agent.to(series.device), fold.train, validate, log, checkpoint_path)


def collapse_check(backtest: Backtest) -> dict:
    exposure, share = backtest.dominant_decision()
    return {"alarm": share >= COLLAPSE_SHARE, "dominant_exposure": exposure, "dominant_share": share}


def uncertainty(backtest: Backtest, ppy: float, trial_sharpes: list[float] | None = None) -> dict:
    """Bootstrap interval of the Sharpe ratio, probabilistic Sharpe, and (with trials) deflated Sharpe.

    ``trial_sharpes`` are the validation Sharpes of every checkpoint the selection looked at:
    picking the best of them is a multiple-testing problem the deflated Sharpe accounts for.
    """
    returns = bar_returns(backtest.nav)
    low, high = sharpe_ci(backtest.nav, ppy, n_resamples=1000, seed=0)
    out = {"sharpe_ci_low": low, "sharpe_ci_high": high, "psr": probabilistic_sharpe_ratio(returns)}
    if trial_sharpes is not None and len(trial_sharpes) > 1:
        per_bar = np.asarray(trial_sharpes, dtype="float64") / np.sqrt(ppy)
        out["dsr"] = deflated_sharpe_ratio(returns, len(per_bar), float(np.var(per_bar, ddof=1)))
        out["dsr_trials"] = len(per_bar)
    return out


def evaluate_fold(agent: ActorCritic, series: MarketSeries, fold: Fold, config: PipelineConfig,
                  trial_sharpes: list[float] | None = None) -> tuple[dict, Backtest, dict[str, Backtest]]:
    """Policy on validation and test, baselines on the identical test window and costs."""
    ppy = periods_per_year(config.data.interval, config.data.calendar)
    agent = agent.to(series.device).eval()
    validation = backtest_policy(agent, series, fold.validation, config)
    test = backtest_policy(agent, series, fold.test, config)
    close = series.ohlcv[:, 3].double().cpu().numpy()
    baselines = {
        name: run_backtest(exposure_series_policy(exposures, series.device), series.ohlcv, series.features,
                           fold.test, series.timestamps, config.costs, series.fill_at_open)
        for name, exposures in baseline_exposures(close, config.ppo.exposure_levels, seed=fold.index).items()
    }
    result = {
        "index": fold.index,
        **fold.dates(series.timestamps),
        "policy": {"validation": validation.metrics(ppy),
                   "test": test.metrics(ppy) | uncertainty(test, ppy, trial_sharpes),
                   "collapse": collapse_check(test),
                   "test_exposure_histogram": _histogram(test.decision)},
        "baselines": {name: bt.metrics(ppy) | uncertainty(bt, ppy) for name, bt in baselines.items()},
    }
    return result, test, baselines


def _histogram(decisions: np.ndarray) -> dict[str, float]:
    values, counts = np.unique(np.round(decisions, 1), return_counts=True)
    return {f"{v:+.2f}": float(c / counts.sum()) for v, c in zip(values, counts)}


def aggregate(folds: list[dict]) -> dict:
    """Mean of each test metric across folds, and how often the policy beat each baseline."""
    keys = ("total_return", "annualized_return", "sharpe", "max_drawdown", "annual_turnover", "costs_paid")

    def mean_of(rows: list[dict]) -> dict:
        return {k: float(np.mean([r[k] for r in rows])) for k in keys}

    policy_tests = [f["policy"]["test"] for f in folds]
    baseline_names = list(folds[0]["baselines"])
    out = {"policy": mean_of(policy_tests),
           "baselines": {b: mean_of([f["baselines"][b] for f in folds]) for b in baseline_names},
           "folds_beating": {}}
    for name in baseline_names:
        wins = sum(f["policy"]["test"]["sharpe"] > f["baselines"][name]["sharpe"] for f in folds)
        out["folds_beating"][name] = {"sharpe": f"{wins}/{len(folds)}"}
    out["collapse_alarm"] = any(f["policy"]["collapse"]["alarm"] for f in folds)
    return out

