"""Environment and feature invariants: money is conserved, costs match hand computation,
the future never leaks into the present, batched equals single."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from ml.config import ActionConfig, CostConfig, EnvConfig
from ml.data.schema import ohlcv_array
from ml.env.action_space import make_action_space
from ml.env.trading_env import BPS, TradingEnv
from ml.market.features import MIN_LOOKBACK, FeatureModule, series_features
from ml.market.series import prepare_series
from tests.conftest import synthetic_bars

LOOKBACK = 64


@pytest.fixture(scope="module")
def series():
    return prepare_series(synthetic_bars(600), LOOKBACK, torch.device("cpu"))


SPACE = make_action_space(ActionConfig())  # one asset; the env keeps exposures in [-1, 1]


def make_env(series, n, costs=CostConfig(), episode_bars=10_000, config=None):
    return TradingEnv(series, n, SPACE, costs, config or EnvConfig(episode_bars=episode_bars))


def prices(series):
    """Close and fill reference per bar of the one asset, [T] float64, read from the raw bars."""
    close = series.ohlcv[:, 0, 3].double()
    reference = series.ohlcv[:, 0, 0].double() if bool(series.fill_at_open[0]) else close
    return close, reference


def test_series_features_equal_per_window_forward(series):
    module = series.feature_module
    for t in (LOOKBACK - 1, 100, 377, 599):
        window = series.ohlcv[t - LOOKBACK + 1:t + 1, 0][None]
        # Equal up to float32 rounding (a batched matmul may sum in another order than a single row).
        torch.testing.assert_close(series.features[t], module(window)[0], rtol=1e-6, atol=1e-6)
    assert torch.isnan(series.features[:LOOKBACK - 1]).all()
    assert torch.isfinite(series.features[LOOKBACK - 1:]).all()


def test_features_never_read_the_future(series):
    t = 300
    perturbed = series.ohlcv[:, 0].clone()
    perturbed[t + 1:] *= torch.linspace(0.5, 3.0, perturbed.shape[0] - t - 1)[:, None]
    after = series_features(series.feature_module, perturbed)
    torch.testing.assert_close(after[:t + 1], series.features[:t + 1], equal_nan=True, rtol=0, atol=0)
    assert not torch.allclose(after[t + 1:], series.features[t + 1:])


def test_feature_module_refuses_too_short_lookback():
    with pytest.raises(ValueError, match="shorter than"):
        FeatureModule(MIN_LOOKBACK - 1)


def test_close_only_features_ignore_open_high_low_volume():
    module = FeatureModule(LOOKBACK)
    window = torch.rand(3, LOOKBACK, 5) + 1.0
    scrambled = window.clone()
    scrambled[:, :, [0, 1, 2, 4]] = torch.rand(3, LOOKBACK, 4) * 50
    torch.testing.assert_close(module(window), module(scrambled))


def test_close_and_volume_series_keeps_its_volume_feature(gspc_bars):
    bars = gspc_bars.copy()
    bars[["open", "high", "low"]] = np.nan  # a source that gives close and volume only
    close_volume = prepare_series(bars, LOOKBACK, torch.device("cpu"))
    module = close_volume.feature_module
    assert module.use_volume and not module.use_range and close_volume.fill_at_open.tolist() == [False]
    full = prepare_series(gspc_bars, LOOKBACK, torch.device("cpu"))
    volume_z = full.feature_module.names.index("volume_z_20")
    torch.testing.assert_close(close_volume.features[:, -1], full.features[:, volume_z], equal_nan=True)


def test_fill_at_next_open_with_hand_computed_costs(series):
    costs = CostConfig(commission_bps=10, half_spread_bps=5, slippage_bps=5)
    env = make_env(series, 1, costs)
    t0 = 100
    env.reset(torch.tensor([t0]), torch.tensor([500]))
    result = env.step(torch.tensor([1.0]))

    open_next = float(series.ohlcv[t0 + 1, 0, 0])
    close_next = float(series.ohlcv[t0 + 1, 0, 3])
    units = 1.0 / open_next  # full NAV at the next open, sized at the reference price
    fill_price = open_next * (1 + 10 * BPS)  # half-spread + slippage, adverse for a buy
    commission = units * fill_price * 10 * BPS
    cash = 1.0 - units * fill_price - commission
    nav = cash + units * close_next
    assert float(result.nav[0]) == pytest.approx(nav, rel=1e-12)
    assert float(result.cost[0]) == pytest.approx(units * (fill_price - open_next) + commission, rel=1e-12)
    assert float(result.reward[0]) == pytest.approx(math.log(nav), rel=1e-6)
    # The close the agent decided on plays no part in the fill.
    assert float(series.ohlcv[t0, 0, 3]) != pytest.approx(open_next)


def test_selling_gets_an_adverse_price_too(series):
    costs = CostConfig(commission_bps=0, half_spread_bps=3, slippage_bps=2)
    env = make_env(series, 1, costs)
    env.reset(torch.tensor([100]), torch.tensor([500]))
    env.step(torch.tensor([1.0]))
    units_held = float(env.units[0, 0])
    cash_before = float(env.cash[0])
    env.step(torch.tensor([0.0]))
    reference = float(series.ohlcv[102, 0, 0])
    assert float(env.cash[0]) == pytest.approx(cash_before + units_held * reference * (1 - 5 * BPS), rel=1e-12)


def test_short_pays_borrow_on_its_notional_at_the_close(series):
    costs = CostConfig(commission_bps=0, half_spread_bps=0, slippage_bps=0, borrow_bps_per_year=252)
    env = make_env(series, 1, costs)  # 252 bps a year over 252 bars: 1 bp per bar
    t0 = 100
    env.reset(torch.tensor([t0]), torch.tensor([500]))
    result = env.step(torch.tensor([-0.5]))

    open_next, close_next = float(series.ohlcv[t0 + 1, 0, 0]), float(series.ohlcv[t0 + 1, 0, 3])
    units = -0.5 / open_next
    borrow = 0.5 / open_next * close_next * 1 * BPS  # short notional at the close x one bar's rate
    cash = 1.0 - units * open_next - borrow
    assert float(result.cost[0]) == pytest.approx(borrow, rel=1e-12)
    assert float(result.nav[0]) == pytest.approx(cash + units * close_next, rel=1e-12)
    # A long position pays no borrow.
    env.reset(torch.tensor([t0]), torch.tensor([500]))
    assert float(env.step(torch.tensor([0.5])).cost[0]) == 0.0


def test_money_is_conserved_at_every_step(series):
    costs = CostConfig(commission_bps=2, half_spread_bps=1, slippage_bps=3, borrow_bps_per_year=50)
    n = 16
    env = make_env(series, n, costs)
    starts = torch.arange(n) * 20 + LOOKBACK
    env.reset(starts, torch.full((n,), 599))
    generator = torch.Generator().manual_seed(0)
    close, reference = prices(series)
    for _ in range(40):
        t, units_before, nav_before = env.t.clone(), env.units[:, 0].clone(), env.nav.clone()
        target = torch.rand(n, generator=generator) * 2 - 1
        result = env.step(target)
        units = env.units[:, 0]
        # NAV is cash plus the marked position ...
        torch.testing.assert_close(result.nav, env.cash + units * close[env.t], rtol=1e-12, atol=1e-12)
        # ... and it changes only by price moves on what was held, minus costs paid.
        pnl = units_before * (reference[t + 1] - close[t]) + units * (close[t + 1] - reference[t + 1])
        torch.testing.assert_close(result.nav - nav_before, pnl - result.cost, rtol=1e-9, atol=1e-12)
        assert (result.cost >= 0).all()
        assert result.position.shape == (n, 1)
        torch.testing.assert_close(result.position[:, 0].double(), target.double(), rtol=0, atol=0.05)


def test_reward_at_t_does_not_see_bars_after_the_fill(series):
    """Changing any bar after t+1 changes neither the observation at t nor the reward for deciding at t."""
    t0, steps = 120, 30
    actions = torch.tensor([1.0, -0.5, 0.0, 0.5, -1.0] * 6)

    def rollout(ohlcv):
        features = series_features(series.feature_module, ohlcv[:, 0])
        env = make_env(replace(series, ohlcv=ohlcv, features=features), 1, episode_bars=1000)
        env.reset(torch.tensor([t0]), torch.tensor([599]))
        observations, rewards = [env.observe()[0].clone()], []
        for a in actions[:steps]:
            result = env.step(a.reshape(1))
            observations.append(result.features.clone())
            rewards.append(float(result.reward[0]))
        return torch.cat(observations), rewards

    base_obs, base_rewards = rollout(series.ohlcv)
    cut = 15  # perturb every bar after t0 + cut
    perturbed = series.ohlcv.clone()
    perturbed[t0 + cut + 1:] *= 1.7
    new_obs, new_rewards = rollout(perturbed)
    assert new_rewards[:cut] == base_rewards[:cut]
    torch.testing.assert_close(new_obs[:cut + 1], base_obs[:cut + 1], rtol=0, atol=0)
    assert new_rewards[cut] != base_rewards[cut]


def test_batched_equals_single_episodes(series):
    n, steps = 8, 50
    generator = torch.Generator().manual_seed(3)
    targets = torch.rand(steps, n, generator=generator) * 2 - 1
    starts = torch.arange(n) * 30 + LOOKBACK
    ends = torch.full((n,), 599)
    costs = CostConfig(commission_bps=1, half_spread_bps=2, slippage_bps=1, borrow_bps_per_year=25)

    batched = make_env(series, n, costs, episode_bars=20)
    batched.reset(starts, ends)
    batched_rewards, batched_nav = [], []
    for k in range(steps):
        result = batched.step(targets[k])
        batched_rewards.append(result.reward)
        batched_nav.append(result.nav)
        done = result.terminated | result.truncated
        batched.reset(starts, ends, mask=done)

    for i in range(n):
        single = make_env(series, 1, costs, episode_bars=20)
        single.reset(starts[i:i + 1], ends[i:i + 1])
        for k in range(steps):
            result = single.step(targets[k, i:i + 1])
            assert abs(float(result.reward[0]) - float(batched_rewards[k][i])) <= 1e-6
            assert abs(float(result.nav[0]) - float(batched_nav[k][i])) <= 1e-6
            if bool(result.terminated[0] | result.truncated[0]):
                single.reset(starts[i:i + 1], ends[i:i + 1])


def test_truncated_and_terminated_are_kept_apart(series):
    env = make_env(series, 2, episode_bars=5)
    env.reset(torch.tensor([100, 590]), torch.tensor([599, 593]))
    flags = []
    for _ in range(5):
        result = env.step(torch.zeros(2))
        flags.append((result.terminated.tolist(), result.truncated.tolist()))
    # Episode 1 reaches the end of its data on step 3; episode 0 hits its length limit on step 5.
    assert flags[1] == ([False, False], [False, False])
    assert flags[2] == ([False, True], [False, False])
    assert flags[4] == ([False, True], [True, False])


def test_ruin_terminates(series):
    crashed = series.ohlcv.clone()
    crashed[102:, :, :4] *= 0.3  # a 70% crash one bar after the fill
    env = make_env(replace(series, ohlcv=crashed), 1, config=EnvConfig(ruin_fraction=0.5))
    env.reset(torch.tensor([100]), torch.tensor([599]))
    assert not bool(env.step(torch.tensor([1.0])).terminated[0])
    result = env.step(torch.tensor([1.0]))
    assert bool(result.terminated[0]) and not bool(result.truncated[0])


def test_close_only_series_fills_at_next_close(ko_bars):
    series = prepare_series(ko_bars.iloc[:400].reset_index(drop=True), LOOKBACK, torch.device("cpu"))
    assert series.fill_at_open.tolist() == [False]
    env = make_env(series, 1, CostConfig(0, 0, 0), config=EnvConfig())
    env.reset(torch.tensor([200]), torch.tensor([399]))
    first = env.step(torch.tensor([1.0]))
    assert float(first.reward[0]) == pytest.approx(0.0, abs=1e-12)  # bought at the close it is marked at
    second = env.step(torch.tensor([1.0]))
    expected = math.log(float(series.ohlcv[202, 0, 3]) / float(series.ohlcv[201, 0, 3]))
    assert float(second.reward[0]) == pytest.approx(expected, abs=1e-6)


def test_ohlcv_array_contract_order(gspc_bars):
    array = ohlcv_array(gspc_bars)
    np.testing.assert_allclose(array[0], [1229.22998, 1248.810059, 1219.099976, 1228.099976, 877000000], rtol=1e-6)


def test_compiled_accounting_equals_eager(series):
    """The fused (torch.compile) step computes the same book as the eager one."""
    n, steps = 64, 30
    costs = CostConfig(commission_bps=2, half_spread_bps=1, slippage_bps=3, borrow_bps_per_year=40)
    targets = torch.rand(steps, n, generator=torch.Generator().manual_seed(5)) * 2 - 1
    books = []
    for compile_ in (False, True):
        env = make_env(series, n, costs, config=EnvConfig(episode_bars=10_000, compile=compile_))
        env.reset(torch.arange(n) * 5 + LOOKBACK, torch.full((n,), 599))
        navs = [env.step(targets[k]).nav for k in range(steps)]
        books.append(torch.stack(navs))
    torch.testing.assert_close(books[1], books[0], rtol=1e-12, atol=1e-12)


def test_shaping_terms_are_added_to_the_reward_and_reported_apart(series):
    plain_env = make_env(series, 4)
    config = EnvConfig(episode_bars=10_000, drawdown_penalty=2.0, volatility_penalty=50.0, turnover_penalty=0.01)
    shaped_env = make_env(series, 4, config=config)
    starts, ends = torch.tensor([100, 200, 300, 400]), torch.full((4,), 599)
    plain_env.reset(starts, ends)
    shaped_env.reset(starts, ends)
    peak = torch.ones(4, dtype=torch.float64)
    for k in range(25):
        target = torch.tensor([1.0, -1.0, 0.5, 0.0]) * (1 if k % 3 else -1)
        plain, shaped = plain_env.step(target), shaped_env.step(target)
        torch.testing.assert_close(shaped.nav, plain.nav, rtol=0, atol=0)  # shaping never touches money
        peak = torch.maximum(peak, plain.nav)
        want = {"drawdown": -2.0 * (1 - plain.nav / peak), "volatility": -50.0 * plain.reward.double() ** 2,
                "turnover": -0.01 * plain.traded}
        assert set(shaped.shaping) == set(want)
        for name, value in want.items():
            torch.testing.assert_close(shaped.shaping[name], value.float(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(shaped.reward, plain.reward + sum(shaped.shaping.values()), rtol=1e-5, atol=1e-7)
    assert plain.shaping == {}
