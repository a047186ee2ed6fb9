"""Performance metrics of an equity curve, one definition each.

All take the NAV at each bar's close (first value = starting NAV) and the
number of bars per year. NaN input is refused rather than silently skipped.
Zero-variance series give a Sharpe of 0, not infinity.
"""

from __future__ import annotations

import math

import numpy as np

from ml.market.calendar import periods_per_year  # noqa: F401  (metrics are annualized with it)

def _check(nav: np.ndarray) -> np.ndarray:
    nav = np.asarray(nav, dtype="float64")
    if nav.ndim != 1 or nav.size < 2:
        raise ValueError("an equity curve needs at least two NAV values")
    if not np.isfinite(nav).all():
        raise ValueError("equity curve contains NaN or infinite values")
    if (nav <= 0).any():
        raise ValueError("equity curve has a non-positive NAV")
    return nav


def bar_returns(nav: np.ndarray) -> np.ndarray:
    nav = _check(nav)
    return nav[1:] / nav[:-1] - 1.0


def total_return(nav) -> float:
    nav = _check(nav)
    return float(nav[-1] / nav[0] - 1.0)


def annualized_return(nav, ppy: float) -> float:
    nav = _check(nav)
    years = (nav.size - 1) / ppy
    return float((nav[-1] / nav[0]) ** (1.0 / years) - 1.0)


def annualized_volatility(nav, ppy: float) -> float:
    returns = bar_returns(nav)
    return float(returns.std(ddof=1) * math.sqrt(ppy)) if returns.size > 1 else 0.0


def sharpe_ratio(nav, ppy: float) -> float:
    returns = bar_returns(nav)
    std = returns.std(ddof=1) if returns.size > 1 else 0.0
    return float(returns.mean() / std * math.sqrt(ppy)) if std > 1e-12 else 0.0


def sortino_ratio(nav, ppy: float) -> float:
    returns = bar_returns(nav)
    downside = math.sqrt(np.mean(np.minimum(returns, 0.0) ** 2))
    return float(returns.mean() / downside * math.sqrt(ppy)) if downside > 1e-12 else 0.0


def drawdown(nav) -> np.ndarray:
    """Fall from the running peak at each bar, as a negative fraction."""
    nav = _check(nav)
    return nav / np.maximum.accumulate(nav) - 1.0


def max_drawdown(nav) -> float:
    return float(drawdown(nav).min())


def max_drawdown_duration(nav) -> int:
    """Longest run of bars spent below a previous peak."""
    underwater = drawdown(nav) < -1e-12
    longest = current = 0
    for below in underwater:
        current = current + 1 if below else 0
        longest = max(longest, current)
    return int(longest)


def calmar_ratio(nav, ppy: float) -> float:
    mdd = max_drawdown(nav)
    return float(annualized_return(nav, ppy) / -mdd) if mdd < -1e-12 else 0.0


def summarize(nav, position, traded, cost, ppy: float) -> dict[str, float]:
    """All metrics of one backtest.

    ``position`` is the exposure held over each bar (len(nav) - 1 values),
    ``traded`` the traded notional over NAV per bar, ``cost`` money paid per bar.
    """
    nav = _check(nav)
    position = np.asarray(position, dtype="float64")
    returns = bar_returns(nav)
    active = np.abs(position) > 1e-9
    gains, losses = returns[returns > 0].sum(), -returns[returns < 0].sum()
    years = returns.size / ppy
    return {
        "total_return": total_return(nav),
        "annualized_return": annualized_return(nav, ppy),
        "annualized_volatility": annualized_volatility(nav, ppy),
        "sharpe": sharpe_ratio(nav, ppy),
        "sortino": sortino_ratio(nav, ppy),
        "calmar": calmar_ratio(nav, ppy),
        "max_drawdown": max_drawdown(nav),
        "max_drawdown_bars": max_drawdown_duration(nav),
        "annual_turnover": float(np.sum(traded) / years),
        "average_exposure": float(np.mean(np.abs(position))) if position.size else 0.0,
        "hit_rate": float(np.mean(returns[active] > 0)) if active.any() else 0.0,
        "profit_factor": float(gains / losses) if losses > 0 else (float("inf") if gains > 0 else 0.0),
        "costs_paid": float(np.sum(cost) / nav[0]),
        "bars": int(returns.size),
    }
