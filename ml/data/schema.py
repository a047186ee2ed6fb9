"""The normalized bar schema every source is converted into.

One row per bar: ``timestamp`` (UTC), ``symbol``, ``interval``, ``open``,
``high``, ``low``, ``close``, ``volume``, ``source``, ``ingested_at``.
``open``/``high``/``low``/``volume`` may be entirely missing (NaN) for
close-only series; ``close`` never is.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

PRICE_COLUMNS = ("open", "high", "low", "close")
BAR_COLUMNS = (
    "timestamp", "symbol", "interval", "open", "high", "low", "close", "volume",
    "source", "ingested_at",
)
# Column order of the `ohlcv` model input (see the ONNX contract).
OHLCV_FIELDS = ("open", "high", "low", "close", "volume")

# yfinance / CSV spellings -> normalized names.
_ALIASES = {
    "date": "timestamp", "datetime": "timestamp", "timestamp": "timestamp",
    "open": "open", "high": "high", "low": "low", "close": "close",
    "adj close": "adj_close", "adj_close": "adj_close", "volume": "volume",
    "symbol": "symbol", "interval": "interval", "source": "source",
    "ingested_at": "ingested_at",
}


class DataError(ValueError):
    """Input data that breaks the bar schema; the message names the file and the rule."""


def normalize_bars(
    frame: pd.DataFrame,
    *,
    symbol: str,
    interval: str,
    source: str,
    origin: str,
    ingested_at: pd.Timestamp | None = None,
) -> pd.DataFrame:
    """Convert a yfinance-layout or normalized frame into the bar schema.

    ``origin`` names where the frame came from (a path or a ticker) so every
    error can point at it. Prices are kept as given; ``Adj Close`` is dropped
    because the adjustment choice is recorded by the source, not mixed in here.
    """
    if frame is None or len(frame) == 0:
        raise DataError(f"{origin}: no rows (rule: data must not be empty)")
    frame = frame.copy()
    if "timestamp" not in {str(c).lower() for c in frame.columns}:
        index_name = str(frame.index.name or "").lower()
        if index_name in ("date", "datetime", "timestamp"):
            frame = frame.reset_index()
    renamed = {}
    for column in frame.columns:
        key = str(column).strip().lower()
        if key in _ALIASES:
            renamed[column] = _ALIASES[key]
    frame = frame.rename(columns=renamed)
    frame = frame.loc[:, ~frame.columns.duplicated()]
    for required in ("timestamp", "close"):
        if required not in frame.columns:
            raise DataError(
                f"{origin}: missing required column '{required}' "
                f"(found {list(map(str, frame.columns))})"
            )

    try:
        timestamps = pd.to_datetime(frame["timestamp"], utc=True, format="mixed")
    except (ValueError, TypeError) as exc:
        raise DataError(f"{origin}: column 'timestamp' is not parseable as dates ({exc})") from exc

    out = pd.DataFrame({"timestamp": timestamps.astype("datetime64[ns, UTC]")})
    out["symbol"] = symbol
    out["interval"] = interval
    for field in ("open", "high", "low", "close", "volume"):
        if field in frame.columns:
            values = pd.to_numeric(frame[field], errors="coerce")
            bad = values.isna() & frame[field].notna()
            if bad.any():
                row = int(np.flatnonzero(bad.to_numpy())[0])
                raise DataError(
                    f"{origin}: column '{field}' row {row} value {frame[field].iloc[row]!r} "
                    "is not numeric (rule: prices and volume must be numbers)"
                )
            out[field] = values.astype("float64").to_numpy()
        else:
            out[field] = np.nan
    out["source"] = source
    out["ingested_at"] = (ingested_at or pd.Timestamp.now(tz="UTC")).tz_convert("UTC")
    return out.loc[:, list(BAR_COLUMNS)].reset_index(drop=True)


def has_ohlc(bars: pd.DataFrame) -> bool:
    """True when open/high/low are present (not a close-only series)."""
    return bool(bars[["open", "high", "low"]].notna().all(axis=None))


def has_volume(bars: pd.DataFrame) -> bool:
    return bool(bars["volume"].notna().all() and (bars["volume"] > 0).any())


def ohlcv_array(bars: pd.DataFrame) -> np.ndarray:
    """Bars as a float32 [T, 5] array in contract order.

    Close-only series are filled the way a downstream service fills them:
    open/high/low = close and volume = 0; the features of a close-only model
    never read those columns.
    """
    close = bars["close"].to_numpy(dtype="float64")
    columns = []
    for field in OHLCV_FIELDS:
        values = bars[field].to_numpy(dtype="float64")
        if np.isnan(values).any():
            values = np.zeros_like(close) if field == "volume" else close
        columns.append(values)
    return np.stack(columns, axis=1).astype("float32")


def content_hash(bars: pd.DataFrame) -> str:
    """SHA-256 of the market content (not of ingestion times), stable across re-pulls."""
    content = bars.loc[:, ["timestamp", "symbol", "interval", *OHLCV_FIELDS]]
    digest = hashlib.sha256()
    digest.update(pd.util.hash_pandas_object(content, index=False).to_numpy().tobytes())
    return digest.hexdigest()
