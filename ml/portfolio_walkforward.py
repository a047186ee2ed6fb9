"""One walk-forward fold in portfolio mode: train, select on validation, report on test.

The same protocol as single-asset mode (``ml.walkforward``): selection reads
the validation backtest only; the test backtest and the baselines (cash,
equal weight, each asset held alone) run once on the identical window.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np

from ml.config import PipelineConfig
from ml.evaluation.metrics import periods_per_year
from ml.evaluation.portfolio_backtest import PortfolioBacktest, portfolio_baselines, run_portfolio_backtest
from ml.evaluation.splits import Fold
from ml.policy import ActorCritic
from ml.portfolio import PortfolioEnv, PortfolioSeries
from ml.ppo import TrainResult, seed_everything, train
from ml.walkforward import COLLAPSE_SHARE, selection_score, uncertainty


def backtest_portfolio_policy(agent: ActorCritic, series: PortfolioSeries, segment: tuple[int, int],
                              config: PipelineConfig) -> PortfolioBacktest:
    return run_portfolio_backtest(lambda features, weights, _t: agent.decide(features, weights),
                                  series, segment, config.costs)


def train_portfolio_fold(series: PortfolioSeries, fold: Fold, config: PipelineConfig,
                         log: Callable[[dict, int], None] | None = None, checkpoint_path=None) -> TrainResult:
    ppo = config.ppo
    ppy = periods_per_year(config.data.interval, config.data.calendar)
    seed_everything(ppo.seed, ppo.deterministic)  # the initial weights are part of the seeded run
    agent = ActorCritic(series.features.shape[1], ppo.exposure_levels, ppo.hidden, "portfolio",
                        n_assets=series.n_assets)
    mean, std = series.feature_stats(fold.train)
    agent.set_normalization(mean.cpu(), std.cpu())
    env = PortfolioEnv(series, ppo.num_envs, config.costs, replace(config.env, periods_per_year=ppy))

    def validate(candidate: ActorCritic) -> float:
        return selection_score(backtest_portfolio_policy(candidate, series, fold.validation, config), config)

    return train(ppo, env, agent.to(series.device), fold.train, validate, log, checkpoint_path)


def evaluate_portfolio_fold(agent: ActorCritic, series: PortfolioSeries, fold: Fold, config: PipelineConfig,
                            trial_sharpes: list[float] | None = None
                            ) -> tuple[dict, PortfolioBacktest, dict[str, PortfolioBacktest]]:
    """Policy on validation and test, baselines on the identical test window and costs."""
    ppy = periods_per_year(config.data.interval, config.data.calendar)
    agent = agent.to(series.device).eval()
    validation = backtest_portfolio_policy(agent, series, fold.validation, config)
    test = backtest_portfolio_policy(agent, series, fold.test, config)
    baselines = {name: run_portfolio_backtest(decide, series, fold.test, config.costs)
                 for name, decide in portfolio_baselines(series).items()}
    weights, share = test.dominant_decision()
    mean_weights = test.decision.mean(axis=0)
    result = {
        "index": fold.index,
        **fold.dates(series.timestamps),
        "policy": {"validation": validation.metrics(ppy),
                   "test": test.metrics(ppy) | uncertainty(test, ppy, trial_sharpes),
                   "collapse": {"alarm": share >= COLLAPSE_SHARE, "dominant_weights": weights,
                                "dominant_share": share},
                   "test_mean_weights": {symbol: float(w) for symbol, w in zip(series.symbols, mean_weights)}
                   | {"cash": float(1.0 - np.sum(mean_weights))}},
        "baselines": {name: bt.metrics(ppy) | uncertainty(bt, ppy) for name, bt in baselines.items()},
    }
    return result, test, baselines
