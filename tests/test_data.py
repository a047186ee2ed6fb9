"""Sources -> normalized schema, and the Great Expectations gate on real and corrupted data."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from ml.data.schema import BAR_COLUMNS, DataError, content_hash, normalize_bars, ohlcv_array
from ml.data.sources import load_bars, load_file, load_yfinance
from ml.data.validation import (
    GX_ROOT, SUITE_CLOSE_ONLY, SUITE_OHLCV, DataValidationError, require_valid, suite_definitions,
    validate_bars,
)
from tests.conftest import ROOT


def yfinance_frame(tickers: list[str], n: int = 300) -> pd.DataFrame:
    """Shaped like yfinance 1.x `download`: (field, ticker) MultiIndex columns, tz-aware index."""
    index = pd.DatetimeIndex(pd.bdate_range("2024-01-02", periods=n, tz="America/New_York"), name="Date")
    rng = np.random.default_rng(1)
    columns = {}
    for ticker in tickers:
        close = 50 * np.exp(np.cumsum(0.01 * rng.standard_normal(n)))
        columns.update({("Close", ticker): close, ("High", ticker): close * 1.01, ("Low", ticker): close * 0.99,
                        ("Open", ticker): close * 1.001, ("Volume", ticker): np.full(n, 1e6)})
    frame = pd.DataFrame(columns, index=index)
    frame.columns = pd.MultiIndex.from_tuples(frame.columns, names=["Price", "Ticker"])
    return frame


def test_yfinance_multiindex_frame_is_normalized(monkeypatch):
    import yfinance

    calls = []

    def fake_download(tickers, **kwargs):
        calls.append(kwargs)
        return yfinance_frame([tickers])

    monkeypatch.setattr(yfinance, "download", fake_download)
    bars = load_yfinance("MSFT", start="2024-01-01")
    assert list(bars.columns) == list(BAR_COLUMNS)
    assert str(bars["timestamp"].dt.tz) == "UTC"
    assert bars["symbol"].unique().tolist() == ["MSFT"]
    assert bars["source"].iloc[0] == "yfinance(auto_adjust=True)"
    assert calls[0]["auto_adjust"] is True and calls[0]["multi_level_index"] is True
    # New York midnight is 05:00 UTC: the timestamp is converted, not relabelled.
    assert bars["timestamp"].iloc[0] == pd.Timestamp("2024-01-02 05:00", tz="UTC")


def test_yfinance_retries_then_names_the_ticker(monkeypatch):
    import yfinance

    attempts = []

    def failing(*_args, **_kwargs):
        attempts.append(1)
        raise ConnectionError("reset by peer")

    monkeypatch.setattr(yfinance, "download", failing)
    with pytest.raises(DataError, match="'MSFT' failed after 3 attempts"):
        load_yfinance("MSFT", retries=3, backoff_seconds=0.0)
    assert len(attempts) == 3


def test_close_only_file_loads_with_missing_ohlv(shared_market):
    bars = load_file(shared_market / "KO.csv")
    assert bars["symbol"].iloc[0] == "KO"
    assert bars["open"].isna().all() and bars["close"].notna().all()
    ohlcv = ohlcv_array(bars)
    assert ohlcv.shape == (len(bars), 5)
    np.testing.assert_array_equal(ohlcv[:, 0], ohlcv[:, 3])  # close-only: open filled with close
    assert (ohlcv[:, 4] == 0).all()


def test_content_hash_ignores_ingestion_time_but_not_prices(gspc_bars):
    later = gspc_bars.assign(ingested_at=pd.Timestamp("2030-01-01", tz="UTC"))
    assert content_hash(later) == content_hash(gspc_bars)
    changed = gspc_bars.copy()
    changed.loc[10, "close"] += 0.01
    assert content_hash(changed) != content_hash(gspc_bars)


@pytest.mark.parametrize("content, message", [
    ("", "file is empty"),
    ("Date,Open\n2020-01-01,1\n", "missing required column 'close'"),
    ("Date,Close\n2020-01-01,abc\n2020-01-02,1\n", "column 'close' row 0 is not numeric"),
    ("Date,Close\nnot-a-date,1\n", "column 'timestamp' is not parseable"),
])
def test_unreadable_files_are_rejected_naming_file_and_rule(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_file(path)
    assert str(path) in str(info.value)


def test_every_shared_market_file_passes_the_gate(shared_market):
    files = sorted(shared_market.glob("*.csv"))
    assert len(files) == 12
    for path in files:
        result = validate_bars(load_file(path), str(path))
        assert result.success, result.describe()
        assert result.suite == (SUITE_OHLCV if path.stem in ("GSPC", "GOOG") else SUITE_CLOSE_ONLY)


def _corrupt(bars: pd.DataFrame, kind: str) -> pd.DataFrame:
    bars = bars.copy()
    if kind == "x100 glitch":
        bars.loc[500, ["open", "high", "low", "close"]] *= 100
    elif kind == "high below close":
        bars.loc[600, "high"] = bars.loc[600, "close"] * 0.9
    elif kind == "low above open":
        bars.loc[610, "low"] = bars.loc[610, "open"] * 1.1
    elif kind == "duplicate timestamp":
        bars.loc[700, "timestamp"] = bars.loc[699, "timestamp"]
    elif kind == "out of order":
        bars.loc[[800, 801], "timestamp"] = bars.loc[[801, 800], "timestamp"].to_numpy()
    elif kind == "negative price":
        bars.loc[900, ["open", "low", "close"]] = -1.0
    elif kind == "null close":
        bars.loc[950, "close"] = np.nan
    elif kind == "future bar":
        bars.loc[len(bars) - 1, "timestamp"] = pd.Timestamp.now(tz="UTC") + pd.Timedelta(days=30)
    elif kind == "gap":
        bars = bars.drop(index=range(1000, 1015)).reset_index(drop=True)
    elif kind == "stale prices":
        bars.loc[1100:1120, ["open", "high", "low", "close"]] = bars.loc[1100, "close"]
    elif kind == "negative volume":
        bars.loc[1200, "volume"] = -5
    elif kind == "null open":
        bars.loc[1300, "open"] = np.nan
    return bars


@pytest.mark.parametrize("kind, rule", [
    ("x100 glitch", "no abnormal one-bar jump"),
    ("high below close", "high >= close"),
    ("low above open", "open >= low"),
    ("duplicate timestamp", "timestamps unique"),
    ("out of order", "timestamps increasing"),
    ("negative price", "close strictly positive"),
    ("null close", "close not null"),
    ("future bar", "no timestamps in the future"),
    ("gap", "no gap longer than allowed"),
    ("stale prices", "no stale run of identical prices"),
    ("negative volume", "volume non-negative"),
    ("null open", "open not null"),
])
def test_each_corruption_is_rejected_by_its_rule(gspc_bars, kind, rule):
    result = validate_bars(_corrupt(gspc_bars, kind), f"GSPC[{kind}]")
    failed = {r.rule: r for r in result.failed}
    assert rule in failed, result.describe()
    assert failed[rule].examples, "a failed rule shows example rows"
    with pytest.raises(DataValidationError, match=rule):
        require_valid(_corrupt(gspc_bars, kind), f"GSPC[{kind}]")


def test_committed_suites_match_their_definitions():
    import great_expectations as gx

    gx.get_context(mode="ephemeral")  # serializing a suite needs an active context
    for name, suite in suite_definitions().items():
        committed = json.loads((GX_ROOT / "gx" / "expectations" / f"{name}.json").read_text())
        want = [(e["type"], e["kwargs"], e["meta"]) for e in suite.to_json_dict()["expectations"]]
        got = [(e["type"], e["kwargs"], e["meta"]) for e in committed["expectations"]]
        assert got == want, f"{name}: run `python -m ml data build-suites` and commit the result"


def test_cli_validate_exit_codes(tmp_path, gspc_bars, shared_market):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "ml", "data", "validate", *map(str, args)],
                              capture_output=True, text=True, cwd=ROOT)

    ok = run(shared_market / "GSPC.csv")
    assert ok.returncode == 0 and "PASSED" in ok.stdout

    bad = tmp_path / "glitch.csv"
    frame = _corrupt(gspc_bars, "x100 glitch")
    frame.rename(columns={"timestamp": "Date"}).to_csv(bad, index=False)
    failed = run(bad)
    assert failed.returncode == 1
    assert "no abnormal one-bar jump" in failed.stdout and "row" in failed.stdout

    junk = tmp_path / "junk.csv"
    junk.write_bytes(b"\x00\x01\x02garbage")
    rejected = run(junk)
    assert rejected.returncode == 2 and "Traceback" not in rejected.stderr
    assert str(junk) in rejected.stderr


def test_sample_source_filters_dates():
    bars = load_bars("sample", symbol="GSPC", start="2010-01-01", end="2011-01-01")
    assert bars["timestamp"].min() >= pd.Timestamp("2010-01-01", tz="UTC")
    assert bars["timestamp"].max() < pd.Timestamp("2011-01-01", tz="UTC")
    assert len(bars) == 252


def test_normalize_refuses_empty_frame():
    with pytest.raises(DataError, match="no rows"):
        normalize_bars(pd.DataFrame(), symbol="X", interval="1d", source="t", origin="empty.csv")


def test_wrong_column_types_are_refused_by_rule(gspc_bars):
    """Normalization coerces types, but a frame read from elsewhere (a curated file) may not be."""
    bad = gspc_bars.copy()
    bad["close"] = bad["close"].astype(str)
    bad["symbol"] = 7
    failed = {r.rule for r in validate_bars(bad, "typed").failed}
    assert {"close is float64", "symbol is a string"} <= failed
