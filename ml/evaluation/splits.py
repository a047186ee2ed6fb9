"""Walk-forward folds in calendar terms: train, purge gap, validation, purge gap, test.

Each segment is an inclusive range of bar indices ``(first, last)``. Decisions
in a segment are made on bars ``first .. last - 1`` and the last fill lands
on ``last``, so a segment's rewards never read a bar beyond it. The gap
between segments (purge + embargo) is at least ``lookback + 1`` bars, so no
feature window of a later segment contains a bar an earlier one traded on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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
