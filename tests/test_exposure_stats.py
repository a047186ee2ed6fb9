"""Beta/alpha with Newey-West errors against a hand computation, and causal regime labels."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from ml.evaluation.exposure_stats import (beta_alpha, equal_weight_index, newey_west_lags, regime_labels,
                                          regime_results)


def hand_hac(y: np.ndarray, x: np.ndarray, lags: int) -> tuple[np.ndarray, np.ndarray]:
    """OLS coefficients and Newey-West standard errors, Bartlett weights, no small-sample factor."""
    design = np.column_stack([np.ones_like(x), x])
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    scores = design * (y - design @ coef)[:, None]
    meat = scores.T @ scores
    for lag in range(1, lags + 1):
        gamma = scores[lag:].T @ scores[:-lag]
        meat += (1 - lag / (lags + 1)) * (gamma + gamma.T)
    bread = np.linalg.inv(design.T @ design)
    return coef, np.sqrt(np.diag(bread @ meat @ bread))


def correlated_returns(n: int = 500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    benchmark = 0.0004 + 0.01 * rng.standard_normal(n)
    noise = np.zeros(n)
    for t in range(1, n):  # AR(1) errors: what HAC errors are for
        noise[t] = 0.6 * noise[t - 1] + 0.004 * rng.standard_normal()
    return 0.0003 + 0.7 * benchmark + noise, benchmark


def test_beta_and_alpha_match_least_squares_and_a_hand_newey_west_interval():
    policy, benchmark = correlated_returns()
    lags = newey_west_lags(policy.size)
    assert lags == 5  # floor(4 * 5 ** (2/9))
    result = beta_alpha(policy, benchmark, ppy=252)
    (alpha, beta), (alpha_se, beta_se) = hand_hac(policy, benchmark, lags)
    z = norm.ppf(0.975)
    assert result["beta"] == pytest.approx(beta, rel=1e-10)
    assert result["alpha_annualized"] == pytest.approx(alpha * 252, rel=1e-10)
    assert (result["beta_ci_low"], result["beta_ci_high"]) == pytest.approx((beta - z * beta_se, beta + z * beta_se),
                                                                             rel=1e-10)
    assert (result["alpha_ci_low"], result["alpha_ci_high"]) == pytest.approx(
        ((alpha - z * alpha_se) * 252, (alpha + z * alpha_se) * 252), rel=1e-10)
    assert result["beta_ci_low"] < 0.7 < result["beta_ci_high"]
    # Autocorrelated errors widen the alpha interval beyond plain OLS's.
    _, plain_se = hand_hac(policy, benchmark, 0)
    assert alpha_se > 1.5 * plain_se[0]
    narrower = beta_alpha(policy, benchmark, ppy=252, max_lags=0, confidence=0.9)
    assert narrower["alpha_ci_high"] - narrower["alpha_ci_low"] < result["alpha_ci_high"] - result["alpha_ci_low"]


def test_beta_alpha_refuses_bad_input():
    policy, benchmark = correlated_returns(50)
    with pytest.raises(ValueError, match="cover 50 and 49 bars"):
        beta_alpha(policy, benchmark[1:], ppy=252)
    with pytest.raises(ValueError, match="benchmark returns are constant"):
        beta_alpha(policy, np.zeros(50), ppy=252)
    with pytest.raises(ValueError, match="policy returns contain NaN"):
        beta_alpha(np.full(50, np.nan), benchmark, ppy=252)


# Window 3. Row t is labelled from closes t-4 .. t-1.
CLOSE = np.array([100, 101, 102, 103, 104, 100, 96, 92, 88, 92, 96, 100], dtype=float)
UP = [None, None, None, None, True, True, False, False, False, False, False, True]


def test_trend_labels_of_a_hand_built_series():
    labels = regime_labels(CLOSE, window=3)
    assert [None if pd.isna(v) else bool(v) for v in labels["up"]] == UP
    assert labels["trailing_return"].iloc[6] == pytest.approx(100 / 102 - 1)  # close 5 over close 2


def test_volatility_labels_follow_the_trailing_window_and_its_expanding_median():
    rng = np.random.default_rng(2)
    returns = np.concatenate([0.002 * rng.standard_normal(150), 0.03 * rng.standard_normal(100)])
    close = 100 * np.cumprod(np.concatenate(([1.0], 1 + returns)))
    labels = regime_labels(close, window=20)
    bar_returns = close[1:] / close[:-1] - 1
    volatility = np.full(close.size, np.nan)
    for t in range(21, close.size):
        volatility[t] = bar_returns[t - 21:t - 1].std(ddof=1)  # returns of bars t-20 .. t-1
    np.testing.assert_allclose(labels["trailing_volatility"], volatility, rtol=1e-9)
    median = np.array([np.median(volatility[21:t + 1]) for t in range(21, close.size)])
    np.testing.assert_allclose(labels["threshold"].iloc[21:], median, rtol=1e-12)
    assert labels["volatile"].iloc[:21].isna().all()
    assert (labels["volatile"].iloc[21:].to_numpy(dtype=bool) == (volatility[21:] > median)).all()
    # Once the wild returns fill the window, every bar is volatile against the calm history's median.
    assert labels["volatile"].iloc[171:].all()
    fixed = regime_labels(close, window=20, volatility_threshold=0.01)
    assert (fixed["volatile"].iloc[21:] == (volatility[21:] > 0.01)).all()


def test_perturbing_later_bars_never_changes_earlier_labels():
    rng = np.random.default_rng(4)
    close = 100 * np.cumprod(1 + 0.01 * rng.standard_normal(400))
    base = regime_labels(close, window=30)
    for k in (31, 100, 250, 399):
        changed = close.copy()
        changed[k:] *= np.exp(0.2 * rng.standard_normal(400 - k))
        after = regime_labels(changed, window=30)
        pd.testing.assert_frame_equal(after.iloc[:k + 1], base.iloc[:k + 1])  # row k reads closes up to k-1
        if k + 1 < close.size:  # the control: row k+1 reads close k, which did change
            assert after["trailing_volatility"].iloc[k + 1] != base["trailing_volatility"].iloc[k + 1]


def test_regime_results_of_a_hand_built_series():
    stamps = pd.Series(pd.bdate_range("2021-01-04", periods=CLOSE.size, tz="UTC"))
    # The policy traded bars 5 .. 11: returns ending on them, up labels T F F F F F T.
    returns = pd.Series([0.02, -0.01, 0.03, 0.01, -0.02, 0.04, 0.05], index=stamps.iloc[5:])
    result = regime_results(returns, CLOSE, stamps, window=3, ppy=252)
    up, down = np.array([0.02, 0.05]), np.array([-0.01, 0.03, 0.01, -0.02, 0.04])
    assert result["up"]["bars"] == 2 and result["down"]["bars"] == 5
    assert result["up"]["share"] == pytest.approx(2 / 7) and result["down"]["share"] == pytest.approx(5 / 7)
    assert result["up"]["total_return"] == pytest.approx(1.02 * 1.05 - 1)
    assert result["down"]["total_return"] == pytest.approx(np.prod(1 + down) - 1)
    assert result["up"]["annualized_return"] == pytest.approx((1.02 * 1.05) ** (252 / 2) - 1)
    assert result["down"]["sharpe"] == pytest.approx(down.mean() / down.std(ddof=1) * math.sqrt(252))
    assert result["up"]["sharpe"] == pytest.approx(up.mean() / up.std(ddof=1) * math.sqrt(252))
    assert result["volatile"]["bars"] + result["calm"]["bars"] == 7
    # A later benchmark bar, perturbed, changes nothing about the bars before it.
    changed = CLOSE.copy()
    changed[9:] = [50, 200, 10]
    assert regime_results(returns.iloc[:4], changed, stamps, window=3) == regime_results(
        returns.iloc[:4], CLOSE, stamps, window=3)


def test_regime_results_refuses_returns_without_benchmark_bars():
    stamps = pd.Series(pd.bdate_range("2021-01-04", periods=CLOSE.size, tz="UTC"))
    with pytest.raises(ValueError, match="has no benchmark bar"):
        regime_results(pd.Series([0.01], index=[pd.Timestamp("2030-01-01", tz="UTC")]), CLOSE, stamps, window=3)
    with pytest.raises(ValueError, match="pandas Series"):
        regime_results(np.zeros(3), CLOSE, stamps, window=3)


def test_equal_weight_index_compounds_the_mean_asset_return():
    close = np.array([[100.0, 10.0], [110.0, 9.0], [121.0, 9.0]])
    np.testing.assert_allclose(equal_weight_index(close), [1.0, 1.0, 1.05])  # (+10%, -10%), (+10%, 0%)
