"""A panel: many symbols, each on its own, for one policy that trades any of them.

Every symbol is a single-asset series on the bars all of them share. For training, the
symbols are stacked along the time axis into one series of blocks (block k holds symbol k's
bars 0..T-1 at rows k*T..k*T+T-1), so the batched environment draws episodes across symbols
with the machinery it already has: a fold's training window becomes one segment per symbol,
and an episode ends at the end of its own segment, never stepping into the next symbol.

Each block's features are standardized with that symbol's own statistics from the fold's
training window, so a calm utility and a volatile chip maker look alike to the policy. The
policy itself then normalizes with mean 0 and std 1; serving passes a symbol's statistics in
(``symbol_normalization`` fits them for a symbol the panel never saw).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch

from ml.data.schema import DataError
from ml.market.features import MIN_FEATURE_STD
from ml.market.series import MarketSeries, align_bars, prepare_series

Segment = tuple[int, int]


@dataclass
class Panel:
    symbols: list[str]
    series: dict[str, MarketSeries]  # each symbol alone, on the bars every symbol has

    @property
    def n_bars(self) -> int:
        return len(self.timestamps)

    @property
    def timestamps(self) -> pd.Series:
        return self.series[self.symbols[0]].timestamps

    @property
    def n_features(self) -> int:
        return self.series[self.symbols[0]].features.shape[1]

    def block(self, symbol: str, segment: Segment) -> Segment:
        """The segment's rows in the stacked series' block of ``symbol``."""
        offset = self.symbols.index(symbol) * self.n_bars
        return segment[0] + offset, segment[1] + offset

    def normalization(self, symbol: str, train: Segment | Sequence[Segment]) -> torch.Tensor:
        """[2, F]: the symbol's feature mean and std over the training window only."""
        mean, std = self.series[symbol].feature_stats(train)
        return torch.stack([mean, std.clamp(min=MIN_FEATURE_STD)])

    def stacked(self, train: Segment | Sequence[Segment]) -> MarketSeries:
        """Every symbol's block, one after the other, each standardized with its own training statistics."""
        first = self.series[self.symbols[0]]
        blocks = [self.series[s] for s in self.symbols]
        features = []
        for symbol, block in zip(self.symbols, blocks):
            stats = self.normalization(symbol, train)
            features.append((block.features - stats[0]) / stats[1])
        return MarketSeries(
            symbols=["panel"],
            timestamps=pd.concat([b.timestamps for b in blocks], ignore_index=True),
            ohlcv=torch.cat([b.ohlcv for b in blocks]),
            features=torch.cat(features),
            feature_module=first.feature_module,
            fill_at_open=first.fill_at_open,
        )


def build_panel(frames: dict[str, pd.DataFrame], lookback: int, device: torch.device,
                return_window: int = 0) -> Panel:
    """Each symbol's series on the bars all of them share, with one feature module for all."""
    if len(frames) < 2:
        raise DataError(f"a panel needs two or more symbols, got {sorted(frames)}")
    common, _ = align_bars(frames, min_bars=lookback + 2)
    series = {}
    for symbol, frame in frames.items():
        on_common = frame[frame["timestamp"].isin(set(common))].reset_index(drop=True)
        series[symbol] = prepare_series({symbol: on_common}, lookback, device, return_window)
    widths = {symbol: s.features.shape[1] for symbol, s in series.items()}
    if len(set(widths.values())) > 1:
        raise DataError(f"panel symbols must carry the same bar fields (open/high/low, volume); "
                        f"feature counts differ: {widths}")
    return Panel(list(frames), series)


def symbol_normalization(frame: pd.DataFrame, lookback: int, until: str | pd.Timestamp | None = None,
                         return_window: int = 0) -> torch.Tensor:
    """[2, F] feature mean and std of one symbol's bars up to ``until`` (its own history): what a
    panel model needs to trade a symbol it never saw. Only the bars given are read, from the first
    with a full window; the panel fitted its own symbols on the bars they all share up to the end
    of the training window, so pass the same span (cut ``frame``) to get their numbers."""
    if until is not None:
        frame = frame[frame["timestamp"] <= pd.Timestamp(until)].reset_index(drop=True)
    series = prepare_series(frame, lookback, torch.device("cpu"), return_window)
    return Panel([series.symbols[0]], {series.symbols[0]: series}).normalization(
        series.symbols[0], (lookback - 1, len(series.timestamps) - 1))
