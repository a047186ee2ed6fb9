"""Cost sensitivity: replays reproduce the original at multiple 1, cost less at 0, and where the edge goes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml.agent.policy import ActorCritic
from ml.config import ActionConfig, CostConfig
from ml.env.action_space import PortfolioWeights, make_action_space
from ml.evaluation.backtest import run_backtest
from ml.evaluation.costs import edge_disappears_at, replay_at_cost_multiples, scaled_costs
from ml.market.series import prepare_series
from tests.conftest import synthetic_bars

CPU = torch.device("cpu")
LOOKBACK = 64
COSTS = CostConfig(commission_bps=4, half_spread_bps=2, slippage_bps=3, borrow_bps_per_year=200)


def policy_backtest(series, space, segment, seed=0):
    """A policy network's own backtest (untrained weights: decisions that move with the features)."""
    torch.manual_seed(seed)
    agent = ActorCritic(series.features.shape[1], space, (16, 16))
    mean, std = series.feature_stats((LOOKBACK, segment[0] - 1))
    agent.set_normalization(mean, std)
    agent.eval()
    return run_backtest(lambda features, position, _t: agent.decide(features, position), series, segment, COSTS,
                        space)


@pytest.mark.parametrize("mode", ["discrete", "continuous"])
def test_replay_at_multiple_one_reproduces_the_policy_backtest(mode):
    series = prepare_series(synthetic_bars(400, seed=7), LOOKBACK, CPU)
    space = make_action_space(ActionConfig(mode=mode))
    segment = (200, 399)
    original = policy_backtest(series, space, segment)
    assert len(np.unique(original.decision)) > 1 and original.cost.sum() > 0
    replays = replay_at_cost_multiples(original.decision, series, segment, COSTS, space)
    assert list(replays) == [0.0, 1.0, 2.0, 5.0]
    np.testing.assert_allclose(replays[1.0].nav, original.nav, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(replays[1.0].decision, original.decision)
    # Without costs NAV is at least as high on every bar; more costs, lower NAV at the end.
    assert (replays[0.0].nav >= original.nav - 1e-12).all() and replays[0.0].nav[-1] > original.nav[-1]
    assert replays[0.0].cost.sum() == 0.0
    assert replays[1.0].nav[-1] > replays[2.0].nav[-1] > replays[5.0].nav[-1]


def test_replay_of_a_portfolio_policy():
    frames = {s: synthetic_bars(300, seed=30 + i).assign(symbol=s) for i, s in enumerate(("AAA", "BBB"))}
    series = prepare_series(frames, LOOKBACK, CPU)
    space = PortfolioWeights(2)
    segment = (150, 299)
    original = policy_backtest(series, space, segment, seed=1)
    replays = replay_at_cost_multiples(original.decision, series, segment, COSTS, space, multiples=(1, 3))
    np.testing.assert_allclose(replays[1.0].nav, original.nav, rtol=0, atol=1e-12)
    assert replays[3.0].nav[-1] < original.nav[-1]


def test_costs_are_scaled_field_by_field():
    assert scaled_costs(COSTS, 2.5) == CostConfig(commission_bps=10, half_spread_bps=5, slippage_bps=7.5,
                                                  borrow_bps_per_year=500)
    assert scaled_costs(COSTS, 0).price_impact == 0.0
    with pytest.raises(ValueError, match="cost multiple must be finite and >= 0, got -1"):
        scaled_costs(COSTS, -1)


def test_replay_refuses_decisions_of_another_segment():
    series = prepare_series(synthetic_bars(300, seed=7), LOOKBACK, CPU)
    space = make_action_space(ActionConfig())
    with pytest.raises(ValueError, match=r"decisions must have shape \[99, 1\]"):
        replay_at_cost_multiples(np.zeros((100, 1)), series, (200, 299), COSTS, space)
    with pytest.raises(ValueError, match="not inside the series"):
        replay_at_cost_multiples(np.zeros((100, 1)), series, (200, 300), COSTS, space)


def test_edge_disappears_at_the_first_multiple_where_the_policy_stops_winning():
    baseline = {0: 0.8, 1: 0.8, 2: 0.8, 5: 0.8}
    assert edge_disappears_at({0: 1.4, 1: 1.2, 2: 0.8, 5: 0.2}, baseline) == 2  # a tie is no edge
    assert edge_disappears_at({0: 1.4, 1: 1.2, 2: 0.9, 5: 0.2}, baseline) == 5
    assert edge_disappears_at({0: 1.4, 1: 1.2, 2: 0.9, 5: 0.85}, baseline) is None
    assert edge_disappears_at({0: 0.5, 1: 0.4, 2: 0.3, 5: 0.1}, baseline) == 0
    # Read in order of the multiple, not of the dict.
    assert edge_disappears_at({5: 0.2, 2: 0.9, 1: 0.7, 0: 1.4}, baseline) == 1
    with pytest.raises(ValueError, match="different multiples"):
        edge_disappears_at({0: 1.0, 1: 1.0}, {0: 1.0})
