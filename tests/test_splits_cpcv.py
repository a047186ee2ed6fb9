"""Combinatorial purged cross-validation: the same splits as skfolio's CombinatorialPurgedCV, purged
and embargoed as stated, and its config switch checked on load."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skfolio.model_selection import CombinatorialPurgedCV

from ml.config import SplitConfig
from ml.evaluation.splits import combinatorial_purged_splits, cpcv_splits


@pytest.mark.parametrize("n_bars, n_groups, n_test_groups, purge, embargo", [
    (100, 6, 2, 3, 2),
    (103, 5, 3, 0, 0),   # 3 bars left over go to the last group
    (57, 4, 2, 4, 1),
    (500, 10, 4, 20, 5),
    (12, 3, 2, 1, 0),    # skfolio's docstring example
])
def test_same_splits_as_skfolio(n_bars, n_groups, n_test_groups, purge, embargo):
    reference = CombinatorialPurgedCV(n_folds=n_groups, n_test_folds=n_test_groups, purged_size=purge,
                                      embargo_size=embargo)
    theirs = list(reference.split(np.zeros((n_bars, 1))))
    ours = list(combinatorial_purged_splits(n_bars, n_groups, n_test_groups, purge, embargo))
    assert len(ours) == len(theirs) == math.comb(n_groups, n_test_groups)
    for split, (train, tests) in zip(ours, theirs):
        np.testing.assert_array_equal(split.train, train)
        assert len(split.test) == len(tests) == n_test_groups
        for group, test in zip(split.test, tests):
            np.testing.assert_array_equal(group, test)
    assert [s.test_groups for s in ours] == [tuple(row) for row in reference.test_set_index]


def test_train_bars_keep_the_purge_before_and_purge_plus_embargo_after_each_test_stretch():
    purge, embargo = 7, 3
    for split in combinatorial_purged_splits(300, 6, 2, purge, embargo):
        test = np.concatenate(split.test)
        assert np.intersect1d(split.train, test).size == 0
        for bar in split.train:
            later = test[test > bar]
            earlier = test[test < bar]
            assert later.size == 0 or later.min() - bar > purge
            assert earlier.size == 0 or bar - earlier.max() > purge + embargo
        # Nothing else is dropped: the train set is every other bar.
        outside = np.setdiff1d(np.arange(300), test)
        dropped = np.setdiff1d(outside, split.train)
        assert all(np.abs(test - bar).min() <= purge + embargo for bar in dropped)


def test_single_test_group_is_purged_k_fold():
    splits = list(combinatorial_purged_splits(40, 4, 1, purge_bars=2, embargo_bars=1))
    assert [s.test_groups for s in splits] == [(0,), (1,), (2,), (3,)]
    np.testing.assert_array_equal(splits[1].test[0], np.arange(10, 20))
    np.testing.assert_array_equal(splits[1].train, np.r_[0:8, 23:40])


def test_config_splits_purge_as_the_walk_forward_folds():
    splits = cpcv_splits(400, lookback=10, config=SplitConfig(embargo_bars=4), n_groups=5, n_test_groups=2)
    reference = CombinatorialPurgedCV(n_folds=5, n_test_folds=2, purged_size=11, embargo_size=4)
    for split, (train, _) in zip(splits, reference.split(np.zeros((400, 1)))):
        np.testing.assert_array_equal(split.train, train)
    with pytest.raises(ValueError, match="shorter than lookback"):
        cpcv_splits(400, lookback=10, config=SplitConfig(purge_bars=5))


@pytest.mark.parametrize("args, message", [
    ((100, 6, 6), "n_test_groups \\(6\\) must be below n_groups \\(6\\)"),
    ((100, 1, 1), "n_groups must be a whole number >= 2"),
    ((100, 6, 2, -1), "purge_bars must be a whole number >= 0"),
    ((4, 6, 2), "4 bars cannot make 6 groups"),
    ((30, 3, 2, 6, 5), "keeps no train bars"),
])
def test_unusable_splits_are_refused_in_one_line(args, message):
    with pytest.raises(ValueError, match=message):
        list(combinatorial_purged_splits(*args))
