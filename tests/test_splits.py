"""By default the walk-forward test windows cover the history: back to back from the earliest date that
leaves enough training data to the last bar, each fold still purged and embargoed."""

from __future__ import annotations

import pandas as pd
import pytest

from ml.config import SplitConfig
from ml.evaluation.splits import walk_forward_folds

LOOKBACK = 64


def test_default_folds_cover_twenty_years_of_daily_bars(gspc_bars):
    folds = walk_forward_folds(gspc_bars["timestamp"], LOOKBACK, SplitConfig())
    stamps = gspc_bars["timestamp"]
    assert len(folds) >= 15  # 1999-2018: one test year per fold after the first training years
    assert [f.index for f in folds] == list(range(len(folds)))
    assert folds[-1].test[1] == len(stamps) - 1
    for earlier, later in zip(folds, folds[1:]):
        assert later.test[0] == earlier.test[1] + 1  # back to back: every test bar is tested once
    gap = LOOKBACK + 1 + SplitConfig().embargo_bars
    for fold in folds:
        assert fold.train[1] - fold.train[0] + 1 >= SplitConfig().min_train_bars
        assert fold.validation[0] - fold.train[1] == gap and fold.test[0] - fold.validation[1] == gap
        assert 240 <= fold.test[1] - fold.test[0] + 1 <= 262  # a calendar year of sessions
    # One more fold would not leave min_train_bars of training before its validation window.
    with pytest.raises(ValueError, match=f"not enough data for {len(folds) + 1} fold"):
        walk_forward_folds(stamps, LOOKBACK, SplitConfig(n_folds=len(folds) + 1))


def test_a_fixed_count_takes_the_most_recent_folds(gspc_bars):
    every = walk_forward_folds(gspc_bars["timestamp"], LOOKBACK, SplitConfig())
    recent = walk_forward_folds(gspc_bars["timestamp"], LOOKBACK, SplitConfig(n_folds=2))
    assert [(f.train, f.validation, f.test) for f in recent] == [(f.train, f.validation, f.test) for f in every[-2:]]


def test_a_series_too_short_for_one_fold_is_refused_by_name():
    stamps = pd.Series(pd.bdate_range("2020-01-01", periods=400, tz="UTC"))
    with pytest.raises(ValueError, match="not enough data for any fold"):
        walk_forward_folds(stamps, LOOKBACK, SplitConfig())
