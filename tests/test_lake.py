"""The market-data lake on local disk and on a real S3 endpoint (moto_server on loopback),
incremental ingestion, and the `market_data` DAG's structure."""

from __future__ import annotations

import ast
import copy
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml.data.ingest import ingest_many, ingest_symbol, pull_incremental
from ml.data.lake import Lake, LakeConflictError
from ml.data.schema import DataError, content_hash
from ml.data.sources import load_lake
from ml.data.validation import DataValidationError
from tests.conftest import ROOT, synthetic_bars
from tests.servers import moto_s3

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "market-lake"
GLITCH_RULE = "no abnormal one-bar jump"


# S3 endpoint and lake roots ----------------------------------------------------------------

@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3 HTTP endpoint: `moto_server` on a free loopback port, with one bucket."""
    import boto3

    with moto_s3(tmp_path_factory.mktemp("moto") / "moto.log") as url:
        boto3.client("s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield url


@pytest.fixture(params=["local", "s3"])
def lake_root(request, tmp_path, monkeypatch) -> str:
    """The same tests on a folder and on s3://bucket/<fresh prefix> (endpoint from the environment)."""
    if request.param == "local":
        return str(tmp_path / "lake")
    endpoint = request.getfixturevalue("s3_endpoint")
    for key, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/lake"


# Fake feeds ------------------------------------------------------------------------------------

def make_bars(symbol: str, n: int = 250, seed: int = 0) -> pd.DataFrame:
    return synthetic_bars(n=n, seed=seed, start="2024-01-02").assign(symbol=symbol)


class FakeFeed:
    """Serves `bars` from the requested start date on; records every request and what it served."""

    def __init__(self, bars: pd.DataFrame):
        self.bars = bars
        self.starts: list[str | None] = []
        self.served: list[pd.DataFrame] = []

    def __call__(self, *, symbol, interval, start=None, end=None) -> pd.DataFrame:
        self.starts.append(start)
        bars = self.bars if start is None else self.bars[self.bars["timestamp"] >= pd.Timestamp(start, tz="UTC")]
        bars = bars.assign(ingested_at=pd.Timestamp.now(tz="UTC")).reset_index(drop=True)
        self.served.append(bars)
        return bars


def glitch(bars: pd.DataFrame, row: int) -> pd.DataFrame:
    """The classic bad tick: one bar's prices x100."""
    bars = bars.copy()
    bars.loc[row, ["open", "high", "low", "close"]] *= 100
    return bars


def fail_writes(monkeypatch, lake_root: str, suffix: str, error: Exception) -> None:
    """Every store write to a key ending in `suffix` raises `error`, on whichever backend the lake uses."""
    store_type = type(Lake(lake_root)._store)
    real = store_type.write

    def write(self, key, data, *args, **kwargs):
        if key.endswith(suffix):
            raise error
        return real(self, key, data, *args, **kwargs)

    monkeypatch.setattr(store_type, "write", write)


def copy_bytes(lake: Lake, symbol: str) -> bytes:
    """`bars.parquet`, the copy of the current version that parquet dataset readers see."""
    return lake._store.read(f"curated/interval=1d/symbol={symbol}/bars.parquet")[0]


def version_bytes(lake: Lake, symbol: str, digest: str) -> bytes:
    return lake._store.read(f"curated/interval=1d/symbol={symbol}/_versions/{digest}.parquet")[0]


# Lake behaviour, on both backends ----------------------------------------------------------------

