"""The risk overlay: turns the policy's target into the executed target, bar by bar.

It sits between the action space (the account's static limits) and the fill, and reads only
what is known when the decision is made on bar t: NAV and positions at bar t's close, the
fill price of bar t, trailing return moments of the bars up to t, and the session schedule.
Rules, in the order they apply (each off unless configured, see ``RiskConfig``):

1. Kelly cap: no exposure above a fraction of the asset's trailing Kelly leverage.
2. Stop-loss: an asset whose price moved ``stop_loss`` against the position since the fill
   that opened it is closed, and stays closed for a cool-down.
3. Volatility targeting: a full target runs at ``target_volatility`` (trailing realized).
4. Leverage cap: gross exposure at most ``max_leverage``.
5. Session close: nothing held through a session's last bar; only reductions near the close.
6. Session loss limit: flat for the rest of a session (and optional more) once its loss is reached.
7. Drawdown breaker: gross exposure capped once NAV is ``max_drawdown`` below its peak.

One module serves everyone: the training environment and every backtest call it with
per-bar inputs computed once over the series; the exported ONNX graph calls it with the same
inputs computed from the window it receives. Everything a rule remembers (peak NAV, the
session's starting NAV, cool-downs, entry prices) is a state vector per account that the
caller keeps: the environment as part of its episodes, a service by passing back what the
model returned on the previous bar.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ml.config import PipelineConfig, RiskConfig
from ml.market.calendar import periods_per_year
from ml.market.series import MarketSeries
from ml.market.sessions import session_schedule

# The rules in the order they apply; interventions are reported per rule in this order.
RULES = ("kelly_cap", "stop_loss", "volatility_target", "leverage_cap", "session_close", "no_new_positions",
         "session_loss_limit", "drawdown_breaker")
# Rules that trip and hold for a while (a trip is counted on the bar it fires).
BREAKERS = ("stop_loss", "session_loss_limit", "drawdown_breaker")
# The state vector of one account: these scalars, then an entry price and a stop cool-down per asset.
STATE_SCALARS = ("peak_nav", "last_nav", "session_day", "session_start_nav", "drawdown_cooldown", "loss_lockout")


def gross(weights: torch.Tensor) -> torch.Tensor:
    """Gross exposure [N] of targets [N, A]."""
    return weights.abs().sum(dim=-1)


def trailing_moments(closes: torch.Tensor, periods_per_year: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [..., A] and covariance [..., A, A] of the log returns in ``closes`` [..., W + 1, A], annualized."""
    returns = torch.log(closes[..., 1:, :] / closes[..., :-1, :])
    mean = returns.mean(dim=-2)
    centered = returns - mean.unsqueeze(-2)
    covariance = centered.transpose(-1, -2) @ centered / (returns.shape[-2] - 1)
    return mean * periods_per_year, covariance * periods_per_year


def _countdown(cooldown: torch.Tensor, trip: torch.Tensor, bars: float):
    """Advance a breaker by one decision: a running cool-down counts down (re-arming at zero); a
    trip while armed starts one of ``bars`` decisions, this one included. Returns (active, cooldown, re-armed)."""
    running = cooldown > 0
    cooldown = torch.where(running, cooldown - 1, cooldown)
    rearmed = running & (cooldown == 0)
    cooldown = torch.where(~running & trip, torch.full_like(cooldown, bars), cooldown)
    return cooldown > 0, cooldown, rearmed


def _cap_gross(weights: torch.Tensor, cap: float) -> torch.Tensor:
    total = gross(weights)
    return weights * torch.where(total > cap, cap / total.clamp(min=1e-12), torch.ones_like(total)).unsqueeze(-1)


@dataclass
class RiskMarket:
    """The overlay's per-bar inputs over a whole series, each row computed from bars <= t."""

    mean: torch.Tensor  # [T, A] annualized trailing mean log return
    covariance: torch.Tensor  # [T, A, A] annualized trailing covariance of log returns
    fill_price: torch.Tensor  # [T, A] the price a fill on bar t got (its open; the close of a close-only series)
    close: torch.Tensor  # [T, A]
    session: torch.Tensor  # [T, 2] session day, bars left in the session after bar t


