"""The risk overlay: each rule on a series worked by hand, its session schedule, causality, and
one executed target in training, backtest and serving."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ml.agent.policy import ActorCritic, ExportPolicy
from ml.config import ActionConfig, ConfigError, CostConfig, EnvConfig, RiskConfig, config_from_dict
from ml.env.action_space import make_action_space
from ml.env.risk import BREAKERS, RULES, RiskOverlay
from ml.env.trading_env import TradingEnv
from ml.evaluation.backtest import run_backtest, target_series_policy
from ml.evaluation.metrics import annualized_volatility, max_drawdown
from ml.market.features import MIN_LOOKBACK
from ml.market.series import prepare_series
from ml.market.sessions import session_schedule
from ml.release.export import export_onnx
from ml.serving import InputError, Policy
from tests.conftest import synthetic_bars

FREE = CostConfig(commission_bps=0.0, half_spread_bps=0.0, slippage_bps=0.0)
SPACE = make_action_space(ActionConfig())
CPU = torch.device("cpu")


def bars_from_closes(close, stamps) -> pd.DataFrame:
    """Bars that open at the previous close (no gaps), so NAV moves with the closes alone."""
    close = np.asarray(close, dtype="float64")
    open_ = np.r_[close[0], close[:-1]]
    return pd.DataFrame({"timestamp": stamps, "symbol": "X", "open": open_, "high": np.maximum(open_, close),
                         "low": np.minimum(open_, close), "close": close, "volume": 1e6})


def daily(close):
    return prepare_series(bars_from_closes(close, pd.date_range("2020-01-02", periods=len(close), freq="B", tz="UTC")),
                          MIN_LOOKBACK, CPU)


def hourly(sessions: int, close_of_bar):
    """US equity hourly bars, 09:30..15:30 New York time (7 a session), on consecutive weekdays."""
    days = pd.bdate_range("2024-03-04", periods=sessions)
    local = [pd.Timestamp(f"{d.date()} {h}:30", tz="America/New_York") for d in days for h in range(9, 16)]
    stamps = pd.DatetimeIndex(local).tz_convert("UTC")
    return prepare_series(bars_from_closes([close_of_bar(i) for i in range(len(stamps))], stamps), MIN_LOOKBACK, CPU)


def replay(series, targets, risk: RiskConfig | None, interval="1d", segment=None, costs=FREE):
    """Backtest fixed targets (one per bar) with the overlay built from ``risk``."""
    overlay = RiskOverlay(risk, 1, 252.0, interval) if risk is not None else None
    targets = np.asarray(targets, dtype="float64").reshape(-1, 1)
    segment = segment or (0, len(series.timestamps) - 1)
    return run_backtest(target_series_policy(targets, CPU), series, segment, costs, SPACE, 252.0, overlay)


FLAT = 70  # bars at 100 before anything happens (the series needs a lookback's worth of history)
CRASH = [100.0] * FLAT + [100 * 0.95 ** k for k in range(1, 11)] + [100 * 0.95 ** 10] * 20


def test_drawdown_breaker_stops_the_loss_at_the_first_close_past_the_limit():
    # Flat at 100, then ten closes each 5% lower, then flat. Long all along.
    close = CRASH
    series = daily(close)
    risk = RiskConfig(max_drawdown=0.10, drawdown_cooldown_bars=1000)
    managed, unmanaged = replay(series, np.ones(len(close)), risk), replay(series, np.ones(len(close)), None)
    # Drawdowns at the closes of the first three falling bars: 5%, 9.75%, 14.26%: the decision on
    # the third goes flat, filled at the next open (= its close), so the loss stops at 1 - 0.95^3.
    assert max_drawdown(managed.nav) == pytest.approx(-(1 - 0.95 ** 3), abs=1e-6)  # float32 prices
    assert max_drawdown(unmanaged.nav) == pytest.approx(-(1 - 0.95 ** 10), abs=1e-6)
    trips = np.flatnonzero(managed.trips[:, BREAKERS.index("drawdown_breaker")])
    assert trips.tolist() == [FLAT + 2]
    assert (managed.executed[FLAT + 2:, 0] == 0).all() and (managed.executed[:FLAT + 2, 0] == 1).all()


def test_drawdown_breaker_rearms_after_its_cooldown_from_the_nav_of_that_bar():
    close = CRASH
    series = daily(close)
    managed = replay(series, np.ones(len(close)), RiskConfig(max_drawdown=0.10, drawdown_cooldown_bars=5,
                                                           drawdown_exposure=0.0))
    # Tripped on the third falling bar (k), held for decisions k..k+4, re-armed on k+5 with the peak
    # reset to that NAV: the two later 5% falls are a 9.75% drawdown from it, below the limit.
    executed, k = managed.executed[:, 0], FLAT + 2
    assert (executed[k:k + 5] == 0).all() and (executed[k + 5:] == 1).all()
    assert np.flatnonzero(managed.trips[:, BREAKERS.index("drawdown_breaker")]).tolist() == [k]


def test_drawdown_exposure_caps_gross_instead_of_flattening():
    managed = replay(daily(CRASH), np.ones(len(CRASH)), RiskConfig(max_drawdown=0.10, drawdown_exposure=0.25,
                                                                 drawdown_cooldown_bars=1000))
    assert managed.executed[FLAT + 2:, 0] == pytest.approx(0.25)
    assert managed.interventions[FLAT + 2, RULES.index("drawdown_breaker")] == pytest.approx(0.75)


@pytest.mark.parametrize("side, step", [(1.0, 0.98), (-1.0, 1.02)])
def test_stop_loss_fires_on_the_bar_a_hand_computation_says(side, step):
    # Flat at 100, then 2% a bar against the position: the close is 5% past the entry
    # (the fill at bar 1's open, 100) after 3 moves (0.98^3 = 0.941, 1.02^3 = 1.061): bar k.
    close = [100.0] * FLAT + [100 * step ** k for k in range(1, 21)]
    series = daily(close)
    managed = replay(series, np.full(len(close), side), RiskConfig(stop_loss=0.05, stop_cooldown_bars=5))
    executed, k = managed.executed[:, 0], FLAT + 2
    assert (executed[:k] == side).all()
    assert (executed[k:k + 5] == 0).all()  # out for the cool-down ...
    assert executed[k + 5] == side  # ... then back in, with a new entry: the fill at bar k + 6's open
    # That entry is bar k + 5's close (no gaps): three more moves make the next stop, on bar k + 8.
    assert np.flatnonzero(managed.trips[:, BREAKERS.index("stop_loss")])[:2].tolist() == [k, k + 8]


def test_volatility_targeting_hits_its_target_on_a_series_of_known_volatility():
    rng = np.random.default_rng(3)
    for daily_vol, leverage in ((0.02, 1.0), (0.004, 3.0)):  # 31.7% a year (scaled down), 6.3% (scaled up)
        close = 100 * np.exp(np.cumsum(daily_vol * rng.standard_normal(3000)))
        managed = replay(daily(close), np.ones(3000), RiskConfig(target_volatility=0.10, volatility_window=20,
                                                                max_leverage=leverage))
        realized = annualized_volatility(managed.nav[100:], 252.0)
        assert realized == pytest.approx(0.10, rel=0.08)
        assert managed.executed[100:, 0].mean() == pytest.approx(0.10 / (daily_vol * np.sqrt(252)), rel=0.1)


def test_leverage_caps_the_volatility_scaling():
    rng = np.random.default_rng(4)
    close = 100 * np.exp(np.cumsum(0.002 * rng.standard_normal(400)))  # 3% a year: wants 3x for 10%
    managed = replay(daily(close), np.ones(400), RiskConfig(target_volatility=0.10, max_leverage=1.5))
    assert managed.executed[30:, 0].max() == pytest.approx(1.5)
    # One intervention, not two: volatility targeting added 0.5 and stopped at the cap.
    assert managed.interventions[30:, RULES.index("volatility_target")] == pytest.approx(-0.5)
    assert (managed.interventions[:, RULES.index("leverage_cap")] == 0).all()


def test_kelly_cap_follows_the_trailing_mean_over_variance():
    rng = np.random.default_rng(5)
    close = 100 * np.exp(np.cumsum(0.01 * rng.standard_normal(300)))
    series = daily(close)
    managed = replay(series, np.ones(300), RiskConfig(kelly_fraction=0.5, volatility_window=20))
    returns = np.diff(np.log(series.close[:, 0].double().numpy()))
    for t in (60, 120, 250):
        window = returns[t - 20:t]
        mean, variance = window.mean(), window.var(ddof=1)
        kelly = 0.5 * (mean + variance / 2) / variance  # per-bar units: annualizing cancels out
        assert managed.executed[t, 0] == pytest.approx(min(1.0, max(kelly, 0.0)), abs=1e-9)


def test_session_schedule_from_the_exchange_clock():
    stamps = pd.to_datetime(["2024-03-08 14:30", "2024-03-08 20:30", "2024-03-11 13:30", "2024-03-11 19:30"], utc=True)
    day, left = session_schedule(stamps, "1h")
    assert left.tolist() == [6, 0, 6, 0]  # 09:30 and 15:30 New York, before and after the switch to summer time
    assert day[0] == day[1] and day[2] == day[3] and day[2] - day[0] == 3
    day, left = session_schedule(stamps, "1d")
    assert left.tolist() == [0, 0, 0, 0]  # a daily bar is a session of its own
    # After the close a bar belongs to the next session, the next calendar day's (weekends and
    # holidays are not in the clock): 16:00 and 23:00 New York are 24 and 17 hourly bars from its close.
    late = pd.to_datetime(["2024-03-08 21:00", "2024-03-09 04:00"], utc=True)
    late_day, late_left = session_schedule(late, "1h")
    assert late_day.tolist() == [day[0] + 1, day[0] + 1] and late_left.tolist() == [23, 16]


def test_session_loss_limit_fires_on_the_hand_computed_bar_and_resets_next_session():
    # Session 11 (bars 70..76) falls 0.5, 1.0 and 0.6 from 100: at bar 73's close it has lost 2.1%.
    closes = {71: 99.5, 72: 98.5, 73: 97.9}

    def close_of(i):
        return closes.get(i, 100.0 if i < 71 else 97.9)

    series = hourly(12, close_of)
    managed = replay(series, np.ones(84), RiskConfig(session_loss_limit=0.02), interval="1h")
    executed = managed.executed[:, 0]
    assert np.flatnonzero(managed.trips[:, BREAKERS.index("session_loss_limit")]).tolist() == [73]
    # Decisions 73, 74, 75 would fill inside the session: flat. The last bar's decision (76)
    # fills at the next session's open, where the limit has reset.
    assert (executed[73:76] == 0).all() and (executed[76:] == 1).all() and (executed[:73] == 1).all()


def test_session_loss_cooldown_skips_whole_sessions_on_daily_bars():
    close = [100.0] * FLAT + [96.0] * 10  # one 4% loss on bar FLAT
    managed = replay(daily(close), np.ones(len(close)), RiskConfig(session_loss_limit=0.03, session_loss_cooldown=2))
    executed, k = managed.executed[:, 0], FLAT
    # Tripped at bar k's close; the next two sessions (bars k+1, k+2) are flat: decisions k and k+1.
    assert (executed[k:k + 2] == 0).all() and (executed[k + 2:] == 1).all() and (executed[:k] == 1).all()


def test_flat_at_session_close_holds_nothing_through_the_last_bar():
    series = hourly(10, lambda i: 100.0 + (i % 5))
    managed = replay(series, np.ones(70), RiskConfig(flat_at_session_close=True), interval="1h")
    bar_of_session = np.arange(70) % 7
    held = managed.weights[:, 0]
    assert (held[bar_of_session == 6] == 0).all()  # flat over every 15:30 bar ...
    assert (held[(bar_of_session != 6) & (np.arange(70) > 0)] == 1).all()  # ... and long in the others


def test_no_new_positions_near_the_close_only_reduces():
    series = hourly(10, lambda i: 100.0 + (i % 3))
    ramp = np.tile([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, -1.0], 10)  # wants more, then to flip, late in the session
    managed = replay(series, ramp, RiskConfig(no_new_positions_bars=2), interval="1h")
    executed, held = managed.executed[:, 0], managed.weights[:-1, 0]
    decisions = np.arange(69)
    late = np.isin(decisions % 7, (4, 5))  # decisions that fill on the last two bars of the session
    want = np.where(held[late] > 0, np.clip(ramp[:69][late], 0, held[late]), 0.0)  # reduce only
    np.testing.assert_allclose(executed[late], want, atol=1e-6)
    assert (executed[late] < ramp[:69][late]).any()
    np.testing.assert_allclose(executed[~late], ramp[:69][~late], atol=1e-12)
    assert (executed[decisions % 7 == 6] == -1).all()  # the last bar's decision fills next session: free


ALL_RULES = RiskConfig(target_volatility=0.15, max_leverage=1.5, max_drawdown=0.08, drawdown_exposure=0.3,
                       drawdown_cooldown_bars=10, session_loss_limit=0.015, session_loss_cooldown=1,
                       stop_loss=0.04, stop_cooldown_bars=3, kelly_fraction=0.5)


def test_the_overlay_never_reads_a_future_bar():
    frame = synthetic_bars(700, vol=0.015, seed=11)
    series = prepare_series(frame, MIN_LOOKBACK, CPU)
    targets = np.random.default_rng(0).choice([-1.0, -0.5, 0.0, 0.5, 1.0], size=700)
    before = replay(series, targets, ALL_RULES, segment=(100, 690))
    assert (np.abs(before.interventions) > 1e-9).any(axis=0).sum() >= 4  # most rules acted
    t = 400
    perturbed = frame.copy()
    for column in ("open", "high", "low", "close"):
        perturbed.loc[t + 1:, column] *= np.linspace(0.5, 2.0, len(frame) - t - 1)
    after = replay(prepare_series(perturbed, MIN_LOOKBACK, CPU), targets, ALL_RULES, segment=(100, 690))
    decided = t - 100 + 1  # decisions on bars 100..t
    np.testing.assert_array_equal(after.executed[:decided], before.executed[:decided])
    assert not np.allclose(after.executed[decided:], before.executed[decided:])


def test_batched_training_episodes_equal_single_backtests():
    series = prepare_series(synthetic_bars(700, vol=0.015, seed=12), MIN_LOOKBACK, CPU)
    overlay = RiskOverlay(ALL_RULES, 1, 252.0, "1d")
    targets = np.random.default_rng(1).choice([-1.0, -0.5, 0.0, 0.5, 1.0], size=700)
    starts, bars = [100, 250, 400], 250
    env = TradingEnv(series, 3, SPACE, CostConfig(), EnvConfig(episode_bars=10_000, ruin_fraction=0.0), overlay)
    env.reset(torch.tensor(starts), torch.tensor([s + bars for s in starts]))
    executed = []
    for i in range(bars):
        step = env.step(torch.tensor(targets[[s + i for s in starts]]))
        executed.append(step.executed[:, 0].numpy())
    executed = np.array(executed)
    for k, start in enumerate(starts):
        single = replay(series, targets, ALL_RULES, segment=(start, start + bars), costs=CostConfig())
        np.testing.assert_allclose(executed[:, k], single.executed[:, 0], rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def overlay_model(tmp_path_factory):
    """A continuous policy with every rule on, its backtest, and its ONNX export."""
    frame = synthetic_bars(600, vol=0.015, seed=13)
    series = prepare_series(frame, MIN_LOOKBACK, CPU)
    torch.manual_seed(0)
    space = make_action_space(ActionConfig(mode="continuous"))
    agent = ActorCritic(series.features.shape[1], space, (16,))
    mean, std = series.feature_stats((MIN_LOOKBACK, 400))
    agent.set_normalization(mean, std)
    with torch.no_grad():  # a policy that moves its exposure around
        agent.actor.weight.normal_(0.0, 0.5)
    overlay = RiskOverlay(ALL_RULES, 1, 252.0, "1d")
    segment = (MIN_LOOKBACK + 5, 590)
    backtest = run_backtest(lambda features, position, _t: agent.decide(features, position), series, segment,
                            CostConfig(), space, 252.0, overlay)
    path = export_onnx(ExportPolicy(series.feature_module, agent, overlay),
                       tmp_path_factory.mktemp("overlay") / "model.onnx",
                       {"lookback": MIN_LOOKBACK, "interval": "1d", "risk": _risk_json(ALL_RULES)})
    return frame, series, segment, backtest, path


def test_training_backtest_and_serving_execute_the_same_targets(overlay_model):
    _, series, segment, backtest, path = overlay_model
    assert (np.abs(backtest.interventions) > 1e-9).any(axis=0).sum() >= 4
    served = Policy(path, prefer_gpu=False, max_stale_bars=None)
    ohlcv = series.ohlcv[:, 0].numpy()
    stamps = series.timestamps.to_numpy()
    state = None
    for i, t in enumerate(range(*segment)):
        window = slice(t - MIN_LOOKBACK + 1, t + 1)
        decision = served.decide_with_risk(ohlcv[window], backtest.weights[i].astype("float32"), backtest.nav[i],
                                           stamps[window], state)
        np.testing.assert_allclose(decision.target[0], backtest.executed[i], rtol=0, atol=2e-5)
        np.testing.assert_allclose(decision.policy_target[0], backtest.decision[i], rtol=0, atol=2e-5)
        state = decision.state
    with pytest.raises(InputError, match="risk overlay: call decide_with_risk"):
        served.decide(ohlcv[window], backtest.weights[0].astype("float32"))
    with pytest.raises(InputError, match="nav: must be 1 finite values above 0"):
        served.decide_with_risk(ohlcv[window], np.zeros(1), -1.0, stamps[window])
    with pytest.raises(InputError, match=r"state: must be the finite \[1, 8\] array"):
        served.decide_with_risk(ohlcv[window], np.zeros(1), 1.0, stamps[window], np.zeros((1, 3)))


def test_serve_command_keeps_the_overlay_state_between_calls(overlay_model, tmp_path, capsys):
    import json

    from ml.cli import main

    frame, series, segment, backtest, path = overlay_model
    bars = tmp_path / "bars.csv"
    frame.iloc[:segment[0] + 1].to_csv(bars, index=False)
    assert main(["serve", "--model", str(path), "--bars", str(bars), "--nav", str(backtest.nav[0])]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["executed_target"] == pytest.approx(backtest.executed[0, 0], abs=2e-5)
    frame.iloc[:segment[0] + 2].to_csv(bars, index=False)
    assert main(["serve", "--model", str(path), "--bars", str(bars), "--nav", str(backtest.nav[1]),
                 "--position", str(backtest.weights[1, 0]), "--risk-state", json.dumps(first["risk_state"])]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["executed_target"] == pytest.approx(backtest.executed[1, 0], abs=2e-5)
    assert main(["serve", "--model", str(path), "--bars", str(bars), "--risk-state", "[1, 2"]) == 2
    assert "--risk-state: must be the JSON list" in capsys.readouterr().err


def _risk_json(risk: RiskConfig) -> str:
    import dataclasses
    import json

    return json.dumps(dataclasses.asdict(risk))


def test_risk_settings_are_checked_on_load():
    with pytest.raises(ConfigError, match="risk.volatility_window = 80: must be below lookback"):
        config_from_dict({"risk": {"target_volatility": 0.1, "volatility_window": 80}})
    with pytest.raises(ConfigError, match="session rules need intraday bars"):
        config_from_dict({"risk": {"no_new_positions_bars": 2}})
    with pytest.raises(ConfigError, match="risk.session_timezone = ../../etc/passwd: must be an IANA time zone"):
        config_from_dict({"risk": {"session_timezone": "../../etc/passwd"}})
    assert not config_from_dict({}).risk.enabled
    assert RiskOverlay.from_config(config_from_dict({}), 1) is None


def test_a_portfolio_runs_the_same_overlay_in_backtest_and_serving(tmp_path):
    frames = {"A": synthetic_bars(500, vol=0.012, seed=21).assign(symbol="A"),
              "B": synthetic_bars(500, vol=0.02, seed=22).assign(symbol="B")}
    series = prepare_series(frames, MIN_LOOKBACK, CPU)
    space = make_action_space(ActionConfig(mode="portfolio"), 2)
    torch.manual_seed(1)
    agent = ActorCritic(series.features.shape[1], space, (16,))
    agent.set_normalization(*series.feature_stats((MIN_LOOKBACK, 400)))
    with torch.no_grad():
        agent.actor.weight.normal_(0.0, 0.5)
    rules = RiskConfig(target_volatility=0.08, max_leverage=1.2, max_drawdown=0.05, drawdown_exposure=0.5,
                       stop_loss=0.03)
    overlay = RiskOverlay(rules, 2, 252.0, "1d")
    segment = (MIN_LOOKBACK + 5, 300)
    backtest = run_backtest(lambda features, position, _t: agent.decide(features, position), series, segment,
                            CostConfig(), space, 252.0, overlay)
    assert (np.abs(backtest.executed).sum(axis=1) <= 1.2 + 1e-9).all()
    assert (np.abs(backtest.interventions) > 1e-9).any(axis=0).sum() >= 3
    path = export_onnx(ExportPolicy(series.feature_module, agent, overlay), tmp_path / "model.onnx",
                       {"lookback": MIN_LOOKBACK, "interval": "1d", "symbols": "A,B", "risk": _risk_json(rules)})
    served = Policy(path, prefer_gpu=False, max_stale_bars=None)
    ohlcv, stamps, state = series.ohlcv.numpy(), series.timestamps.to_numpy(), None
    for i, t in enumerate(range(*segment)):
        window = slice(t - MIN_LOOKBACK + 1, t + 1)
        decision = served.decide_with_risk(ohlcv[window], backtest.weights[i].astype("float32"), backtest.nav[i],
                                           stamps[window], state)
        np.testing.assert_allclose(decision.target[0], backtest.executed[i], rtol=0, atol=2e-5)
        state = decision.state
    assert state.shape == (1, 6 + 2 * 2)


def test_serving_starts_a_fresh_account_the_way_the_environment_does(overlay_model):
    *_, path = overlay_model
    nav = np.array([1.0, 2.5, 0.7])
    served = Policy(path, prefer_gpu=False).initial_risk_state(nav)
    np.testing.assert_array_equal(served, RiskOverlay(ALL_RULES, 1, 252.0, "1d").initial_state(
        torch.tensor(nav)).float().numpy())


def test_the_leverage_cap_cuts_a_target_above_it_and_volatility_targeting_only_its_own_scale_up():
    overlay = RiskOverlay(RiskConfig(target_volatility=0.10, max_leverage=1.0), 2, 252.0, "1d")
    nav = torch.ones(2, dtype=torch.float64)
    # Two uncorrelated assets: 20% a year each (account 0), 5% a year each (account 1).
    covariance = torch.stack([torch.eye(2, dtype=torch.float64) * 0.04, torch.eye(2, dtype=torch.float64) * 0.0025])
    target = torch.tensor([[0.9, 0.9], [0.4, 0.4]], dtype=torch.float64)
    zeros = torch.zeros(2, 2, dtype=torch.float64)
    executed, _, removed, _ = overlay(target, zeros, nav, zeros + 100, zeros + 100, zeros, covariance, zeros,
                                      overlay.initial_state(nav))
    vol, cap = RULES.index("volatility_target"), RULES.index("leverage_cap")
    # Half in each at 20% runs at 14.1% a year: x0.707 for 10%, gross 1.8 -> 1.27; the cap then cuts to 1.
    np.testing.assert_allclose(executed[0].numpy(), [0.5, 0.5], atol=1e-12)
    assert removed[0, vol] == pytest.approx(1.8 * (1 - 0.1 / np.sqrt(0.02)), abs=1e-12)
    assert removed[0, cap] == pytest.approx(1.8 * 0.1 / np.sqrt(0.02) - 1.0, abs=1e-12)
    # At 5% the scale-up (x2.83) stops at gross 1 by itself: one intervention, adding 0.2.
    np.testing.assert_allclose(executed[1].numpy(), [0.5, 0.5], atol=1e-12)
    assert removed[1, vol] == pytest.approx(-0.2, abs=1e-12) and removed[1, cap] == 0.0


def test_serving_takes_a_levered_position_that_drifted_past_the_cap(overlay_model):
    *_, series, segment, backtest, path = overlay_model
    served = Policy(path, prefer_gpu=False, max_stale_bars=None)
    t = segment[0]
    window = slice(t - MIN_LOOKBACK + 1, t + 1)
    # Short 1.5 (the cap), then a 5% rise: the account now holds -1.5 * 1.05 / (1 - 0.075) = -1.70.
    drifted = np.array([[-1.5 * 1.05 / (1 - 0.075)]], dtype=np.float32)
    decision = served.decide_with_risk(series.ohlcv[window, 0].numpy(), drifted, 1.0,
                                       series.timestamps.to_numpy()[window])
    assert abs(decision.target[0, 0]) <= 1.5 + 1e-6
    with pytest.raises(InputError, match=r"position: must be finite and within \[-10, 10\]"):
        served.decide_with_risk(series.ohlcv[window, 0].numpy(), np.array([[np.nan]]), 1.0,
                                series.timestamps.to_numpy()[window])
