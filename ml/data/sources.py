"""Where bars come from: the bundled sample, CSV/parquet files, or yfinance.

Every loader returns a frame in the normalized bar schema (``ml.data.schema``).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import pandas as pd

from ml.config import INTERVALS, SYMBOL_RULE, is_symbol
from ml.data.lake import Lake
from ml.data.schema import DataError, normalize_bars

# yfinance is imported where it is called: only the yfinance source needs it, and it is slow to import.

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample"
log = logging.getLogger(__name__)


def check_symbol(symbol: str) -> str:
    """``symbol`` when it is a ticker (``ml.config.SYMBOL_PATTERN``); a DataError before it names any file."""
    if not is_symbol(symbol):
        raise DataError(f"symbol {str(symbol)[:64]!r}: {SYMBOL_RULE}")
    return symbol


def sample_path(symbol: str) -> Path:
    path = SAMPLE_DIR / f"{check_symbol(symbol)}.csv"
    if not path.exists():
        available = sorted(p.stem for p in SAMPLE_DIR.glob("*.csv"))
        raise DataError(f"no bundled sample for symbol '{symbol}' (available: {available})")
    return path


# Parser messages that name a line number or position but quote none of the file's text.
_QUIET_READ_ERRORS = (pd.errors.ParserError, pd.errors.EmptyDataError)


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV or parquet file, turning every read failure into a DataError.

    Errors never quote the file: the path may point anywhere, and the message ends up in logs.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (rule: data must not be empty)")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as exc:  # any parser failure is a bad-input error for the user
        why = str(exc).strip() if isinstance(exc, _QUIET_READ_ERRORS) else type(exc).__name__
        # No chained exception either: a traceback would print it, and some quote the text.
        raise DataError(f"{path}: cannot be read as {path.suffix or 'CSV'} ({why})") from None


def _unfit_file(raw: pd.DataFrame, path: Path) -> str:
    """Why a file's table does not fit the bar schema, naming columns and rows but no cell or header text."""
    columns = {str(c).strip().lower(): c for c in raw.columns}
    dates = next((columns[c] for c in ("timestamp", "date", "datetime") if c in columns), None)
    if dates is None and str(raw.index.name or "").lower() in ("timestamp", "date", "datetime"):
        dates = raw.index.to_series()
    if dates is None or "close" not in columns:
        missing = "'timestamp' (or Date, Datetime)" if dates is None else "'close'"
        return f"{path}: missing required column {missing}; the header has {len(raw.columns)} column(s)"
    stamps = raw[dates] if not isinstance(dates, pd.Series) else dates
    bad = pd.to_datetime(stamps, utc=True, errors="coerce", format="mixed").isna() & stamps.notna()
    if bad.any():
        return f"{path}: column 'timestamp' is not parseable as dates (row {int(bad.to_numpy().argmax())})"
    for field in ("open", "high", "low", "close", "volume"):
        if field in columns:
            values = raw[columns[field]]
            bad = pd.to_numeric(values, errors="coerce").isna() & values.notna()
            if bad.any():
                return (f"{path}: column '{field}' row {int(bad.to_numpy().argmax())} is not numeric "
                        "(rule: prices and volume must be numbers)")
    return f"{path}: does not fit the bar schema"


def load_file(path: str | Path, *, symbol: str | None = None, interval: str = "1d",
              source: str = "file") -> pd.DataFrame:
    """Load a CSV/parquet in yfinance layout or in the normalized schema.

    Without ``symbol``, the file's single ``symbol`` value or its name (a ticker either way).
    """
    path = Path(path)
    if symbol is not None:
        check_symbol(symbol)
    raw = read_table(path)
    if symbol is None:
        if "symbol" in raw.columns and raw["symbol"].nunique() == 1:
            symbol = str(raw["symbol"].iloc[0])
            if not is_symbol(symbol):  # a value from the file: not echoed
                raise DataError(f"{path}: column 'symbol' holds a value that is not a ticker ({SYMBOL_RULE})")
        else:
            symbol = path.stem
            if not is_symbol(symbol):
                raise DataError(f"{path}: the file name '{symbol}' is not a ticker to name the bars by "
                                f"({SYMBOL_RULE}); give the symbol explicitly")
    try:
        return normalize_bars(raw, symbol=symbol, interval=interval, source=source, origin=str(path))
    except DataError:
        # normalize_bars quotes headers and cells, right for a download but not for a file that
        # may be anything: say the same without the text.
        raise DataError(_unfit_file(raw, path)) from None


def load_folder(folder: str | Path, symbols: list[str], start: str | None = None,
                end: str | None = None) -> dict[str, pd.DataFrame]:
    """``<folder>/<SYMBOL>.csv`` per symbol (checked names only), cut to [start, end]."""
    frames = {}
    for symbol in symbols:
        frame = load_file(Path(folder) / f"{check_symbol(symbol)}.csv", symbol=symbol)
        if start:
            frame = frame[frame["timestamp"] >= pd.Timestamp(start, tz="UTC")]
        if end:
            frame = frame[frame["timestamp"] <= pd.Timestamp(end, tz="UTC")]
        frames[symbol] = frame.reset_index(drop=True)
    return frames