def test_raw_is_kept_as_pulled_and_curated_holds_the_validated_series(lake_root):
    bars = make_bars("AAA", 200)
    feed = FakeFeed(bars)
    out = ingest_symbol(lake_root, "AAA", "1d", feed)
    assert out["status"] == "updated" and out["rows_added"] == 200, out
    json.dumps(out)  # the DAG passes it through XCom

    lake = Lake(lake_root)
    pd.testing.assert_frame_equal(lake.read_raw("AAA", "1d", out["pull_id"]), feed.served[0])
    curated, digest = lake.snapshot("AAA", "1d")
    assert digest == out["curated_hash"] == content_hash(bars)
    assert len(curated) == 200 and curated["timestamp"].is_unique
    assert lake.quarantined("AAA", "1d") == [] and lake.symbols("1d") == ["AAA"]
    # Every curated version stays readable by its content hash.
    assert lake.snapshot("AAA", "1d", version=digest)[1] == digest
    assert lake.manifest("AAA", "1d")["current"]["hash"] == digest
    # What training reads (a future `source: lake`): the curated series, optionally cut by date.
    pd.testing.assert_frame_equal(load_lake("AAA", root=lake_root), curated)
    assert len(load_lake("AAA", root=lake_root, start=str(bars["timestamp"].iloc[150].date()))) == 50
    if not lake_root.startswith("s3://"):
        assert not list(Path(lake_root).rglob("*.tmp"))


def test_corrupted_batch_is_quarantined_and_curated_is_untouched(lake_root):
    bars = make_bars("AAA", 230)
    feed = FakeFeed(bars.iloc[:200])
    ingest_symbol(lake_root, "AAA", "1d", feed)
    lake = Lake(lake_root)
    before = lake.snapshot("AAA", "1d")[1]

    feed.bars = glitch(bars, 215)
    with pytest.raises(DataValidationError, match=GLITCH_RULE) as info:
        pull_incremental(lake, "AAA", "1d", feed, pull_id="glitch-1")
    assert info.value.location.endswith("quarantine/interval=1d/symbol=AAA/glitch-1")

    assert lake.snapshot("AAA", "1d")[1] == before
    assert len(lake.read_curated("AAA", "1d")) == 200
    assert lake.quarantined("AAA", "1d") == ["glitch-1"]
    batch, report = lake.read_quarantine("AAA", "1d", "glitch-1")
    assert len(batch) == 35  # 5 overlap bars + 30 new, as pulled
    assert report["failed_rules"] == [GLITCH_RULE] and report["curated_hash"] == before
    assert report["validation"]["success"] is False
    failed = [r for r in report["validation"]["rules"] if not r["success"]]
    assert failed[0]["examples"], "the quarantine record shows the offending rows"
    assert len(lake.raw_pulls("AAA", "1d")) == 2  # the bad pull is kept raw too


def test_a_quarantined_batch_gets_a_readable_html_report_beside_its_validation_json(lake_root):
    bars = make_bars("AAA", 230)
    feed = FakeFeed(bars.iloc[:200])
    ingest_symbol(lake_root, "AAA", "1d", feed)
    feed.bars = glitch(bars, 215)
    out = ingest_symbol(lake_root, "AAA", "1d", feed, pull_id="glitch-1")
    assert out["status"] == "quarantined" and out["report"] == out["quarantine"] + "/validation.html"

    lake = Lake(lake_root)
    key = "quarantine/interval=1d/symbol=AAA/glitch-1/validation.html"
    page = lake._store.read(key)[0].decode()
    _, report = lake.read_quarantine("AAA", "1d", "glitch-1")
    rules = report["validation"]["rules"]
    failed = [r for r in rules if not r["success"]]
    assert f"1 of {len(rules)} rules failed" in page
    assert page.count('<tr class="failed">') == 1 and page.count('<tr class="passed">') == len(rules) - 1
    # The failed rule with its count and the offending rows (the x100 bar and the one after it).
    row = page[page.index('<tr class="failed">'):page.index('<tr class="passed">')]
    assert GLITCH_RULE in row and "FAIL" in row and f"<td>{failed[0]['unexpected_count']}</td>" in row
    assert all(example["timestamp"] in row for example in failed[0]["examples"])
    assert report["curated_hash"] in page and "glitch-1" in page
    assert "<script" not in page and "<link" not in page and "src=" not in page  # one self-contained file
    assert lake.quarantined("AAA", "1d") == ["glitch-1"]
    if lake_root.startswith("s3://"):
        head = lake._store._s3.head_object(Bucket=lake._store.bucket, Key=lake._store._key(key))
        assert head["ContentType"].startswith("text/html")  # a browser renders it from the bucket
    else:
        assert Path(out["report"]).is_file() and Path(out["quarantine"], "validation.json").is_file()


