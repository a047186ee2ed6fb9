"""The Gymnasium wrapper: API checkers pass, registration works, and an episode is
bit-for-bit the batched TradingEnv's episode (same accounting, not a re-implementation)."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

from ml.config import ActionConfig, CostConfig, EnvConfig
from ml.data.sources import sample_path
from ml.env.action_space import make_action_space
from ml.env.gym_env import ENV_ID, TradingGymEnv
from ml.env.trading_env import TradingEnv
from ml.market.features import NORM_CLIP
from ml.market.series import prepare_series
from tests.conftest import synthetic_bars

GSPC = sample_path("GSPC")
LOOKBACK = 64


@pytest.fixture(scope="module")
def env():
    return TradingGymEnv("sample:GSPC")


def no_warnings(check, *args):
    """Run a checker and return every warning it raised (pytest's ignore filters are overridden)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check(*args)
    return [f"{w.category.__name__}: {w.message}" for w in caught]


SETTINGS = [{}, {"long_only": True}, {"max_exposure": 0.5}, {"action_mode": "continuous"},
            {"action_mode": "continuous", "min_exposure": 0.0}]


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_gymnasium_env_checker_passes_without_warnings(kwargs):
    from gymnasium.utils.env_checker import check_env

    # Made through the registry so the checker can also test the spec (render modes).
    env = gym.make(ENV_ID, data="sample:GSPC", **kwargs).unwrapped
    assert no_warnings(check_env, env) == []


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_sb3_env_checker_passes_without_warnings(kwargs):
    from stable_baselines3.common.env_checker import check_env

    assert no_warnings(check_env, TradingGymEnv("sample:GSPC", **kwargs)) == []


def test_exposure_range_masks_levels_and_bounds_continuous_actions():
    capped = TradingGymEnv("sample:GSPC", max_exposure=0.5)
    assert capped.action_masks().tolist() == [True, True, True, True, False]
    capped.reset(options={"start": 1000})
    assert capped.step(4)[4]["position"] == pytest.approx(0.5, abs=0.05)  # a masked 1.0 runs as 0.5
    long_only = TradingGymEnv("sample:GSPC", action_mode="continuous", long_only=True)
    assert long_only.action_space == gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
    long_only.reset(options={"start": 1000})
    assert long_only.step(np.array([-0.7], dtype=np.float32))[4]["position"] == 0.0
    with pytest.raises(ValueError, match="one finite target exposure"):
        long_only.step(np.array([np.nan], dtype=np.float32))
    with pytest.raises(ValueError, match="min_exposure <= max_exposure"):
        TradingGymEnv("sample:GSPC", min_exposure=0.6, max_exposure=0.5)
    with pytest.raises(ValueError, match="no exposure level inside"):
        TradingGymEnv("sample:GSPC", exposure_levels=(-1.0, 1.0), min_exposure=-0.5, max_exposure=0.5)


def test_registered_on_import_and_made_with_defaults():
    assert gym.registry[ENV_ID].entry_point == "ml.env.gym_env:TradingGymEnv"
    env = gym.make(ENV_ID, data=str(GSPC))
    assert isinstance(env.unwrapped, TradingGymEnv)
    assert env.action_space == gym.spaces.Discrete(5)
    assert env.observation_space.shape == (env.unwrapped.series.features.shape[1] + 1,)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs) and info["nav"] == 1.0 and info["position"] == 0.0
    for _ in range(20):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs) and np.isfinite(reward)
        assert {"nav", "cost", "position"} <= set(info)
    # The "module:id" form imports the module first, as an entry-point-free fallback.
    assert isinstance(gym.make(f"ml.env.gym_env:{ENV_ID}", data=str(GSPC)).unwrapped, TradingGymEnv)


def test_accepts_a_normalized_dataframe(gspc_bars):
    from_frame = TradingGymEnv(gspc_bars)
    from_file = TradingGymEnv(str(GSPC))
    assert from_frame.window == from_file.window
    np.testing.assert_array_equal(from_frame.reset(seed=3)[0], from_file.reset(seed=3)[0])


def test_seeded_resets_are_reproducible():
    a, b = TradingGymEnv("sample:GSPC"), TradingGymEnv("sample:GSPC")
    actions = np.random.default_rng(0).integers(0, 5, size=40)

    def rollout(env, seed):
        trace = [env.reset(seed=seed)]
        for action in actions:
            obs, reward, terminated, truncated, info = env.step(action)
            trace.append((obs, reward, info))
            if terminated or truncated:
                trace.append(env.reset())  # unseeded resets continue the seeded generator
        trace += [env.reset() for _ in range(5)]
        return trace

    first, second = rollout(a, 7), rollout(b, 7)
    for x, y in zip(first, second, strict=True):
        np.testing.assert_array_equal(x[0], y[0])
        assert x[1:] == y[1:]
    starts = {a.reset(seed=seed)[1]["bar"] for seed in range(10)}
    assert len(starts) > 1


