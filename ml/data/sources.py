"""Where bars come from: the bundled sample, CSV/parquet files, or yfinance.

Every loader returns a frame in the normalized bar schema (``ml.data.schema``).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pandas as pd

from ml.data.schema import DataError, normalize_bars

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample"


def sample_path(symbol: str) -> Path:
    path = SAMPLE_DIR / f"{symbol}.csv"
    if not path.exists():
        available = sorted(p.stem for p in SAMPLE_DIR.glob("*.csv"))
        raise DataError(f"no bundled sample for symbol '{symbol}' (available: {available})")
    return path


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV or parquet file, turning every read failure into a DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (rule: data must not be empty)")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as exc:  # any parser failure is a bad-input error for the user
        raise DataError(f"{path}: cannot be read as {path.suffix or 'CSV'} ({exc})") from exc


def load_file(path: str | Path, *, symbol: str | None = None, interval: str = "1d",
              source: str = "file") -> pd.DataFrame:
    """Load a CSV/parquet in yfinance layout or in the normalized schema."""
    path = Path(path)
    raw = read_table(path)
    if symbol is None:
        if "symbol" in raw.columns and raw["symbol"].nunique() == 1:
            symbol = str(raw["symbol"].iloc[0])
        else:
            symbol = path.stem
    return normalize_bars(raw, symbol=symbol, interval=interval, source=source, origin=str(path))


def load_sample(symbol: str = "GSPC", interval: str = "1d") -> pd.DataFrame:
    return load_file(sample_path(symbol), symbol=symbol, interval=interval, source="sample")


def _yfinance_frame_for(raw: pd.DataFrame, ticker: str) -> pd.DataFrame:
    """Pick one ticker out of yfinance's (field, ticker) MultiIndex columns."""
    if isinstance(raw.columns, pd.MultiIndex):
        level = next(
            (i for i in range(raw.columns.nlevels) if ticker in raw.columns.get_level_values(i)),
            None,
        )
        if level is None:
            raise DataError(f"yfinance: no columns for ticker '{ticker}' in the download")
        raw = raw.xs(ticker, axis=1, level=level)
    return raw.dropna(how="all")


def load_yfinance(
    symbol: str,
    *,
    interval: str = "1d",
    start: str | None = None,
    end: str | None = None,
    auto_adjust: bool = True,
    retries: int = 4,
    backoff_seconds: float = 2.0,
) -> pd.DataFrame:
    """Download one ticker with retries (exponential backoff with jitter).

    ``auto_adjust`` is explicit and recorded in ``source`` so the adjustment
    choice travels with the data.
    """
    import yfinance as yf

    last_error: Exception | None = None
    for attempt in range(retries):
        try:
            raw = yf.download(
                symbol, start=start, end=end, interval=interval, auto_adjust=auto_adjust,
                progress=False, multi_level_index=True, threads=False,
            )
            if raw is None or raw.empty:
                raise DataError(f"yfinance: no bars returned for '{symbol}' ({interval}, {start}..{end})")
            frame = _yfinance_frame_for(raw, symbol)
            source = f"yfinance(auto_adjust={auto_adjust})"
            return normalize_bars(frame, symbol=symbol, interval=interval, source=source,
                                  origin=f"yfinance:{symbol}")
        except DataError as exc:
            last_error = exc
        except Exception as exc:  # network and rate-limit errors are retried
            last_error = exc
        if attempt + 1 < retries:
            time.sleep(backoff_seconds * 2**attempt * (1 + random.random()))
    raise DataError(f"yfinance: '{symbol}' failed after {retries} attempts: {last_error}")


def load_bars(source: str, *, symbol: str, interval: str = "1d", path: str | None = None,
              start: str | None = None, end: str | None = None,
              auto_adjust: bool = True) -> pd.DataFrame:
    """Dispatch on the configured source name: ``sample``, ``file``, ``yfinance`` or ``lake``.

    ``lake`` reads the curated partition of the data lake (``path`` = lake root, default
    ``$ML_LAKE_ROOT``), i.e. only batches that passed the gate.
    """
    if source == "lake":
        return load_lake(symbol, interval=interval, root=path, start=start, end=end)
    if source == "sample":
        bars = load_sample(symbol, interval)
    elif source == "file":
        if not path:
            raise DataError("source 'file' needs a path (config data.path or --data)")
        bars = load_file(path, symbol=symbol, interval=interval)
    elif source == "yfinance":
        return load_yfinance(symbol, interval=interval, start=start, end=end,
                             auto_adjust=auto_adjust)
    else:
        raise DataError(f"unknown data source '{source}' (expected sample, file, yfinance or lake)")
    if start:
        bars = bars[bars["timestamp"] >= pd.Timestamp(start, tz="UTC")]
    if end:
        bars = bars[bars["timestamp"] < pd.Timestamp(end, tz="UTC")]
    return bars.reset_index(drop=True)


def load_lake(symbol: str, *, interval: str = "1d", root: str | None = None, start: str | None = None,
              end: str | None = None, version: str | None = None) -> pd.DataFrame:
    """Curated bars from the data lake (``ml.data.lake``; root defaults to ``$ML_LAKE_ROOT``).

    ``version`` pins a curated content hash, so a training run can be repeated
    on exactly the data it saw.
    """
    from ml.data.lake import Lake

    bars = Lake(root).read_curated(symbol, interval, version)
    if start:
        bars = bars[bars["timestamp"] >= pd.Timestamp(start, tz="UTC")]
    if end:
        bars = bars[bars["timestamp"] < pd.Timestamp(end, tz="UTC")]
    return bars.reset_index(drop=True)
