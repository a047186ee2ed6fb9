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

from ml.env import CostConfig, EnvConfig, TradingEnv
from ml.evaluation.metrics import summarize

# decide(features [1, F], position [1], bar index) -> target exposure [1]
Decide = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class Backtest:
    timestamps: pd.Series  # bars first..last of the segment
    nav: np.ndarray  # NAV at each bar's close, starting at 1.0
    position: np.ndarray  # exposure held at each bar's close
    decision: np.ndarray  # target exposure decided on each bar (last bar: none)
    traded: np.ndarray  # traded notional over NAV per step
    cost: np.ndarray  # costs paid per step

    def metrics(self, ppy: float) -> dict[str, float]:
        return summarize(self.nav, self.position[1:], self.traded, self.cost, ppy)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({"timestamp": self.timestamps.to_numpy(), "nav": self.nav,
                             "position": self.position})

    def dominant_decision(self) -> tuple[float, float]:
        """The most frequent decision (to 0.01) and its share of all decisions."""
        values, counts = np.unique(np.round(self.decision, 2), return_counts=True)
        best = int(np.argmax(counts))
        return float(values[best]), float(counts[best] / counts.sum())


@torch.no_grad()
def run_backtest(decide: Decide, ohlcv: torch.Tensor, features: torch.Tensor, segment: tuple[int, int],
                 timestamps: pd.Series, costs: CostConfig, fill_at_open: bool) -> Backtest:
    """Start flat at bar ``segment[0]``, decide on every bar up to ``segment[1] - 1``."""
    first, last = segment
    env = TradingEnv(ohlcv, features, n_envs=1, costs=costs,
                     config=EnvConfig(episode_bars=last - first + 1, ruin_fraction=0.0),
                     fill_at_open=fill_at_open)
    device = ohlcv.device
    env.reset(torch.tensor([first], device=device), torch.tensor([last], device=device))
    n = last - first
    nav, position, decision = np.ones(n + 1), np.zeros(n + 1), np.full(n + 1, np.nan)
    traded, cost = np.zeros(n), np.zeros(n)
    feats, pos = env.observe()
    for i in range(n):
        target = decide(feats, pos, first + i).reshape(1)
        decision[i] = float(target[0])
        result = env.step(target)
        nav[i + 1], position[i + 1] = float(result.nav[0]), float(result.position[0])
        traded[i], cost[i] = float(result.traded[0]), float(result.cost[0])
        feats, pos = result.features, result.position
    return Backtest(timestamps.iloc[first:last + 1].reset_index(drop=True), nav, position,
                    decision[:-1], traded, cost)


def baseline_exposures(close: np.ndarray, levels: tuple[float, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """Causal exposure series of the baselines, one value per bar (decided on that bar)."""
    close = pd.Series(close, dtype="float64")
    fast, slow = close.rolling(20).mean(), close.rolling(60).mean()
    momentum = np.log(close / close.shift(60))
    rng = np.random.default_rng(seed)
    return {
        "buy_and_hold": np.ones(len(close)),
        "cash": np.zeros(len(close)),
        "ma_crossover": (fast > slow).astype("float64").to_numpy(),
        "momentum": np.sign(momentum.fillna(0.0)).to_numpy(),
        "random": rng.choice(np.asarray(levels, dtype="float64"), size=len(close)),
    }


def exposure_series_policy(exposures: np.ndarray, device: torch.device) -> Decide:
    series = torch.as_tensor(exposures, dtype=torch.float32, device=device)
    return lambda _features, _position, t: series[t].reshape(1)
