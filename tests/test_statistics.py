"""Uncertainty of performance numbers against closed forms and hand-computed values."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from ml.evaluation import metrics
from ml.evaluation.statistics import (
    EULER_MASCHERONI,
    block_bootstrap_ci,
    deflated_sharpe_ratio,
    expected_max_sharpe,
    probabilistic_sharpe_ratio,
    sharpe_ci,
    total_return_ci,
)


def normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def nav_of(returns: np.ndarray) -> np.ndarray:
    return np.concatenate(([1.0], np.cumprod(1.0 + returns)))


def iid_returns(n: int, seed: int, mean: float = 0.0005, vol: float = 0.01) -> np.ndarray:
    return np.random.default_rng(seed).normal(mean, vol, n)


# Probabilistic and deflated Sharpe --------------------------------------------------------------

def test_psr_equals_the_normal_cdf_expression_for_the_sample_moments():
    returns = np.array([0.012, -0.004, 0.007, 0.021, -0.015, 0.003, 0.009, -0.002, 0.030, -0.011])
    n = returns.size
    sharpe = returns.mean() / returns.std(ddof=1)  # per bar, as in metrics.sharpe_ratio before annualizing
    centered = returns - returns.mean()
    sd = math.sqrt(np.mean(centered ** 2))
    skew, kurt = np.mean(centered ** 3) / sd ** 3, np.mean(centered ** 4) / sd ** 4
    for benchmark in (0.0, 0.1, -0.2):
        expected = normal_cdf((sharpe - benchmark) * math.sqrt(n - 1)
                              / math.sqrt(1 - skew * sharpe + (kurt - 1) / 4 * sharpe ** 2))
        assert probabilistic_sharpe_ratio(returns, benchmark) == pytest.approx(expected, rel=1e-12)


def test_psr_units_are_per_bar_sharpe():
    returns = iid_returns(500, seed=3)
    per_bar = metrics.sharpe_ratio(nav_of(returns), 252) / math.sqrt(252)
    assert probabilistic_sharpe_ratio(returns, per_bar) == pytest.approx(0.5, abs=1e-6)  # benchmark = estimate


def test_psr_grows_with_track_record_length_for_a_positive_sharpe():
    short = np.tile([0.01, -0.005, 0.004, -0.002], 10)
    long = np.tile(short, 10)  # same moments, ten times the bars
    assert 0.5 < probabilistic_sharpe_ratio(short) < probabilistic_sharpe_ratio(long) <= 1.0


def test_dsr_with_one_trial_is_psr_against_zero():
    returns = iid_returns(300, seed=4)
    psr = probabilistic_sharpe_ratio(returns, 0.0)
    assert deflated_sharpe_ratio(returns, n_trials=1, trial_sharpe_variance=0.01) == pytest.approx(psr)
    assert deflated_sharpe_ratio(returns, n_trials=50, trial_sharpe_variance=0.0) == pytest.approx(psr)


def test_dsr_is_psr_against_the_euler_mascheroni_expected_maximum():
    returns = iid_returns(300, seed=5, mean=0.002)
    n_trials, variance = 20, 0.03 ** 2
    from scipy.stats import norm

    g = 0.5772156649015329
    expected_max = math.sqrt(variance) * ((1 - g) * norm.ppf(1 - 1 / n_trials)
                                          + g * norm.ppf(1 - 1 / (n_trials * math.e)))
    assert EULER_MASCHERONI == pytest.approx(g)
    assert expected_max_sharpe(n_trials, variance) == pytest.approx(expected_max)
    dsr = deflated_sharpe_ratio(returns, n_trials, variance)
    assert dsr == pytest.approx(probabilistic_sharpe_ratio(returns, expected_max))
    assert dsr < probabilistic_sharpe_ratio(returns, 0.0)  # trying many configurations costs confidence


def test_expected_max_sharpe_matches_simulated_maximum_of_normals():
    draws = np.random.default_rng(6).standard_normal((4000, 100))
    assert expected_max_sharpe(100, 1.0) == pytest.approx(draws.max(axis=1).mean(), rel=0.03)


def test_zero_variance_gives_definite_values_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flat = np.zeros(50)
        assert probabilistic_sharpe_ratio(flat) == 0.0  # no evidence the Sharpe exceeds 0
        assert probabilistic_sharpe_ratio(flat, benchmark_sharpe=-0.1) == 1.0
        assert deflated_sharpe_ratio(flat, 10, 0.01) == 0.0
        constant = np.full(50, 0.001)  # positive but riskless: Sharpe 0 by convention, as in metrics
        assert probabilistic_sharpe_ratio(constant) == 0.0
        assert sharpe_ci(np.ones(60), 252) == (0.0, 0.0)


@pytest.mark.parametrize("call", [
    lambda r: probabilistic_sharpe_ratio(r),
    lambda r: deflated_sharpe_ratio(r, 5, 0.01),
    lambda r: block_bootstrap_ci(r, np.mean),
])
def test_too_few_or_nan_returns_are_refused(call):
    with pytest.raises(ValueError, match="at least 3"):
        call(np.array([0.01, -0.01]))
    with pytest.raises(ValueError, match="NaN"):
        call(np.array([0.01, float("nan"), 0.02, 0.0]))


def test_nan_equity_curve_and_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        sharpe_ci(np.array([1.0, 1.01, float("nan"), 1.02]), 252)
    with pytest.raises(ValueError):
        expected_max_sharpe(0, 0.01)
    with pytest.raises(ValueError):
        block_bootstrap_ci(np.zeros(10), np.mean, block_length=11)
    with pytest.raises(ValueError):
        block_bootstrap_ci(np.zeros(10), np.mean, confidence=1.0)
    with pytest.raises(ValueError):
        block_bootstrap_ci(np.zeros(10), np.mean, method="moving")


# Block bootstrap ------------------------------------------------------------------------------

def test_bootstrap_interval_of_a_mean_matches_the_normal_width_for_iid_data():
    returns = iid_returns(2000, seed=7)
    low, high = block_bootstrap_ci(returns, np.mean, n_resamples=1000)
    normal_width = 2 * 1.959964 * returns.std(ddof=1) / math.sqrt(returns.size)
    assert high - low == pytest.approx(normal_width, rel=0.15)
    assert low < returns.mean() < high


def test_blocks_widen_the_interval_of_a_trending_series():
    rng = np.random.default_rng(8)
    noise, returns = rng.normal(0, 0.01, 1000), np.zeros(1000)
    for t in range(1, 1000):  # AR(1) with strong persistence: i.i.d. resampling understates the spread
        returns[t] = 0.8 * returns[t - 1] + noise[t]
    iid = block_bootstrap_ci(returns, np.mean, block_length=1, n_resamples=500)
    blocks = block_bootstrap_ci(returns, np.mean, block_length=30, n_resamples=500)
    assert blocks[1] - blocks[0] > 1.8 * (iid[1] - iid[0])  # theory: sqrt((1 + 0.8) / (1 - 0.8)) = 3


def test_sharpe_interval_covers_the_true_sharpe_of_iid_normal_returns():
    mean, vol, ppy = 0.0005, 0.01, 252
    true_sharpe = mean / vol * math.sqrt(ppy)
    hits = 0
    for seed in range(40):
        low, high = sharpe_ci(nav_of(iid_returns(500, seed, mean, vol)), ppy, n_resamples=300, seed=seed)
        hits += low <= true_sharpe <= high
    assert hits >= 34  # nominal 95% coverage of 40 intervals


def test_sharpe_interval_narrows_with_longer_series():
    short = sharpe_ci(nav_of(iid_returns(250, seed=9)), 252, n_resamples=500)
    long = sharpe_ci(nav_of(iid_returns(4000, seed=9)), 252, n_resamples=500)
    assert long[1] - long[0] < 0.5 * (short[1] - short[0])  # ~ 1/sqrt(16) in theory


def test_intervals_bracket_the_point_estimate():
    nav = nav_of(iid_returns(500, seed=10, mean=0.001))
    low, high = sharpe_ci(nav, 252)
    assert low < metrics.sharpe_ratio(nav, 252) < high
    low, high = total_return_ci(nav, method="circular")
    assert low < metrics.total_return(nav) < high


def test_bootstrap_is_deterministic_under_a_seed():
    nav = nav_of(iid_returns(300, seed=11))
    assert sharpe_ci(nav, 252, seed=1) == sharpe_ci(nav, 252, seed=1)
    assert sharpe_ci(nav, 252, seed=1) != sharpe_ci(nav, 252, seed=2)
    assert total_return_ci(nav, seed=3, method="circular") == total_return_ci(nav, seed=3, method="circular")


def test_constant_series_gives_a_degenerate_interval():
    nav = 1.001 ** np.arange(200)  # the same return every bar
    assert sharpe_ci(nav, 252) == (0.0, 0.0)
    low, high = total_return_ci(nav)
    assert low == pytest.approx(metrics.total_return(nav)) and high == pytest.approx(low)
    assert block_bootstrap_ci(np.full(30, 0.002), np.mean) == pytest.approx((0.002, 0.002))
