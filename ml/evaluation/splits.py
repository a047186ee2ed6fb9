"""Walk-forward folds in calendar terms: train, purge gap, validation, purge gap, test.

Each segment is an inclusive range of bar indices ``(first, last)``. Decisions
in a segment are made on bars ``first .. last - 1`` and the last fill lands
on ``last``, so a segment's rewards never read a bar beyond it. The gap
between segments (purge + embargo) is at least ``lookback + 1`` bars, so no
feature window of a later segment contains a bar an earlier one traded on.

``combinatorial_purged_splits`` offers combinatorial purged cross-validation
(``splits.method: cpcv``) on bar indices, with the same purge and embargo.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import pandas as pd

from ml.config import SplitConfig


@dataclass(frozen=True)
class Fold:
    index: int
    train: tuple[int, int]
    validation: tuple[int, int]
    test: tuple[int, int]

    def dates(self, timestamps: pd.Series) -> dict[str, dict[str, str]]:
        def span(segment: tuple[int, int]) -> dict[str, str]:
            return {"start": timestamps.iloc[segment[0]].isoformat(),
                    "end": timestamps.iloc[segment[1]].isoformat(),
                    "first_bar": segment[0], "last_bar": segment[1]}
        return {"train": span(self.train), "validation": span(self.validation), "test": span(self.test)}

    def as_dict(self) -> dict:
        return asdict(self)


def _months_back(timestamps: pd.Series, last: int, months: int) -> int:
    """First bar index inside the ``months`` calendar months that end at bar ``last``."""
    boundary = timestamps.iloc[last] - pd.DateOffset(months=months)
    first = int(timestamps.searchsorted(boundary, side="right"))
    return min(first, last)


def walk_forward_folds(timestamps: pd.Series, lookback: int, config: SplitConfig = SplitConfig()) -> list[Fold]:
    """Folds laid out backwards from the last bar, test windows back to back, the most recent fold last.

    ``config.n_folds`` None lays out every fold that fits: test windows cover the history from
    the earliest date that still leaves ``min_train_bars`` of training (and a validation window)
    to the end of the series. A number asks for exactly that many recent folds.
    """
    timestamps = pd.Series(pd.to_datetime(timestamps)).reset_index(drop=True)
    purge = config.purge_bars if config.purge_bars is not None else lookback + 1
    if purge < lookback + 1:
        raise ValueError(f"purge_bars {purge} is shorter than lookback + horizon ({lookback + 1})")
    gap = purge + config.embargo_bars
    first_usable = lookback - 1  # first bar with a full feature window
    wanted = config.n_folds
    folds: list[Fold] = []
    test_last = len(timestamps) - 1
    while wanted is None or len(folds) < wanted:
        fold, problem = _fold_ending_at(timestamps, test_last, first_usable, gap, config)
        if problem:
            if wanted is None and folds:  # every fold that fits is laid out
                break
            count = "any" if wanted is None else str(wanted)
            raise ValueError(f"not enough data for {count} fold(s): fold {len(folds)} {problem}")
        folds.append(fold)
        test_last = fold.test[0] - 1
    folds.reverse()
    return [Fold(index=i, train=f.train, validation=f.validation, test=f.test) for i, f in enumerate(folds)]


def _fold_ending_at(timestamps: pd.Series, test_last: int, first_usable: int, gap: int,
                    config: SplitConfig) -> tuple[Fold | None, str]:
    """The fold whose test window ends at ``test_last``, or why it does not fit."""
    test_first = _months_back(timestamps, test_last, config.test_months)
    val_last = test_first - gap
    if val_last <= first_usable:
        return None, "has no room for validation"
    val_first = _months_back(timestamps, val_last, config.validation_months)
    train_last = val_first - gap
    train_first = first_usable
    if config.train_months is not None:
        train_first = max(first_usable, _months_back(timestamps, train_last, config.train_months))
    if train_last - train_first + 1 < config.min_train_bars:
        return None, (f"would train on {max(0, train_last - train_first + 1)} bars "
                      f"(min_train_bars={config.min_train_bars})")
    return Fold(index=0, train=(train_first, train_last), validation=(val_first, val_last),
                test=(test_first, test_last)), ""


# Combinatorial purged cross-validation -------------------------------------------------------

@dataclass(frozen=True)
class CPCVSplit:
    """One CPCV split: the test groups, the purged train bars, and the test bars group by group."""
    index: int
    test_groups: tuple[int, ...]
    train: np.ndarray
    test: tuple[np.ndarray, ...]


def combinatorial_purged_splits(n_bars: int, n_groups: int = 6, n_test_groups: int = 2, purge_bars: int = 0,
                                embargo_bars: int = 0) -> Iterator[CPCVSplit]:
    """Combinatorial purged cross-validation (López de Prado, *Advances in Financial Machine
    Learning*, 2018, ch. 12): every choice of ``n_test_groups`` of ``n_groups`` groups as test.

    The bars 0 .. n_bars - 1 are cut into ``n_groups`` consecutive groups: the first
    ``n_groups - 1`` hold ``n_bars // n_groups`` bars each and the last group the rest (as
    skfolio's ``CombinatorialPurgedCV``). The splits come in the order of
    ``itertools.combinations(range(n_groups), n_test_groups)``; each split's train bars are
    every bar outside its test groups, less

    - the purge: ``purge_bars`` bars on both sides of each contiguous test stretch, whose
      feature windows or fills would overlap the test bars, and
    - the embargo: ``embargo_bars`` more bars after each test stretch, against serial
      correlation leaking test outcomes into training.

    Test groups that touch form one stretch, with no purge between them. With the walk-forward
    folds' convention, ``purge_bars`` is at least lookback + 1 (see ``cpcv_splits``). The
    ``C(n_groups, n_test_groups)`` splits recombine into ``n_test_groups / n_groups * C(...)``
    full backtest paths. Every split must keep some train bars.
    """
    for name, value, low in (("n_bars", n_bars, 1), ("n_groups", n_groups, 2), ("n_test_groups", n_test_groups, 1),
                             ("purge_bars", purge_bars, 0), ("embargo_bars", embargo_bars, 0)):
        if isinstance(value, bool) or int(value) != value or value < low:
            raise ValueError(f"{name} must be a whole number >= {low}, got {value}")
    if n_test_groups >= n_groups:
        raise ValueError(f"n_test_groups ({n_test_groups}) must be below n_groups ({n_groups})")
    size = n_bars // n_groups
    if size < 1:
        raise ValueError(f"{n_bars} bars cannot make {n_groups} groups")
    group_of = np.minimum(np.arange(n_bars) // size, n_groups - 1)
    groups = [np.flatnonzero(group_of == g) for g in range(n_groups)]
    for index, chosen in enumerate(itertools.combinations(range(n_groups), n_test_groups)):
        is_test = np.isin(group_of, chosen)
        keep = ~is_test
        # Starts and ends of contiguous test stretches: where is_test switches on / off.
        edges = np.diff(is_test.astype(np.int8))
        for first in np.flatnonzero(edges == 1) + 1:
            keep[max(0, first - purge_bars):first] = False
        for last in np.flatnonzero(edges == -1):
            keep[last + 1:last + 1 + purge_bars + embargo_bars] = False
        train = np.flatnonzero(keep)
        if train.size == 0:
            raise ValueError(f"split {index} (test groups {list(chosen)}) keeps no train bars: purge_bars + "
                             f"embargo_bars ({purge_bars + embargo_bars}) eat groups of {size} bars")
        yield CPCVSplit(index=index, test_groups=tuple(chosen), train=train,
                        test=tuple(groups[g] for g in chosen))


def cpcv_splits(n_bars: int, lookback: int, config: SplitConfig = SplitConfig(), n_groups: int = 6,
                n_test_groups: int = 2) -> list[CPCVSplit]:
    """CPCV splits of ``n_bars`` into ``n_groups`` groups, every choice of ``n_test_groups`` as test,
    purged and embargoed as the walk-forward folds are: purge ``purge_bars`` (default lookback + 1),
    then ``embargo_bars``. The pipeline trains on walk-forward folds; these splits are for analysis."""
    purge = config.purge_bars if config.purge_bars is not None else lookback + 1
    if purge < lookback + 1:
        raise ValueError(f"purge_bars {purge} is shorter than lookback + horizon ({lookback + 1})")
    return list(combinatorial_purged_splits(n_bars, n_groups, n_test_groups, purge, config.embargo_bars))
