"""How far to trust a performance number: bootstrap intervals, probabilistic and deflated Sharpe.

Units matter here. ``sharpe_ci`` works on an equity curve and reports the
*annualized* Sharpe of ``ml.evaluation.metrics``. The probabilistic and
deflated Sharpe ratios take *per-bar* returns and use the *per-bar*
(non-annualized) Sharpe, mean / std(ddof=1), inside their formulas; any
benchmark or trial variance passed to them must be per-bar too (divide an
annualized Sharpe by sqrt(bars per year), an annualized variance by bars per
year). Both return a probability in [0, 1].

As in ``metrics``, NaN input is refused and a zero-variance series has a
Sharpe of 0; its estimate then has no spread, so intervals collapse to a
point and PSR/DSR become 0 or 1.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy.stats import norm

from ml.evaluation.metrics import bar_returns, sharpe_ratio, total_return

# Fewest per-bar returns accepted: std(ddof=1), skewness and kurtosis all need
# at least three values to say anything. Real test folds hold hundreds.
MIN_RETURNS = 3
# Same threshold as metrics.sharpe_ratio: below it the series counts as flat.
_ZERO_STD = 1e-12
EULER_MASCHERONI = 0.5772156649015329
# Resamples drawn per batch, to bound memory on long intraday series.
_BATCH = 256


def _returns(returns, what: str = "returns") -> np.ndarray:
    values = np.asarray(returns, dtype="float64")
    if values.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    if values.size < MIN_RETURNS:
        raise ValueError(f"need at least {MIN_RETURNS} per-bar {what}, got {values.size}")
    return values


def _nav(returns: np.ndarray) -> np.ndarray:
    """Equity curve starting at 1.0 from per-bar returns (inverse of bar_returns)."""
    return np.concatenate(([1.0], np.cumprod(1.0 + returns)))


# Block bootstrap ----------------------------------------------------------------------------

def default_block_length(n: int) -> int:
    """n ** (1/3), the usual rate for block bootstraps of a mean-like statistic."""
    return max(1, round(n ** (1.0 / 3.0)))


def _resample_indices(rng: np.random.Generator, n: int, block_length: int, size: int,
                      method: str) -> np.ndarray:
    """``size`` rows of ``n`` indices into the series, drawn in blocks that wrap around the end."""
    positions = np.arange(n)
    if method == "circular":
        # Fixed-length blocks starting anywhere, glued together and cut to n.
        n_blocks = -(-n // block_length)
        starts = rng.integers(0, n, size=(size, n_blocks))
        blocks = starts[:, :, None] + np.arange(block_length)
        return blocks.reshape(size, -1)[:, :n] % n
    # Stationary (Politis & Romano): a new block starts on each bar with probability
    # 1 / block_length, so block lengths are geometric and the resample stays stationary.
    new_block = rng.random((size, n)) < 1.0 / block_length
    new_block[:, 0] = True
    starts = rng.integers(0, n, size=(size, n))
    block_first = np.maximum.accumulate(np.where(new_block, positions, 0), axis=1)
    offset = positions - block_first
    return (np.take_along_axis(starts, block_first, axis=1) + offset) % n


def block_bootstrap_ci(returns, statistic: Callable[[np.ndarray], float], block_length: int | None = None,
                       n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0,
                       method: str = "stationary") -> tuple[float, float]:
    """Percentile interval of ``statistic(returns)`` under a block bootstrap.

    Resampling blocks of consecutive bars, rather than single bars, keeps
    the serial dependence (volatility clustering, trends) that i.i.d.
    resampling would destroy and that would make the interval too narrow.
    ``block_length`` is the mean block length for ``method="stationary"``
    and the fixed one for ``method="circular"``; default ``n ** (1/3)``.
    The same ``seed`` gives the same interval.
    """
    values = _returns(returns)
    n = values.size
    if method not in ("stationary", "circular"):
        raise ValueError(f"unknown bootstrap method '{method}' (expected stationary or circular)")
    block_length = default_block_length(n) if block_length is None else int(block_length)
    if not 1 <= block_length <= n:
        raise ValueError(f"block_length must be between 1 and the {n} returns, got {block_length}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")

    rng = np.random.default_rng(seed)
    estimates = np.empty(n_resamples)
    for first in range(0, n_resamples, _BATCH):
        size = min(_BATCH, n_resamples - first)
        for row, indices in enumerate(_resample_indices(rng, n, block_length, size, method)):
            estimates[first + row] = statistic(values[indices])
    if not np.isfinite(estimates).all():
        raise ValueError("the statistic returned NaN or infinite values on some resamples")
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(estimates, [tail, 1.0 - tail])
    return float(low), float(high)


def sharpe_ci(nav, ppy: float, block_length: int | None = None, n_resamples: int = 2000,
              confidence: float = 0.95, seed: int = 0, method: str = "stationary") -> tuple[float, float]:
    """Bootstrap interval of the annualized Sharpe (metrics.sharpe_ratio) of an equity curve."""
    return block_bootstrap_ci(bar_returns(nav), lambda r: sharpe_ratio(_nav(r), ppy), block_length,
                              n_resamples, confidence, seed, method)


def total_return_ci(nav, block_length: int | None = None, n_resamples: int = 2000,
                    confidence: float = 0.95, seed: int = 0, method: str = "stationary") -> tuple[float, float]:
    """Bootstrap interval of the total return (metrics.total_return) of an equity curve."""
    return block_bootstrap_ci(bar_returns(nav), lambda r: total_return(_nav(r)), block_length,
                              n_resamples, confidence, seed, method)


def sharpe_difference_bound(nav, reference_nav, ppy: float, confidence: float = 0.9,
                            block_length: int | None = None, n_resamples: int = 2000,
                            seed: int = 0) -> tuple[float, float]:
    """Annualized Sharpe of ``nav`` minus that of ``reference_nav`` over the same bars, and the
    one-sided lower bound of that difference at ``confidence`` under a paired block bootstrap.

    Both curves are resampled with the same blocks of bars, so what they share (the market they
    both traded) cancels out of the spread and only their difference is uncertain.
    """
    returns, reference = _returns(bar_returns(nav)), _returns(bar_returns(reference_nav), "reference returns")
    if returns.size != reference.size:
        raise ValueError(f"the curves cover {returns.size} and {reference.size} bars: they must cover the same bars")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    n = returns.size
    block_length = default_block_length(n) if block_length is None else int(block_length)
    rng = np.random.default_rng(seed)
    differences = np.empty(n_resamples)
    for first in range(0, n_resamples, _BATCH):
        size = min(_BATCH, n_resamples - first)
        for row, indices in enumerate(_resample_indices(rng, n, block_length, size, "stationary")):
            differences[first + row] = (sharpe_ratio(_nav(returns[indices]), ppy)
                                        - sharpe_ratio(_nav(reference[indices]), ppy))
    point = sharpe_ratio(np.asarray(nav, dtype="float64"), ppy) - sharpe_ratio(np.asarray(reference_nav, dtype="float64"), ppy)
    return float(point), float(np.quantile(differences, 1.0 - confidence))


# Probabilistic and deflated Sharpe ------------------------------------------------------------

def _moments(values: np.ndarray) -> tuple[float, float, float]:
    """Per-bar Sharpe (ddof=1, as in metrics), skewness and kurtosis (normal = 3).

    Skewness and kurtosis use population moments, as Bailey & Lopez de Prado
    do; with them 1 - skew*SR + (kurt-1)/4*SR^2 can never be negative.
    Returns (0, 0, 3) for a flat series rather than dividing by zero.
    """
    std = values.std(ddof=1)
    if std <= _ZERO_STD:
        return 0.0, 0.0, 3.0
    centered = values - values.mean()
    population_std = math.sqrt(np.mean(centered ** 2))
    skew = float(np.mean(centered ** 3) / population_std ** 3)
    kurt = float(np.mean(centered ** 4) / population_std ** 4)
    return float(values.mean() / std), skew, kurt


def probabilistic_sharpe_ratio(returns, benchmark_sharpe: float = 0.0) -> float:
    """Probability that the true per-bar Sharpe exceeds ``benchmark_sharpe`` (Bailey & Lopez de Prado 2012).

    PSR = Phi((SR - SR*) * sqrt(n - 1) / sqrt(1 - skew*SR + (kurt - 1)/4 * SR^2))

    with SR the per-bar Sharpe of ``returns`` (mean / std, ddof=1), n the
    number of returns, skew and kurt (normal = 3) of the per-bar returns,
    and SR* = ``benchmark_sharpe``, per bar too. Fat tails and negative skew
    widen the Sharpe's standard error and so lower the PSR.
    """
    values = _returns(returns)
    if not math.isfinite(benchmark_sharpe):
        raise ValueError(f"benchmark_sharpe must be finite, got {benchmark_sharpe}")
    sharpe, skew, kurt = _moments(values)
    variance_term = 1.0 - skew * sharpe + (kurt - 1.0) / 4.0 * sharpe ** 2
    if values.std(ddof=1) <= _ZERO_STD or variance_term <= _ZERO_STD:
        # The estimate has no spread: it either exceeds the benchmark or it does not.
        return 1.0 if sharpe > benchmark_sharpe else 0.0
    z = (sharpe - benchmark_sharpe) * math.sqrt(values.size - 1) / math.sqrt(variance_term)
    return float(norm.cdf(z))


def expected_max_sharpe(n_trials: int, trial_sharpe_variance: float) -> float:
    """Expected best Sharpe among ``n_trials`` strategies with zero true Sharpe (per bar).

    E[max] ~ sqrt(V) * ((1 - g) * Phi^-1(1 - 1/N) + g * Phi^-1(1 - 1/(N e))), g the
    Euler-Mascheroni constant, V the variance of the trials' per-bar Sharpe
    estimates. One trial involves no selection, so its expected maximum is 0.
    """
    if int(n_trials) != n_trials or n_trials < 1:
        raise ValueError(f"n_trials must be a positive whole number, got {n_trials}")
    if not math.isfinite(trial_sharpe_variance) or trial_sharpe_variance < 0:
        raise ValueError(f"trial_sharpe_variance must be finite and non-negative, got {trial_sharpe_variance}")
    if n_trials == 1 or trial_sharpe_variance == 0:
        return 0.0
    g = EULER_MASCHERONI
    quantiles = (1.0 - g) * norm.ppf(1.0 - 1.0 / n_trials) + g * norm.ppf(1.0 - 1.0 / (n_trials * math.e))
    return float(math.sqrt(trial_sharpe_variance) * quantiles)


def deflated_sharpe_ratio(returns, n_trials: int, trial_sharpe_variance: float) -> float:
    """PSR against the best Sharpe of ``n_trials`` skill-less strategies (Bailey & Lopez de Prado 2014).

    Selecting the best of many configurations inflates its Sharpe; the DSR
    asks whether the selected one beats that inflation. ``trial_sharpe_variance``
    is the variance of the per-bar Sharpe ratios across the trials tried.
    With ``n_trials=1`` it equals ``probabilistic_sharpe_ratio(returns, 0)``.
    """
    return probabilistic_sharpe_ratio(returns, expected_max_sharpe(n_trials, trial_sharpe_variance))
