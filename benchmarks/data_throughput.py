"""Data-layer throughput: the Great Expectations gate, and pull + store into a local lake.

    .venv/bin/python benchmarks/data_throughput.py [--symbols 10] [--years 30] [--lake DIR]

(a) Rows per second validated by the GX gate (``validate_bars``, one suite run per symbol)
    on N symbols x Y years of synthetic daily OHLCV on business days from 1995-01-02.
(b) Pull + store through ``ingest_many`` (source ``yfinance``: one batched download, raw
    parquet, gate on the merged series, curated + version + manifest) into a fresh local
    lake, with ``yf.download`` faked at its boundary by frames shaped like yfinance 1.x
    daily output: (Price, Ticker) MultiIndex columns sorted by field, a tz-naive ``Date``
    index. The first pull (backfill), then an idempotent re-run (overlap bars only,
    every symbol ``unchanged``).

No network. GX is imported and warmed up before timing. Prints a Markdown table with the
machine, date, load average at start and end, and the exact command.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ml.data.ingest import ingest_many
from ml.data.schema import normalize_bars
from ml.data.validation import validate_bars

FIRST_DAY = "1995-01-02"


def synthetic_download(symbols: list[str], years: int) -> pd.DataFrame:
    """All symbols as one yfinance 1.x ``download(group_by="column")`` result for daily bars."""
    dates = pd.bdate_range(FIRST_DAY, f"{pd.Timestamp(FIRST_DAY).year + years - 1}-12-31")
    n = len(dates)
    columns = {}
    for k, symbol in enumerate(symbols):
        rng = np.random.default_rng(k)
        close = rng.uniform(20, 200) * np.exp(np.cumsum(0.0003 + 0.012 * rng.standard_normal(n)))
        open_ = np.r_[close[0], close[:-1]] * np.exp(0.004 * rng.standard_normal(n))  # overnight gap
        high = np.maximum(open_, close) * (1 + np.abs(0.006 * rng.standard_normal(n)))
        low = np.minimum(open_, close) * (1 - np.abs(0.006 * rng.standard_normal(n)))
        volume = np.round(rng.lognormal(15, 0.4, n))
        for field, values in (("Close", close), ("High", high), ("Low", low), ("Open", open_), ("Volume", volume)):
            columns[(field, symbol)] = values
    frame = pd.DataFrame(columns, index=pd.DatetimeIndex(dates.astype("datetime64[us]"), name="Date"))
    frame.columns = pd.MultiIndex.from_tuples(frame.columns, names=["Price", "Ticker"])
    return frame.sort_index(axis=1, level=0)


class FakeDownload:
    """``yf.download`` over the synthetic frame: honours tickers, start and end; counts calls."""

    def __init__(self, frame: pd.DataFrame):
        self.frame, self.calls = frame, 0

    def __call__(self, tickers, start=None, end=None, **_kwargs) -> pd.DataFrame:
        self.calls += 1
        tickers = [tickers] if isinstance(tickers, str) else list(tickers)
        rows = np.ones(len(self.frame), dtype=bool)
        if start:
            rows &= self.frame.index >= pd.Timestamp(start)
        if end:
            rows &= self.frame.index < pd.Timestamp(end)
        keep = self.frame.columns.get_level_values("Ticker").isin(tickers)
        return self.frame.loc[rows, keep].copy()


def bench_gate(raw: pd.DataFrame, symbols: list[str]) -> dict:
    frames = [normalize_bars(raw.xs(s, axis=1, level="Ticker"), symbol=s, interval="1d", source="bench",
                             origin=s) for s in symbols]
    validate_bars(frames[0].iloc[:300], "warm-up")
    seconds = []
    for bars in frames:
        start = time.perf_counter()
        result = validate_bars(bars, bars["symbol"].iloc[0])
        seconds.append(time.perf_counter() - start)
        assert result.success, result.describe()
    rows = sum(len(b) for b in frames)
    return {"rows": rows, "seconds": sum(seconds), "per_symbol": float(np.median(seconds)),
            "rules": len(result.rules)}


def bench_ingest(raw: pd.DataFrame, symbols: list[str], lake: Path) -> tuple[dict, dict]:
    import yfinance

    fake = FakeDownload(raw)
    yfinance.download = fake  # the boundary: everything after it is the real pull path
    runs = []
    for kwargs, want in (({"start": "1995-01-01"}, "updated"), ({}, "unchanged")):
        calls = fake.calls
        start = time.perf_counter()
        results = ingest_many(lake, symbols, source="yfinance", **kwargs)
        seconds = time.perf_counter() - start
        statuses = {r["status"] for r in results}
        assert statuses == {want}, [(r["symbol"], r["status"], r.get("error")) for r in results]
        runs.append({"rows": sum(r["rows_pulled"] for r in results), "curated": sum(r["rows"] for r in results),
                     "seconds": seconds, "downloads": fake.calls - calls})
    return runs[0], runs[1]


def machine() -> str:
    import great_expectations
    import yfinance

    return (f"{platform.node()} · {platform.platform()} · {os.cpu_count()} CPUs · Python {platform.python_version()}"
            f" · pandas {pd.__version__} · great-expectations {great_expectations.__version__}"
            f" · yfinance {yfinance.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=10)
    parser.add_argument("--years", type=int, default=30)
    parser.add_argument("--lake", type=Path, default=None, help="an empty folder (default: a fresh temp folder)")
    args = parser.parse_args()
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    load_start = os.getloadavg()

    symbols = [f"SYN{k:02d}" for k in range(args.symbols)]
    raw = synthetic_download(symbols, args.years)
    gate = bench_gate(raw, symbols)
    with tempfile.TemporaryDirectory(prefix="lake-bench-") as tmp:
        lake = args.lake or Path(tmp) / "lake"
        first, again = bench_ingest(raw, symbols, lake)
    load_end = os.getloadavg()

    def rate(rows: int, seconds: float) -> str:
        return f"{rows / seconds:,.0f}"

    per_symbol = gate["rows"] // args.symbols
    print(f"Data throughput: {args.symbols} symbols x {args.years} years of daily bars "
          f"({per_symbol:,} business days each, {FIRST_DAY} on)\n")
    print(f"- machine: {machine()}")
    print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"- load average (1/5/15 min): start {' / '.join(f'{x:.2f}' for x in load_start)}, "
          f"end {' / '.join(f'{x:.2f}' for x in load_end)}")
    print(f"- command: `{command}`\n")
    print("| stage | rows | seconds | rows/s | notes |")
    print("|---|---:|---:|---:|---|")
    print(f"| (a) GX gate, `validate_bars` | {gate['rows']:,} | {gate['seconds']:.2f} | "
          f"{rate(gate['rows'], gate['seconds'])} | {gate['rules']} rules, one suite run per symbol, "
          f"median {gate['per_symbol']:.2f} s/symbol |")
    print(f"| (b) first pull: `ingest_many` -> raw + gate + curated | {first['rows']:,} | {first['seconds']:.2f} | "
          f"{rate(first['rows'], first['seconds'])} | {first['downloads']} batched download, "
          f"{args.symbols} x updated |")
    print(f"| (b) re-run (idempotent) | {again['curated']:,} | {again['seconds']:.2f} | "
          f"{rate(again['curated'], again['seconds'])} | rows = curated rows covered; {again['rows']} overlap rows "
          f"pulled in {again['downloads']} batched download, {args.symbols} x unchanged |")

if __name__ == "__main__":
    main()
