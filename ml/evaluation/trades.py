"""Round-trip trades of a backtest: when each position opened and closed, and what it earned.

A trade in an asset opens on the bar whose fill takes the held weight away from 0 (or flips
its sign) and closes on the bar whose fill brings it back to 0 (or flips it again); a trade
still held at the end is closed at the last bar and flagged ``open``. A flip closes one trade
and opens the opposite one on the same fill.

P&L attribution. Money is in units of the backtest's starting NAV (which is 1.0, so a trade's
``pnl`` is also its contribution to NAV as a fraction of the starting NAV, and the P&L of all
trades plus that of flat positions adds up to ``nav[-1] - nav[0]``). Units held at each close
are recovered from the weights, ``u_t = w_t * nav_t / close_t``. On bar t (filled at
``fill_t``: the open, or the close for close-only assets, as in ``TradingEnv``) asset a earns

    u_{t-1} * (close_t - close_{t-1})       = nav_{t-1} * w_{t-1} * r_t   (the position held into the bar)
  + (u_t - u_{t-1}) * (close_t - fill_t)                                  (the fill, marked to the close)
  - its share of the bar's costs.

The held part belongs to the trade live at t-1. The fill part belongs to the live trade when
the fill only resizes it; when the fill closes, opens or flips, ``-u_{t-1}`` of it belongs to
the closing trade and ``u_t`` to the opening one. A bar's cost is split across assets by the
notional each traded, ``|u_t - u_{t-1}| * fill_t`` (exact for commission, spread and slippage,
which charge every asset's notional at the same rate), or by the notional held when nothing
traded (only borrow costs then); an asset's share is split between a closing and an opening
trade by ``|u_{t-1}| : |u_t|``. For one asset all of this is exact; borrow on a flip bar is
split with the fill's costs. Weights are stored in float32, so the ledger reproduces the NAV
change to about 1e-9 of NAV per bar, not to the last bit.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ml.evaluation.backtest import Backtest
from ml.market.series import MarketSeries

LEDGER_COLUMNS = ("asset", "side", "entry_bar", "entry_time", "exit_bar", "exit_time", "holding_bars", "size",
                  "pnl", "open")


def segment_prices(series: MarketSeries, segment: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Closes and fill prices [bars, A] of a segment, as ``TradingEnv`` uses them: fills at the
    bar's open, or at its close for close-only assets."""
    first, last = segment
    ohlcv = series.ohlcv[first:last + 1]
    fill = torch.where(series.fill_at_open, ohlcv[:, :, 0], ohlcv[:, :, 3])
    return ohlcv[:, :, 3].double().cpu().numpy(), fill.double().cpu().numpy()


def _prices(values, what: str, bars: int, assets: int) -> np.ndarray:
    array = np.asarray(values, dtype="float64")
    if array.ndim == 1 and assets == 1:
        array = array[:, None]
    if array.shape != (bars, assets):
        raise ValueError(f"{what} must have shape [{bars} bars, {assets} assets] like the backtest, got {array.shape}")
    if not np.isfinite(array).all() or (array <= 0).any():
        raise ValueError(f"{what} must be finite and positive")
    return array


def _trade_ids(weights: np.ndarray, flat_below: float) -> np.ndarray:
    """Per bar, the index of the trade live at its close (-1 when flat), numbered within the asset."""
    sign = np.where(np.abs(weights) > flat_below, np.sign(weights), 0.0)
    starts = (sign != 0) & (sign != np.concatenate(([0.0], sign[:-1])))
    return np.where(sign != 0, np.cumsum(starts) - 1, -1)


def _asset_trade_pnl(units: np.ndarray, close: np.ndarray, fill: np.ndarray, cost: np.ndarray,
                     ids: np.ndarray) -> np.ndarray:
    """P&L of each trade of one asset (index 0 = flat positions, then trade 0, 1, ...)."""
    old, new = ids[:-1] + 1, ids[1:] + 1  # +1: bucket 0 collects what no trade holds
    held = units[:-1] * (close[1:] - close[:-1])
    mark = close[1:] - fill[1:]
    same = old == new
    scale = np.abs(units[:-1]) + np.abs(units[1:])
    closing_share = np.divide(np.abs(units[:-1]), scale, out=np.zeros_like(scale), where=scale > 0)
    closing = np.where(same, 0.0, -units[:-1] * mark - cost * closing_share)
    opening = np.where(same, (units[1:] - units[:-1]) * mark - cost, units[1:] * mark - cost * (1 - closing_share))
    buckets = ids.max() + 2
    return (np.bincount(old, held + closing, minlength=buckets)
            + np.bincount(new, opening, minlength=buckets))


