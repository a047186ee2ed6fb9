"""Stress windows: hand-computed results inside test folds, absent outside, blind to non-test bars."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from ml.config import ActionConfig, CostConfig
from ml.env.action_space import make_action_space
from ml.evaluation.backtest import run_backtest, target_series_policy
from ml.evaluation.stress import STRESS_WINDOWS, StressWindow, stress_results
from ml.market.series import prepare_series
from tests.conftest import synthetic_bars

CPU = torch.device("cpu")


def curve(start: str, policy, benchmark=None) -> pd.DataFrame:
    policy = np.asarray(policy, float)
    stamps = pd.bdate_range(start, periods=len(policy), tz="UTC")
    benchmark = np.ones(len(policy)) if benchmark is None else np.asarray(benchmark, float)
    return pd.DataFrame({"timestamp": stamps, "policy": policy, "buy_and_hold": benchmark})


def test_windows_are_the_sp500_peaks_and_troughs():
    assert [(w.name, w.start, w.end) for w in STRESS_WINDOWS] == [
        ("dot-com", "2000-03-24", "2002-10-09"), ("2008 financial crisis", "2007-10-09", "2009-03-09"),
        ("covid crash", "2020-02-19", "2020-03-23"), ("2022 rates", "2022-01-03", "2022-10-12")]


def test_a_window_inside_a_test_fold_is_reported_with_hand_computed_numbers():
    stamps = pd.bdate_range("2020-02-10", "2020-03-31", tz="UTC")
    inside = (stamps >= "2020-02-19") & (stamps <= "2020-03-23")
    # Inside the window: 1.0 at the peak day, 1.1, then 0.99 until the trough day's 1.089.
    values = np.full(inside.sum(), 0.99)
    values[:2], values[-1] = (1.0, 1.1), 1.089
    policy = np.full(len(stamps), 5.0)  # bars outside the window must not matter
    policy[inside] = values
    benchmark = np.linspace(1.0, 0.7, len(stamps))
    frame = pd.DataFrame({"timestamp": stamps, "policy": policy, "buy_and_hold": benchmark})
    [covid] = stress_results([frame], ppy=252)
    assert covid["name"] == "covid crash" and (covid["start"], covid["end"]) == ("2020-02-19", "2020-03-23")
    assert covid["covered_from"].startswith("2020-02-19") and covid["covered_to"].startswith("2020-03-23")
    assert covid["bars"] == inside.sum() - 1 == 23 and covid["folds"] == [0]
    result = covid["strategies"]["policy"]
    assert result["total_return"] == pytest.approx(0.089)
    assert result["max_drawdown"] == pytest.approx(0.99 / 1.1 - 1)
    returns = np.zeros(23)
    returns[0], returns[1], returns[-1] = 0.1, -0.1, 0.1
    assert result["annualized_volatility"] == pytest.approx(returns.std(ddof=1) * math.sqrt(252))
    held = benchmark[inside]
    assert covid["strategies"]["buy_and_hold"]["total_return"] == pytest.approx(held[-1] / held[0] - 1)
    assert covid["strategies"]["buy_and_hold"]["max_drawdown"] == pytest.approx(held[-1] / held[0] - 1)


def test_a_window_outside_every_test_segment_is_absent():
    assert stress_results([curve("2015-01-02", np.linspace(1, 2, 300))], ppy=252) == []
    # One bar inside the window gives no return: still absent.
    assert stress_results([curve("2020-03-23", [1.0, 1.1, 1.2])], ppy=252) == []


def test_folds_covering_parts_of_a_window_are_chained_in_time_order():
    window = StressWindow("test", "2021-01-06", "2021-01-19")
    first = curve("2021-01-04", [1.0, 2.0, 1.0, 1.2, 1.5])  # 4 .. 8 Jan; inside: 1.0, 1.2, 1.5
    second = curve("2021-01-15", [1.0, 0.8, 1.0, 3.0])  # 15 .. 20 Jan; inside: 1.0, 0.8, 1.0
    [result] = stress_results([second, first], ppy=252, windows=(window,))
    assert result["folds"] == [1, 0] and result["bars"] == 4
    policy = result["strategies"]["policy"]
    # Chained: 1.0, 1.2, 1.5, then x0.8, x1.0 -> 1.0, 1.2, 1.5, 1.2, 1.5
    assert policy["total_return"] == pytest.approx(0.5)
    assert policy["max_drawdown"] == pytest.approx(1.2 / 1.5 - 1)
    with pytest.raises(ValueError, match="test curves 0 and 1 overlap in time"):
        stress_results([curve("2021-01-04", [1, 1, 1]), curve("2021-01-06", [1, 1])], ppy=252)
    with pytest.raises(ValueError, match="test curve 1 has strategies"):
        stress_results([first, second.rename(columns={"buy_and_hold": "other"})], ppy=252)


def test_bars_outside_test_segments_change_nothing():
    bars = synthetic_bars(420, start="2019-01-02", seed=5)
    stamps = bars["timestamp"]
    first = int(stamps.searchsorted(pd.Timestamp("2020-01-02", tz="UTC")))
    middle = int(stamps.searchsorted(pd.Timestamp("2020-03-02", tz="UTC")))
    last = int(stamps.searchsorted(pd.Timestamp("2020-04-30", tz="UTC")))
    tests = [(first, middle), (middle + 1, last)]
    space = make_action_space(ActionConfig())
    pattern = np.tile([1.0, 1.0, 0.5, -0.5, 0.0], len(bars) // 5 + 1)[:len(bars), None]

    def results(frame: pd.DataFrame) -> list[dict]:
        series = prepare_series(frame, 64, CPU)
        curves = []
        for segment in tests:
            run = {name: run_backtest(target_series_policy(targets, CPU), series, segment, CostConfig(), space)
                   for name, targets in (("policy", pattern), ("buy_and_hold", np.ones_like(pattern)))}
            curves.append(pd.DataFrame({"timestamp": run["policy"].timestamps,
                                        **{name: bt.nav for name, bt in run.items()}}))
        return stress_results(curves, ppy=252)

    base = results(bars)
    [covid] = base
    assert covid["name"] == "covid crash" and covid["folds"] == [0, 1]
    ohlc = ["open", "high", "low", "close"]
    outside = bars.copy()
    scale = np.where((np.arange(len(bars)) < first) | (np.arange(len(bars)) > last), 1.7, 1.0)
    outside[ohlc] = outside[ohlc].mul(scale, axis=0)
    assert results(outside) == base
    # The control: the same change on a test bar inside the window moves the numbers.
    inside = bars.copy()
    shock = int(stamps.searchsorted(pd.Timestamp("2020-03-10", tz="UTC")))
    inside.loc[shock:, ohlc] *= 0.8
    changed = results(inside)[0]["strategies"]["buy_and_hold"]
    assert changed["total_return"] < covid["strategies"]["buy_and_hold"]["total_return"] - 0.1
