"""A validated bar series as tensors: raw OHLCV and its causal features."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from ml.data.schema import has_ohlc, has_volume, ohlcv_array
from ml.features import FeatureModule, series_features


@dataclass
class MarketSeries:
    timestamps: pd.Series
    ohlcv: torch.Tensor  # [T, 5] raw bars, contract column order
    features: torch.Tensor  # [T, F]; rows before the first full window are NaN
    feature_module: FeatureModule
    fill_at_open: bool  # False for close-only data: orders fill at the next close

    @property
    def device(self) -> torch.device:
        return self.ohlcv.device

    def feature_stats(self, segment: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the features over a segment (the training window only)."""
        rows = self.features[segment[0]:segment[1] + 1]
        return rows.mean(dim=0), rows.std(dim=0)


def prepare_series(bars: pd.DataFrame, lookback: int, device: torch.device) -> MarketSeries:
    ohlc = has_ohlc(bars)
    module = FeatureModule(lookback, use_range=ohlc, use_volume=has_volume(bars))
    ohlcv = torch.from_numpy(ohlcv_array(bars)).to(device)
    return MarketSeries(
        timestamps=bars["timestamp"].reset_index(drop=True),
        ohlcv=ohlcv,
        features=series_features(module.to(device), ohlcv),
        feature_module=module,
        fill_at_open=ohlc,
    )
