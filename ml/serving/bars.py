"""The data gate's bar rules (``ml.data.validation``), held by every window a model is asked about.

numpy only: serving runs without pandas and Great Expectations, so the rules are restated here
with the gate's names and default thresholds. A failure names the window, asset, bar and rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FIELDS = ("open", "high", "low", "close", "volume")
# The gate's default (ValidationConfig.max_abs_log_return): a x100 glitch is |log 100| = 4.6.
MAX_ABS_LOG_RETURN = 1.0
# The gate's OHLC order, a >= b on every bar, with its rule names.
OHLC_ORDER = (("high", "open"), ("high", "close"), ("open", "low"), ("close", "low"))
# A feed's clock may run a little ahead of this host's; a bar further in the future is refused.
CLOCK_SKEW = np.timedelta64(60, "s")
# Windows checked at a time: 2048 x 64 bars x 5 fields is about 2.6 MB.
CHUNK = 2048


class InputError(ValueError):
    """A model input that breaks the ONNX contract; the message names the field and the rule."""


def _time(value: np.datetime64) -> str:
    return f"{np.datetime_as_string(value, unit='s')}Z"


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if abs(seconds) >= size:
            return f"{seconds / size:.4g} {unit}"
    return f"{seconds:.4g} seconds"


@dataclass(frozen=True)
class BarRules:
    """Which rules apply, and their limits (None turns a limit off).

    ``reads_ohlc``: the model reads open/high/low, so they must be positive and in order;
    otherwise only the close (and a non-negative volume) is held to the rules.
    ``symbols``: the asset axis, to name an asset in errors.
    """

    reads_ohlc: bool = True
    max_abs_log_return: float | None = MAX_ABS_LOG_RETURN
    max_stale_bars: int | None = 10
    max_age: np.timedelta64 | None = None
    symbols: tuple[str, ...] | None = None

    @property
    def max_ratio(self) -> float | None:
        # |log r| <= m  <=>  exp(-m) <= r <= exp(m): a ratio of closes, no log per bar.
        return math.exp(self.max_abs_log_return) if self.max_abs_log_return is not None else None

    def check_windows(self, ohlcv: np.ndarray) -> None:
        """Raise InputError unless every window of ``ohlcv`` [B, L, A, 5] keeps the rules.

        A handful of whole-array reductions hold exactly when every rule holds (with a batch of
        one, each numpy call costs a microsecond or two however small the array); only a failing
        batch pays for finding where (``_explain``). Large batches go in chunks that stay in the
        CPU cache, since the rules read each field several times.
        """
        if not all(self._holds(ohlcv[start:start + CHUNK]) for start in range(0, len(ohlcv), CHUNK)):
            self._explain(ohlcv)

    def _holds(self, ohlcv: np.ndarray) -> bool:
        lowest, highest = ohlcv.min(), ohlcv.max()  # NaN propagates through both
        if not (math.isfinite(lowest) and math.isfinite(highest)):
            return False
        close = np.ascontiguousarray(ohlcv[..., 3])  # read three more times below
        if self.reads_ohlc:
            open_, high, low = ohlcv[..., 0], ohlcv[..., 1], ohlcv[..., 2]
            # Nothing negative, low > 0 and the OHLC order: then every price is positive.
            if not (lowest >= 0 and (lowest > 0 or low.min() > 0)
                    and ((low <= open_) & (open_ <= high) & (low <= close) & (close <= high)).all()):
                return False
        elif not (close.min() > 0 and ohlcv[..., 4].min() >= 0):  # the model reads the close alone
            return False
        max_ratio = self.max_ratio
        if max_ratio is not None:
            ratio = close[:, 1:] / close[:, :-1]
            if not (ratio.max() <= max_ratio and ratio.min() >= 1.0 / max_ratio):
                return False
        if self.max_stale_bars is not None:
            tail = close[:, -(self.max_stale_bars + 1):]
            # ndarray methods, not np.all(..., axis=): the module-level wrapper costs microseconds.
            return bool((tail[:, :-1] != tail[:, -1:]).any(axis=1).all())
        return True

    def _explain(self, ohlcv: np.ndarray) -> None:
        """Raise for the first broken rule, in the gate's order, naming where."""
        lookback = ohlcv.shape[1]

        def where(row, bar, asset) -> str:
            last = " (the last)" if int(bar) == lookback - 1 else ""
            return f"ohlcv: window {int(row)}{self._asset(asset)} bar {int(bar)}{last}"

        if not np.isfinite(ohlcv).all():
            row, _, asset, _ = np.argwhere(~np.isfinite(ohlcv))[0]
            raise InputError(f"ohlcv: window {int(row)}{self._asset(asset)} contains NaN or infinite values")
        for name in ("open", "high", "low", "close") if self.reads_ohlc else ("close",):
            values = ohlcv[..., FIELDS.index(name)]
            if (values <= 0).any():
                row, bar, asset = np.argwhere(values <= 0)[0]
                raise InputError(f"{where(row, bar, asset)}: {name} {values[row, bar, asset]:g} breaks rule "
                                 f"'{name} strictly positive'")
        volume = ohlcv[..., 4]
        if (volume < 0).any():
            row, bar, asset = np.argwhere(volume < 0)[0]
            raise InputError(f"{where(row, bar, asset)}: volume {volume[row, bar, asset]:g} breaks rule "
                             "'volume non-negative'")
        for a, b in OHLC_ORDER if self.reads_ohlc else ():
            first, second = ohlcv[..., FIELDS.index(a)], ohlcv[..., FIELDS.index(b)]
            if (first < second).any():
                row, bar, asset = np.argwhere(first < second)[0]
                raise InputError(f"{where(row, bar, asset)}: {a} {first[row, bar, asset]:g} < {b} "
                                 f"{second[row, bar, asset]:g} breaks rule '{a} >= {b}'")
        close, max_ratio = ohlcv[..., 3], self.max_ratio
        if max_ratio is not None:
            ratio = close[:, 1:] / close[:, :-1]
            jumps = (ratio > max_ratio) | (ratio < 1.0 / max_ratio)
            if jumps.any():
                row, bar, asset = np.argwhere(jumps)[0]
                raise InputError(
                    f"{where(row, bar + 1, asset)}: close {close[row, bar + 1, asset]:g} after "
                    f"{close[row, bar, asset]:g} (|log return| {abs(math.log(ratio[row, bar, asset])):.3g} > "
                    f"{self.max_abs_log_return:g}) breaks rule 'no abnormal one-bar jump'")
        if self.max_stale_bars is not None:
            tail = close[:, -(self.max_stale_bars + 1):]
            moving = (tail[:, :-1] != tail[:, -1:]).any(axis=1)
            if not moving.all():
                row, asset = np.argwhere(~moving)[0]
                raise InputError(f"ohlcv: window {int(row)}{self._asset(asset)} ends with more than "
                                 f"{self.max_stale_bars} identical closes (stale feed)")

    def check_timestamps(self, timestamps, batch: int, lookback: int) -> None:
        """Bars unique, increasing, not in the future and, with ``max_age``, the last one recent enough.

        ``timestamps`` [B, L] or [L] (the same bars for every window), datetime64 in UTC.
        """
        try:
            times = np.asarray(timestamps)
            if times.dtype.kind != "M":
                times = times.astype("datetime64[ns]")
        except (TypeError, ValueError):
            raise InputError("timestamps: must be datetimes (numpy datetime64, UTC)") from None
        if times.ndim == 1:
            times = times[None]
        if times.ndim != 2 or times.shape[1] != lookback or times.shape[0] not in (1, batch):
            raise InputError(f"timestamps: shape {times.shape} must be [{batch}, {lookback}] (one per bar)")
        if np.isnat(times).any():
            row, bar = np.argwhere(np.isnat(times))[0]
            raise InputError(f"timestamps: window {int(row)} bar {int(bar)} is not a time (NaT)")
        steps = np.diff(times, axis=1)
        if not (steps > np.timedelta64(0)).all():
            row, bar = np.argwhere(steps <= np.timedelta64(0))[0]
            this, before = times[row, bar + 1], times[row, bar]
            rule, how = ("timestamps unique", "repeats") if this == before else ("timestamps increasing", "is before")
            raise InputError(f"timestamps: window {int(row)} bar {int(bar) + 1} at {_time(this)} {how} bar "
                             f"{int(bar)} at {_time(before)}: breaks rule '{rule}'")
        now = np.datetime64("now")  # UTC, like the timestamps
        last = times[:, -1]
        if last.max() > now + CLOCK_SKEW:
            row = int(last.argmax())
            raise InputError(f"timestamps: window {row} last bar at {_time(last[row])} is after now "
                             f"({_time(now)}): breaks rule 'no timestamps in the future'")
        if self.max_age is not None and now - last.min() > self.max_age:
            row = int(last.argmin())
            age, limit = (now - last[row]) / np.timedelta64(1, "s"), self.max_age / np.timedelta64(1, "s")
            raise InputError(f"timestamps: window {row} last bar at {_time(last[row])} is {_duration(age)} old, more "
                             f"than max_age {_duration(limit)}: breaks rule 'last bar within max_age'")

    def _asset(self, index) -> str:
        return f" asset {self.symbols[int(index)]}" if self.symbols is not None else ""
