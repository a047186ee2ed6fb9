"""Incremental pulls into the lake: fetch -> raw -> gate -> curated or quarantine.

``ingest_symbol`` is what the ``market_data`` DAG runs once per symbol. It
never raises for one symbol's trouble (bad data, a source outage): it returns
a small JSON-able dict whose ``status`` says what happened, so a loop over
symbols (or the DAG task) decides how to report it. ``ingest_many`` (the CLI
path) fetches all yfinance symbols in one batched download first.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import pandas as pd

from ml.data.lake import Lake, QuarantinedError, new_pull_id
from ml.data.schema import DataError
from ml.data.sources import load_bars, load_yfinance, load_yfinance_many
from ml.data.validation import ValidationConfig

log = logging.getLogger(__name__)

# A source is a name understood by ``load_bars`` or a callable
# ``(symbol=, interval=, start=, end=) -> bars`` (tests, custom feeds).
Source = str | Callable[..., pd.DataFrame]


def symbol_path(path: str | None, symbol: str) -> str:
    """Source ``file`` for many symbols: ``{symbol}`` in the path, or a folder of SYMBOL.csv/.parquet."""
    if not path:
        raise DataError("source 'file' needs a path (a folder of SYMBOL.csv files or a '{symbol}' pattern)")
    if "{symbol}" in path:
        return path.format(symbol=symbol)
    folder = Path(path)
    if folder.is_dir():
        for suffix in (".csv", ".parquet", ".pq"):
            if (folder / f"{symbol}{suffix}").exists():
                return str(folder / f"{symbol}{suffix}")
        raise DataError(f"{folder}: no {symbol}.csv or {symbol}.parquet")
    return path


def fetch_bars(source: Source, symbol: str, interval: str, *, start: str | None = None,
               end: str | None = None, path: str | None = None) -> pd.DataFrame:
    if callable(source):
        return source(symbol=symbol, interval=interval, start=start, end=end)
    if source == "file":
        path = symbol_path(path, symbol)
    return load_bars(source, symbol=symbol, interval=interval, path=path, start=start, end=end)


def resume_from(lake: Lake, symbol: str, interval: str, overlap_bars: int) -> pd.Timestamp | None:
    """The first stored bar to fetch again: ``overlap_bars`` back from the last one, to catch revisions."""
    times = lake.timestamps(symbol, interval)
    if times.empty:
        return None
    return times.iloc[max(len(times) - max(overlap_bars, 1), 0)]


def fetch_window(lake: Lake, symbol: str, interval: str, overlap_bars: int,
                 start: str | None) -> tuple[pd.Timestamp | None, str | None]:
    """The first stored bar fetched again (None on the first pull) and the start date to ask the source."""
    since = resume_from(lake, symbol, interval, overlap_bars)
    # Sources take dates; the exact cut is made on the timestamps.
    return since, since.strftime("%Y-%m-%d") if since is not None else start


class BatchedYFinance:
    """A source that serves each symbol from one batched yfinance download per
    distinct start date (one for the whole run when the symbols are in step).

    Built before the per-symbol pulls, from the same resume dates they will
    compute; a symbol asked for with another start is fetched on its own.
    """

    def __init__(self, lake: Lake, symbols: list[str], interval: str, *, start: str | None = None,
                 end: str | None = None, overlap_bars: int = 5, **options):
        groups: dict[str | None, list[str]] = {}
        for symbol in symbols:
            groups.setdefault(fetch_window(lake, symbol, interval, overlap_bars, start)[1], []).append(symbol)
        self._bars: dict[tuple[str, str | None], pd.DataFrame | DataError] = {}
        for first, group in groups.items():
            try:
                fetched = load_yfinance_many(group, interval=interval, start=first, end=end, **options)
            except DataError as exc:  # a request Yahoo cannot serve (history limits): every symbol says why
                fetched = dict.fromkeys(group, exc)
            self._bars.update({(symbol, first): bars for symbol, bars in fetched.items()})

    def __call__(self, *, symbol: str, interval: str, start: str | None = None, end: str | None = None):
        found = self._bars.get((symbol, start))
        if found is None:
            return load_yfinance(symbol, interval=interval, start=start, end=end)
        if isinstance(found, DataError):
            raise found
        return found


def pull_incremental(lake: Lake, symbol: str, interval: str, source: Source, *, overlap_bars: int = 5,
                     start: str | None = None, end: str | None = None, path: str | None = None,
                     pull_id: str | None = None, validation: ValidationConfig | None = None) -> dict:
    """Fetch only what is new (plus the overlap), keep it raw, then curate it.

    ``start`` applies to the first pull only (the backfill); later pulls resume
    from the lake. Re-running is idempotent: bars equal to the stored ones leave
    curated untouched, and revised bars in the overlap replace the old values.
    Raises QuarantinedError when the merged series fails the gate.
    """
    since, fetch_start = fetch_window(lake, symbol, interval, overlap_bars, start)
    bars = fetch_bars(source, symbol, interval, start=fetch_start, end=end, path=path)
    pull_id = pull_id or new_pull_id()
    summary = {"pull_id": pull_id, "fetched_from": fetch_start, "rows_pulled": len(bars), "raw_key": None}
    if len(bars):
        summary["raw_key"] = lake.write_raw(bars, pull_id)
    if since is not None:
        bars = bars[bars["timestamp"] >= since]
    if bars.empty:
        if since is None:
            raise DataError(f"{symbol} {interval}: the source returned no bars from {start or 'the start'}")
        current = lake.manifest(symbol, interval)["current"] or {}
        return {**summary, "status": "unchanged", "rows": current.get("rows"), "rows_added": 0,
                "rows_revised": 0, "curated_hash": current.get("hash"), "previous_hash": current.get("hash")}
    result = lake.curate(bars.reset_index(drop=True), validation, pull_id=pull_id)
    return {**summary, **result.as_dict()}


def ingest_symbol(lake_root: str | Path | None, symbol: str, interval: str = "1d", source: Source = "sample",
                  start: str | None = None, path: str | None = None, *, end: str | None = None,
                  overlap_bars: int = 5, endpoint_url: str | None = None,
                  validation: ValidationConfig | dict | None = None, pull_id: str | None = None) -> dict:
    """Pull one symbol into the lake; returns a JSON-able summary whose ``status`` is
    ``updated``, ``unchanged``, ``quarantined`` (the gate refused the batch) or
    ``failed`` (the pull or the lake failed; ``error`` says why, ``retryable`` whether
    trying again later may help)."""
    if isinstance(validation, dict):
        validation = ValidationConfig(**validation)
    base = {"symbol": symbol, "interval": interval, "lake_root": str(lake_root or ""), "status": "failed",
            "rows_added": 0, "curated_hash": None, "error": None}
    try:
        lake = Lake(lake_root, endpoint_url)
        base["lake_root"] = lake.root
        return {**base, **pull_incremental(lake, symbol, interval, source, overlap_bars=overlap_bars,
                                           start=start, end=end, path=path, pull_id=pull_id,
                                           validation=validation)}
    except QuarantinedError as exc:
        log.warning("%s %s quarantined at %s:\n%s", symbol, interval, exc.location, exc)
        return {**base, "status": "quarantined", "curated_hash": exc.curated_hash, "quarantine": exc.location,
                "report": exc.report_url,
                "failed_rules": [rule.rule for rule in exc.result.failed], "error": str(exc)}
    except Exception as exc:  # one symbol's failure must not stop the others
        log.exception("%s %s: ingest failed", symbol, interval)
        # A DataError is bad input, or a source that already exhausted its own retries.
        return {**base, "error": f"{type(exc).__name__}: {exc}", "retryable": not isinstance(exc, DataError)}


def ingest_many(lake_root: str | Path | None, symbols: list[str], **kwargs) -> list[dict]:
    """``ingest_symbol`` for each symbol in turn (the no-Airflow path).

    With source ``yfinance`` the bars of all symbols come from one batched
    download (``BatchedYFinance``) instead of one request per symbol: fewer
    round trips and less rate limiting. A ticker missing from the batch fails
    alone, as it would on its own.
    """
    if kwargs.get("source") == "yfinance" and len(symbols) > 1:
        try:
            lake = Lake(lake_root, kwargs.get("endpoint_url"))
            kwargs["source"] = BatchedYFinance(
                lake, symbols, kwargs.get("interval", "1d"), start=kwargs.get("start"), end=kwargs.get("end"),
                overlap_bars=kwargs.get("overlap_bars", 5))
        except Exception:  # e.g. the lake is unreachable: each symbol reports it below
            log.exception("batched yfinance download failed; pulling symbol by symbol")
    return [ingest_symbol(lake_root, symbol, **kwargs) for symbol in symbols]
