"""Walk-forward folds in calendar terms: train, purge gap, validation, purge gap, test.

Each segment is an inclusive range of bar indices ``(first, last)``. Decisions
in a segment are made on bars ``first .. last - 1`` and the last fill lands
on ``last``, so a segment's rewards never read a bar beyond it. The gap
between segments (purge + embargo) is at least ``lookback + 1`` bars, so no
feature window of a later segment contains a bar an earlier one traded on.

``combinatorial_purged_splits`` offers combinatorial purged cross-validation on bar
indices, with the same purge and embargo; ``cpcv_folds`` lays its splits out for training
(``splits.method: cpcv``) and ``cpcv_paths`` recombines their test groups into backtest paths.
"""

from __future__ import annotations

import itertools
import math
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
    then ``embargo_bars``. ``cpcv_folds`` lays them out for training."""
    purge = _purge(lookback, config)
    return list(combinatorial_purged_splits(n_bars, n_groups, n_test_groups, purge, config.embargo_bars))


def _purge(lookback: int, config: SplitConfig) -> int:
    purge = config.purge_bars if config.purge_bars is not None else lookback + 1
    if purge < lookback + 1:
        raise ValueError(f"purge_bars {purge} is shorter than lookback + horizon ({lookback + 1})")
    return purge


def cpcv_paths(n_groups: int, n_test_groups: int) -> np.ndarray:
    """Which split's test result fills each group on each backtest path: [n_groups, n_paths] split indices.

    A group is tested by C(n_groups - 1, n_test_groups - 1) splits, and that is the number of paths:
    the k-th split (in split order) that tests group g fills group g on path k. This is skfolio's
    recombination (``CombinatorialPurgedCV.recombined_paths``), so each path covers every group,
    the whole history, once.
    """
    n_paths = math.comb(n_groups, n_test_groups) * n_test_groups // n_groups
    paths = np.empty((n_groups, n_paths), dtype=int)
    used = [0] * n_groups
    for index, chosen in enumerate(itertools.combinations(range(n_groups), n_test_groups)):
        for group in chosen:
            paths[group, used[group]] = index
            used[group] += 1
    return paths


@dataclass(frozen=True)
class CPCVFold:
    """One CPCV split laid out for training: inclusive bar ranges ``(first, last)``, as a ``Fold``'s.

    ``train`` is several segments (the train groups less the purges and embargoes around the test
    groups and the validation group); ``validation`` is the held-out group; ``test`` holds each test
    group's backtest segment, in group order.
    """
    index: int
    test_groups: tuple[int, ...]
    validation_group: int
    train: tuple[tuple[int, int], ...]
    validation: tuple[int, int]
    test: tuple[tuple[int, int], ...]

    def dates(self, timestamps: pd.Series) -> dict:
        def span(segment: tuple[int, int]) -> dict:
            return {"start": timestamps.iloc[segment[0]].isoformat(), "end": timestamps.iloc[segment[1]].isoformat(),
                    "first_bar": int(segment[0]), "last_bar": int(segment[1])}
        return {"train": [span(s) for s in self.train], "validation": span(self.validation),
                "test": [span(s) for s in self.test]}


def _runs(bars: np.ndarray) -> list[tuple[int, int]]:
    """Sorted bar indices as contiguous ``(first, last)`` runs."""
    breaks = np.flatnonzero(np.diff(bars) > 1)
    return [(int(a), int(b)) for a, b in zip(np.r_[bars[0], bars[breaks + 1]], np.r_[bars[breaks], bars[-1]])]


def cpcv_groups(n_bars: int, lookback: int, config: SplitConfig) -> list[tuple[int, int]]:
    """The ``config.n_groups`` consecutive groups CPCV cuts the usable bars into (from the first bar
    with a full feature window), sized as skfolio's: equal groups, the rest in the last one."""
    first_usable = lookback - 1
    size = (n_bars - first_usable) // config.n_groups
    if size < 2:
        raise ValueError(f"{n_bars - first_usable} usable bars cannot make {config.n_groups} groups (splits.n_groups)")
    starts = [first_usable + g * size for g in range(config.n_groups)]
    return [(start, end - 1) for start, end in zip(starts, starts[1:] + [n_bars])]


def cpcv_folds(n_bars: int, lookback: int, config: SplitConfig) -> list[CPCVFold]:
    """Every CPCV split of the usable bars (``config.n_groups`` groups, every choice of
    ``config.n_test_groups`` as test) as a training layout.

    - Train: the split's purged, embargoed train bars (``cpcv_splits``), less the validation group
      and a walk-forward gap (purge + embargo) on both sides of it, as contiguous segments; a
      segment of one bar offers no episode and is dropped. They must hold ``min_train_bars``.
    - Validation: the latest group that is not tested, less the purge and embargo that already
      separate it from the test groups. Checkpoints and seeds are selected there, so selection
      never reads a test bar, and the validation window sits next to the most recent training data
      as in a walk-forward fold.
    - Test: each test group, from its first bar to the next group's first bar (the last group: to
      the last bar), so the groups of a path tile the history with no bar return left out. The
      extra bar is the fill of the group's last decision; the purge after a test group covers it.
    """
    groups = cpcv_groups(n_bars, lookback, config)
    offset, gap = groups[0][0], _purge(lookback, config) + config.embargo_bars
    splits = cpcv_splits(n_bars - offset, lookback, config, config.n_groups, config.n_test_groups)
    folds = []
    for split in splits:
        train = split.train + offset
        held_out = max(g for g in range(config.n_groups) if g not in split.test_groups)
        first, last = groups[held_out]
        validation = train[(train >= first) & (train <= last)]
        if validation.size < 2:
            raise ValueError(f"cpcv split {split.index} keeps {validation.size} validation bar(s) in group {held_out}: "
                             f"purge + embargo ({gap}) eat groups of {last - first + 1} bars (splits.n_groups)")
        train = train[(train < validation[0] - gap) | (train > validation[-1] + gap)]
        segments = [(a, b) for a, b in (_runs(train) if train.size else []) if b > a]
        bars = sum(b - a + 1 for a, b in segments)
        if bars < config.min_train_bars:
            raise ValueError(f"cpcv split {split.index} (test groups {list(split.test_groups)}) would train on {bars} "
                             f"bars (min_train_bars={config.min_train_bars})")
        tests = tuple((groups[g][0], groups[g + 1][0] if g + 1 < len(groups) else groups[g][1])
                      for g in split.test_groups)
        folds.append(CPCVFold(index=split.index, test_groups=split.test_groups, validation_group=held_out,
                              train=tuple(segments), validation=(int(validation[0]), int(validation[-1])),
                              test=tests))
    return folds
