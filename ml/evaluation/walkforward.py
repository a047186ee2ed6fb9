"""One walk-forward fold: train on its train window, select on validation, report on test.

``train_fold`` also trains a CPCV split (``CPCVFold``): several train segments, one validation segment.

Selection (which update's weights to keep) reads the validation backtest
only; the test backtest and the baselines run once, after training, on the
identical window and costs, for the report.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from ml.agent.checkpoint import seed_everything
from ml.agent.policy import ActorCritic, model_options
from ml.agent.ppo import TrainResult, train
from ml.agent.regime import fit_regimes
from ml.config import PipelineConfig
from ml.env.action_space import make_action_space
from ml.env.risk import RiskOverlay
from ml.env.trading_env import TradingEnv
from ml.evaluation.backtest import Backtest, run_backtest, run_baselines
from ml.evaluation.metrics import bar_returns
from ml.evaluation.risk_report import fold_risk
from ml.evaluation.splits import CPCVFold, Fold
from ml.evaluation.statistics import (deflated_sharpe_ratio, expected_max_sharpe, probabilistic_sharpe_ratio,
                                      sharpe_ci)
from ml.market.calendar import periods_per_year
from ml.market.series import MarketSeries


def backtest_policy(agent: ActorCritic, series: MarketSeries, segment: tuple[int, int],
                    config: PipelineConfig, with_risk: bool = True) -> Backtest:
    """The policy's greedy decisions on the segment, through the run's risk overlay (unless ``with_risk`` is off)."""
    risk = RiskOverlay.from_config(config, series.n_assets) if with_risk else None
    return run_backtest(lambda features, position, _t: agent.decide(features, position), series, segment,
                        config.costs, agent.action_space, periods_per_year(config.data.interval, config.data.calendar),
                        risk)


def selection_score(backtest: Backtest, config: PipelineConfig) -> float:
    metrics = backtest.metrics(periods_per_year(config.data.interval, config.data.calendar))
    return float(metrics[config.selection_metric])


def new_agent(series: MarketSeries, config: PipelineConfig, fold: Fold | CPCVFold) -> ActorCritic:
    """A freshly initialized policy for the series, normalized (and its regime model fitted) on the
    fold's training bars only."""
    agent = ActorCritic(series.features.shape[1], make_action_space(config.action, series.n_assets),
                        **model_options(config.ppo))
    mean, std = series.feature_stats(fold.train)
    agent.set_normalization(mean.cpu(), std.cpu())
    if agent.regime is not None:
        agent.regime.set_model(fit_regimes(training_returns(series, fold), agent.regime.states))
    return agent


def training_returns(series: MarketSeries, fold: Fold | CPCVFold) -> np.ndarray:
    """The one-bar log returns of the fold's training bars (the last feature column), segments joined."""
    if not series.feature_module.return_window:
        raise ValueError("the regime model reads the one-bar returns: build the series with a return window "
                         "(PipelineConfig.return_window)")
    segments = (fold.train,) if np.ndim(fold.train) == 1 else fold.train
    return torch.cat([series.features[first:last + 1, -1] for first, last in segments]).cpu().double().numpy()


def train_fold(series: MarketSeries, fold: Fold | CPCVFold, config: PipelineConfig,
               log: Callable[[dict, int], None] | None = None, checkpoint_path=None) -> TrainResult:
    ppo = config.ppo
    seed_everything(ppo.seed, ppo.deterministic)  # the initial weights are part of the seeded run
    agent = new_agent(series, config, fold)
    env_config = replace(config.env, periods_per_year=periods_per_year(config.data.interval, config.data.calendar))
    env = TradingEnv(series, ppo.num_envs, agent.action_space, config.costs, env_config,
                     RiskOverlay.from_config(config, series.n_assets), record_risk=False)

    def validate(candidate: ActorCritic) -> tuple[float, np.ndarray]:
        # The bar returns go with the score: every checkpoint scored is a trial for the overfitting statistics.
        backtest = backtest_policy(candidate, series, fold.validation, config)
        return selection_score(backtest, config), bar_returns(backtest.nav)

    return train(ppo, env, agent.to(series.device), fold.train, validate, log, checkpoint_path,
                 collapse_share=config.action.collapse_share)


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


def selection_allowance(trial_sharpes: list[float] | None, ppy: float) -> float:
    """The annualized validation Sharpe that picking the best of the trials scores by luck alone.

    The kept checkpoint's validation Sharpe is the maximum over every trial the selection scored;
    with zero true skill that maximum is still expected to be this high (the deflated Sharpe's
    expected maximum, from the trials' spread).
    """
    if not trial_sharpes or len(trial_sharpes) < 2:
        return 0.0
    per_bar = np.asarray(trial_sharpes, dtype="float64") / np.sqrt(ppy)
    return expected_max_sharpe(len(per_bar), float(np.var(per_bar, ddof=1))) * float(np.sqrt(ppy))


def evaluate_fold(agent: ActorCritic, series: MarketSeries, fold: Fold, config: PipelineConfig,
                  trial_sharpes: list[float] | None = None) -> tuple[dict, Backtest, dict[str, Backtest]]:
    """Policy on validation and test, baselines on the identical test window and costs."""
    ppy = periods_per_year(config.data.interval, config.data.calendar)
    agent = agent.to(series.device).eval()
    space = agent.action_space
    validation = backtest_policy(agent, series, fold.validation, config)
    test = backtest_policy(agent, series, fold.test, config)
    risk = RiskOverlay.from_config(config, series.n_assets)
    baselines = run_baselines(series, fold.test, config.costs, space, seed=fold.index, periods_per_year=ppy,
                              risk=risk)
    if config.risk.target_volatility:  # the benchmark with volatility targeting alone, no breakers
        baselines[f"{space.benchmark}_vol_target"] = run_baselines(
            series, fold.test, config.costs, space, seed=fold.index, names=(space.benchmark,), periods_per_year=ppy,
            risk=risk.volatility_only())[space.benchmark]
    # Reported for the gate's "learned something" rule; selection has already happened in training.
    validation_nulls = run_baselines(series, fold.validation, config.costs, space, seed=fold.index,
                                     names=space.null_baselines, periods_per_year=ppy, risk=risk)
    result = {
        "index": fold.index,
        **fold.dates(series.timestamps),
        "policy": {"validation": validation.metrics(ppy),
                   "selection_allowance": selection_allowance(trial_sharpes, ppy),
                   "test": test.metrics(ppy) | uncertainty(test, ppy, trial_sharpes),
                   "collapse": space.collapse_report(torch.from_numpy(test.decision), config.action.collapse_share),
                   **space.decision_summary(test.decision, series.symbols)},
        "baselines": {name: bt.metrics(ppy) | uncertainty(bt, ppy) for name, bt in baselines.items()},
        "validation_baselines": {name: bt.metrics(ppy) for name, bt in validation_nulls.items()},
    }
    if risk is not None:
        unmanaged = {"policy": backtest_policy(agent, series, fold.test, config, with_risk=False),
                     space.benchmark: run_baselines(series, fold.test, config.costs, space, seed=fold.index,
                                                    names=(space.benchmark,), periods_per_year=ppy)[space.benchmark]}
        result["risk"] = fold_risk({"policy": test, space.benchmark: baselines[space.benchmark]}, unmanaged, ppy)
    return result, test, baselines


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
