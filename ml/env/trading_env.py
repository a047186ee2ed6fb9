"""Batched trading environment in torch, over one or more aligned assets.

N episodes are stepped together as tensors (CPU or CUDA, no Python loop over
episodes). Semantics, fixed by the design:

- the agent decides on bar t from data up to and including bar t;
- every asset's order fills at bar t+1's open (the next close for a close-only
  series), with commission, half-spread and adverse slippage on the notional
  each asset trades, plus an optional borrow cost on short notional;
- reward = log change of net asset value after costs, plus optional shaping;
- ``terminated`` = ruin or end of the data segment, ``truncated`` = episode
  length limit (the trainer bootstraps the value there).

The action is a target per asset ([N, A]): the fraction of net asset value
held in it after the fill. A single asset is a portfolio of one; the action
space keeps the account's limits (exposure in [-1, 1], or long-only weights
summing to at most 1). With NAV-relative sizing the cash share is
1 - sum(targets), so the observation (features and current position) is Markov.
Training, validation, the test backtest and the baselines all run through this
one class, so they share one accounting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ml.config import CostConfig, EnvConfig
from ml.env.action_space import ActionSpace
from ml.env.risk import RiskOverlay
from ml.market.series import MarketSeries

BPS = 1e-4


def over_assets(values: torch.Tensor) -> torch.Tensor:
    """Sum over the asset axis ([N, A] -> [N]); one asset is a view, no reduction kernel."""
    return values.squeeze(-1) if values.shape[-1] == 1 else values.sum(dim=-1)


def settle(cash: torch.Tensor, units: torch.Tensor, nav_before: torch.Tensor, target: torch.Tensor,
           reference: torch.Tensor, close: torch.Tensor, price_impact: float, commission_rate: float,
           borrow_per_bar: float):
    """Fill every episode's orders ([N, A]) at the reference prices and mark the book at the close.

    Returns cash, units, NAV, costs paid, traded notional over NAV, and the log-NAV reward.
    """
    nav_at_fill = cash + over_assets(units * reference)
    target_units = target * nav_at_fill.unsqueeze(-1) / reference
    delta = target_units - units
    traded_value = delta.abs() * reference  # notional at the reference price
    # The fill price is worse than the reference by the impact, in the trade's direction.
    impact_paid = traded_value * price_impact
    cost = impact_paid + (traded_value + impact_paid) * commission_rate
    if borrow_per_bar:  # short notional pays borrow; skipped when free (the default), it is a fifth of the ops
        cost = cost + torch.clamp(-target_units, min=0.0) * close * borrow_per_bar
    cost = over_assets(cost)
    cash = cash - (over_assets(delta * reference) + cost)
    nav = cash + over_assets(target_units * close)
    reward = torch.log(nav.clamp(min=1e-12) / nav_before)
    return cash, target_units, nav, cost, over_assets(traded_value) / nav_at_fill.clamp(min=1e-12), reward


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
    features: torch.Tensor  # [N, A * F] features of the bar the next decision is made on
    position: torch.Tensor  # [N, A] share of NAV in each asset after this step, marked at the close
    reward: torch.Tensor  # [N] log NAV change after costs, plus the shaping terms
    shaping: dict[str, torch.Tensor]  # [N] each shaping term (already included in reward)
    terminated: torch.Tensor  # [N] bool
    truncated: torch.Tensor  # [N] bool
    nav: torch.Tensor  # [N] NAV at this bar's close (before any reset)
    cost: torch.Tensor  # [N] money paid in costs this step
    traded: torch.Tensor  # [N] traded notional / NAV (turnover contribution)
    executed: torch.Tensor  # [N, A] the target that was filled (the policy's, after the risk overlay)
    interventions: torch.Tensor | None = None  # [N, rules] exposure each risk rule removed (with an overlay)
    trips: torch.Tensor | None = None  # [N, breakers] which risk breakers tripped on this bar (with an overlay)


class TradingEnv:
    """N episodes over one aligned series of A assets.

    The series holds the raw bars [T, A, 5] and their precomputed causal features
    [T, A * F] (row t reads bars <= t only). With a ``risk`` overlay every target passes
    through it before the fill, so the agent learns under the limits it will trade with;
    ``record_risk`` keeps what each rule did in every step's result.
    """

    # Everything that changes while episodes run, so a resumed training run steps on
    # exactly where the interrupted one stopped.
    _EPISODE_STATE = ("t", "end", "steps", "cash", "units", "nav", "start_nav", "peak_nav", "_position")

    def __init__(self, series: MarketSeries, n_envs: int, action_space: ActionSpace,
                 costs: CostConfig = CostConfig(), config: EnvConfig = EnvConfig(),
                 risk: RiskOverlay | None = None, record_risk: bool = True):
        self.device = series.device
        self.features = series.features
        self.n_envs = n_envs
        self.config = config
        self.costs = costs
        self.action_space = action_space
        self.position_shape = (series.n_assets,)
        ohlcv = series.ohlcv
        close = ohlcv[:, :, 3].double()
        # Close-only series have no open: their orders fill at the next close.
        reference = torch.where(series.fill_at_open, ohlcv[:, :, 0], ohlcv[:, :, 3]).double()
        # One gather per step fetches both prices of the fill bar: [T, 2, A].
        self._fill_bar = torch.stack([reference, close], dim=1)
        self.borrow_per_bar = costs.borrow_bps_per_year * BPS / config.periods_per_year
        self._settle = torch.compile(settle, dynamic=False) if config.compile else settle

        zeros = torch.zeros(n_envs, dtype=torch.float64, device=self.device)
        self.t = torch.zeros(n_envs, dtype=torch.long, device=self.device)
        self.end = torch.zeros_like(self.t)
        self.steps = torch.zeros_like(self.t)
        self.cash, self.nav, self.start_nav, self.peak_nav = zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone()
        self.units = torch.zeros((n_envs,) + self.position_shape, dtype=torch.float64, device=self.device)
        self._position = torch.zeros((n_envs,) + self.position_shape, dtype=torch.float32, device=self.device)
        self.risk = risk
        self.record_risk = record_risk  # the overlay's per-rule records, for backtests; training skips them
        if risk is not None:
            self._risk_market = risk.market_inputs(series)
            self.risk_state = risk.initial_state(zeros)
            self._EPISODE_STATE = self._EPISODE_STATE + ("risk_state",)

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
        if self.risk is not None:
            self.risk_state[index] = self.risk.initial_state(self.nav[index])

    def observe(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features.index_select(0, self.t), self._position.clone()

    def episode_state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).clone() for name in self._EPISODE_STATE}

    def load_episode_state(self, state: dict[str, torch.Tensor]) -> None:
        for name in self._EPISODE_STATE:
            getattr(self, name).copy_(state[name])

    def step(self, target: torch.Tensor) -> StepResult:
        """Fill the targets ([N, A], or [N] for one asset) at the next bar and mark it at its close."""
        target = self.action_space.project(target.double().reshape((self.n_envs,) + self.position_shape))
        interventions = trips = None
        if self.risk is not None:
            target, interventions, trips = self._apply_risk(target)
        self.t += 1
        prices = self._fill_bar.index_select(0, self.t)
        close = prices[:, 1]
        self.cash, self.units, self.nav, cost, traded, reward = self._settle(
            self.cash, self.units, self.nav, target, prices[:, 0], close,
            self.costs.price_impact, self.costs.commission_bps * BPS, self.borrow_per_bar)
        self._position = (self.units * close / self.nav.unsqueeze(-1)).float()

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
            executed=target, interventions=interventions, trips=trips,
        )

    def _apply_risk(self, target: torch.Tensor):
        """The overlay's decision on bar t, from the book at t's close and the bar inputs up to t."""
        market, t = self._risk_market, self.t
        close = market.close.index_select(0, t)
        held = self.units * close / self.nav.clamp(min=1e-12).unsqueeze(-1)
        executed, self.risk_state, interventions, trips = self.risk(
            target, held, self.nav, close, market.fill_price.index_select(0, t), market.mean.index_select(0, t),
            market.covariance.index_select(0, t), market.session.index_select(0, t), self.risk_state,
            self.record_risk)
        return executed, interventions, trips