def test_the_html_report_escapes_what_it_shows():
    from ml.data.report import render_validation_html

    page = render_validation_html({"pull_id": "p<1>", "validation": {"origin": "<b>x</b>", "suite": "s", "rules": [
        {"rule": "a <script>", "success": False, "unexpected_count": 2,
         "examples": [{"row": 1, "timestamp": "t", "close": "<img src=x>"}]}]}})
    assert "<script>" not in page and "<img" not in page and "<b>x" not in page
    assert "a &lt;script&gt;" in page and "&lt;img src=x&gt;" in page and "p&lt;1&gt;" in page


def test_incremental_pull_fetches_only_after_the_last_bar_and_reruns_change_nothing(lake_root):
    bars = make_bars("AAA", 230)
    feed = FakeFeed(bars.iloc[:200])
    first = ingest_symbol(lake_root, "AAA", "1d", feed, start="2024-01-01")
    assert feed.starts == ["2024-01-01"] and first["rows_added"] == 200

    feed.bars = bars.iloc[:220]
    second = ingest_symbol(lake_root, "AAA", "1d", feed, overlap_bars=5)
    overlap_start = bars["timestamp"].iloc[195]  # the 5th-last stored bar
    assert feed.starts[1] == overlap_start.strftime("%Y-%m-%d")
    assert second["rows_pulled"] == 25 and second["rows_added"] == 20 and second["rows_revised"] == 0
    assert second["curated_hash"] == content_hash(bars.iloc[:220])

    again = ingest_symbol(lake_root, "AAA", "1d", feed, overlap_bars=5)
    assert again["status"] == "unchanged" and again["rows_added"] == 0
    assert again["curated_hash"] == second["curated_hash"]
    curated = Lake(lake_root).read_curated("AAA", "1d")
    assert len(curated) == 220 and curated["timestamp"].is_unique
    assert len(Lake(lake_root).manifest("AAA", "1d")["history"]) == 2


def test_revised_bars_in_the_overlap_replace_stored_values(lake_root):
    bars = make_bars("AAA", 200)
    feed = FakeFeed(bars)
    ingest_symbol(lake_root, "AAA", "1d", feed)

    revised = bars.copy()
    revised.loc[198, "close"] *= 1.002
    revised.loc[198, "high"] = max(revised.loc[198, "high"], revised.loc[198, "close"])
    revised.loc[100, "volume"] += 1  # older than the overlap: not fetched again
    feed.bars = revised
    out = ingest_symbol(lake_root, "AAA", "1d", feed, overlap_bars=5)
    assert out["status"] == "updated" and out["rows_revised"] == 1 and out["rows_added"] == 0, out

    curated, digest = Lake(lake_root).snapshot("AAA", "1d")
    assert len(curated) == 200 and curated["timestamp"].is_unique
    assert curated.loc[198, "close"] == revised.loc[198, "close"]
    assert curated.loc[100, "volume"] == bars.loc[100, "volume"]
    assert digest == out["curated_hash"] != out["previous_hash"]


def test_one_failing_symbol_does_not_affect_another(lake_root):
    feeds = {"GOOD": FakeFeed(make_bars("GOOD", 200, seed=1)),
             "BAD": FakeFeed(glitch(make_bars("BAD", 200, seed=2), 150))}

    def feed(*, symbol, **kwargs):
        if symbol == "DOWN":
            raise ConnectionError("connection reset by peer")
        return feeds[symbol](symbol=symbol, **kwargs)

    results = {r["symbol"]: r for r in ingest_many(lake_root, ["BAD", "DOWN", "GOOD"], source=feed)}
    json.dumps(results)
    assert results["BAD"]["status"] == "quarantined" and results["BAD"]["failed_rules"] == [GLITCH_RULE]
    assert results["DOWN"]["status"] == "failed" and results["DOWN"]["retryable"] is True
    assert "connection reset" in results["DOWN"]["error"]
    assert results["GOOD"]["status"] == "updated"

    lake = Lake(lake_root)
    assert lake.symbols("1d") == ["GOOD"]
    assert lake.snapshot("GOOD", "1d")[1] == content_hash(make_bars("GOOD", 200, seed=1))
    with pytest.raises(DataError, match="no curated data for BAD"):
        lake.read_curated("BAD", "1d")
    assert len(lake.quarantined("BAD", "1d")) == 1


