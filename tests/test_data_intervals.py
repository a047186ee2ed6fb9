"""The gap rule per interval family: business days for daily equities, continuous time for
crypto (calendar="crypto"), and within the session for intraday equities."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ml.data.schema import normalize_bars
from ml.data.validation import ValidationConfig, rule_columns, validate_bars

GAP_RULE = "no gap longer than allowed"
CRYPTO = ValidationConfig(calendar="crypto")


def bars_at(index: pd.DatetimeIndex, interval: str, symbol: str = "SPY", seed: int = 0) -> pd.DataFrame:
    """A consistent OHLCV random walk at the given (tz-aware, yfinance-like) bar times."""
    rng = np.random.default_rng(seed)
    n = len(index)
    close = 400 * np.exp(np.cumsum(0.002 * rng.standard_normal(n)))
    open_ = close * np.exp(0.001 * rng.standard_normal(n))
    high = np.maximum(open_, close) * (1 + 0.001 * np.abs(rng.standard_normal(n)))
    low = np.minimum(open_, close) * (1 - 0.001 * np.abs(rng.standard_normal(n)))
    frame = pd.DataFrame({"Open": open_, "High": high, "Low": low, "Close": close,
                          "Volume": rng.integers(100_000, 900_000, n).astype(float)},
                         index=pd.DatetimeIndex(index, name="Datetime"))
    return normalize_bars(frame, symbol=symbol, interval=interval, source="test", origin=f"{symbol} {interval}")


def equity_hours(start: str = "2024-02-01", end: str = "2024-04-30", holidays=("2024-02-19", "2024-03-29"),
                 freq: str = "1h") -> pd.DatetimeIndex:
    """US equity bars as yfinance gives them: 09:30..15:30 New York for 1h (7 a day), weekdays,
    exchange holidays absent; the range crosses the March DST switch."""
    days = [d for d in pd.bdate_range(start, end) if str(d.date()) not in holidays]
    stamps = []
    for day in days:
        opens = pd.Timestamp(f"{day.date()} 09:30", tz="America/New_York")
        stamps += list(pd.date_range(opens, opens + pd.Timedelta(hours=6, minutes=29), freq=freq))
    return pd.DatetimeIndex(stamps)


def crypto_hours(start: str = "2024-02-01", days: int = 60) -> pd.DatetimeIndex:
    return pd.date_range(start, periods=24 * days, freq="1h", tz="UTC")


def gap_failures(bars: pd.DataFrame, config: ValidationConfig = ValidationConfig()):
    result = validate_bars(bars, "test", config)
    return result, {r.rule: r for r in result.failed}


def test_intraday_equity_bars_pass_across_nights_weekends_holidays_and_dst():
    index = equity_hours()
    assert len(index) == 7 * len({stamp.date() for stamp in index})
    bars = bars_at(index, "1h")
    result, failed = gap_failures(bars)
    assert result.success, result.describe()
    assert rule_columns(bars, ValidationConfig())["gap_sessions"].max() == 0


def test_a_missing_hour_inside_a_session_fails_the_gap_rule():
    index = equity_hours()
    hole = index.get_loc(pd.Timestamp("2024-03-12 12:30", tz="America/New_York"))
    bars = bars_at(index.delete(hole), "1h")
    result, failed = gap_failures(bars)
    assert list(failed) == [GAP_RULE], result.describe()
    assert failed[GAP_RULE].unexpected_count == 1
    example = failed[GAP_RULE].examples[0]
    assert example["gap_sessions"] == 1  # one missing bar, shown at the bar after the hole
    assert pd.Timestamp(example["timestamp"]) == pd.Timestamp("2024-03-12 13:30", tz="America/New_York")
    # A looser limit is a config away.
    assert validate_bars(bars, "test", ValidationConfig(max_gap_bars=1)).success


def test_a_week_of_missing_intraday_sessions_fails_but_a_holiday_does_not():
    index = equity_hours()
    dates = pd.Series(index.tz_convert("America/New_York").date, index=index)
    week = (dates >= pd.Timestamp("2024-03-04").date()) & (dates <= pd.Timestamp("2024-03-12").date())
    result, failed = gap_failures(bars_at(index[~week.to_numpy()], "1h"))
    assert list(failed) == [GAP_RULE]
    # 7 business days missing (more than the 5-session allowance) count as their 7 x 7 bars.
    assert failed[GAP_RULE].examples[0]["gap_sessions"] == 49


def test_five_minute_bars_allow_holes_under_an_hour():
    index = equity_hours(start="2024-03-04", end="2024-03-08", freq="5min")
    assert len(index) == 5 * 78
    short = index.delete(slice(100, 111))  # 11 bars: 55 minutes
    long = index.delete(slice(100, 112))  # 12 bars: an hour
    assert validate_bars(bars_at(short, "5m"), "short").success
    _, failed = gap_failures(bars_at(long, "5m"))
    assert list(failed) == [GAP_RULE] and failed[GAP_RULE].examples[0]["gap_sessions"] == 12


def test_crypto_hourly_bars_run_around_the_clock():
    bars = bars_at(crypto_hours(), "1h", symbol="BTC-USD")
    result = validate_bars(bars, "BTC-USD", CRYPTO)
    assert result.success, result.describe()


def test_a_missing_day_of_crypto_hourly_bars_fails_the_gap_rule():
    index = crypto_hours()
    missing_day = (index >= pd.Timestamp("2024-03-02", tz="UTC")) & (index < pd.Timestamp("2024-03-03", tz="UTC"))
    result, failed = gap_failures(bars_at(index[~missing_day], "1h", symbol="BTC-USD"), CRYPTO)
    assert list(failed) == [GAP_RULE], result.describe()
    example = failed[GAP_RULE].examples[0]
    assert example["gap_sessions"] == 24
    assert pd.Timestamp(example["timestamp"]) == pd.Timestamp("2024-03-03", tz="UTC")


def test_crypto_hourly_bars_miss_no_weekend_unnoticed():
    """The same weekend hole that an equity session calendar shrugs off is a gap for crypto."""
    index = crypto_hours()
    weekend = (index >= pd.Timestamp("2024-03-02", tz="UTC")) & (index < pd.Timestamp("2024-03-04", tz="UTC"))
    bars = bars_at(index[~weekend], "1h", symbol="BTC-USD")
    assert rule_columns(bars, CRYPTO)["gap_sessions"].max() == 48
    assert rule_columns(bars, ValidationConfig())["gap_sessions"].max() == 0


@pytest.mark.parametrize("calendar, dates, missing", [
    ("equity", pd.bdate_range("2020-01-01", periods=400), 0),
    ("crypto", pd.date_range("2020-01-01", periods=400), 0),
])
def test_daily_bars_count_sessions_in_their_calendar(calendar, dates, missing):
    bars = bars_at(pd.DatetimeIndex(dates, tz="UTC"), "1d", symbol="X")
    config = ValidationConfig(calendar=calendar)
    assert rule_columns(bars, config)["gap_sessions"].max() == missing
    assert validate_bars(bars, "daily", config).success
    holed = bars.drop(index=range(200, 207)).reset_index(drop=True)  # 7 missing sessions
    _, failed = gap_failures(holed, config)
    assert list(failed) == [GAP_RULE] and failed[GAP_RULE].examples[0]["gap_sessions"] == 7


def test_gap_limits_per_interval_family():
    config = ValidationConfig()
    assert [config.gap_limit(i) for i in ("1d", "1wk", "1h", "60m", "90m", "30m", "15m", "5m", "2m", "1m")] == \
        [5, 5, 0, 0, 0, 1, 3, 11, 29, 59]
    assert ValidationConfig(max_gap_bars=4).gap_limit("1h") == 4
    assert ValidationConfig(max_gap_sessions=2).gap_limit("1d") == 2
    with pytest.raises(ValueError, match="unknown calendar 'fx'"):
        ValidationConfig(calendar="fx")
