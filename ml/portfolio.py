"""Portfolio mode: target weights over several assets plus cash, batched in torch.

The semantics are the single-asset environment's, asset by asset:

- the agent decides on bar t from data up to and including bar t;
- every asset's order fills at bar t+1's open (the next close for a
  close-only series), with commission, half-spread and adverse slippage on
  the notional each asset trades;
- reward = log change of net asset value after costs, plus the same
  shaping terms as single-asset mode.

The action is a vector of target weights, one per asset, each the fraction of
net asset value held in that asset after the fill; they are long-only and sum
to at most 1, the rest is cash. A long/short pair of leveraged ETFs is a
portfolio of two. The observation is every asset's features plus the current
weights; with NAV-relative sizing the cash weight is 1 - sum(weights), so the
state stays Markov.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ml.data.schema import DataError, has_ohlc, has_volume, ohlcv_array
from ml.env import BPS, CostConfig, EnvConfig, EpisodeBook, StepResult
from ml.features import FeatureModule, series_features

# A softmax head that ignores its input still jitters in the third decimal, so two weight vectors
# count as the same allocation when every asset is within this distance (collapse checks).
SAME_ALLOCATION_TOLERANCE = 0.025


@dataclass
class PortfolioSeries:
    symbols: list[str]
    timestamps: pd.Series  # bars every asset has
    ohlcv: torch.Tensor  # [T, A, 5] raw bars, contract column order
    features: torch.Tensor  # [T, A * F]: asset 0's features, then asset 1's, ...
    feature_module: FeatureModule  # the same module for every asset
    fill_at_open: torch.Tensor  # [A] bool: False for close-only assets (they fill at the next close)

    @property
    def device(self) -> torch.device:
        return self.ohlcv.device

    @property
    def n_assets(self) -> int:
        return len(self.symbols)

    def feature_stats(self, segment: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the features over a segment (the training window only)."""
        rows = self.features[segment[0]:segment[1] + 1]
        return rows.mean(dim=0), rows.std(dim=0)


def align_bars(frames: dict[str, pd.DataFrame], min_bars: int = 2) -> tuple[pd.Series, np.ndarray]:
    """Timestamps every symbol has a bar for, and the bars there as [T, A, 5] (contract order)."""
    if len(frames) < 2:
        raise DataError(f"portfolio mode needs at least two symbols, got {sorted(frames)}")
    common = None
    for frame in frames.values():
        stamps = pd.Index(frame["timestamp"])
        common = stamps if common is None else common.intersection(stamps)
    if len(common) < min_bars:
        spans = {s: f"{f['timestamp'].iloc[0]:%Y-%m-%d}..{f['timestamp'].iloc[-1]:%Y-%m-%d}"
                 for s, f in frames.items()}
        raise DataError(f"symbols {sorted(frames)} share only {len(common)} bars (need {min_bars}); spans: {spans}")
    common = common.sort_values()
    columns = [ohlcv_array(frame.set_index("timestamp").loc[common].reset_index()) for frame in frames.values()]
    return pd.Series(common), np.stack(columns, axis=1)


def prepare_portfolio(frames: dict[str, pd.DataFrame], lookback: int, device: torch.device) -> PortfolioSeries:
    """Align the symbols on their common bars and compute each asset's features with one module."""
    timestamps, ohlcv = align_bars(frames, min_bars=lookback + 2)
    # A feature is used only when every asset has the data for it.
    use_range = all(has_ohlc(f) for f in frames.values())
    use_volume = all(has_volume(f) for f in frames.values())
    module = FeatureModule(lookback, use_range=use_range, use_volume=use_volume).to(device)
    bars = torch.from_numpy(ohlcv).to(device)
    features = torch.cat([series_features(module, bars[:, a]) for a in range(bars.shape[1])], dim=1)
    return PortfolioSeries(
        symbols=list(frames), timestamps=timestamps, ohlcv=bars, features=features, feature_module=module,
        fill_at_open=torch.tensor([has_ohlc(f) for f in frames.values()], device=device),
    )


def project_weights(weights: torch.Tensor) -> torch.Tensor:
    """Long-only weights summing to at most 1: negatives to 0, an excess scaled down pro rata."""
    weights = weights.clamp(min=0.0)
    return weights / weights.sum(dim=-1, keepdim=True).clamp(min=1.0)


def settle_weights(cash: torch.Tensor, units: torch.Tensor, target: torch.Tensor, reference: torch.Tensor,
                   close: torch.Tensor, price_impact: float, commission_rate: float):
    """Fill every episode's orders ([N, A]) at the reference prices and mark the book at the close.

    Returns cash, units, NAV, costs paid, and traded notional over NAV.
    """
    nav_at_fill = cash + (units * reference).sum(dim=-1)
    target_units = target * nav_at_fill.unsqueeze(-1) / reference
    delta = target_units - units
    traded_value = delta.abs() * reference
    impact_paid = traded_value * price_impact  # the fill is worse than the reference, whatever the side
    cost = (impact_paid + (traded_value + impact_paid) * commission_rate).sum(dim=-1)
    cash = cash - (delta * reference).sum(dim=-1) - cost
    nav = cash + (target_units * close).sum(dim=-1)
    return cash, target_units, nav, cost, traded_value.sum(dim=-1) / nav_at_fill.clamp(min=1e-12)


class PortfolioEnv(EpisodeBook):
    """N episodes over one aligned multi-asset series; the interface of ``TradingEnv``.

    ``step`` takes target weights [N, A]; ``position`` in observations and results
    is the weights [N, A] held after the fill, marked at the close.
    """

    def __init__(self, series: PortfolioSeries, n_envs: int, costs: CostConfig = CostConfig(),
                 config: EnvConfig = EnvConfig()):
        super().__init__(series.features, n_envs, config, position_shape=(series.n_assets,))
        ohlcv = series.ohlcv
        self.close = ohlcv[:, :, 3].double()
        self.fill_reference = torch.where(series.fill_at_open, ohlcv[:, :, 0], ohlcv[:, :, 3]).double()
        self.costs = costs

    def step(self, target_weights: torch.Tensor) -> StepResult:
        target = project_weights(target_weights.double())
        self.t += 1
        reference, close = self.fill_reference.index_select(0, self.t), self.close.index_select(0, self.t)
        nav_before = self.nav
        self.cash, self.units, self.nav, cost, traded = settle_weights(
            self.cash, self.units, target, reference, close, self.costs.price_impact,
            self.costs.commission_bps * BPS)
        reward = torch.log(self.nav.clamp(min=1e-12) / nav_before)
        self._position = (self.units * close / self.nav.unsqueeze(-1)).float()
        return self._close_step(reward, cost, traded)
