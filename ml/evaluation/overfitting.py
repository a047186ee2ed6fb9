"""Was the selection fooled by noise? Probability of backtest overfitting, and Hansen's SPA test.

A *trial* is one candidate the selection looked at: every checkpoint scored on
validation, for every seed. ``probability_of_backtest_overfitting`` takes their
per-bar validation returns side by side, ``[bars, trials]``, and asks how often
the trial that looks best on one half of the bars is below the median on the
other half. ``spa_test`` asks whether any baseline beats the selected policy
once data snooping over the baselines is accounted for.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import numpy as np
from arch.bootstrap import SPA
from scipy.stats import rankdata

# Same threshold as metrics.sharpe_ratio: below it a series counts as flat (Sharpe 0).
_ZERO_STD = 1e-12
# C(16, 8) = 12,870 splits; the paper's own examples use 16 blocks.
MAX_BLOCKS = 16


def sharpe(returns: np.ndarray) -> np.ndarray:
    """Per-bar Sharpe of each column of ``returns`` [bars, trials]: mean / std (ddof=1), 0 when flat.

    Not annualized: CSCV compares trials on the same bars, so only the order matters.
    """
    returns = np.asarray(returns, dtype="float64")
    std = returns.std(axis=0, ddof=1)
    flat = std <= _ZERO_STD
    return np.where(flat, 0.0, returns.mean(axis=0) / np.where(flat, 1.0, std))


def _matrix(returns_matrix) -> np.ndarray:
    values = np.asarray(returns_matrix, dtype="float64")
    if values.ndim != 2:
        raise ValueError(f"returns_matrix must be two-dimensional [bars, trials], got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("returns_matrix contains NaN or infinite values")
    return values


def probability_of_backtest_overfitting(returns_matrix, n_blocks: int = 8,
                                        metric: Callable[[np.ndarray], np.ndarray] = sharpe) -> dict:
    """Probability of backtest overfitting by combinatorially symmetric cross-validation (CSCV).

    Bailey, Borwein, López de Prado and Zhu (2017), "The probability of backtest overfitting".
    ``returns_matrix`` is [bars, trials]: the per-bar returns of each trial on the same bars.

    1. The bars are cut into ``n_blocks`` (even) consecutive blocks of ``bars // n_blocks`` bars;
       the oldest ``bars % n_blocks`` bars are left out so the blocks are equal.
    2. For each of the C(n_blocks, n_blocks/2) ways to choose half the blocks as in-sample (the
       rest, out-of-sample), kept in time order: score every trial on each half with ``metric``
       (a function of a [bars, trials] array returning one score per trial, higher is better;
       default per-bar Sharpe), take the in-sample best (the first on ties), and its relative
       rank out-of-sample w = rank / (trials + 1), rank 1 = worst (ties share their average rank).
    3. logit = ln(w / (1 - w)). A logit <= 0 means the in-sample winner was at or below the
       out-of-sample median. Trials with identical returns tie at the median, so a set of
       identical trials (say, every checkpoint made the same decisions) gives PBO 1.

    PBO is the share of logits <= 0: near 0 when what wins in-sample keeps winning, near 0.5
    when the trials are all noise (winning in-sample says nothing), above 0.5 when winning
    in-sample predicts losing out-of-sample.

    Returns ``{"pbo", "n_trials", "n_blocks", "n_combinations", "bars_per_block", "logits"}``,
    the logits in the order of ``itertools.combinations(range(n_blocks), n_blocks // 2)`` of
    the in-sample blocks.
    """
    values = _matrix(returns_matrix)
    n_bars, n_trials = values.shape
    if isinstance(n_blocks, bool) or int(n_blocks) != n_blocks or n_blocks < 2 or n_blocks % 2:
        raise ValueError(f"n_blocks must be an even whole number >= 2, got {n_blocks}")
    n_blocks = int(n_blocks)
    if n_blocks > MAX_BLOCKS:
        raise ValueError(f"n_blocks must be at most {MAX_BLOCKS} (C({n_blocks}, {n_blocks // 2}) splits), "
                         f"got {n_blocks}")
    if n_trials < 2:
        raise ValueError(f"need at least 2 trials (columns) to speak of selection, got {n_trials}")
    block = n_bars // n_blocks
    if block * (n_blocks // 2) < 2:
        raise ValueError(f"{n_bars} bars in {n_blocks} blocks leave fewer than 2 bars per half: "
                         "use fewer blocks or more bars")
    blocks = values[n_bars - block * n_blocks:].reshape(n_blocks, block, n_trials)

    logits = []
    for chosen in itertools.combinations(range(n_blocks), n_blocks // 2):
        in_sample = np.zeros(n_blocks, dtype=bool)
        in_sample[list(chosen)] = True
        score_in = np.asarray(metric(blocks[in_sample].reshape(-1, n_trials)), dtype="float64")
        score_out = np.asarray(metric(blocks[~in_sample].reshape(-1, n_trials)), dtype="float64")
        if score_in.shape != (n_trials,) or score_out.shape != (n_trials,):
            raise ValueError(f"metric must return one score per trial ({n_trials}), got shape {score_in.shape}")
        if not (np.isfinite(score_in).all() and np.isfinite(score_out).all()):
            raise ValueError("metric returned NaN or infinite scores")
        best = int(np.argmax(score_in))
        w = rankdata(score_out)[best] / (n_trials + 1)
        logits.append(math.log(w / (1.0 - w)))
    return {"pbo": float(np.mean(np.asarray(logits) <= 0.0)), "n_trials": n_trials, "n_blocks": n_blocks,
            "n_combinations": len(logits), "bars_per_block": block, "logits": logits}


def spa_test(policy_returns, baseline_returns: dict[str, np.ndarray], seed: int = 0, reps: int = 1000,
             block_size: int | None = None) -> dict:
    """Hansen's (2005) test for superior predictive ability, with the policy as the benchmark.

    Losses are negated per-bar returns. The null hypothesis is that *no baseline beats the
    policy*: no baseline's expected loss is below the policy's (its expected return above).
    A **small p-value rejects it: some baseline does better than the policy**. A large p-value
    says no baseline is shown to beat the policy; it is not proof that the policy beats them.
    arch compares the largest mean loss differential (baseline return minus policy return) with
    its bootstrap distribution, so a policy far ahead of every baseline gets a consistent p-value
    of about 0.5 or more and an upper one near 1, never a small one.

    Runs ``arch.bootstrap.SPA`` (stationary bootstrap, ``reps`` resamples, mean block length
    ``block_size`` or arch's default) on the bars the series share; the same ``seed`` gives the
    same p-values. ``p_value`` is Hansen's consistent p-value; ``p_value_lower`` and
    ``p_value_upper`` bound it (the upper one is White's reality check).

    Returns ``{"p_value", "p_value_lower", "p_value_upper", "benchmark": "policy", "models",
    "reps", "n_bars"}``, ``models`` the baseline names in the order given.
    """
    policy = np.asarray(policy_returns, dtype="float64")
    if policy.ndim != 1 or policy.size < 3:
        raise ValueError(f"policy_returns must be one-dimensional with at least 3 bars, got shape {policy.shape}")
    if not baseline_returns:
        raise ValueError("baseline_returns is empty: the test needs at least one baseline")
    models = list(baseline_returns)
    columns = []
    for name in models:
        series = np.asarray(baseline_returns[name], dtype="float64")
        if series.shape != policy.shape:
            raise ValueError(f"baseline '{name}' has shape {series.shape}, the policy {policy.shape}: "
                             "they must cover the same bars")
        columns.append(series)
    baselines = np.column_stack(columns)
    if not (np.isfinite(policy).all() and np.isfinite(baselines).all()):
        raise ValueError("policy or baseline returns contain NaN or infinite values")
    if int(reps) != reps or reps < 1:
        raise ValueError(f"reps must be a positive whole number, got {reps}")
    spa = SPA(-policy, -baselines, block_size=block_size, reps=int(reps), bootstrap="stationary",
              seed=seed)
    spa.compute()
    p = spa.pvalues
    return {"p_value": float(p["consistent"]), "p_value_lower": float(p["lower"]),
            "p_value_upper": float(p["upper"]), "benchmark": "policy", "models": models,
            "reps": int(reps), "n_bars": int(policy.size)}
