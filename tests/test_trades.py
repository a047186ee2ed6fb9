"""Trade ledger: hand-computed trades, and the ledger's P&L adds up to the backtest's NAV change."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ml.config import ActionConfig, CostConfig
from ml.env.action_space import PortfolioWeights, make_action_space
from ml.evaluation.backtest import Backtest, run_backtest, target_series_policy
from ml.evaluation.trades import LEDGER_COLUMNS, segment_prices, trade_ledger, trade_statistics
from ml.market.series import prepare_series
from tests.conftest import synthetic_bars

CPU = torch.device("cpu")
LOOKBACK = 64


def hand_backtest(symbols, nav, units, close, cost) -> Backtest:
    """A backtest built from a hand-kept book: units held at each close, NAV and costs per bar."""
    nav, units, close = np.asarray(nav, float), np.asarray(units, float), np.asarray(close, float)
    bars = len(nav)
    units, close = units.reshape(bars, -1), close.reshape(bars, -1)
    weights = units * close / nav[:, None]
    return Backtest(symbols, pd.Series(pd.bdate_range("2021-01-04", periods=bars, tz="UTC")), nav, weights,
                    np.zeros((bars - 1, len(symbols))), np.zeros(bars - 1), np.asarray(cost, float))


# One asset filled at the close, costs 0.1% of traded notional. The book, bar by bar:
# 1: buy 0.01 at 100 (cost 0.001)        cash -0.001     nav 0.999
# 2: hold, close 110                      cash -0.001     nav 1.099
# 3: sell 0.01 at 121 (cost 0.00121)      cash 1.20779    nav 1.20779
# 4: short 0.005 at 110 (cost 0.00055)    cash 1.75724    nav 1.20724
# 5: buy 0.015 at 100 (flip, cost 0.0015) cash 0.25574    nav 1.25574
# 6: hold, close 100                      cash 0.25574    nav 1.25574
CLOSE = [100, 100, 110, 121, 110, 100, 100]
UNITS = [0, 0.01, 0.01, 0, -0.005, 0.01, 0.01]
NAV = [1.0, 0.999, 1.099, 1.20779, 1.20724, 1.25574, 1.25574]
COST = [0.001, 0, 0.00121, 0.00055, 0.0015, 0]


def test_hand_computed_ledger_with_a_flip_and_an_open_trade():
    backtest = hand_backtest(["X"], NAV, UNITS, CLOSE, COST)
    ledger = trade_ledger(backtest, np.asarray(CLOSE, float))
    assert list(ledger.columns) == list(LEDGER_COLUMNS)
    assert ledger["side"].tolist() == ["long", "short", "long"]
    assert ledger["entry_bar"].tolist() == [1, 4, 5]
    assert ledger["exit_bar"].tolist() == [3, 5, 6]
    assert ledger["holding_bars"].tolist() == [2, 1, 1]
    assert ledger["open"].tolist() == [False, False, True]
    assert ledger["entry_time"].tolist() == list(backtest.timestamps.iloc[[1, 4, 5]])
    assert ledger["exit_time"].tolist() == list(backtest.timestamps.iloc[[3, 5, 6]])
    # long: 0.01 * (121 - 100) minus both fills' costs
    # short: -0.005 * (100 - 110) minus its opening cost and a third of the flip's cost (0.005 of 0.015 units)
    # long: flat price, two thirds of the flip's cost
    assert ledger["pnl"].tolist() == pytest.approx([0.21 - 0.00221, 0.05 - 0.00055 - 0.0005, -0.001], abs=1e-12)
    assert ledger["size"].tolist() == pytest.approx([(1 / 0.999 + 1.1 / 1.099) / 2, 0.55 / 1.20724, 1 / 1.25574],
                                                    abs=1e-12)
    assert ledger["pnl"].sum() == pytest.approx(NAV[-1] - NAV[0], abs=1e-12)

    stats = trade_statistics(ledger)
    assert stats == pytest.approx({"count": 3, "win_rate": 2 / 3, "average_win": (0.20779 + 0.04895) / 2,
                                   "average_loss": -0.001, "profit_factor": (0.20779 + 0.04895) / 0.001,
                                   "average_holding_bars": 4 / 3, "long_share": 2 / 3})


def test_fills_at_the_open_are_marked_to_the_close():
    # Buy 1/105 units at bar 1's open 105 (cost 0.001), sell them at bar 2's open 118 (cost 0.1% of 118/105).
    close, open_ = np.array([100.0, 110.0, 120.0]), np.array([100.0, 105.0, 118.0])
    units = 1 / 105
    sell_cost = 0.001 * 118 / 105
    nav = [1.0, -0.001 + units * 110, -0.001 + units * 118 - sell_cost]
    backtest = hand_backtest(["X"], nav, [0, units, 0], close, [0.001, sell_cost])
    ledger = trade_ledger(backtest, close, open_)
    assert len(ledger) == 1 and ledger["exit_bar"].iloc[0] == 2 and not ledger["open"].iloc[0]
    assert ledger["pnl"].iloc[0] == pytest.approx(13 / 105 - 0.001 - sell_cost, abs=1e-12)
    # Taken at the close instead, the same fills would be credited with 110 -> 120, not 105 -> 118.
    assert trade_ledger(backtest, close)["pnl"].iloc[0] == pytest.approx(10 / 105 - 0.001 - sell_cost, abs=1e-12)


def test_costs_of_a_bar_are_split_across_assets_by_traded_notional():
    # Bar 1: buy 0.006 A at 100 and 0.008 B at 50 (0.6 and 0.4 of NAV), cost 0.001 in all.
    # Bar 2: A 110, B 45; sell all A at 110 (cost 0.00066), keep B to the end.
    close = np.array([[100.0, 50.0], [100.0, 50.0], [110.0, 45.0]])
    units = np.array([[0, 0], [0.006, 0.008], [0, 0.008]])
    cash = [1.0, -0.001, -0.001 + 0.66 - 0.00066]
    nav = [cash[t] + units[t] @ close[t] for t in range(3)]
    ledger = trade_ledger(hand_backtest(["A", "B"], nav, units, close, [0.001, 0.00066]), close)
    assert ledger["asset"].tolist() == ["A", "B"]
    assert ledger["open"].tolist() == [False, True]
    assert ledger["pnl"].tolist() == pytest.approx([0.06 - 0.0006 - 0.00066, -0.04 - 0.0004], abs=1e-12)
    assert ledger["pnl"].sum() == pytest.approx(nav[-1] - 1.0, abs=1e-12)


def money_check(backtest: Backtest, close, fill):
    """The trades' P&L plus the flat bars' P&L is the backtest's whole NAV change."""
    ledger = trade_ledger(backtest, close, fill)
    nav_change = np.diff(backtest.nav)
    flat = (np.abs(backtest.weights[:-1]).sum(axis=1) == 0) & (np.abs(backtest.weights[1:]).sum(axis=1) == 0)
    flat_pnl = nav_change[flat].sum()
    assert flat.any() and flat_pnl == 0.0  # cash earns nothing and pays nothing while flat
    total = backtest.nav[-1] - backtest.nav[0]
    # Weights come back from the environment in float32: about 1e-9 of NAV per bar.
    assert ledger["pnl"].sum() + flat_pnl == pytest.approx(total, abs=1e-9 * len(nav_change))
    assert abs(total) > 1e-3  # the check is about a NAV that moved
    return ledger