def test_writes_are_create_only_or_compare_and_swap(lake_root):
    lake = Lake(lake_root)
    store = lake._store
    store.write("scratch/x.bin", b"first", expect=None)
    with pytest.raises(LakeConflictError):
        store.write("scratch/x.bin", b"second", expect=None)  # create-only never overwrites
    data, token = store.read("scratch/x.bin")
    store.write("scratch/x.bin", b"second", expect=token)
    with pytest.raises(LakeConflictError):
        store.write("scratch/x.bin", b"third", expect=token)  # a stale read loses
    assert store.read("scratch/x.bin")[0] == b"second"

    bars = make_bars("AAA", 20)
    key = lake.write_raw(bars, "pull-1")
    assert lake.write_raw(bars, "pull-1") == key  # the same pull again is a no-op
    with pytest.raises(LakeConflictError, match="pull id reused"):
        lake.write_raw(glitch(bars, 5), "pull-1")


def test_an_interrupted_manifest_swap_is_finished_by_the_retry(lake_root, monkeypatch):
    bars = make_bars("AAA", 220)
    feed = FakeFeed(bars.iloc[:200])
    old = ingest_symbol(lake_root, "AAA", "1d", feed)["curated_hash"]
    new = content_hash(bars)

    feed.bars = bars
    with monkeypatch.context() as patch:  # the new version is stored, then the manifest write is lost
        fail_writes(patch, lake_root, "symbol=AAA/_manifest.json", ConnectionError("connection reset by peer"))
        failed = ingest_symbol(lake_root, "AAA", "1d", feed)
    assert failed["status"] == "failed" and failed["retryable"] is True, failed
    assert "connection reset" in failed["error"]

    # Readers still see the old series whole: bars, manifest, resume point and copy agree.
    lake = Lake(lake_root)
    assert lake.snapshot("AAA", "1d", version=new)[1] == new  # stored, but not current
    assert lake.manifest("AAA", "1d")["current"]["hash"] == old
    assert lake.snapshot("AAA", "1d")[1] == old and len(lake.read_curated("AAA", "1d")) == 200
    assert len(lake.timestamps("AAA", "1d")) == 200
    assert copy_bytes(lake, "AAA") == version_bytes(lake, "AAA", old)

    retry = ingest_symbol(lake_root, "AAA", "1d", feed)
    # What the market_data DAG emits the asset event on: status `updated` with the new hash and rows.
    assert retry["status"] == "updated", retry
    assert retry["curated_hash"] == new and retry["previous_hash"] == old
    assert retry["rows"] == 220 and retry["rows_added"] == 20
    manifest = lake.manifest("AAA", "1d")
    assert manifest["current"]["hash"] == new and [e["hash"] for e in manifest["history"]] == [old, new]
    curated = lake.read_curated("AAA", "1d")
    assert len(curated) == 220 and content_hash(curated) == new
    # The version stored by the interrupted run is the one published, and the copy is derived from it.
    assert copy_bytes(lake, "AAA") == version_bytes(lake, "AAA", new)
    assert ingest_symbol(lake_root, "AAA", "1d", feed)["status"] == "unchanged"


