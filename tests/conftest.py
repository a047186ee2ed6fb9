from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_MARKET = ROOT.parent / "shared" / "data" / "market"


@pytest.fixture(autouse=True)
def _isolated_mlflow(monkeypatch):
    """No test writes to a developer's MLflow store by accident."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # As scripts/env.sh and the compose file run it: no download bars in the captured logs.
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session")
def shared_market() -> Path:
    """The real market files that sit beside the project checkout (../shared/data/market).

    They are the workplace's shared data set: twelve Yahoo Finance series (full
    OHLCV and close-only). Tests that prove real data passes the gate read them.
    """
    if not SHARED_MARKET.is_dir():
        pytest.fail(
            f"{SHARED_MARKET} is missing: these tests check real market files that live in "
            "../shared/data/market beside the checkout. Put that folder back (or clone the "
            "project next to it) to run them."
        )
    return SHARED_MARKET


@pytest.fixture(scope="session")
def gspc_bars() -> pd.DataFrame:
    from ml.data.sources import load_sample

    return load_sample("GSPC")


@pytest.fixture(scope="session")
def ko_bars() -> pd.DataFrame:
    from ml.data.sources import load_sample

    return load_sample("KO")


def synthetic_bars(n: int = 800, drift: float = 0.0005, vol: float = 0.01, seed: int = 0,
                   start: str = "2015-01-02") -> pd.DataFrame:
    """A realistic-looking OHLCV random walk in the normalized schema."""
    from ml.data.schema import normalize_bars

    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(drift + vol * rng.standard_normal(n)))
    open_ = close * np.exp(0.3 * vol * rng.standard_normal(n))
    high = np.maximum(open_, close) * (1 + np.abs(vol * rng.standard_normal(n)))
    low = np.minimum(open_, close) * (1 - np.abs(vol * rng.standard_normal(n)))
    frame = pd.DataFrame({
        "Date": pd.bdate_range(start, periods=n), "Open": open_, "High": high, "Low": low,
        "Close": close, "Volume": rng.integers(1_000_000, 5_000_000, n).astype(float),
    })
    return normalize_bars(frame, symbol="SYN", interval="1d", source="test", origin="synthetic")
