"""yfinance at its boundary: Yahoo's history limits per interval, the batched download with
partial failures and rate limits, and `ingest_many` pulling all symbols in one batch."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml.data import sources
from ml.data.ingest import ingest_many
from ml.data.lake import Lake
from ml.data.schema import BAR_COLUMNS, DataError
from ml.data.sources import load_yfinance, load_yfinance_many, yahoo_window

NOW = pd.Timestamp("2026-11-20 15:00", tz="UTC")


def yf_frame(tickers: list[str], n: int = 260, start: str = "2024-01-02", nan: tuple[str, ...] = ()) -> pd.DataFrame:
    """Shaped like yfinance 1.x `download(..., group_by="column")`: (Price, Ticker) MultiIndex columns
    sorted by field, a tz-aware index; tickers in `nan` come back all-NaN, as yfinance returns a failed one."""
    index = pd.DatetimeIndex(pd.bdate_range(start, periods=n, tz="America/New_York"), name="Date")
    columns = {}
    for k, ticker in enumerate(tickers):
        close = (50 + 10 * k) * np.exp(np.cumsum(0.01 * np.random.default_rng(k).standard_normal(n)))
        volume = np.full(n, 1e6)
        if ticker in nan:
            close, volume = np.full(n, np.nan), np.full(n, np.nan)
        columns.update({("Close", ticker): close, ("High", ticker): close * 1.01, ("Low", ticker): close * 0.99,
                        ("Open", ticker): close * 1.001, ("Volume", ticker): volume})
    frame = pd.DataFrame(columns, index=index)
    frame.columns = pd.MultiIndex.from_tuples(frame.columns, names=["Price", "Ticker"])
    return frame.sort_index(axis=1, level=0)


@pytest.fixture
def no_sleep(monkeypatch) -> list[float]:
    """Backoff sleeps are recorded, not slept."""
    slept: list[float] = []
    monkeypatch.setattr(sources.time, "sleep", slept.append)
    return slept


class FakeDownload:
    """`yf.download` that serves `yf_frame` from `start` on, per call scripted by `script(call_no, tickers)`:
    return None for a normal answer, an exception to raise, or a set of tickers to leave out."""

    def __init__(self, script=lambda call, tickers: None, **frame_kwargs):
        self.calls: list[dict] = []
        self.script = script
        self.frame_kwargs = frame_kwargs

    def __call__(self, tickers, **kwargs):
        tickers = tickers if isinstance(tickers, list) else [tickers]
        self.calls.append({"tickers": list(tickers), **kwargs})
        action = self.script(len(self.calls), tickers)
        if isinstance(action, Exception):
            raise action
        frame = yf_frame([t for t in tickers if t not in (action or set())], **self.frame_kwargs)
        start = kwargs.get("start")
        return frame if start is None else frame[frame.index >= pd.Timestamp(start, tz="America/New_York")]


# History limits --------------------------------------------------------------------------------

@pytest.mark.parametrize("interval, days_back, limit", [
    ("5m", 61, "60 days"), ("15m", 90, "60 days"), ("90m", 61, "60 days"),
    ("1h", 731, "730 days"), ("60m", 800, "730 days"), ("1m", 31, "30 days"),
])
def test_a_start_older_than_yahoo_keeps_is_refused_naming_interval_limit_and_start(interval, days_back, limit):
    start = f"{NOW - pd.Timedelta(days=days_back):%Y-%m-%d}"
    with pytest.raises(DataError) as info:
        yahoo_window(interval, start, now=NOW)
    message = str(info.value)
    assert f"{interval} bars reach back only {limit}" in message and f"requested start {start}" in message


@pytest.mark.parametrize("interval, days_back", [("5m", 59), ("1h", 700), ("1m", 6), ("1d", 20000), ("1wk", 20000)])
def test_a_start_inside_the_limit_is_passed_through(interval, days_back):
    start = f"{NOW - pd.Timedelta(days=days_back):%Y-%m-%d}"
    assert yahoo_window(interval, start, now=NOW) == start


def test_1m_requests_longer_than_eight_days_are_refused():
    with pytest.raises(DataError, match="1m bars are served at most 8 days per request"):
        yahoo_window("1m", f"{NOW - pd.Timedelta(days=20):%Y-%m-%d}", now=NOW)
    end = f"{NOW - pd.Timedelta(days=12):%Y-%m-%d}"
    assert yahoo_window("1m", f"{NOW - pd.Timedelta(days=20):%Y-%m-%d}", end, now=NOW)  # 8 days, 20..12 back
    with pytest.raises(DataError, match="requested end .* is older"):
        yahoo_window("1m", None, f"{NOW - pd.Timedelta(days=45):%Y-%m-%d}", now=NOW)


def test_no_start_is_clamped_to_what_yahoo_serves_with_a_warning(caplog):
    caplog.set_level(logging.WARNING, logger="ml.data.sources")
    assert yahoo_window("5m", None, now=NOW) == "2026-09-22"  # whole days inside the last 60
    assert yahoo_window("1m", None, now=NOW) == "2026-11-13"  # one request: 8 days
    assert "no start given for 5m bars; Yahoo keeps 60 days" in caplog.text
    assert yahoo_window("1d", None, now=NOW) is None  # daily: yfinance's own default, no warning
    assert len(caplog.records) == 2
    with pytest.raises(DataError, match="unknown interval '4h'"):
        yahoo_window("4h", None, now=NOW)


def test_load_yfinance_refuses_an_impossible_start_without_downloading(monkeypatch):
    import yfinance

    fake = FakeDownload()
    monkeypatch.setattr(yfinance, "download", fake)
    with pytest.raises(DataError, match="5m bars reach back only 60 days"):
        load_yfinance("MSFT", interval="5m", start="2020-01-01")
    assert fake.calls == []


# Batched download -----------------------------------------------------------------------------

def test_one_batched_call_is_split_into_normalized_bars_per_ticker(monkeypatch, no_sleep):
    import yfinance

    fake = FakeDownload()
    monkeypatch.setattr(yfinance, "download", fake)
    out = load_yfinance_many(["MSFT", "AAPL", "MSFT", "KO"], start="2024-01-01")
    assert len(fake.calls) == 1
    call = fake.calls[0]
    assert call["tickers"] == ["MSFT", "AAPL", "KO"]  # deduplicated, order kept
    assert call["group_by"] == "column" and call["multi_level_index"] is True and call["auto_adjust"] is True
    assert list(out) == ["MSFT", "AAPL", "KO"]
    raw = yf_frame(["MSFT", "AAPL", "KO"])
    for symbol, bars in out.items():
        assert list(bars.columns) == list(BAR_COLUMNS) and len(bars) == 260
        assert bars["symbol"].unique().tolist() == [symbol]
        np.testing.assert_allclose(bars["close"].to_numpy(), raw[("Close", symbol)].to_numpy())
    assert no_sleep == []


def test_a_missing_or_all_nan_ticker_fails_alone_and_only_it_is_retried(monkeypatch, no_sleep):
    import yfinance

    # GONE never comes back; EMPTY comes back all-NaN (how yfinance returns a failed ticker).
    fake = FakeDownload(lambda call, tickers: {"GONE"})
    fake.frame_kwargs = {"nan": ("EMPTY",)}
    monkeypatch.setattr(yfinance, "download", fake)
    out = load_yfinance_many(["MSFT", "GONE", "EMPTY", "KO"], retries=3, backoff_seconds=0.5)
    assert isinstance(out["MSFT"], pd.DataFrame) and isinstance(out["KO"], pd.DataFrame)
    for symbol in ("GONE", "EMPTY"):
        assert isinstance(out[symbol], DataError)
        assert f"'{symbol}' failed after 3 attempts" in str(out[symbol])
    assert "no columns for ticker 'GONE'" in str(out["GONE"])
    assert [c["tickers"] for c in fake.calls] == [["MSFT", "GONE", "EMPTY", "KO"], ["GONE", "EMPTY"], ["GONE", "EMPTY"]]
    # Exponential backoff with jitter: base * 2**attempt * [1, 2).
    assert len(no_sleep) == 2 and 0.5 <= no_sleep[0] < 1.0 and 1.0 <= no_sleep[1] < 2.0


def test_a_ticker_yfinance_logs_as_delisted_is_not_retried(monkeypatch, no_sleep):
    import yfinance

    def script(call, tickers):
        # yfinance logs a failed ticker of a batch instead of raising.
        logging.getLogger("yfinance").error("['OLD']: YFTzMissingError('possibly delisted; no timezone found')")
        return {"OLD"}

    fake = FakeDownload(script)
    monkeypatch.setattr(yfinance, "download", fake)
    out = load_yfinance_many(["MSFT", "OLD"], retries=4, backoff_seconds=0)
    assert len(fake.calls) == 1 and isinstance(out["MSFT"], pd.DataFrame)
    assert "possibly delisted" in str(out["OLD"])


def test_bars_that_break_the_schema_fail_their_ticker_without_retries(monkeypatch, no_sleep):
    import yfinance

    def download(tickers, **kwargs):
        calls.append(tickers)
        frame = yf_frame(tickers).astype(object)
        frame.loc[frame.index[3], ("Close", "BAD")] = "n/a"
        return frame

    calls: list = []
    monkeypatch.setattr(yfinance, "download", download)
    out = load_yfinance_many(["MSFT", "BAD"])
    assert len(calls) == 1 and isinstance(out["MSFT"], pd.DataFrame)
    assert "column 'close' row 3 value 'n/a' is not numeric" in str(out["BAD"])


def test_a_rate_limit_error_is_retried_then_the_batch_succeeds(monkeypatch, no_sleep):
    import yfinance
    from yfinance.exceptions import YFRateLimitError

    fake = FakeDownload(lambda call, tickers: YFRateLimitError() if call == 1 else None)
    monkeypatch.setattr(yfinance, "download", fake)
    out = load_yfinance_many(["MSFT", "AAPL"], backoff_seconds=2.0)
    assert len(fake.calls) == 2 and fake.calls[1]["tickers"] == ["MSFT", "AAPL"]
    assert all(isinstance(bars, pd.DataFrame) and len(bars) == 260 for bars in out.values())
    assert len(no_sleep) == 1 and 2.0 <= no_sleep[0] < 4.0


def test_when_every_attempt_raises_each_symbol_gets_the_error(monkeypatch, no_sleep):
    import yfinance
    from yfinance.exceptions import YFRateLimitError

    fake = FakeDownload(lambda call, tickers: YFRateLimitError())
    monkeypatch.setattr(yfinance, "download", fake)
    out = load_yfinance_many(["MSFT", "AAPL"], retries=3, backoff_seconds=0)
    assert len(fake.calls) == 3
    for symbol in ("MSFT", "AAPL"):
        assert isinstance(out[symbol], DataError) and "Too Many Requests" in str(out[symbol])


def test_real_download_assembly_with_a_rate_limited_ticker(monkeypatch, no_sleep):
    """One level further in: yfinance's own `download` assembles the batch from `Ticker.history`,
    where a rate limit on one ticker becomes all-NaN columns and a log line, not an exception."""
    import yfinance
    from yfinance.exceptions import YFRateLimitError

    attempts: dict[str, int] = {}

    def history(self, period=None, interval="1d", start=None, end=None, **kwargs):
        attempts[self.ticker] = attempts.get(self.ticker, 0) + 1
        if self.ticker == "AAPL" and attempts["AAPL"] == 1:
            raise YFRateLimitError()
        index = pd.DatetimeIndex(pd.bdate_range("2024-01-02", periods=50, tz="America/New_York"), name="Date")
        close = np.linspace(100, 110, 50) * (2 if self.ticker == "AAPL" else 1)
        return pd.DataFrame({"Open": close, "High": close * 1.01, "Low": close * 0.99, "Close": close,
                             "Volume": np.full(50, 1e6)}, index=index)

    monkeypatch.setattr(yfinance.Ticker, "history", history)
    out = load_yfinance_many(["MSFT", "aapl"], start="2024-01-01", threads=False)
    assert attempts == {"MSFT": 1, "AAPL": 2}  # the retry asked for the rate-limited ticker only
    assert out["aapl"]["close"].iloc[0] == 200 and out["MSFT"]["close"].iloc[0] == 100
    # Daily bars come back tz-naive from yfinance (exchange dates): stored as midnight UTC.
    assert out["MSFT"]["timestamp"].iloc[0] == pd.Timestamp("2024-01-02", tz="UTC")


# ingest_many on yfinance -----------------------------------------------------------------------

def test_ingest_many_pulls_all_symbols_in_one_batched_download(tmp_path, monkeypatch, no_sleep):
    import yfinance

    fake = FakeDownload(lambda call, tickers: {"GONE"})
    monkeypatch.setattr(yfinance, "download", fake)
    first = {r["symbol"]: r for r in ingest_many(tmp_path, ["MSFT", "GONE", "KO"], source="yfinance",
                                                 start="2024-01-01")}
    assert fake.calls[0]["tickers"] == ["MSFT", "GONE", "KO"] and fake.calls[0]["start"] == "2024-01-01"
    assert {c["start"] for c in fake.calls} == {"2024-01-01"}  # the retries were of the batch, not per symbol
    assert all(c["tickers"] == ["GONE"] for c in fake.calls[1:])
    assert first["MSFT"]["status"] == first["KO"]["status"] == "updated"
    assert first["GONE"]["status"] == "failed" and first["GONE"]["retryable"] is False
    assert "no columns for ticker 'GONE'" in first["GONE"]["error"]

    fake.calls.clear()
    fake.script = lambda call, tickers: None
    again = {r["symbol"]: r for r in ingest_many(tmp_path, ["MSFT", "KO"], source="yfinance", overlap_bars=3)}
    resume = Lake(tmp_path).timestamps("MSFT", "1d").iloc[-3].strftime("%Y-%m-%d")
    assert [(c["tickers"], c["start"]) for c in fake.calls] == [(["MSFT", "KO"], resume)]
    assert again["MSFT"]["status"] == again["KO"]["status"] == "unchanged"


def test_ingest_many_reports_an_impossible_intraday_start_for_every_symbol(tmp_path, monkeypatch):
    import yfinance

    fake = FakeDownload()
    monkeypatch.setattr(yfinance, "download", fake)
    results = ingest_many(tmp_path, ["MSFT", "KO"], source="yfinance", interval="5m", start="2020-01-01")
    assert fake.calls == []
    assert [r["status"] for r in results] == ["failed", "failed"]
    assert all("5m bars reach back only 60 days" in r["error"] and not r["retryable"] for r in results)


# Symbols and files at the boundary ---------------------------------------------------------------

def test_a_symbol_that_walks_out_of_the_sample_folder_is_refused_before_any_file_is_read(tmp_path):
    """`symbol='../../../tmp/x/evil'` once loaded any CSV as the sample (and named a model after it)."""
    import os

    from tests.conftest import synthetic_bars

    evil = tmp_path / "evil"
    synthetic_bars(300).rename(columns={"timestamp": "Date", "close": "Close"})[["Date", "Close"]].to_csv(
        f"{evil}.csv", index=False)
    symbol = os.path.relpath(evil, sources.SAMPLE_DIR)
    assert (sources.SAMPLE_DIR / f"{symbol}.csv").resolve() == Path(f"{evil}.csv")  # the path would reach it
    for source, path in (("sample", None), ("file", f"{evil}.csv"), ("lake", str(tmp_path)),
                         ("yfinance", None)):
        with pytest.raises(DataError, match=r"must be a ticker") as refused:
            sources.load_bars(source, symbol=symbol, path=path)
        assert symbol[:40] in str(refused.value)
    with pytest.raises(DataError, match=r"must be a ticker"):
        sources.sample_path(symbol)
    with pytest.raises(DataError, match=r"must be a ticker"):
        sources.load_file(f"{evil}.csv", symbol="../evil")
    with pytest.raises(DataError, match=r"must be a ticker"):
        sources.load_lake("../x", root=str(tmp_path))


@pytest.mark.parametrize("symbol", ["GSPC", "^GSPC", "BRK-B", "BTC-USD", "EURUSD=X"])
def test_real_tickers_pass_the_sources_check(symbol):
    assert sources.check_symbol(symbol) == symbol
    if symbol == "GSPC":
        assert len(sources.load_bars("sample", symbol=symbol)) == 5031


def test_a_batched_download_leaves_out_a_name_that_is_no_ticker(monkeypatch, no_sleep):
    import yfinance

    fake = FakeDownload()
    monkeypatch.setattr(yfinance, "download", fake)
    out = load_yfinance_many(["MSFT", "../../etc/passwd", "KO"], start="2024-01-01")
    assert [c["tickers"] for c in fake.calls] == [["MSFT", "KO"]]
    assert isinstance(out["MSFT"], pd.DataFrame) and isinstance(out["KO"], pd.DataFrame)
    assert isinstance(out["../../etc/passwd"], DataError) and "must be a ticker" in str(out["../../etc/passwd"])
    assert isinstance(load_yfinance_many(["a b"])["a b"], DataError) and len(fake.calls) == 1  # no download at all


SECRET = "s3cr3t-Zq8-token"


@pytest.mark.parametrize("name, content", [
    ("shadow.csv", f"root:$6${SECRET}:20228:0:99999:7:::\ndaemon:*:20228:0:99999:7:::\n"),
    ("header.csv", f"{SECRET}\n1\n2\n"),
    ("os-release.csv", f'PRETTY_NAME="{SECRET}"\nNAME="Debian"\n'),
    ("cell.csv", f"Date,Close\n2020-01-01,1\n2020-01-02,{SECRET}\n"),
    ("date.csv", f"Date,Close\n2020-01-01,1\n{SECRET},2\n"),
    ("ragged.csv", f"a\n{SECRET},b,c\n"),
    ("binary.parquet", f"\x00\x01PK{SECRET}\x00" * 20),
])
def test_file_errors_name_the_file_and_rule_but_never_quote_it(tmp_path, name, content):
    import traceback

    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as refused:
        sources.load_file(path, symbol="X")
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert SECRET not in message and SECRET not in "".join(traceback.format_exception(refused.value))


def test_a_file_name_that_is_no_ticker_needs_an_explicit_symbol(tmp_path, gspc_bars):
    path = tmp_path / "my bars.csv"
    gspc_bars.tail(50).drop(columns="symbol").to_csv(path, index=False)
    with pytest.raises(DataError, match="file name 'my bars' is not a ticker"):
        sources.load_file(path)
    assert (sources.load_file(path, symbol="GSPC")["symbol"] == "GSPC").all()
    bad = tmp_path / "GSPC.csv"
    gspc_bars.tail(50).assign(symbol="../../x").to_csv(bad, index=False)
    with pytest.raises(DataError, match="column 'symbol' holds a value that is not a ticker") as refused:
        sources.load_file(bad)
    assert "../../x" not in str(refused.value)


@pytest.mark.parametrize("bad, good", [
    (["data", "validate", "bars.csv", "--symbol", "../../x"], ["data", "validate", "bars.csv", "--symbol", "BRK-B"]),
    (["data", "ingest", "GSPC", "../../../tmp/x/evil"], ["data", "ingest", "GSPC", "^GSPC", "EURUSD=X"]),
    (["pipeline", "--out", "runs/x", "--symbol", "a/b"], ["pipeline", "--out", "runs/x", "--symbol", "BTC-USD"]),
])
def test_the_cli_refuses_a_symbol_that_is_no_ticker_before_running(bad, good, capsys):
    from ml.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(bad)
    assert exited.value.code == 2 and "must be a ticker" in capsys.readouterr().err
    assert build_parser().parse_args(good).run is not None