def test_a_failed_copy_refresh_keeps_the_update_and_the_next_pull_repairs_it(lake_root, monkeypatch):
    bars = make_bars("AAA", 220)
    feed = FakeFeed(bars.iloc[:200])
    old = ingest_symbol(lake_root, "AAA", "1d", feed)["curated_hash"]

    feed.bars = bars
    with monkeypatch.context() as patch:
        fail_writes(patch, lake_root, "symbol=AAA/bars.parquet", OSError("disk full"))
        out = ingest_symbol(lake_root, "AAA", "1d", feed)
    # The manifest swap is the update: it stands, and the asset event goes out.
    assert out["status"] == "updated" and out["curated_hash"] == content_hash(bars), out
    lake = Lake(lake_root)
    assert lake.snapshot("AAA", "1d")[1] == out["curated_hash"]
    assert copy_bytes(lake, "AAA") == version_bytes(lake, "AAA", old)  # lags, never leads

    again = ingest_symbol(lake_root, "AAA", "1d", feed)
    assert again["status"] == "unchanged"
    assert copy_bytes(lake, "AAA") == version_bytes(lake, "AAA", out["curated_hash"])
    if not lake_root.startswith("s3://"):  # the dataset reader of the whole zone sees the new series
        zone = pd.read_parquet(Path(lake_root) / "curated", partitioning=None)
        assert len(zone) == 220


