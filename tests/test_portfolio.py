"""Portfolio mode: the single-asset invariants over several assets, a portfolio of one trading like
one of several, and PPO learning to allocate."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from ml.agent.diagnostics import dominant_share
from ml.agent.policy import ActorCritic, ExportPolicy, load_policy, policy_checkpoint
from ml.config import ActionConfig, CostConfig, EnvConfig, config_from_dict
from ml.data.schema import DataError
from ml.env.action_space import PortfolioWeights, make_action_space
from ml.env.trading_env import BPS, TradingEnv
from ml.evaluation.backtest import Backtest, run_backtest, target_series_policy
from ml.evaluation.splits import walk_forward_folds
from ml.evaluation.walkforward import evaluate_fold, train_fold
from ml.market.features import series_features
from ml.market.series import align_bars, prepare_series
from ml.release.export import check_parity, export_onnx, real_windows
from tests.conftest import synthetic_bars

LOOKBACK = 64
CPU = torch.device("cpu")


def two_assets(n: int = 600, drifts=(0.0005, -0.0002), vol: float = 0.01) -> dict[str, pd.DataFrame]:
    frames = {}
    for i, (symbol, drift) in enumerate(zip(("AAA", "BBB"), drifts)):
        bars = synthetic_bars(n, drift=drift, vol=vol, seed=10 + i)
        frames[symbol] = bars.assign(symbol=symbol)
    return frames


@pytest.fixture(scope="module")
def series():
    return prepare_series(two_assets(), LOOKBACK, CPU)


WEIGHTS = PortfolioWeights(2)
EXPOSURE = make_action_space(ActionConfig(mode="continuous"))  # one asset, exposure in [-1, 1]


def make_env(series, n, costs=CostConfig(), episode_bars=10_000):
    return TradingEnv(series, n, WEIGHTS, costs, EnvConfig(episode_bars=episode_bars))


def prices(series):
    """Close and fill reference per bar and asset, [T, A] float64, read from the raw bars."""
    close = series.ohlcv[:, :, 3].double()
    return close, torch.where(series.fill_at_open, series.ohlcv[:, :, 0].double(), close)


def test_assets_are_aligned_on_the_bars_they_all_have():
    frames = two_assets(300)
    # Rows out of order must not matter: the bars are matched by timestamp.
    frames["AAA"] = frames["AAA"].sample(frac=1.0, random_state=0)
    frames["BBB"] = frames["BBB"].drop(index=[5, 6, 200])
    timestamps, ohlcv = align_bars(frames)
    assert len(timestamps) == 297 and ohlcv.shape == (297, 2, 5) and timestamps.is_monotonic_increasing
    for symbol, asset in (("AAA", 0), ("BBB", 1)):
        row = frames[symbol].set_index("timestamp").loc[timestamps.iloc[150]]
        np.testing.assert_allclose(ohlcv[150, asset, 3], row["close"], rtol=1e-6)


def test_symbols_without_common_bars_are_refused_by_name():
    frames = two_assets(100)
    frames["BBB"] = frames["BBB"].assign(timestamp=frames["BBB"]["timestamp"] + pd.Timedelta(days=3650))
    with pytest.raises(DataError, match=r"\['AAA', 'BBB'\] share only 0 bars"):
        align_bars(frames)
    # One symbol is a series of one asset; a portfolio (weights over assets plus cash) needs two.
    timestamps, ohlcv = align_bars({"AAA": frames["AAA"]})
    assert ohlcv.shape == (100, 1, 5)
    with pytest.raises(ValueError, match="at least two assets"):
        PortfolioWeights(1)


def test_features_per_asset_equal_the_single_asset_features(series):
    frames = two_assets()
    for i, symbol in enumerate(("AAA", "BBB")):
        single = prepare_series(frames[symbol], LOOKBACK, CPU).features
        width = single.shape[1]
        torch.testing.assert_close(series.features[:, i * width:(i + 1) * width], single, equal_nan=True)


def test_weights_are_long_only_and_sum_to_at_most_one():
    raw = torch.tensor([[0.5, -0.2], [0.9, 0.6], [0.2, 0.3]])
    torch.testing.assert_close(WEIGHTS.project(raw), torch.tensor([[0.5, 0.0], [0.6, 0.4], [0.2, 0.3]]))


def test_fills_at_next_open_with_hand_computed_costs(series):
    costs = CostConfig(commission_bps=10, half_spread_bps=5, slippage_bps=5)
    env = make_env(series, 1, costs)
    t0 = 100
    env.reset(torch.tensor([t0]), torch.tensor([500]))
    result = env.step(torch.tensor([[0.5, 0.3]], dtype=torch.float64))

    opens, closes = series.ohlcv[t0 + 1, :, 0].double(), series.ohlcv[t0 + 1, :, 3].double()
    cash, marked, paid = 1.0, 0.0, 0.0
    for weight, open_, close in zip((0.5, 0.3), opens.tolist(), closes.tolist()):
        units = weight / open_  # sized on NAV at the next open's reference price
        fill_price = open_ * (1 + 10 * BPS)  # half-spread + slippage, adverse for a buy
        commission = units * fill_price * 10 * BPS
        cash -= units * fill_price + commission
        paid += units * (fill_price - open_) + commission
        marked += units * close
    assert float(result.nav[0]) == pytest.approx(cash + marked, rel=1e-12)
    assert float(result.cost[0]) == pytest.approx(paid, rel=1e-12)
    assert float(result.reward[0]) == pytest.approx(np.log(cash + marked), rel=1e-6)
    assert float(result.traded[0]) == pytest.approx(0.8, rel=1e-12)


def test_money_is_conserved_at_every_step(series):
    costs = CostConfig(commission_bps=2, half_spread_bps=1, slippage_bps=3)
    n = 16
    env = make_env(series, n, costs)
    env.reset(torch.arange(n) * 20 + LOOKBACK, torch.full((n,), 599))
    generator = torch.Generator().manual_seed(0)
    close, reference = prices(series)
    for _ in range(40):
        t, units_before, nav_before = env.t.clone(), env.units.clone(), env.nav.clone()
        target = WEIGHTS.project(torch.rand(n, 2, generator=generator) * 0.7)
        result = env.step(target)
        # NAV is cash plus every marked position ...
        torch.testing.assert_close(result.nav, env.cash + (env.units * close[env.t]).sum(-1), rtol=1e-12, atol=1e-12)
        # ... and it changes only by price moves on what was held, minus costs paid.
        pnl = (units_before * (reference[t + 1] - close[t]) + env.units * (close[t + 1] - reference[t + 1])).sum(-1)
        torch.testing.assert_close(result.nav - nav_before, pnl - result.cost, rtol=1e-9, atol=1e-12)
        assert (result.cost >= 0).all()
        torch.testing.assert_close(result.position.double(), target.double(), rtol=0, atol=0.05)


def test_one_asset_of_a_portfolio_trades_like_the_single_asset_environment(series):
    """Weights (w, 0) over two assets give exactly the NAV of exposure w in a series of that asset alone."""
    costs = CostConfig(commission_bps=3, half_spread_bps=2, slippage_bps=1)
    single_series = prepare_series(two_assets()["AAA"], LOOKBACK, CPU)
    assert single_series.symbols == ["AAA"] and single_series.ohlcv.shape[1] == 1
    single = TradingEnv(single_series, 1, EXPOSURE, costs, EnvConfig(episode_bars=10_000))
    portfolio = make_env(series, 1, costs)
    for env in (single, portfolio):
        env.reset(torch.tensor([80]), torch.tensor([500]))
    for w in [1.0, 0.5, 0.0, 0.25, 0.75, 0.75, 1.0, 0.0] * 3:
        a = single.step(torch.tensor([w]))
        b = portfolio.step(torch.tensor([[w, 0.0]]))
        torch.testing.assert_close(b.nav, a.nav, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b.cost, a.cost, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(b.reward, a.reward)


def test_reward_at_t_does_not_see_bars_after_the_fill(series):
    t0, steps = 120, 30
    targets = torch.tensor([[1.0, 0.0], [0.2, 0.5], [0.0, 0.0], [0.5, 0.5], [0.0, 1.0]] * 6)

    def rollout(ohlcv):
        features = torch.cat([series_features(series.feature_module, ohlcv[:, a]) for a in range(2)], dim=1)
        env = make_env(replace(series, ohlcv=ohlcv, features=features), 1)
        env.reset(torch.tensor([t0]), torch.tensor([590]))
        observations, rewards = [env.observe()[0]], []
        for i in range(steps):
            result = env.step(targets[i:i + 1])
            observations.append(result.features)
            rewards.append(result.reward)
        return torch.cat(observations), torch.cat(rewards)

    base_obs, base_rewards = rollout(series.ohlcv)
    cut = 15  # perturb every bar after the fill of the decision made at t0 + cut
    perturbed = series.ohlcv.clone()
    perturbed[t0 + cut + 2:] *= torch.linspace(0.7, 1.6, perturbed.shape[0] - t0 - cut - 2)[:, None, None]
    obs, rewards = rollout(perturbed)
    torch.testing.assert_close(obs[:cut + 1], base_obs[:cut + 1], rtol=0, atol=0)
    torch.testing.assert_close(rewards[:cut + 1], base_rewards[:cut + 1], rtol=0, atol=0)
    assert not torch.allclose(rewards[cut + 1:], base_rewards[cut + 1:])


def test_batched_equals_single_episodes(series):
    n, steps = 6, 25
    starts = torch.tensor([70, 90, 150, 200, 333, 400])
    generator = torch.Generator().manual_seed(3)
    targets = WEIGHTS.project(torch.rand(steps, n, 2, generator=generator))
    batched = make_env(series, n)
    batched.reset(starts, torch.full((n,), 599))
    batched_navs = torch.stack([batched.step(targets[s]).nav for s in range(steps)])
    for i in range(n):
        one = make_env(series, 1)
        one.reset(starts[i:i + 1], torch.tensor([599]))
        navs = torch.stack([one.step(targets[s, i:i + 1]).nav[0] for s in range(steps)])
        torch.testing.assert_close(navs, batched_navs[:, i], rtol=1e-12, atol=1e-12)


def test_close_only_assets_fill_at_the_next_close():
    frames = two_assets(400)
    frames["BBB"] = frames["BBB"].assign(open=np.nan, high=np.nan, low=np.nan, volume=np.nan)
    mixed = prepare_series(frames, LOOKBACK, CPU)
    assert mixed.fill_at_open.tolist() == [True, False]
    assert not mixed.feature_module.use_range  # only features every asset has data for
    env = make_env(mixed, 1, CostConfig(0, 0, 0))
    env.reset(torch.tensor([100]), torch.tensor([390]))
    env.step(torch.tensor([[0.5, 0.5]]))
    units = env.units[0].tolist()
    assert units[0] == pytest.approx(0.5 / float(mixed.ohlcv[101, 0, 0]), rel=1e-12)
    assert units[1] == pytest.approx(0.5 / float(mixed.ohlcv[101, 1, 3]), rel=1e-12)


def test_holding_one_asset_alone_matches_the_single_asset_buy_and_hold(series):
    costs = CostConfig()
    segment = (200, 450)
    baselines = WEIGHTS.baselines(series)
    assert set(baselines) == {"cash", "equal_weight", "random", "hold_AAA", "hold_BBB"}

    def replay(targets, on=series, space=WEIGHTS):
        return run_backtest(target_series_policy(targets, CPU), on, segment, costs, space)

    portfolio = replay(baselines["hold_AAA"])
    single_series = prepare_series(two_assets()["AAA"], LOOKBACK, CPU)
    single = replay(np.ones((600, 1)), single_series, EXPOSURE)
    np.testing.assert_allclose(portfolio.nav, single.nav, rtol=1e-12)
    cash = replay(baselines["cash"])
    assert (cash.nav == 1.0).all() and cash.cost.sum() == 0.0
    equal = replay(baselines["equal_weight"])
    np.testing.assert_allclose(equal.decision, 0.5)
    assert 0.45 < equal.weights[-1, 0] < 0.55


def _learning_setup(timesteps: int):
    frames = two_assets(1400, drifts=(0.003, -0.003), vol=0.004)
    config = config_from_dict({
        "data": {"symbols": ["AAA", "BBB"]},
        "action": {"mode": "portfolio"},
        "ppo": {"total_timesteps": timesteps, "num_envs": 64, "num_steps": 32, "eval_every": 2, "seed": 1,
                "learning_rate": 1e-3},
        "splits": {"n_folds": 1, "test_months": 6, "validation_months": 6, "min_train_bars": 300},
    })
    series = prepare_series(frames, config.lookback, CPU)
    fold = walk_forward_folds(series.timestamps, config.lookback, config.splits)[0]
    return config, series, fold


def test_ppo_learns_to_allocate_to_the_rising_asset():
    config, series, fold = _learning_setup(150_000)
    result = train_fold(series, fold, config)
    report, test, baselines = evaluate_fold(result.agent, series, fold, config)
    weights = report["policy"]["test_mean_weights"]
    assert weights["AAA"] > 0.8 and weights["BBB"] < 0.05, weights
    assert report["policy"]["test"]["sharpe"] > report["baselines"]["equal_weight"]["sharpe"]
    assert test.nav[-1] > baselines["equal_weight"].nav[-1]
    last = result.history[-1]
    assert last["greedy_weight/asset0"] > 0.8 and "sampled_weight/cash" in last and "flat_share" in last
    assert not result.collapse_alarm or report["policy"]["collapse"]["dominant_share"] >= 0.98


def test_portfolio_policy_exports_to_onnx_with_parity(tmp_path, series):
    torch.manual_seed(0)
    agent = ActorCritic(series.features.shape[1], PortfolioWeights(2), (32, 32))
    mean, std = series.feature_stats((LOOKBACK, 400))
    agent.set_normalization(mean, std)
    policy = load_policy(policy_checkpoint(agent, series.feature_module))
    assert isinstance(policy, ExportPolicy) and isinstance(policy.action_space, PortfolioWeights)
    assert policy.action_space.n_assets == 2 and policy.actor_critic.hidden == (32, 32)
    path = export_onnx(policy, tmp_path / "portfolio.onnx", {"lookback": LOOKBACK, "assets": "AAA,BBB"})
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["ohlcv", "weights"]
    assert [o.name for o in model.graph.output] == ["target_weights", "value"]
    windows, weights = real_windows(policy, series.ohlcv.numpy(), 100, 599, 256, seed=1)
    assert windows.shape == (256, LOOKBACK, 2, 5) and weights.shape == (256, 2)
    parity = check_parity(policy, path, windows, weights)
    assert parity.passed, parity
    # The exported graph computes what training computed: per-asset features, then the agent.
    feats = torch.cat([series.features[t][None] for t in (150, 151)])
    want = agent.decide(feats, torch.zeros(2, 2))
    got = policy(torch.stack([series.ohlcv[t - LOOKBACK + 1:t + 1] for t in (150, 151)]), torch.zeros(2, 2))[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got >= 0).all() and (got.sum(-1) <= 1 + 1e-6).all()


def test_a_near_constant_allocation_counts_as_collapsed():
    """A softmax head that ignores its input still jitters in the third decimal: allocations within
    0.025 of the median one count as one; a policy that moves between assets does not."""
    rng = np.random.default_rng(0)
    jitter = 0.33 + rng.uniform(-0.01, 0.01, size=(500, 2))  # straddles any fixed rounding grid
    moving = rng.dirichlet(np.ones(3), size=500)[:, :2]
    assert dominant_share(WEIGHTS, torch.tensor(jitter)) == 1.0
    assert dominant_share(WEIGHTS, torch.tensor(moving)) < 0.2
    # A backtest's decisions are judged by the same rule.
    stamps = pd.Series(pd.bdate_range("2020-01-01", periods=501))
    backtest = Backtest(["A", "B"], stamps, np.ones(501), np.zeros((501, 2)), jitter, np.zeros(500), np.zeros(500))
    weights, share = WEIGHTS.dominant(torch.from_numpy(backtest.decision))
    assert share == 1.0 and weights == pytest.approx([0.33, 0.33], abs=0.01)
    assert WEIGHTS.collapse_report(torch.from_numpy(backtest.decision), 0.98)["alarm"]
    backtest.decision = moving
    assert WEIGHTS.dominant(torch.from_numpy(backtest.decision))[1] < 0.2
    assert not WEIGHTS.collapse_report(torch.from_numpy(backtest.decision), 0.98)["alarm"]
