"""Which trading session a bar belongs to, and how many bars of it are left, from its timestamp alone.

The risk overlay's session rules (a loss limit that resets every session, flat at the close,
no new positions near the close) need both. They come from the exchange's schedule (the
session closes at a fixed local time), never from the bars that follow, so a backtest and a
live service that sees one bar at a time compute the same values. Daily and longer bars are
each a session of their own. Half days and holidays are not in the schedule: on a half day the
close rules act late. A bar that starts at or after the close (extended hours, a market that
trades around the clock) belongs to the next session. numpy and pandas only: ``ml.serving`` uses
it without torch.
"""

from __future__ import annotations

import numpy as np

from ml.config import INTRADAY

_EPOCH = np.datetime64("1970-01-01", "D")


def bar_minutes(interval: str) -> int:
    """Length of an intraday bar in minutes ("1h" -> 60, "15m" -> 15)."""
    return 60 * int(interval[:-1]) if interval.endswith("h") else int(interval[:-1])


def session_schedule(timestamps, interval: str, timezone: str = "America/New_York",
                     close: str = "16:00") -> tuple[np.ndarray, np.ndarray]:
    """(session day, bars left) per bar, both int64 [T].

    ``session day``: the session's local date as days since 1970-01-01. ``bars left``: how many
    more bars the session holds after this one by the schedule (0 = its last bar). Timestamps are
    bar starts, UTC (datetime64, a pandas Series or DatetimeIndex, naive taken as UTC).
    """
    import pandas as pd  # here, not at the top: ml.serving imports this module and loads pandas only when used

    stamps = pd.DatetimeIndex(pd.to_datetime(np.asarray(timestamps).reshape(-1), utc=True))
    if interval not in INTRADAY:  # a daily (or longer) bar is a session of its own
        days = (stamps.tz_localize(None).values.astype("datetime64[D]") - _EPOCH).astype("int64")
        return days, np.zeros(len(stamps), dtype="int64")
    local = stamps.tz_convert(timezone)
    dates = local.tz_localize(None).normalize()  # the local calendar date, as naive midnight
    hours, minutes = (int(part) for part in close.split(":"))
    to_close = pd.Timedelta(hours=hours, minutes=minutes)

    def close_on(day: pd.DatetimeIndex) -> pd.DatetimeIndex:
        # The close as a local wall-clock time (so a DST switch that day does not move it).
        return (day + to_close).tz_localize(timezone, ambiguous=True, nonexistent="shift_forward")

    # A bar at or after the close (extended hours, a 24-hour market) belongs to the next session.
    after_close = np.asarray(local >= close_on(dates))
    session_date = dates + pd.to_timedelta(after_close.astype("int64"), unit="D")
    minutes_left = (close_on(session_date) - local).total_seconds().to_numpy() / 60.0
    bars_left = np.maximum(np.ceil(minutes_left / bar_minutes(interval)) - 1, 0).astype("int64")
    days = (session_date.values.astype("datetime64[D]") - _EPOCH).astype("int64")
    return days, bars_left
