"""Backtests in portfolio mode, of a policy and of its baselines, through ``PortfolioEnv``.

The baselines run on the identical window and costs: cash, equal weight
(rebalanced to 1/A on every bar), and buying and holding each asset alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch

from ml.env import CostConfig, EnvConfig
from ml.evaluation.metrics import summarize
from ml.portfolio import SAME_ALLOCATION_TOLERANCE, PortfolioEnv, PortfolioSeries

# decide(features [1, A * F], weights [1, A], bar index) -> target weights [1, A]
DecideWeights = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class PortfolioBacktest:
    symbols: list[str]
    timestamps: pd.Series  # bars first..last of the segment
    nav: np.ndarray  # NAV at each bar's close, starting at 1.0
    weights: np.ndarray  # [bars, A] weights held at each bar's close
    decision: np.ndarray  # [bars - 1, A] target weights decided on each bar but the last
    traded: np.ndarray  # traded notional over NAV per step
    cost: np.ndarray  # costs paid per step

    def metrics(self, ppy: float) -> dict[str, float]:
        """The single-asset metrics, with exposure = the invested share (sum of weights)."""
        return summarize(self.nav, self.weights[1:].sum(axis=1), self.traded, self.cost, ppy)

    def frame(self) -> pd.DataFrame:
        weights = {f"weight_{symbol}": self.weights[:, i] for i, symbol in enumerate(self.symbols)}
        return pd.DataFrame({"timestamp": self.timestamps.to_numpy(), "nav": self.nav, **weights,
                             "position": self.weights.sum(axis=1)})

    def dominant_decision(self, tolerance: float = SAME_ALLOCATION_TOLERANCE) -> tuple[list[float], float]:
        """The median allocation and the share of decisions within ``tolerance`` of it, asset by asset."""
        median = np.median(self.decision, axis=0)
        near = np.abs(self.decision - median).max(axis=1) <= tolerance
        return median.round(4).tolist(), float(near.mean())


@torch.no_grad()
def run_portfolio_backtest(decide: DecideWeights, series: PortfolioSeries, segment: tuple[int, int],
                           costs: CostConfig) -> PortfolioBacktest:
    """Start in cash at bar ``segment[0]``, decide on every bar up to ``segment[1] - 1``."""
    first, last = segment
    env = PortfolioEnv(series, n_envs=1, costs=costs,
                       config=EnvConfig(episode_bars=last - first + 1, ruin_fraction=0.0))
    device = series.device
    env.reset(torch.tensor([first], device=device), torch.tensor([last], device=device))
    n, assets = last - first, series.n_assets
    nav, weights = np.ones(n + 1), np.zeros((n + 1, assets))
    decision, traded, cost = np.zeros((n, assets)), np.zeros(n), np.zeros(n)
    features, held = env.observe()
    for i in range(n):
        target = decide(features, held, first + i).reshape(1, assets)
        decision[i] = target[0].double().cpu().numpy()
        result = env.step(target)
        nav[i + 1], weights[i + 1] = float(result.nav[0]), result.position[0].double().cpu().numpy()
        traded[i], cost[i] = float(result.traded[0]), float(result.cost[0])
        features, held = result.features, result.position
    return PortfolioBacktest(series.symbols, series.timestamps.iloc[first:last + 1].reset_index(drop=True), nav, weights,
                             decision, traded, cost)


def constant_weights(weights: list[float], device: torch.device) -> DecideWeights:
    target = torch.tensor([weights], dtype=torch.float32, device=device)
    return lambda _features, _weights, _t: target


def portfolio_baselines(series: PortfolioSeries) -> dict[str, DecideWeights]:
    """Cash, equal weight, and each asset bought and held alone."""
    assets, device = series.n_assets, series.device
    baselines = {"cash": constant_weights([0.0] * assets, device),
                 "equal_weight": constant_weights([1.0 / assets] * assets, device)}
    for i, symbol in enumerate(series.symbols):
        hold = [0.0] * assets
        hold[i] = 1.0
        baselines[f"hold_{symbol}".replace("^", "")] = constant_weights(hold, device)
    return baselines
