"""Cost sensitivity: the same test decisions replayed with every cost scaled, and where the edge goes.

Replaying the recorded decisions (not re-running the policy) keeps what the policy did fixed,
so the NAV differences come from the costs alone. Fills still follow the environment's
accounting: a target is a share of NAV, so higher costs shrink the units each target buys.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ml.config import CostConfig
from ml.env.action_space import ActionSpace
from ml.env.risk import RiskOverlay
from ml.evaluation.backtest import Backtest, run_backtest, target_series_policy
from ml.market.series import MarketSeries

DEFAULT_MULTIPLES = (0.0, 1.0, 2.0, 5.0)


def scaled_costs(costs: CostConfig, multiple: float) -> CostConfig:
    """Commission, half spread, slippage and borrow, each times ``multiple``."""
    if not (math.isfinite(multiple) and multiple >= 0):
        raise ValueError(f"cost multiple must be finite and >= 0, got {multiple}")
    return replace(costs, commission_bps=costs.commission_bps * multiple,
                   half_spread_bps=costs.half_spread_bps * multiple, slippage_bps=costs.slippage_bps * multiple,
                   borrow_bps_per_year=costs.borrow_bps_per_year * multiple)


def replay_at_cost_multiples(decisions, series: MarketSeries, segment: tuple[int, int], costs: CostConfig,
                             action_space: ActionSpace, multiples: tuple[float, ...] = DEFAULT_MULTIPLES,
                             periods_per_year: float = 252.0, risk: RiskOverlay | None = None) -> dict[float, Backtest]:
    """The decisions [bars - 1, A] of a backtest on ``segment`` (its ``decision``), replayed at
    each multiple of ``costs``, through the same risk overlay. At multiple 1 this reproduces the
    original backtest exactly."""
    first, last = segment
    if not 0 <= first < last < len(series.timestamps):
        raise ValueError(f"segment {segment} is not inside the series' {len(series.timestamps)} bars")
    decisions = np.asarray(decisions, dtype="float64")
    expected = (last - first, series.n_assets)
    if decisions.shape != expected:
        raise ValueError(f"decisions must have shape {list(expected)} (bars - 1, assets) for segment {segment}, "
                         f"got {list(decisions.shape)}")
    if not np.isfinite(decisions).all():
        raise ValueError("decisions contain NaN or infinite values")
    if not multiples:
        raise ValueError("give at least one cost multiple")
    # target_series_policy reads row t on bar t: place the decisions at their bars.
    targets = np.zeros((last, series.n_assets))
    targets[first:] = decisions
    decide = target_series_policy(targets, series.device)
    return {float(m): run_backtest(decide, series, segment, scaled_costs(costs, float(m)), action_space,
                                   periods_per_year, risk)
            for m in multiples}


def edge_disappears_at(policy_metric_by_multiple: dict[float, float],
                       baseline_metric_by_multiple: dict[float, float]) -> float | None:
    """The smallest multiple tried at which the policy's metric no longer beats the baseline's
    (policy <= baseline), or None when it beats it at every multiple tried."""
    policy, baseline = dict(policy_metric_by_multiple), dict(baseline_metric_by_multiple)
    if set(policy) != set(baseline):
        raise ValueError(f"policy and baseline were measured at different multiples: {sorted(policy)} vs "
                         f"{sorted(baseline)}")
    for multiple in sorted(policy):
        if math.isnan(policy[multiple]) or math.isnan(baseline[multiple]):
            raise ValueError(f"metric at cost multiple {multiple} is NaN")
        if policy[multiple] <= baseline[multiple]:
            return multiple
    return None
