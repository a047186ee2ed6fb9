"""How many bars a year holds: the annualization of every rate, and the borrow cost per bar."""

from __future__ import annotations

# Bars per calendar session, for annualizing intraday intervals of US equities.
_INTRADAY_BARS_PER_SESSION = {
    "1m": 390, "2m": 195, "5m": 78, "15m": 26, "30m": 13, "60m": 7, "90m": 5, "1h": 7,
}


def periods_per_year(interval: str, calendar: str = "equity") -> float:
    """Bars per year from the bar interval and the market calendar.

    Equities trade 252 sessions a year; crypto trades every day around the clock.
    """
    if calendar not in ("equity", "crypto"):
        raise ValueError(f"unknown calendar '{calendar}' (expected equity or crypto)")
    days = 252.0 if calendar == "equity" else 365.0
    if interval in ("1d", "5d"):
        return days / (5.0 if interval == "5d" else 1.0)
    if interval == "1wk":
        return 52.0
    if interval in ("1mo", "3mo"):
        return 12.0 / (3.0 if interval == "3mo" else 1.0)
    if interval in _INTRADAY_BARS_PER_SESSION:
        if calendar == "crypto":
            minutes = 60 * int(interval[:-1]) if interval.endswith("h") else int(interval[:-1])
            return days * 24 * 60 / minutes
        return days * _INTRADAY_BARS_PER_SESSION[interval]
    raise ValueError(f"unknown bar interval '{interval}'")