def test_a_writer_that_lost_the_manifest_swap_drops_nothing_and_its_retry_merges(lake_root, monkeypatch):
    bars = make_bars("AAA", 230)
    Lake(lake_root).curate(bars.iloc[:200])
    slow, fast = Lake(lake_root), Lake(lake_root)
    real = slow._store.write

    def write(key, data, *args, **kwargs):
        if key.endswith("/_manifest.json"):  # another writer swaps between this one's read and its swap
            fast.curate(bars.iloc[195:210])
        return real(key, data, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(slow._store, "write", write)
        with pytest.raises(LakeConflictError):
            slow.curate(bars.iloc[195:220])
    lake = Lake(lake_root)
    assert lake.snapshot("AAA", "1d")[1] == content_hash(bars.iloc[:210])
    assert copy_bytes(lake, "AAA") == version_bytes(lake, "AAA", content_hash(bars.iloc[:210]))

    retry = slow.curate(bars.iloc[195:220])
    assert retry.status == "updated" and retry.rows_added == 10
    assert retry.previous_hash == content_hash(bars.iloc[:210])
    assert lake.snapshot("AAA", "1d")[1] == content_hash(bars.iloc[:220])
    assert [e["hash"] for e in lake.manifest("AAA", "1d")["history"]] == [
        content_hash(bars.iloc[:n]) for n in (200, 210, 220)]
    assert copy_bytes(lake, "AAA") == version_bytes(lake, "AAA", content_hash(bars.iloc[:220]))


def test_a_damaged_manifest_is_refused_in_one_line(lake_root):
    feed = FakeFeed(make_bars("AAA", 200))
    ingest_symbol(lake_root, "AAA", "1d", feed)
    lake = Lake(lake_root)
    lake._store.write("curated/interval=1d/symbol=AAA/_manifest.json", b'{"current": "secret-junk"')
    with pytest.raises(DataError, match="_manifest.json: not a lake manifest") as info:
        lake.read_curated("AAA", "1d")
    assert "secret-junk" not in str(info.value) and "\n" not in str(info.value)
    out = ingest_symbol(lake_root, "AAA", "1d", feed)
    assert out["status"] == "failed" and out["retryable"] is False and "not a lake manifest" in out["error"]


# Local specifics -------------------------------------------------------------------------------

def test_a_crash_during_the_manifest_swap_leaves_the_old_series(tmp_path, monkeypatch):
    root = tmp_path / "lake"
    bars = make_bars("AAA", 220)
    feed = FakeFeed(bars.iloc[:200])
    ingest_symbol(root, "AAA", "1d", feed)
    before = Lake(root).snapshot("AAA", "1d")[1]

    def crash(src, dst):
        if str(dst).endswith("_manifest.json"):
            raise OSError("disk full")
        return real_replace(src, dst)

    real_replace = os.replace
    monkeypatch.setattr(os, "replace", crash)
    feed.bars = bars
    out = ingest_symbol(root, "AAA", "1d", feed)
    assert out["status"] == "failed" and "disk full" in out["error"]
    monkeypatch.undo()
    assert Lake(root).snapshot("AAA", "1d")[1] == before
    assert not list(root.rglob("*.tmp"))
    assert len(Lake(root).read_curated("AAA", "1d")) == 200
    retry = ingest_symbol(root, "AAA", "1d", feed)  # the next run catches up
    assert retry["status"] == "updated" and retry["rows_added"] == 20


def yfinance_download(calls: list, n: int = 260):
    """Shaped like yfinance 1.x `download`; serves bars from `start` on and records the call."""
    index = pd.DatetimeIndex(pd.bdate_range("2024-01-02", periods=n, tz="America/New_York"), name="Date")
    close = 50 * np.exp(np.cumsum(0.01 * np.random.default_rng(3).standard_normal(n)))

    def download(ticker, **kwargs):
        calls.append(kwargs)
        frame = pd.DataFrame({("Close", ticker): close, ("High", ticker): close * 1.01,
                              ("Low", ticker): close * 0.99, ("Open", ticker): close * 1.001,
                              ("Volume", ticker): np.full(n, 1e6)}, index=index)
        frame.columns = pd.MultiIndex.from_tuples(frame.columns, names=["Price", "Ticker"])
        start = pd.Timestamp(kwargs["start"], tz="America/New_York") if kwargs.get("start") else None
        return frame if start is None else frame[frame.index >= start]

    return download


def test_yfinance_pulls_resume_from_the_lake(tmp_path, monkeypatch):
    import yfinance

    calls: list[dict] = []
    monkeypatch.setattr(yfinance, "download", yfinance_download(calls))
    first = ingest_symbol(tmp_path, "MSFT", "1d", "yfinance", start="2024-01-01")
    assert first["status"] == "updated" and calls[0]["start"] == "2024-01-01"
    last = Lake(tmp_path).timestamps("MSFT", "1d")
    again = ingest_symbol(tmp_path, "MSFT", "1d", "yfinance", overlap_bars=3)
    assert calls[1]["start"] == last.iloc[-3].strftime("%Y-%m-%d")
    assert again["status"] == "unchanged" and again["rows_pulled"] == 3


# The DAG ---------------------------------------------------------------------------------------

def test_market_data_dag_parses_with_one_mapped_task_per_symbol(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{tmp_path}/airflow.db")
    from airflow.dag_processing.dagbag import BundleDagBag
    from airflow.sdk import AssetAlias
    from airflow.sdk.exceptions import ParamValidationError

    bag = BundleDagBag(dag_folder=str(ROOT / "dags"), bundle_path=ROOT / "dags", bundle_name="dags-folder")
    assert bag.import_errors == {}
    dag = bag.dags["market_data"]
    assert dag.catchup is False and dag.schedule == "30 21 * * 1-5"
    ingest = dag.get_task("ingest")
    assert ingest.is_mapped and "symbol" in ingest.map_index_template
    assert [type(o) for o in ingest.outlets] == [AssetAlias]
    dag.params.validate()
    for key, bad in (("symbols", []), ("symbols", ["a/b"]), ("start", "2024-13-01"), ("source", "ftp")):
        with pytest.raises(ParamValidationError, match=key):
            copy.deepcopy(dag.params)[key] = bad

    # Parsing imports nothing heavy: only the tasks import the rest of `ml` (pandas, GX, boto3), when
    # they run. The one `ml` module allowed at the top is ml.config, the light bottom layer (the intervals).
    tree = ast.parse((ROOT / "dags" / "market_data.py").read_text())
    top_level = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top_level |= {node.module if node.module.split(".")[0] == "ml" else node.module.split(".")[0]
                  for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert top_level <= {"__future__", "logging", "os", "datetime", "pathlib", "pendulum", "airflow",
                         "ml.config"}, top_level
    code = (
        "import sys, runpy\n"
        f"runpy.run_path(r'{ROOT / 'dags' / 'market_data.py'}')\n"
        "heavy = [m for m in ('pandas', 'great_expectations', 'boto3', 'torch', 'ml.data') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    parsed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert parsed.returncode == 0, parsed.stderr[-2000:]
    assert parsed.stdout.strip().splitlines()[-1] == "[]"