@pytest.mark.parametrize("action_mode", ["discrete", "continuous"])
def test_rollouts_match_the_batched_env(gspc_bars, action_mode):
    """Three single-env episodes equal the three columns of one batched TradingEnv (rewards, NAV, obs)."""
    costs = CostConfig(commission_bps=2, half_spread_bps=3, slippage_bps=1, borrow_bps_per_year=50)
    episode_bars = 60
    singles = [TradingGymEnv(str(GSPC), costs=costs, episode_bars=episode_bars, action_mode=action_mode)
               for _ in range(3)]
    first, last = singles[0].window
    starts = [first, 2500, last - 20]  # the last episode ends on the data, the others truncate
    series = prepare_series(gspc_bars, LOOKBACK, torch.device("cpu"))
    space = make_action_space(ActionConfig(mode=action_mode))
    batched = TradingEnv(series, len(starts), space, costs, EnvConfig(episode_bars=episode_bars))
    batched.reset(torch.tensor(starts), torch.full((len(starts),), last))
    levels = torch.tensor(singles[0].exposure_levels, dtype=torch.float64)
    mean, std = series.feature_stats(singles[0].window)
    rng = np.random.default_rng(1)
    if action_mode == "discrete":
        actions = rng.integers(0, len(levels), size=(episode_bars, len(starts)))
        targets = [levels[torch.from_numpy(row)] for row in actions]
    else:
        actions = rng.uniform(-1, 1, size=(episode_bars, len(starts), 1)).astype(np.float32)
        targets = [torch.from_numpy(row[:, 0]) for row in actions]

    for env, start in zip(singles, starts):
        obs, _ = env.reset(options={"start": start})
        assert obs[-1] == 0.0
    done = [False] * len(starts)
    for k in range(episode_bars):
        result = batched.step(targets[k])
        expected_obs = torch.clamp((result.features - mean) / torch.clamp(std, min=1e-6), -NORM_CLIP, NORM_CLIP)
        for i, env in enumerate(singles):
            if done[i]:
                continue
            obs, reward, terminated, truncated, info = env.step(actions[k, i])
            assert reward == pytest.approx(float(result.reward[i]), abs=1e-6)
            assert info["nav"] == pytest.approx(float(result.nav[i]), abs=1e-6)
            assert info["cost"] == pytest.approx(float(result.cost[i]), abs=1e-9)
            np.testing.assert_allclose(obs[:-1], expected_obs[i].numpy(), atol=1e-6)
            assert obs[-1] == pytest.approx(float(result.position[i, 0]), abs=1e-6)
            assert (terminated, truncated) == (bool(result.terminated[i]), bool(result.truncated[i]))
            done[i] = terminated or truncated
        # Park finished columns on an early bar so the batched env never steps past the data.
        finished = torch.tensor(done)
        if finished.any():
            batched.reset(torch.full((len(starts),), first), torch.full((len(starts),), last), mask=finished)
    assert all(done)
    assert singles[2].env.t.item() == last  # the one that ran into the end of the data


def test_end_of_data_terminates_and_length_limit_truncates():
    env = TradingGymEnv("sample:GSPC", episode_bars=5)
    first, last = env.window
    env.reset(options={"start": last - 3})
    flags = [env.step(4)[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (True, False)]
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)

    env.reset(options={"start": first})
    flags = [env.step(4)[2:4] for _ in range(5)]
    assert flags == [(False, False)] * 4 + [(False, True)]


def test_ruin_terminates():
    bars = synthetic_bars(400, vol=0.005)
    bars.loc[200:, ["open", "high", "low", "close"]] *= 0.3  # a 70% crash at bar 200
    env = TradingGymEnv(bars, episode_bars=1000)
    env.reset(options={"start": 190})
    for _ in range(10):
        _, _, terminated, truncated, info = env.step(4)  # fully long into the crash
        if terminated:
            break
    assert terminated and not truncated
    assert info["bar"] == 200 and info["nav"] < 0.5


def test_train_window_confines_starts_and_normalization():
    window = (500, 1500)
    env = TradingGymEnv("sample:GSPC", train_window=window)
    starts = [env.reset(seed=seed)[1]["bar"] for seed in range(50)]
    assert all(window[0] <= s < window[1] for s in starts)
    mean, std = env.series.feature_stats(window)
    obs, info = env.reset(options={"start": 700})
    expected = torch.clamp((env.series.features[700] - mean) / std, -NORM_CLIP, NORM_CLIP)
    np.testing.assert_allclose(obs[:-1], expected.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="train_window"):
        TradingGymEnv("sample:GSPC", train_window=(10, 100))  # before the first full feature window


def test_long_only_masks_and_enforces_negative_levels(env):
    np.testing.assert_array_equal(env.action_masks(), [True] * 5)
    long_only = TradingGymEnv("sample:GSPC", long_only=True)
    masks = long_only.action_masks()
    np.testing.assert_array_equal(masks, [False, False, True, True, True])
    assert long_only.action_space.sample(mask=masks.astype(np.int8)) >= 2
    long_only.reset(seed=0)
    _, _, _, _, info = long_only.step(0)  # a masked level (-1) is executed as flat
    assert info["position"] == 0.0 and info["traded"] == 0.0


def test_info_reports_each_shaping_term_inside_the_reward():
    env = TradingGymEnv("sample:GSPC", env_config={"drawdown_penalty": 2.0, "turnover_penalty": 0.1})
    env.reset(options={"start": 1000})
    nav = 1.0
    for action in (4, 0, 4, 2):
        _, reward, _, _, info = env.step(action)
        shaping = info["shaping/drawdown"] + info["shaping/turnover"]
        assert info["shaping/turnover"] == pytest.approx(-0.1 * info["traded"], rel=1e-6)
        assert reward == pytest.approx(np.log(info["nav"] / nav) + shaping, abs=1e-6)
        nav = info["nav"]
