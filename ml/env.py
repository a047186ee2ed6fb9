"""Batched single-asset trading environment in torch.

N episodes are stepped together as tensors (CPU or CUDA, no Python loop over
episodes). Semantics, fixed by the design:

- the agent decides on bar t from data up to and including bar t;
- the order fills at bar t+1's open (the next close for close-only series);
- commission, half-spread and adverse slippage are charged on every change
  of position, plus an optional borrow cost on short notional;
- reward = log change of net asset value after costs;
- ``terminated`` = ruin or end of the data segment, ``truncated`` = episode
  length limit (the trainer bootstraps the value there).

The action is a target exposure in [-1, 1]: the fraction of net asset value
held in the asset after the fill. Training, validation, the test backtest and
the baselines all run through this one class, so they share one accounting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BPS = 1e-4


@dataclass(frozen=True)
class CostConfig:
    commission_bps: float = 1.0  # fee on traded notional
    half_spread_bps: float = 1.0  # half the bid/ask spread, paid on every trade
    slippage_bps: float = 1.0  # adverse price impact, paid on every trade
    borrow_bps_per_year: float = 0.0  # charged per bar on short notional

    @property
    def price_impact(self) -> float:
        """Fraction by which the fill price is worse than the reference price."""
        return (self.half_spread_bps + self.slippage_bps) * BPS


@dataclass(frozen=True)
class EnvConfig:
    episode_bars: int = 256  # truncation limit during training
    ruin_fraction: float = 0.5  # terminate when NAV falls below this share of the start
    periods_per_year: float = 252.0  # for the borrow cost per bar
    compile: bool = False  # fuse the accounting with torch.compile (pays a one-off compile, ~30 s on CPU)
    # Reward shaping, added to the log-NAV reward and reported term by term (0 = off):
    drawdown_penalty: float = 0.0  # x fall of NAV below the episode's peak
    volatility_penalty: float = 0.0  # x squared log return of the step
    turnover_penalty: float = 0.0  # x traded notional over NAV


def settle(cash: torch.Tensor, units: torch.Tensor, nav_before: torch.Tensor, target: torch.Tensor,
           reference: torch.Tensor, close: torch.Tensor, price_impact: float, commission_rate: float,
           borrow_per_bar: float):
    """Fill every episode's order at its reference price and mark the book at the close.

    Returns cash, units, NAV, costs paid, traded notional over NAV, and the log-NAV reward.
    """
    nav_at_fill = units * reference + cash
    target_units = target * nav_at_fill / reference
    delta = target_units - units
    traded_value = delta.abs() * reference  # notional at the reference price
    # The fill price is worse than the reference by the impact, in the trade's direction.
    impact_paid = traded_value * price_impact
    cost = impact_paid + (traded_value + impact_paid) * commission_rate
    cost = cost + torch.clamp(-target_units, min=0.0) * close * borrow_per_bar
    cash = cash - (delta * reference + cost)
    nav = target_units * close + cash
    reward = torch.log(nav.clamp(min=1e-12) / nav_before)
    return cash, target_units, nav, cost, traded_value / nav_at_fill.clamp(min=1e-12), reward


def shaping_terms(config: EnvConfig, nav: torch.Tensor, peak_nav: torch.Tensor, log_return: torch.Tensor,
                  traded: torch.Tensor) -> dict[str, torch.Tensor]:
    """The configured reward-shaping terms, each on its own so it can be logged apart."""
    terms = {}
    if config.drawdown_penalty:
        terms["drawdown"] = -config.drawdown_penalty * (1.0 - nav / peak_nav)
    if config.volatility_penalty:
        terms["volatility"] = -config.volatility_penalty * log_return ** 2
    if config.turnover_penalty:
        terms["turnover"] = -config.turnover_penalty * traded
    return {name: term.float() for name, term in terms.items()}


@dataclass
class StepResult:
    features: torch.Tensor  # [N, F] features of the bar the next decision is made on
    position: torch.Tensor  # [N] exposure ([N, A] weights in portfolio mode) after this step, marked at close
    reward: torch.Tensor  # [N] log NAV change after costs, plus the shaping terms
    shaping: dict[str, torch.Tensor]  # [N] each shaping term (already included in reward)
    terminated: torch.Tensor  # [N] bool
    truncated: torch.Tensor  # [N] bool
    nav: torch.Tensor  # [N] NAV at this bar's close (before any reset)
    cost: torch.Tensor  # [N] money paid in costs this step
    traded: torch.Tensor  # [N] traded notional / NAV (turnover contribution)


class EpisodeBook:
    """The per-episode state every batched environment keeps, and the end of a step.

    Bar index, episode length, cash, holdings and NAV of N episodes; restarts
    (all at once or masked, for autoreset) and the shaping, termination and
    truncation that close every step. Subclasses settle the orders.
    """

    def __init__(self, features: torch.Tensor, n_envs: int, config: EnvConfig, position_shape: tuple[int, ...]):
        self.device = features.device
        self.features = features
        self.n_envs = n_envs
        self.config = config
        self.position_shape = position_shape  # () = one exposure per episode, (A,) = weights of A assets
        zeros = torch.zeros(n_envs, dtype=torch.float64, device=self.device)
        self.t = torch.zeros(n_envs, dtype=torch.long, device=self.device)
        self.end = torch.zeros_like(self.t)
        self.steps = torch.zeros_like(self.t)
        self.cash, self.nav, self.start_nav, self.peak_nav = zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone()
        self.units = torch.zeros((n_envs,) + position_shape, dtype=torch.float64, device=self.device)
        self._position = torch.zeros((n_envs,) + position_shape, dtype=torch.float32, device=self.device)

    def reset(self, starts: torch.Tensor, ends: torch.Tensor,
              mask: torch.Tensor | None = None, nav: float = 1.0) -> None:
        """(Re)start episodes at bar ``starts`` flat in cash; they end at bar ``ends``.

        With ``mask`` only the selected episodes restart (autoreset); ``starts`` and
        ``ends`` are then read at the selected positions.
        """
        index = slice(None) if mask is None else mask.nonzero().squeeze(1)
        self.t[index] = starts[index]
        self.end[index] = ends[index]
        self.steps[index] = 0
        self.cash[index] = nav
        self.units[index] = 0.0
        self.nav[index] = nav
        self.start_nav[index] = nav
        self.peak_nav[index] = nav
        self._position[index] = 0.0

    def observe(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features.index_select(0, self.t), self._position.clone()

    # Everything that changes while episodes run, so a resumed training run steps on
    # exactly where the interrupted one stopped.
    _EPISODE_STATE = ("t", "end", "steps", "cash", "units", "nav", "start_nav", "peak_nav", "_position")

    def episode_state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).clone() for name in self._EPISODE_STATE}

    def load_episode_state(self, state: dict[str, torch.Tensor]) -> None:
        for name in self._EPISODE_STATE:
            getattr(self, name).copy_(state[name])

    def _close_step(self, reward: torch.Tensor, cost: torch.Tensor, traded: torch.Tensor) -> StepResult:
        """Add the shaping terms, advance the episode clocks and report the step."""
        self.peak_nav = torch.maximum(self.peak_nav, self.nav)
        shaping = shaping_terms(self.config, self.nav, self.peak_nav, reward, traded)
        for term in shaping.values():
            reward = reward + term
        self.steps += 1
        terminated = (self.t >= self.end) | (self.nav <= self.config.ruin_fraction * self.start_nav)
        truncated = (self.steps >= self.config.episode_bars) & ~terminated
        # Snapshots (observe copies): a later in-place reset must not rewrite this step's result.
        features, position = self.observe()
        return StepResult(
            features=features, position=position, reward=reward.float(), shaping=shaping,
            terminated=terminated, truncated=truncated, nav=self.nav.clone(), cost=cost, traded=traded,
        )


class TradingEnv(EpisodeBook):
    """N episodes over one price series.

    ``ohlcv`` is the raw [T, 5] series, ``features`` its precomputed causal
    features [T, F] (row t reads bars <= t only).
    """

    def __init__(self, ohlcv: torch.Tensor, features: torch.Tensor, n_envs: int,
                 costs: CostConfig = CostConfig(), config: EnvConfig = EnvConfig(),
                 fill_at_open: bool = True):
        super().__init__(features, n_envs, config, position_shape=())
        self.close = ohlcv[:, 3].double()
        # Close-only series have no open: the order fills at the next close.
        self.fill_reference = (ohlcv[:, 0] if fill_at_open else ohlcv[:, 3]).double()
        # One gather per step fetches both prices of the fill bar.
        self._fill_bar = torch.stack([self.fill_reference, self.close], dim=1)
        self.costs = costs
        self.borrow_per_bar = costs.borrow_bps_per_year * BPS / config.periods_per_year
        self._settle = torch.compile(settle, dynamic=False) if config.compile else settle

    def step(self, target_exposure: torch.Tensor) -> StepResult:
        target = target_exposure.double().clamp(-1.0, 1.0)
        self.t += 1
        prices = self._fill_bar.index_select(0, self.t)
        self.cash, self.units, self.nav, cost, traded, reward = self._settle(
            self.cash, self.units, self.nav, target, prices[:, 0], prices[:, 1],
            self.costs.price_impact, self.costs.commission_bps * BPS, self.borrow_per_bar)
        self._position = (self.units * prices[:, 1] / self.nav).float()
        return self._close_step(reward, cost, traded)