def load_sample(symbol: str = "GSPC", interval: str = "1d") -> pd.DataFrame:
    return load_file(sample_path(symbol), symbol=symbol, interval=interval, source="sample")


# How far back Yahoo serves each intraday interval, and the longest span one request
# may cover; daily and longer intervals have neither limit.
YAHOO_HISTORY_DAYS = {"1m": 30, "2m": 60, "5m": 60, "15m": 60, "30m": 60, "90m": 60, "60m": 730, "1h": 730}
YAHOO_REQUEST_DAYS = {"1m": 8}
YAHOO_INTERVALS = INTERVALS
# Words in yfinance's per-ticker error log that no retry will fix.
_PERMANENT_ERRORS = ("delisted", "YFInvalidPeriodError", "YFTzMissingError", "not found")


def yahoo_window(interval: str, start: str | None, end: str | None = None,
                 now: pd.Timestamp | None = None) -> str | None:
    """The start to request, after checking it against Yahoo's history limits.

    A start older than the interval's history (e.g. 5m bars before the last 60
    days) raises DataError naming the interval, the limit and the start. No
    start means "as much as Yahoo serves": for limited intervals the start is
    set to the oldest date one request can get (with a warning, since it is
    not the whole series); daily and longer keep yfinance's default.
    """
    if interval not in YAHOO_INTERVALS:
        raise DataError(f"yfinance: unknown interval '{interval}' (expected one of {', '.join(YAHOO_INTERVALS)})")
    if interval not in YAHOO_HISTORY_DAYS:
        return start
    now = now or pd.Timestamp.now(tz="UTC")
    history, span = YAHOO_HISTORY_DAYS[interval], YAHOO_REQUEST_DAYS.get(interval)
    earliest = now - pd.Timedelta(days=history)
    stop = _utc(end) if end else now
    if stop <= earliest:
        raise DataError(f"yfinance: {interval} bars reach back only {history} days (to {earliest:%Y-%m-%d %H:%M} "
                        f"UTC); requested end {end} is older")
    if start is None:
        # One request's worth, in whole days inside the window, so the exchange's timezone
        # (yfinance reads dates in it) cannot push the start past the limit.
        first = max(earliest, stop - pd.Timedelta(days=span or history)) + pd.Timedelta(days=1)
        log.warning("yfinance: no start given for %s bars; Yahoo keeps %d days of them%s, so fetching from %s",
                    interval, history, f" and serves {span} days per request" if span else "", f"{first:%Y-%m-%d}")
        return f"{first:%Y-%m-%d}"
    if _utc(start) < earliest:
        raise DataError(
            f"yfinance: {interval} bars reach back only {history} days (to {earliest:%Y-%m-%d %H:%M} UTC); "
            f"requested start {start} is older. Use a start on or after "
            f"{earliest + pd.Timedelta(days=1):%Y-%m-%d}, or a daily interval")
    if span and stop - _utc(start) > pd.Timedelta(days=span):
        raise DataError(
            f"yfinance: {interval} bars are served at most {span} days per request; requested start {start} "
            f"to {end or 'now'} is longer. Pull in windows of up to {span} days")
    return start


def _utc(value) -> pd.Timestamp:
    stamp = pd.Timestamp(value)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _yfinance_frame_for(raw: pd.DataFrame, ticker: str) -> pd.DataFrame:
    """Pick one ticker out of yfinance's (field, ticker) MultiIndex columns."""
    if isinstance(raw.columns, pd.MultiIndex):
        # yfinance upper-cases tickers in its columns.
        names = {ticker, ticker.upper()}
        level = next(
            (i for i in range(raw.columns.nlevels) if names & set(raw.columns.get_level_values(i))),
            None,
        )
        if level is None:
            raise DataError(f"yfinance: no columns for ticker '{ticker}' in the download")
        present = ticker if ticker in raw.columns.get_level_values(level) else ticker.upper()
        raw = raw.xs(present, axis=1, level=level)
    return raw.dropna(how="all")


