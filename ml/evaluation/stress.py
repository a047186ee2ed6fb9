"""How the policy and its baselines fared in named market crises, read from test curves only.

``stress_results`` takes nothing but the per-fold test curves, so no training or validation
bar can enter a stress number. A window is reported when test curves cover at least one bar
return inside it; when several folds' tests cover parts of it, their returns are chained in
time order (the step from one fold's last bar to the next fold's first bar belongs to no test
curve and is left out), and the numbers describe only the covered part (``covered_from`` ..
``covered_to``). Drawdown is measured inside the window, from its first covered bar.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ml.evaluation.metrics import annualized_volatility, max_drawdown, total_return


@dataclass(frozen=True)
class StressWindow:
    name: str
    start: str  # first day, inclusive (the S&P 500's closing peak)
    end: str  # last day, inclusive (its closing trough)


# Peak-to-trough of the S&P 500 on closing prices:
# - dot-com: 1527.46 on 2000-03-24 to 776.76 on 2002-10-09 (the project's GSPC sample agrees; the
#   Nasdaq Composite peaked earlier, on 2000-03-10);
# - financial crisis: 1565.15 on 2007-10-09 to 676.53 on 2009-03-09 (the GSPC sample agrees);
# - covid crash: 3386.15 on 2020-02-19 to 2237.40 on 2020-03-23 (-33.9%);
# - 2022 rates: 4796.56 on 2022-01-03 to 3577.03 on 2022-10-12 (Dow Jones Market Data).
STRESS_WINDOWS = (
    StressWindow("dot-com", "2000-03-24", "2002-10-09"),
    StressWindow("2008 financial crisis", "2007-10-09", "2009-03-09"),
    StressWindow("covid crash", "2020-02-19", "2020-03-23"),
    StressWindow("2022 rates", "2022-01-03", "2022-10-12"),
)


def _check_curves(curves: list[pd.DataFrame]) -> list[str]:
    if not curves:
        raise ValueError("stress_results needs at least one test curve")
    strategies = None
    for i, curve in enumerate(curves):
        if "timestamp" not in curve.columns:
            raise ValueError(f"test curve {i} has no 'timestamp' column")
        names = [c for c in curve.columns if c != "timestamp"]
        if not names:
            raise ValueError(f"test curve {i} has no NAV column")
        if strategies is not None and set(names) != set(strategies):
            raise ValueError(f"test curve {i} has strategies {sorted(names)}, curve 0 has {sorted(strategies)}")
        strategies = strategies or names
        stamps = pd.to_datetime(curve["timestamp"])
        if not stamps.is_monotonic_increasing or stamps.duplicated().any():
            raise ValueError(f"test curve {i}: timestamps must be strictly increasing")
        values = curve[names].to_numpy(dtype="float64")
        if not np.isfinite(values).all() or (values <= 0).any():
            raise ValueError(f"test curve {i}: NAV must be finite and positive")
    order = sorted(range(len(curves)), key=lambda i: curves[i]["timestamp"].iloc[0])
    for before, after in zip(order, order[1:]):
        if curves[after]["timestamp"].iloc[0] <= curves[before]["timestamp"].iloc[-1]:
            raise ValueError(f"test curves {before} and {after} overlap in time: test segments must not overlap")
    return strategies


def _day(date: str, like: pd.Series) -> pd.Timestamp:
    """Midnight of ``date`` in the curve's time zone (UTC for the project's bars)."""
    day = pd.Timestamp(date)
    tz = getattr(like.dt, "tz", None)
    return day.tz_localize(tz) if tz is not None else day


def stress_results(curves: list[pd.DataFrame], ppy: float,
                   windows: tuple[StressWindow, ...] = STRESS_WINDOWS) -> list[dict]:
    """Per window covered by the test curves: ``{name, start, end, covered_from, covered_to, bars,
    folds, strategies: {strategy: {total_return, max_drawdown, annualized_volatility}}}``.

    ``curves`` are the per-fold test curves: a ``timestamp`` column and one NAV column per
    strategy (the policy and its baselines), the same strategies in every fold. ``folds`` are
    positions in ``curves``; ``bars`` counts the bar returns inside the window.
    """
    strategies = _check_curves(curves)
    order = sorted(range(len(curves)), key=lambda i: curves[i]["timestamp"].iloc[0])
    results = []
    for window in windows:
        pieces, folds = [], []
        for i in order:
            stamps = pd.to_datetime(curves[i]["timestamp"]).reset_index(drop=True)
            start, stop = _day(window.start, stamps), _day(window.end, stamps) + pd.Timedelta(days=1)
            inside = ((stamps >= start) & (stamps < stop)).to_numpy()
            if inside.sum() >= 2:
                pieces.append((stamps[inside], curves[i].loc[curves[i].index[inside], strategies]))
                folds.append(i)
        if not pieces:
            continue
        stats = {}
        for name in strategies:
            # Chain each piece's growth onto the level the previous piece ended at.
            growth = [piece[name].to_numpy(dtype="float64") for _, piece in pieces]
            nav = [np.ones(1)]
            for values in growth:
                nav.append(nav[-1][-1] * values[1:] / values[0])
            nav = np.concatenate(nav)
            stats[name] = {"total_return": total_return(nav), "max_drawdown": max_drawdown(nav),
                           "annualized_volatility": annualized_volatility(nav, ppy)}
        results.append({"name": window.name, "start": window.start, "end": window.end,
                        "covered_from": pieces[0][0].iloc[0].isoformat(),
                        "covered_to": pieces[-1][0].iloc[-1].isoformat(),
                        "bars": int(sum(len(stamps) - 1 for stamps, _ in pieces)), "folds": folds,
                        "strategies": stats})
    return results