def trade_ledger(backtest: Backtest, close, fill_prices=None, flat_below: float = 0.0) -> pd.DataFrame:
    """One row per trade (columns ``LEDGER_COLUMNS``), ordered by entry bar then asset.

    ``close`` and ``fill_prices`` are the segment's prices [bars, A] (``segment_prices`` gives
    both); without ``fill_prices`` fills are taken at the close (close-only assets). A weight
    whose magnitude is at most ``flat_below`` counts as flat; what such a position earns is
    part of no trade. ``size`` is the mean |weight| at the closes the trade was held,
    ``holding_bars`` = exit_bar - entry_bar, ``pnl`` as in the module docstring.
    """
    weights = np.asarray(backtest.weights, dtype="float64")
    nav = np.asarray(backtest.nav, dtype="float64")
    bars, assets = weights.shape
    close = _prices(close, "close", bars, assets)
    fill = close if fill_prices is None else _prices(fill_prices, "fill_prices", bars, assets)
    if np.abs(weights[0]).max() > 0:
        raise ValueError("the backtest must start flat (weights[0] all 0): the cost of its first position is unknown")
    units = weights * nav[:, None] / close
    notional = np.abs(np.diff(units, axis=0)) * fill[1:]
    held = np.abs(units[1:]) * close[1:]
    # Each bar's cost by traded notional; by held notional on a bar without trades (borrow only).
    basis = np.where((notional.sum(axis=1) > 0)[:, None], notional, held)
    total = basis.sum(axis=1, keepdims=True)
    asset_cost = np.divide(basis * np.asarray(backtest.cost, dtype="float64")[:, None], total,
                           out=np.zeros_like(basis), where=total > 0)

    rows = []
    timestamps = pd.Series(backtest.timestamps).reset_index(drop=True)
    for a, symbol in enumerate(backtest.symbols):
        ids = _trade_ids(weights[:, a], flat_below)
        if ids.max() < 0:
            continue
        pnl = _asset_trade_pnl(units[:, a], close[:, a], fill[:, a], asset_cost[:, a], ids)[1:] / nav[0]
        live = ids >= 0
        # Trades are runs of one id: where each starts and ends, and its mean |weight|.
        entries = np.flatnonzero(live & (ids != np.concatenate(([-1], ids[:-1]))))
        last_bars = np.flatnonzero(live & (ids != np.concatenate((ids[1:], [-1]))))
        sizes = np.bincount(ids[live], np.abs(weights[live, a])) / np.bincount(ids[live])
        for k, (entry, last_held) in enumerate(zip(entries.tolist(), last_bars.tolist())):
            still_open = last_held == bars - 1
            exit_bar = last_held if still_open else last_held + 1
            rows.append({"asset": symbol, "side": "long" if weights[entry, a] > 0 else "short",
                         "entry_bar": entry, "entry_time": timestamps.iloc[entry],
                         "exit_bar": exit_bar, "exit_time": timestamps.iloc[exit_bar],
                         "holding_bars": exit_bar - entry, "size": float(sizes[k]),
                         "pnl": float(pnl[k]), "open": still_open})
    ledger = pd.DataFrame(rows, columns=list(LEDGER_COLUMNS))
    return ledger.sort_values(["entry_bar", "asset"], kind="stable").reset_index(drop=True)


def trade_statistics(ledger: pd.DataFrame) -> dict[str, float]:
    """Count, win rate, average win and loss (a loss is negative), profit factor (gross wins over
    gross losses; inf with wins and no losses, 0 without trades), mean holding bars and the
    share of long trades. Trades still open at the end count with their P&L so far."""
    count = len(ledger)
    if count == 0:
        return {"count": 0, "win_rate": 0.0, "average_win": 0.0, "average_loss": 0.0, "profit_factor": 0.0,
                "average_holding_bars": 0.0, "long_share": 0.0}
    pnl = ledger["pnl"].to_numpy(dtype="float64")
    wins, losses = pnl[pnl > 0], pnl[pnl < 0]
    gross_loss = -losses.sum()
    profit_factor = wins.sum() / gross_loss if gross_loss > 0 else (float("inf") if wins.size else 0.0)
    return {"count": count, "win_rate": float(wins.size / count),
            "average_win": float(wins.mean()) if wins.size else 0.0,
            "average_loss": float(losses.mean()) if losses.size else 0.0,
            "profit_factor": float(profit_factor),
            "average_holding_bars": float(ledger["holding_bars"].mean()),
            "long_share": float((ledger["side"] == "long").mean())}