def _backoff(attempt: int, backoff_seconds: float) -> None:
    """Exponential backoff with jitter, so parallel clients do not retry in step."""
    time.sleep(backoff_seconds * 2**attempt * (1 + random.random()))


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

    ``start`` is checked against Yahoo's history limit for ``interval``
    (``yahoo_window``): too old raises DataError at once; None fetches what
    Yahoo keeps (intraday) or yfinance's default (daily and longer).
    ``auto_adjust`` is explicit and recorded in ``source`` so the adjustment
    choice travels with the data.
    """
    import yfinance as yf

    check_symbol(symbol)
    start = yahoo_window(interval, start, end)
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
            _backoff(attempt, backoff_seconds)
    raise DataError(f"yfinance: '{symbol}' failed after {retries} attempts: {last_error}")


class _YFinanceErrors(logging.Handler):
    """Collects yfinance's per-ticker error log lines: a batched download logs a
    failed ticker (rate limited, delisted) instead of raising."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def reason(self, ticker: str) -> str | None:
        return next((line for line in self.lines if f"'{ticker.upper()}'" in line), None)


def load_yfinance_many(
    symbols: list[str],
    *,
    interval: str = "1d",
    start: str | None = None,
    end: str | None = None,
    auto_adjust: bool = True,
    retries: int = 4,
    backoff_seconds: float = 2.0,
    threads: bool | int = True,
) -> dict[str, pd.DataFrame | DataError]:
    """Download many tickers in one ``yf.download`` call and split them per ticker.

    Returns ``{symbol: bars}`` with a DataError in place of the bars for each
    ticker that came back empty or missing, so one bad ticker never fails the
    others. A raised error (network, ``YFRateLimitError``) retries the call; a
    ticker yfinance logged as failed is retried too (rate limits hit tickers
    one by one inside a batch), unless its error is permanent (delisted, no
    timezone). Each retry downloads only the tickers still missing, after an
    exponential backoff with jitter. A ``start`` beyond Yahoo's limits raises
    DataError for the whole request (``yahoo_window``).
    """
    import yfinance as yf

    start = yahoo_window(interval, start, end)
    results: dict[str, pd.DataFrame | DataError] = {}
    pending = []
    for symbol in dict.fromkeys(symbols):  # a name that is no ticker fails alone, never downloaded
        try:
            pending.append(check_symbol(symbol))
        except DataError as exc:
            results[symbol] = exc
    source = f"yfinance(auto_adjust={auto_adjust})"
    last_error: Exception | None = None
    for attempt in range(retries if pending else 0):
        errors = _YFinanceErrors()
        yf_log = logging.getLogger("yfinance")
        yf_log.addHandler(errors)
        try:
            raw = yf.download(pending, start=start, end=end, interval=interval, auto_adjust=auto_adjust,
                              group_by="column", multi_level_index=True, progress=False, threads=threads)
        except Exception as exc:  # network and rate-limit errors: retry the whole call
            raw, last_error = None, exc
        finally:
            yf_log.removeHandler(errors)
        if raw is not None:
            retry = []
            for symbol in pending:
                try:
                    frame = _yfinance_frame_for(raw, symbol)  # all-NaN rows dropped
                    if frame.empty:
                        raise DataError(f"yfinance: no bars for '{symbol}' in the batched download "
                                        f"({interval}, {start}..{end})")
                except DataError as exc:  # missing: retried unless yfinance logged a permanent reason
                    reason = errors.reason(symbol)
                    results[symbol] = DataError(f"{exc}: {reason}" if reason else str(exc))
                    if not (reason and any(word in reason for word in _PERMANENT_ERRORS)):
                        retry.append(symbol)
                    continue
                try:  # bars that came but break the schema will not improve on a retry
                    results[symbol] = normalize_bars(frame, symbol=symbol, interval=interval, source=source,
                                                     origin=f"yfinance:{symbol}")
                except DataError as exc:
                    results[symbol] = exc
            pending = retry
        if not pending:
            break
        if attempt + 1 < retries:
            log.info("yfinance: retrying %d of %d tickers (attempt %d)", len(pending), len(symbols), attempt + 2)
            _backoff(attempt, backoff_seconds)
    for symbol in pending:
        why = results.get(symbol) or last_error
        results[symbol] = DataError(f"yfinance: '{symbol}' failed after {retries} attempts: {why}")
    return {symbol: results[symbol] for symbol in dict.fromkeys(symbols)}


def load_bars(source: str, *, symbol: str, interval: str = "1d", path: str | None = None,
              start: str | None = None, end: str | None = None,
              auto_adjust: bool = True) -> pd.DataFrame:
    """Dispatch on the configured source name: ``sample``, ``file``, ``yfinance`` or ``lake``.

    ``lake`` reads the curated partition of the data lake (``path`` = lake root, default
    ``$ML_LAKE_ROOT``), i.e. only batches that passed the gate. ``symbol`` must be a ticker
    (``ml.config.SYMBOL_PATTERN``) for every source: it names files and models.
    """
    check_symbol(symbol)
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
    bars = Lake(root).read_curated(check_symbol(symbol), interval, version)
    if start:
        bars = bars[bars["timestamp"] >= pd.Timestamp(start, tz="UTC")]
    if end:
        bars = bars[bars["timestamp"] < pd.Timestamp(end, tz="UTC")]
    return bars.reset_index(drop=True)
