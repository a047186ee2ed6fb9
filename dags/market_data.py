"""
### Market data into the lake

Every weekday at 21:30 UTC (cron `30 21 * * 1-5`), after the New York close: for
each symbol, pull the bars after the last curated one (plus a few overlap bars,
to catch revisions), keep the pull as raw, run the Great Expectations gate on the
merged series, then update the curated partition, or quarantine the batch with
its validation result.

One mapped task per symbol (labelled by the symbol), so one failing ticker
never stops the others. A quarantined batch or bad input fails its task
without retry (the data will not fix itself; yfinance pulls already retry
with backoff); a lake/storage error fails it with retry.

Each symbol whose curated data changed emits an event on the Asset
`market_data_curated` with `{symbol, interval, hash, rows, lake_root}` in its
extra; unchanged symbols emit nothing. Consumers schedule on that Asset.

Defaults for scheduled runs come from the environment: `ML_LAKE_ROOT` (a
folder or `s3://bucket/prefix`, with `MLFLOW_S3_ENDPOINT_URL` or
`AWS_ENDPOINT_URL` for MinIO), `ML_MARKET_SOURCE` and `ML_MARKET_SYMBOLS`
(comma-separated).
"""

from __future__ import annotations

import logging

import os
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import Asset, AssetAlias, Param, dag, task

from ml.config import INTERVALS, SYMBOL_PATTERN  # imports no torch: parsing stays fast

MARKET_DATA_CURATED = Asset("market_data_curated")
# An Asset listed in outlets gets an event on every success; emitting through an
# alias instead lets the task update the Asset only when curated data changed.
CURATED_UPDATES = AssetAlias("market_data_curated_updates")

DEFAULT_SYMBOLS = [s.strip() for s in os.environ.get("ML_MARKET_SYMBOLS", "GSPC,KO").split(",") if s.strip()]
DEFAULT_SOURCE = os.environ.get("ML_MARKET_SOURCE", "sample")
# Same rule as ml.data.lake.default_root(), which cannot be imported at parse time.
DEFAULT_LAKE_ROOT = os.environ.get("ML_LAKE_ROOT") or str(Path(__file__).resolve().parents[1] / "lake")


def log_failure(context) -> None:
    """One line per failed symbol: which ingest, which run, which attempt, what broke."""
    ti = context["task_instance"]
    logging.getLogger(__name__).error(
        "market_data FAILED: task=%s map_index=%s run_id=%s try=%s error=%r",
        ti.task_id, getattr(ti, "map_index", -1), context["run_id"], ti.try_number, context.get("exception"))


@dag(
    dag_id="market_data",
    description="Weekdays 21:30 UTC (cron 30 21 * * 1-5), after the New York close: pull, gate, curate.",
    schedule="30 21 * * 1-5",  # 21:30 UTC: after the 16:00 New York close, summer and winter
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one writer per curated partition
    tags=["ml", "data"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=5), "retry_exponential_backoff": True,
                  "execution_timeout": timedelta(minutes=30), "on_failure_callback": log_failure},
    params={
        "symbols": Param(DEFAULT_SYMBOLS, type="array", minItems=1, uniqueItems=True,
                         items={"type": "string", "pattern": SYMBOL_PATTERN},
                         description="Tickers (yfinance) or sample names; one mapped task each."),
        "interval": Param("1d", enum=list(INTERVALS), description="Bar interval (yfinance spelling)."),
        "start": Param(None, type=["null", "string"], format="date",
                       description="First date of the first pull (YYYY-MM-DD); later pulls resume from the lake."),
        "source": Param(DEFAULT_SOURCE, enum=["sample", "file", "yfinance"],
                        description="Where bars come from: the bundled sample, CSV/parquet files, or yfinance."),
        "path": Param(None, type=["null", "string"],
                      description="source 'file': a folder of SYMBOL.csv/.parquet, or a path with '{symbol}'."),
        "lake_root": Param(DEFAULT_LAKE_ROOT, type="string", minLength=1,
                           description="Lake root: a folder or s3://bucket/prefix."),
        "calendar": Param("equity", enum=["equity", "crypto"],
                          description="Session calendar the gap rule counts in (crypto trades every day)."),
        "overlap_bars": Param(5, type="integer", allOf=[{"minimum": 1, "maximum": 500}], title="overlap_bars (1 to 500)",
                              description="Stored bars fetched again to catch revisions."),
    },
)
def market_data():
    @task
    def symbols(params=None) -> list[str]:
        return list(params["symbols"])

    @task(outlets=[CURATED_UPDATES], map_index_template="{{ task.op_kwargs['symbol'] }}")
    def ingest(symbol: str, params=None):
        from airflow.sdk import Metadata
        from airflow.sdk.exceptions import AirflowFailException

        from ml.config import ConfigError
        from ml.data.ingest import ingest_symbol
        from ml.orchestration import ingest_locations

        try:
            lake_root, path = ingest_locations(params)
        except ConfigError as error:  # a path outside the data roots will not fix itself: no retries
            raise AirflowFailException(str(error)) from None
        result = ingest_symbol(lake_root, symbol, params["interval"], params["source"],
                               start=params["start"], path=path, overlap_bars=params["overlap_bars"],
                               validation={"calendar": params["calendar"]})
        if result["status"] == "quarantined":
            raise AirflowFailException(f"{symbol}: batch quarantined at {result['quarantine']}\n{result['error']}")
        if result["status"] == "failed":
            if not result["retryable"]:
                raise AirflowFailException(f"{symbol}: {result['error']}")
            raise RuntimeError(f"{symbol}: {result['error']}")
        if result["status"] == "updated":
            yield Metadata(MARKET_DATA_CURATED, alias=CURATED_UPDATES, extra={
                key: result[key] for key in ("symbol", "interval", "curated_hash", "rows", "lake_root")})
        return result

    ingest.expand(symbol=symbols())


market_data()