class RiskOverlay(nn.Module):
    """Policy target [N, A] + decision-time state -> executed target [N, A] + next state."""

    def __init__(self, config: RiskConfig, n_assets: int, periods_per_year: float, interval: str):
        super().__init__()
        self.config = config
        self.n_assets = n_assets
        self.periods_per_year = periods_per_year
        self.interval = interval

    @classmethod
    def from_config(cls, config: PipelineConfig, n_assets: int) -> "RiskOverlay | None":
        """The run's overlay, or None when every rule is off (nothing then runs between target and fill)."""
        if not config.risk.enabled:
            return None
        ppy = periods_per_year(config.data.interval, config.data.calendar)
        return cls(config.risk, n_assets, ppy, config.data.interval)

    def volatility_only(self) -> "RiskOverlay":
        """This overlay's volatility targeting with every other rule off (the benchmark's own baseline)."""
        cfg = self.config
        only = RiskConfig(target_volatility=cfg.target_volatility, volatility_window=cfg.volatility_window,
                          max_leverage=cfg.max_leverage)
        return RiskOverlay(only, self.n_assets, self.periods_per_year, self.interval)

    @property
    def state_size(self) -> int:
        return len(STATE_SCALARS) + 2 * self.n_assets

    def initial_state(self, nav: torch.Tensor) -> torch.Tensor:
        """A fresh account [N, S] at ``nav`` [N]: flat, at its peak, before its first session."""
        state = torch.zeros(nav.shape[0], self.state_size, dtype=nav.dtype, device=nav.device)
        state[:, 0] = nav
        state[:, 1] = nav
        state[:, 2] = -1.0  # no session yet: the first decision starts one
        state[:, 3] = nav
        return state

    def example_inputs(self, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Plausible (nav [B, 1], session [B, 2], state [B, S]) for export and parity: some accounts in
        drawdown, some mid-session, some after a loss. Float32, as a service passes them."""
        generator = torch.Generator().manual_seed(seed)
        nav = 0.8 + 0.4 * torch.rand(count, generator=generator, dtype=torch.float64)
        state = self.initial_state(nav)
        state[:, 0] = nav * (1.0 + 0.3 * torch.rand(count, generator=generator, dtype=torch.float64))  # peak
        state[:, 1] = nav * (1.0 + 0.05 * torch.rand(count, generator=generator, dtype=torch.float64))  # last NAV
        state[:, 2] = 20000.0
        day = 20000.0 + torch.randint(0, 2, (count,), generator=generator).double()
        bars_left = torch.randint(0, 7, (count,), generator=generator).double()
        return nav.reshape(-1, 1).float(), torch.stack([day, bars_left], dim=1).float(), state.float()

    def market_inputs(self, series: MarketSeries) -> RiskMarket:
        """Every bar's inputs at once; row t equals what ``window_inputs`` computes from the window ending at t."""
        close = series.close.double()
        window = self.config.volatility_window
        # [T - W, W + 1, A]: the closes behind each bar from bar W on. The first W bars have no
        # estimate (zeros: no volatility scaling, no Kelly cap); no decision reads them, since a
        # decision needs a lookback window and the config keeps W below it.
        windows = close.unfold(0, window + 1, 1).transpose(1, 2)
        mean, covariance = trailing_moments(windows, self.periods_per_year)
        pad = min(window, close.shape[0])
        mean = torch.cat([mean.new_zeros(pad, mean.shape[1]), mean])
        covariance = torch.cat([covariance.new_zeros(pad, *covariance.shape[1:]), covariance])
        day, bars_left = session_schedule(series.timestamps, self.interval, self.config.session_timezone,
                                          self.config.session_close)
        session = torch.stack([torch.from_numpy(day), torch.from_numpy(bars_left)], dim=1).to(close)
        return RiskMarket(mean=mean, covariance=covariance, fill_price=series.ohlcv[:, :, 0].double(), close=close,
                          session=session.to(series.device))

    def window_inputs(self, ohlcv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(close, fill price, mean, covariance) of the last bar of raw windows [B, L, A, 5] (or [B, L, 5])."""
        bars = ohlcv.reshape(ohlcv.shape[0], ohlcv.shape[1], self.n_assets, 5)
        closes = bars[:, -(self.config.volatility_window + 1):, :, 3]
        mean, covariance = trailing_moments(closes, self.periods_per_year)
        return bars[:, -1, :, 3], bars[:, -1, :, 0], mean, covariance

    def forward(self, target: torch.Tensor, held: torch.Tensor, nav: torch.Tensor, close: torch.Tensor,
                fill_price: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor, session: torch.Tensor,
                state: torch.Tensor, record: bool = True):
        """One decision for N accounts.

        target [N, A]: the policy's (projected) target. held [N, A]: weights at bar t's close.
        nav [N]: NAV at bar t's close. close, fill_price [N, A]: bar t's close and the price its
        fill got. mean [N, A], covariance [N, A, A]: trailing annualized moments. session [N, 2]:
        session day and bars left after bar t. state [N, S].
        Returns the executed target [N, A], the next state [N, S], the gross exposure each rule
        removed [N, len(RULES)] (negative when volatility targeting added some) and whether each
        breaker tripped on this bar [N, len(BREAKERS)]; with ``record`` off (training, where nobody
        reads them) those two are None and cost nothing.
        """
        cfg, assets = self.config, self.n_assets
        n_scalars = len(STATE_SCALARS)
        peak, last_nav, day, start_nav, drawdown_cooldown, lockout = state[:, :n_scalars].unbind(dim=1)
        entry = state[:, n_scalars:n_scalars + assets]  # signed: + long, - short, 0 flat
        stop_cooldown = state[:, n_scalars + assets:]
        session_day, bars_left = session[:, 0], session[:, 1]
        zero = torch.zeros_like(nav)

        # A new session starts from the NAV the previous one ended with; a lockout counts sessions.
        new_session = session_day != day
        start_nav = torch.where(new_session, last_nav, start_nav)
        lockout = torch.where(new_session, (lockout - 1).clamp(min=0), lockout)
        # The fill on bar t's open opened or flipped a position: its price is the new entry.
        side = torch.sign(held)
        opened = (side != 0) & (side != torch.sign(entry))
        entry = torch.where(opened, side * fill_price, torch.where(side == 0, torch.zeros_like(entry), entry))
        peak = torch.maximum(peak, nav)

        executed = target
        removed, trips = [], []

        def apply(rule_on: bool, new: torch.Tensor | None) -> None:
            nonlocal executed
            if record:
                removed.append(gross(executed) - gross(new) if rule_on else zero)
            if rule_on:
                executed = new

        # 1. Kelly cap: |w| <= fraction x (mean / variance), on the side the trailing mean favours.
        if cfg.kelly_fraction:
            variance = torch.diagonal(covariance, dim1=-2, dim2=-1)
            kelly = cfg.kelly_fraction * (mean + variance / 2) / variance.clamp(min=1e-12)  # log-normal's mean
            w_side = torch.sign(executed)
            capped = w_side * torch.minimum(executed.abs(), (w_side * kelly).clamp(min=0))
            apply(True, torch.where(variance > 0, capped, executed))  # no estimate yet: no cap
        else:
            apply(False, None)
        # 2. Stop-loss per asset, measured from the entry fill to bar t's close. Before the sizing
        # below, so that what remains of a hedged basket is sized as what it now is.
        if cfg.stop_loss:
            adverse = torch.sign(entry) * (close / entry.abs().clamp(min=1e-12) - 1.0)
            hit = (entry != 0) & (adverse <= -cfg.stop_loss)
            running = stop_cooldown > 0
            stopped, stop_cooldown, _ = _countdown(stop_cooldown, hit, float(cfg.stop_cooldown_bars))
            trips.append((hit & ~running).any(dim=-1))
            apply(True, torch.where(stopped, torch.zeros_like(executed), executed))
        else:
            trips.append(torch.zeros_like(nav, dtype=torch.bool))
            apply(False, None)
        # 3. Volatility targeting: the target's direction at full size would run at the target vol;
        # the scale stops where gross exposure reaches max_leverage.
        if cfg.target_volatility:
            size = gross(executed)
            direction = executed / size.clamp(min=1e-12).unsqueeze(-1)
            variance = (direction.unsqueeze(1) @ covariance @ direction.unsqueeze(2)).reshape(-1)
            forecast = variance.clamp(min=0).sqrt()
            # A scale-up stops at max_leverage; a target already above it is the leverage cap's to cut.
            scale = torch.minimum(cfg.target_volatility / forecast.clamp(min=1e-12),
                                  (cfg.max_leverage / size.clamp(min=1e-12)).clamp(min=1.0))
            scale = torch.where((size > 0) & (forecast > 0), scale, torch.ones_like(forecast))
            apply(True, executed * scale.unsqueeze(-1))
        else:
            apply(False, None)
        # 4. Leverage cap on the policy's own target (volatility targeting caps its own scaling).
        apply(True, _cap_gross(executed, cfg.max_leverage))
        # 5. Session close: the fill lands on the session's last bar (bars_left == 1) or near it.
        fill_bars_left = bars_left - 1  # bars after the fill bar, when it is in this session (bars_left > 0)
        if cfg.flat_at_session_close:
            apply(True, torch.where((bars_left == 1).unsqueeze(-1), torch.zeros_like(executed), executed))
        else:
            apply(False, None)
        if cfg.no_new_positions_bars:
            near_close = ((bars_left > 0) & (fill_bars_left < cfg.no_new_positions_bars)).unsqueeze(-1)
            held_side = torch.sign(held)
            reduce_only = held_side * torch.minimum((executed * held_side).clamp(min=0), held.abs())
            apply(True, torch.where(near_close, reduce_only, executed))
        else:
            apply(False, None)
        # 6. Session loss limit: locks this session and `session_loss_cooldown` more.
        if cfg.session_loss_limit:
            hit = (lockout == 0) & (1.0 - nav / start_nav >= cfg.session_loss_limit)
            lockout = torch.where(hit, torch.full_like(lockout, 1.0 + cfg.session_loss_cooldown), lockout)
            # The fill's session: this one (lockout > 0), or the next one when bar t ends the session.
            locked = lockout > (bars_left <= 0).to(lockout.dtype)
            trips.append(hit)
            apply(True, torch.where(locked.unsqueeze(-1), torch.zeros_like(executed), executed))
        else:
            trips.append(torch.zeros_like(nav, dtype=torch.bool))
            apply(False, None)
        # 7. Drawdown breaker: re-arms after its cool-down, measuring from the NAV of that bar.
        if cfg.max_drawdown:
            hit = 1.0 - nav / peak >= cfg.max_drawdown
            running = drawdown_cooldown > 0
            active, drawdown_cooldown, rearmed = _countdown(drawdown_cooldown, hit, float(cfg.drawdown_cooldown_bars))
            peak = torch.where(rearmed, nav, peak)
            trips.append(hit & ~running & active)
            capped = _cap_gross(executed, cfg.drawdown_exposure) if cfg.drawdown_exposure else torch.zeros_like(executed)
            apply(True, torch.where(active.unsqueeze(-1), capped, executed))
        else:
            trips.append(torch.zeros_like(nav, dtype=torch.bool))
            apply(False, None)

        next_state = torch.cat([torch.stack([peak, nav, session_day.to(nav.dtype), start_nav, drawdown_cooldown,
                                             lockout], dim=1), entry, stop_cooldown], dim=1)
        if not record:
            return executed, next_state, None, None
        return executed, next_state, torch.stack(removed, dim=1), torch.stack(trips, dim=1)
