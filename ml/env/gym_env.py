"""A single-episode Gymnasium view of ``TradingEnv``, registered as ``ml/Trading-v0``.

For off-the-shelf RL libraries (Stable-Baselines3 and the like) and for
comparing against them. It steps one ``TradingEnv`` episode on CPU, so fills,
costs, rewards and termination are the batched environment's own; this module
only adds spaces, seeding and observation scaling.

    import gymnasium as gym
    import ml.env.gym_env  # registers ml/Trading-v0

    env = gym.make("ml/Trading-v0", data="ml/sample/GSPC.csv")  # or "sample:GSPC", or a DataFrame
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())

Observation: the bar's features normalized with mean/std fitted on the env's
own window and clipped to ``±NORM_CLIP`` (exactly what ``ActorCritic`` feeds
its MLP), followed by the current position clipped to the same bound.
Action: with ``action_mode="discrete"`` an index into ``exposure_levels`` (the
level is the target exposure); with ``"continuous"`` the target exposure itself,
a ``Box`` over [-1, 1]. Levels outside [``min_exposure``, ``max_exposure``] are
masked, and any action is executed clamped into that range. ``long_only=True``
is ``min_exposure=0``.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pandas as pd
import torch
from gymnasium import spaces

from ml.config import ActionConfig, CostConfig, EnvConfig
from ml.data.schema import OHLCV_FIELDS, DataError
from ml.data.sources import load_file, load_sample, sample_path
from ml.env.action_space import make_action_space
from ml.env.trading_env import TradingEnv
from ml.market.calendar import periods_per_year
from ml.market.features import NORM_CLIP
from ml.market.series import MarketSeries, prepare_series

ENV_ID = "ml/Trading-v0"
DEFAULT_LEVELS = (-1.0, -0.5, 0.0, 0.5, 1.0)
SAMPLE_PREFIX = "sample:"


def load_bars(data: str | Path | pd.DataFrame) -> pd.DataFrame:
    """A path (CSV/parquet), ``"sample:SYMBOL"`` or a frame already in the normalized schema."""
    if isinstance(data, pd.DataFrame):
        missing = [c for c in ("timestamp", *OHLCV_FIELDS) if c not in data.columns]
        if missing:
            raise DataError(f"DataFrame is not in the normalized bar schema: missing columns {missing}")
        return data.reset_index(drop=True)
    if isinstance(data, str) and data.startswith(SAMPLE_PREFIX):
        return load_sample(data[len(SAMPLE_PREFIX):])
    return load_file(data)


@lru_cache(maxsize=8)
def _cached_series(data: str, _resolved: str, lookback: int, _stamp: tuple[int, int]) -> tuple[pd.DataFrame, MarketSeries]:
    bars = load_bars(data)
    return bars, prepare_series(bars, lookback, torch.device("cpu"))


def load_series(data: str | Path | pd.DataFrame, lookback: int) -> tuple[pd.DataFrame, MarketSeries]:
    """Bars and their features; files are read once per process (a vector of N envs shares them).

    Sharing is safe: ``TradingEnv`` never writes to the ohlcv or feature tensors.
    The cache key includes the file's mtime and size, so an edited file is re-read.
    """
    if isinstance(data, pd.DataFrame):
        bars = load_bars(data)
        return bars, prepare_series(bars, lookback, torch.device("cpu"))
    if isinstance(data, str) and data.startswith(SAMPLE_PREFIX):
        path = sample_path(data[len(SAMPLE_PREFIX):])
    else:
        path = Path(data)
    stat = path.stat() if path.exists() else None
    stamp = (stat.st_mtime_ns, stat.st_size) if stat else (0, 0)  # a missing file fails in load_file
    return _cached_series(str(data), str(path.resolve()), int(lookback), stamp)


class TradingGymEnv(gym.Env):
    """One trading episode at a time over one bar series (n_envs=1, CPU).

    ``train_window=(first, last)`` (inclusive bar indices) confines episodes and
    the normalization statistics to those bars; by default it is every bar
    with a full feature window. Episodes start at a random bar of the window
    (drawn from the generator seeded by ``reset(seed=...)``, or pinned with
    ``reset(options={"start": bar})``) and end with ``terminated`` at the
    window's last bar or on ruin, or with ``truncated`` after ``episode_bars``.
    """

    metadata = {"render_modes": []}

    def __init__(self, data: str | Path | pd.DataFrame, *, lookback: int = 64,
                 train_window: tuple[int, int] | None = None, episode_bars: int | None = None,
                 exposure_levels: tuple[float, ...] = DEFAULT_LEVELS, action_mode: str = "discrete",
                 min_exposure: float | None = None, max_exposure: float = 1.0, long_only: bool = False,
                 costs: CostConfig | dict | None = None, env_config: EnvConfig | dict | None = None,
                 calendar: str = "equity", render_mode: str | None = None):
        if render_mode is not None:
            raise ValueError(f"{ENV_ID} has no render modes (got render_mode={render_mode!r})")
        self.render_mode = None
        bars, self.series = load_series(data, lookback)
        n_bars = self.series.ohlcv.shape[0]

        first_usable = lookback - 1  # earlier rows have NaN features
        first, last = train_window if train_window is not None else (first_usable, n_bars - 1)
        first, last = int(first), int(last)
        if not first_usable <= first < last <= n_bars - 1:
            raise ValueError(f"train_window ({first}, {last}) must satisfy {first_usable} <= first < last "
                             f"<= {n_bars - 1} (lookback {lookback}, {n_bars} bars)")
        self.window = (first, last)

        costs = CostConfig(**costs) if isinstance(costs, dict) else (costs or CostConfig())
        if env_config is None:
            # Same borrow accrual per bar as the training pipeline for this interval.
            interval = str(bars["interval"].iloc[0]) if "interval" in bars.columns else "1d"
            config = EnvConfig(periods_per_year=periods_per_year(interval, calendar))
        else:
            config = EnvConfig(**env_config) if isinstance(env_config, dict) else env_config
        if episode_bars is not None:
            config = replace(config, episode_bars=int(episode_bars))

        # Normalize every bar once; an observation is then a row lookup.
        mean, std = self.series.feature_stats(self.window)
        normalized = (self.series.features - mean) / torch.clamp(std, min=1e-6)
        self._feature_rows = torch.clamp(normalized, -NORM_CLIP, NORM_CLIP).numpy().astype(np.float32)
        n_features = self._feature_rows.shape[1]
        self.observation_space = spaces.Box(-NORM_CLIP, NORM_CLIP, shape=(n_features + 1,), dtype=np.float32)

        if min_exposure is None:
            min_exposure = 0.0 if long_only else -1.0
        elif long_only and min_exposure < 0:
            raise ValueError(f"long_only contradicts min_exposure={min_exposure}")
        if not -1.0 <= min_exposure <= max_exposure <= 1.0:
            raise ValueError(f"need -1 <= min_exposure <= max_exposure <= 1, got {min_exposure} and {max_exposure}")
        self.exposure_range = (float(min_exposure), float(max_exposure))
        self.action_mode = action_mode
        self.exposure_levels = tuple(float(level) for level in exposure_levels)
        if action_mode not in ("discrete", "continuous"):
            raise ValueError(f"unknown action_mode '{action_mode}' (expected discrete or continuous)")
        if not self.exposure_levels or any(abs(level) > 1.0 for level in self.exposure_levels):
            raise ValueError(f"exposure_levels must be non-empty and inside [-1, 1], got {exposure_levels}")
        try:
            self.trading_space = make_action_space(ActionConfig(action_mode, self.exposure_levels, min_exposure,
                                                                max_exposure))
        except ValueError as error:
            raise ValueError(f"{error}: {exposure_levels}") from None
        self.action_space = self.trading_space.gym_space()
        self.env = TradingEnv(self.series, 1, self.trading_space, costs, config)
        self._done = True

    def action_masks(self) -> np.ndarray:
        """Allowed actions as a bool array (the ``MaskablePPO`` convention; discrete mode).

        For ``action_space.sample(mask=...)`` pass ``env.action_masks().astype(np.int8)``.
        """
        return self.trading_space.gym_action_mask()

    def _observation(self, bar: int, position: float) -> np.ndarray:
        obs = np.empty(self.observation_space.shape, dtype=np.float32)
        obs[:-1] = self._feature_rows[bar]
        obs[-1] = min(max(position, -NORM_CLIP), NORM_CLIP)
        return obs

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        first, last = self.window
        start = (options or {}).get("start")
        if start is None:
            start = int(self.np_random.integers(first, last))  # same range as the PPO trainer's starts
        elif not first <= int(start) < last:
            raise ValueError(f"start {start} is outside the window's decision bars [{first}, {last - 1}]")
        start = int(start)
        self.env.reset(torch.tensor([start]), torch.tensor([last]))
        self._done = False
        info = {"nav": 1.0, "cost": 0.0, "position": 0.0, "traded": 0.0, "bar": start}
        return self._observation(start, 0.0), info

    def step(self, action):
        if self._done:
            raise RuntimeError("the episode is over: call reset() before step()")
        result = self.env.step(self.trading_space.gym_target(action, self.action_space))
        terminated, truncated = bool(result.terminated.item()), bool(result.truncated.item())
        self._done = terminated or truncated
        position = float(result.position.item())
        bar = int(self.env.t.item())
        info = {"nav": float(result.nav.item()), "cost": float(result.cost.item()), "position": position,
                "traded": float(result.traded.item()), "bar": bar,
                **{f"shaping/{name}": float(term.item()) for name, term in result.shaping.items()}}
        return self._observation(bar, position), float(result.reward.item()), terminated, truncated, info


# Registration on import; gymnasium >= 1.0 no longer loads entry-point plugins by itself.
if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="ml.env.gym_env:TradingGymEnv")