def test_ledger_adds_up_to_an_exposure_backtest_with_shorts_borrow_and_open_fills():
    series = prepare_series(synthetic_bars(400, seed=3), LOOKBACK, CPU)
    space = make_action_space(ActionConfig())  # levels -1 .. 1
    rng = np.random.default_rng(0)
    # Runs of random levels, so trades last several bars and some bars are flat.
    targets = np.repeat(rng.choice([-1.0, -0.5, 0.0, 0.0, 0.5, 1.0], size=40), 10)[:, None]
    costs = CostConfig(commission_bps=5, half_spread_bps=3, slippage_bps=2, borrow_bps_per_year=300)
    segment = (100, 399)
    backtest = run_backtest(target_series_policy(targets, CPU), series, segment, costs, space)
    close, fill = segment_prices(series, segment)
    assert (fill != close).any()  # the synthetic bars fill at their opens
    ledger = money_check(backtest, close, fill)
    assert {"long", "short"} <= set(ledger["side"])
    # Every trade opens where the held weight leaves 0 or flips, and closes where it returns or flips.
    sign = np.sign(backtest.weights[:, 0])
    for row in ledger.itertuples():
        assert sign[row.entry_bar] == (1 if row.side == "long" else -1) != sign[row.entry_bar - 1]
        assert (sign[row.entry_bar:row.exit_bar] == sign[row.entry_bar]).all()
        assert row.open or sign[row.exit_bar] != sign[row.entry_bar]


def test_ledger_adds_up_to_a_portfolio_backtest():
    frames = {s: synthetic_bars(300, drift=d, seed=20 + i).assign(symbol=s)
              for i, (s, d) in enumerate((("AAA", 0.0008), ("BBB", -0.0004)))}
    series = prepare_series(frames, LOOKBACK, CPU)
    rng = np.random.default_rng(1)
    weights = np.repeat(rng.dirichlet(np.ones(3), size=30)[:, :2], 10, axis=0)
    weights[150:170] = 0.0  # all cash for a while
    weights[200:230, 1] = 0.0  # out of BBB only
    segment = (80, 299)
    backtest = run_backtest(target_series_policy(weights, CPU), series, segment, CostConfig(commission_bps=10),
                            PortfolioWeights(2))
    ledger = money_check(backtest, *segment_prices(series, segment))
    assert set(ledger["asset"]) == {"AAA", "BBB"} and set(ledger["side"]) == {"long"}
    assert ledger["open"].sum() == 2  # both assets held at the end


def test_bad_input_is_refused_with_one_line():
    backtest = hand_backtest(["X"], NAV, UNITS, CLOSE, COST)
    with pytest.raises(ValueError, match=r"close must have shape \[7 bars, 1 assets\]"):
        trade_ledger(backtest, np.ones(6))
    with pytest.raises(ValueError, match="fill_prices must be finite and positive"):
        trade_ledger(backtest, np.asarray(CLOSE, float), np.zeros(7))
    backtest.weights[0] = 0.5
    with pytest.raises(ValueError, match="must start flat"):
        trade_ledger(backtest, np.asarray(CLOSE, float))


def test_no_trades_gives_an_empty_ledger_and_zero_statistics():
    backtest = hand_backtest(["X"], [1.0, 1.0, 1.0], [0, 0, 0], [100, 101, 99], [0, 0])
    ledger = trade_ledger(backtest, np.array([100.0, 101.0, 99.0]))
    assert ledger.empty and list(ledger.columns) == list(LEDGER_COLUMNS)
    assert trade_statistics(ledger) == {"count": 0, "win_rate": 0.0, "average_win": 0.0, "average_loss": 0.0,
                                        "profit_factor": 0.0, "average_holding_bars": 0.0, "long_share": 0.0}
