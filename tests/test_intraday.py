"""Hourly equity bars through the same path as daily ones: gate, features, calendar folds,
training, and metrics annualized by the session's bar count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml.config import config_from_dict
from ml.data.validation import validate_bars
from ml.evaluation.metrics import sharpe_ratio
from ml.evaluation.splits import walk_forward_folds
from ml.evaluation.walkforward import evaluate_fold, train_fold
from ml.market.series import prepare_series
from tests.test_data_intervals import bars_at, equity_hours

HOURLY_BARS_PER_YEAR = 252 * 7  # 09:30..15:30 New York, seven bars a session


@pytest.fixture(scope="module")
def hourly():
    bars = bars_at(equity_hours("2023-01-03", "2024-06-28", holidays=()), "1h")
    config = config_from_dict({
        "data": {"interval": "1h"},
        "ppo": {"total_timesteps": 2 * 64 * 32, "num_envs": 64, "num_steps": 32, "eval_every": 1,
                "progress": False},
        "splits": {"n_folds": 1, "test_months": 3, "validation_months": 3, "min_train_bars": 600},
    })
    return bars, config


def test_hourly_bars_train_and_report_with_intraday_annualization(hourly):
    bars, config = hourly
    assert validate_bars(bars, "SPY 1h").success
    series = prepare_series(bars, config.lookback, torch.device("cpu"))
    assert series.fill_at_open.tolist() == [True] and {"range_1", "volume_z_20"} <= set(series.feature_module.names)
    assert torch.isfinite(series.features[config.lookback - 1:]).all()

    (fold,) = walk_forward_folds(series.timestamps, config.lookback, config.splits)
    assert fold.train[1] < fold.validation[0] <= fold.validation[1] < fold.test[0]
    test_months = series.timestamps[fold.test[1]] - series.timestamps[fold.test[0]]
    assert 80 <= test_months.days <= 92  # three calendar months of sessions, not three months of bars
    result = train_fold(series, fold, config)
    report, test, _ = evaluate_fold(result.agent, series, fold, config)
    # Seven bars a session: 1764 bars a year, not 252 (daily) or 8760 (round the clock).
    assert report["policy"]["test"]["sharpe"] == pytest.approx(sharpe_ratio(test.nav, HOURLY_BARS_PER_YEAR))
    assert np.isfinite(report["policy"]["test"]["sharpe"])
