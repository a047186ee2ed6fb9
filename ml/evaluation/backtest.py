"""Backtests of a policy and of baselines, through the training environment itself.

Using ``TradingEnv`` for evaluation means validation, test and baselines
share training's accounting: next-open fills and the same costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch

from ml.config import CostConfig, EnvConfig
from ml.env.action_space import ActionSpace
from ml.env.risk import RiskOverlay
from ml.env.trading_env import TradingEnv
from ml.evaluation.metrics import summarize
from ml.market.series import MarketSeries

# decide(features [1, A * F], position [1, A], bar index) -> target [1, A]
Decide = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class Backtest:
    symbols: list[str]
    timestamps: pd.Series  # bars first..last of the segment
    nav: np.ndarray  # NAV at each bar's close, starting at 1.0
    weights: np.ndarray  # [bars, A] share of NAV in each asset at each bar's close
    decision: np.ndarray  # [bars - 1, A] target decided on each bar but the last
    traded: np.ndarray  # traded notional over NAV per step
    cost: np.ndarray  # costs paid per step
    executed: np.ndarray | None = None  # [bars - 1, A] the filled target, after the risk overlay (with one)
    interventions: np.ndarray | None = None  # [bars - 1, rules] gross exposure each risk rule removed
    trips: np.ndarray | None = None  # [bars - 1, breakers] bool: the breakers that tripped on each bar

    @property
    def position(self) -> np.ndarray:
        """Net exposure at each bar's close: the exposure of one asset, the invested share of a portfolio."""
        return self.weights.sum(axis=1)

    def metrics(self, ppy: float) -> dict[str, float]:
        return summarize(self.nav, np.abs(self.weights[1:]).sum(axis=1), self.traded, self.cost, ppy)

    def frame(self) -> pd.DataFrame:
        weights = ({f"weight_{symbol}": self.weights[:, i] for i, symbol in enumerate(self.symbols)}
                   if len(self.symbols) > 1 else {})
        return pd.DataFrame({"timestamp": self.timestamps.to_numpy(), "nav": self.nav, **weights,
                             "position": self.position})


@torch.no_grad()
def run_backtest(decide: Decide, series: MarketSeries, segment: tuple[int, int], costs: CostConfig,
                 action_space: ActionSpace, periods_per_year: float = 252.0,
                 risk: RiskOverlay | None = None) -> Backtest:
    """Start flat at bar ``segment[0]``, decide on every bar up to ``segment[1] - 1``.

    ``periods_per_year``: bars a year of the series' interval, which spreads the borrow cost over bars.
    ``risk``: the overlay between each decision and its fill (the overlay's state starts fresh).
    """
    first, last = segment
    config = EnvConfig(episode_bars=last - first + 1, ruin_fraction=0.0, periods_per_year=periods_per_year)
    env = TradingEnv(series, 1, action_space, costs, config, risk)
    device = series.device
    env.reset(torch.tensor([first], device=device), torch.tensor([last], device=device))
    n, assets = last - first, series.n_assets
    nav, weights = np.ones(n + 1), np.zeros((n + 1, assets))
    decision, traded, cost = np.zeros((n, assets)), np.zeros(n), np.zeros(n)
    executed = np.zeros((n, assets))
    interventions, trips = [], []
    features, held = env.observe()
    for i in range(n):
        target = decide(features, held, first + i).reshape(1, assets)
        decision[i] = target[0].double().cpu().numpy()
        result = env.step(target)
        nav[i + 1], weights[i + 1] = float(result.nav[0]), result.position[0].double().cpu().numpy()
        traded[i], cost[i] = float(result.traded[0]), float(result.cost[0])
        executed[i] = result.executed[0].double().cpu().numpy()
        if risk is not None:
            interventions.append(result.interventions[0].cpu().numpy())
            trips.append(result.trips[0].cpu().numpy())
        features, held = result.features, result.position
    return Backtest(series.symbols, series.timestamps.iloc[first:last + 1].reset_index(drop=True), nav, weights,
                    decision, traded, cost, executed,
                    np.array(interventions, dtype="float64") if risk is not None else None,
                    np.array(trips, dtype=bool) if risk is not None else None)


def target_series_policy(targets: np.ndarray, device: torch.device) -> Decide:
    """A decision function that replays precomputed targets [T, A], one row per bar."""
    series = torch.tensor(targets, dtype=torch.float32, device=device)  # a copy: baseline arrays may be read-only
    return lambda _features, _position, t: series[t]


def run_baselines(series: MarketSeries, segment: tuple[int, int], costs: CostConfig, action_space: ActionSpace,
                  seed: int = 0, names: tuple[str, ...] | None = None,
                  periods_per_year: float = 252.0, risk: RiskOverlay | None = None) -> dict[str, Backtest]:
    """The action space's baselines (or those in ``names``) on the segment, with the policy's costs and limits."""
    return {name: run_backtest(target_series_policy(targets, series.device), series, segment, costs, action_space,
                               periods_per_year, risk)
            for name, targets in action_space.baselines(series, seed).items() if names is None or name in names}
