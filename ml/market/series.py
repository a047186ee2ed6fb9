"""A validated bar series as tensors: raw OHLCV of one or more aligned assets and their causal features.

A single asset is a portfolio of one: the asset axis has length 1, and every
layer above (environment, backtest, fold training) runs the same code for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ml.data.schema import DataError, has_ohlc, has_volume, ohlcv_array
from ml.market.features import FeatureModule, series_features


@dataclass
class MarketSeries:
    symbols: list[str]  # the order of the asset axis
    timestamps: pd.Series  # bars every asset has
    ohlcv: torch.Tensor  # [T, A, 5] raw bars, contract column order
    features: torch.Tensor  # [T, A * F]: asset 0's features, then asset 1's, ...; NaN before the first full window
    feature_module: FeatureModule  # the same module for every asset
    fill_at_open: torch.Tensor  # [A] bool: False for close-only assets (they fill at the next close)

    @property
    def device(self) -> torch.device:
        return self.ohlcv.device

    @property
    def n_assets(self) -> int:
        return len(self.symbols)

    @property
    def close(self) -> torch.Tensor:
        """[T, A] closes."""
        return self.ohlcv[:, :, 3]

    def feature_stats(self, segment: tuple[int, int] | Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the features over the training window only: one segment ``(first, last)``,
        or several (the train groups of a CPCV split), whose bars are pooled."""
        if np.ndim(segment) == 1:
            segment = (segment,)
        rows = torch.cat([self.features[first:last + 1] for first, last in segment])
        return rows.mean(dim=0), rows.std(dim=0)


def align_bars(frames: dict[str, pd.DataFrame], min_bars: int = 2) -> tuple[pd.Series, np.ndarray]:
    """Timestamps every symbol has a bar for, and the bars there as [T, A, 5] (contract order)."""
    common = None
    for frame in frames.values():
        stamps = pd.Index(frame["timestamp"])
        common = stamps if common is None else common.intersection(stamps)
    if common is None or len(common) < min_bars:
        spans = {s: f"{f['timestamp'].iloc[0]:%Y-%m-%d}..{f['timestamp'].iloc[-1]:%Y-%m-%d}"
                 for s, f in frames.items() if len(f)}
        raise DataError(f"symbols {sorted(frames)} share only {0 if common is None else len(common)} bars "
                        f"(need {min_bars}); spans: {spans}")
    common = common.sort_values()
    columns = [ohlcv_array(frame.set_index("timestamp").loc[common].reset_index()) for frame in frames.values()]
    return pd.Series(common), np.stack(columns, axis=1)


def prepare_series(frames: dict[str, pd.DataFrame] | pd.DataFrame, lookback: int,
                   device: torch.device, return_window: int = 0, signals: bool = False) -> MarketSeries:
    """Align the symbols on their common bars and compute each asset's features with one module.

    A single frame is a series of one asset, named by its ``symbol`` column. ``return_window``:
    one-bar returns appended for a temporal encoder (``PipelineConfig.return_window``); ``signals``: the
    rule strategies' exposures, for a policy that selects among them (``ActionConfig.selects_strategies``).
    """
    if isinstance(frames, pd.DataFrame):
        symbol = str(frames["symbol"].iloc[0]) if "symbol" in frames.columns and len(frames) else "asset"
        frames = {symbol: frames}
    timestamps, ohlcv = align_bars(frames, min_bars=lookback + 2)
    # A feature is used only when every asset has the data for it.
    use_range = all(has_ohlc(f) for f in frames.values())
    use_volume = all(has_volume(f) for f in frames.values())
    module = FeatureModule(lookback, use_range=use_range, use_volume=use_volume,
                           return_window=return_window, signals=signals).to(device)
    bars = torch.from_numpy(ohlcv).to(device)
    features = torch.cat([series_features(module, bars[:, a]) for a in range(bars.shape[1])], dim=1)
    return MarketSeries(
        symbols=list(frames), timestamps=timestamps, ohlcv=bars, features=features, feature_module=module,
        fill_at_open=torch.tensor([has_ohlc(f) for f in frames.values()], device=device),
    )
