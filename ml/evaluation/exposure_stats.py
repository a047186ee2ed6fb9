"""What the policy's returns owe to the market: beta and alpha to the benchmark, and results by regime.

Beta and alpha come from an OLS of the policy's bar returns on the benchmark's,
``r_policy = alpha + beta * r_benchmark + e``, with Newey-West (HAC, Bartlett kernel)
standard errors: bar returns are autocorrelated and heteroscedastic, and plain OLS errors
would make the intervals too narrow. Intervals use the normal distribution and no
small-sample correction (statsmodels' HAC defaults). Alpha is annualized arithmetically:
per-bar alpha times bars per year, its interval likewise.

Regimes are labelled causally: the label of the return on bar t (close t-1 to close t) reads
benchmark closes up to bar t-1 only, so perturbing bar t or later never changes it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import statsmodels.api as sm

from ml.evaluation.metrics import annualized_return, sharpe_ratio, total_return

REGIMES = ("volatile", "calm", "up", "down")


def newey_west_lags(n: int) -> int:
    """floor(4 * (n / 100) ** (2/9)), Newey and West's (1994) rule for the Bartlett kernel."""
    return int(math.floor(4 * (n / 100.0) ** (2.0 / 9.0)))


def _series(values, what: str) -> np.ndarray:
    array = np.asarray(values, dtype="float64")
    if array.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return array


def beta_alpha(policy_returns, benchmark_returns, ppy: float, max_lags: int | None = None,
               confidence: float = 0.95) -> dict[str, float]:
    """``{beta, beta_ci_low, beta_ci_high, alpha_annualized, alpha_ci_low, alpha_ci_high}`` of the
    policy's bar returns on the benchmark's over the same bars; ``max_lags`` defaults to
    ``newey_west_lags(n)``."""
    y, x = _series(policy_returns, "policy returns"), _series(benchmark_returns, "benchmark returns")
    if y.size != x.size:
        raise ValueError(f"policy and benchmark returns cover {y.size} and {x.size} bars: "
                         "they must cover the same bars")
    if y.size < 3:
        raise ValueError(f"need at least 3 bar returns for a regression with an intercept, got {y.size}")
    if x.std() <= 1e-15:
        raise ValueError("benchmark returns are constant: beta is undefined")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    lags = newey_west_lags(y.size) if max_lags is None else int(max_lags)
    if not 0 <= lags < y.size:
        raise ValueError(f"max_lags must be between 0 and {y.size - 1}, got {max_lags}")
    fit = sm.OLS(y, sm.add_constant(x, has_constant="add")).fit(
        cov_type="HAC", cov_kwds={"maxlags": lags, "use_correction": False}, use_t=False)
    (alpha_low, beta_low), (alpha_high, beta_high) = fit.conf_int(alpha=1.0 - confidence).T
    alpha, beta = fit.params
    return {"beta": float(beta), "beta_ci_low": float(beta_low), "beta_ci_high": float(beta_high),
            "alpha_annualized": float(alpha * ppy), "alpha_ci_low": float(alpha_low * ppy),
            "alpha_ci_high": float(alpha_high * ppy)}


def equal_weight_index(close) -> np.ndarray:
    """A benchmark level [T] from closes [T, A]: every asset's bar return weighted 1/A, compounded
    from 1.0 (the frictionless ``equal_weight`` baseline), for the regimes of a portfolio."""
    close = np.asarray(close, dtype="float64")
    if close.ndim != 2 or not np.isfinite(close).all() or (close <= 0).any():
        raise ValueError("closes must be a finite, positive [bars, assets] array")
    returns = (close[1:] / close[:-1] - 1.0).mean(axis=1)
    return np.concatenate(([1.0], np.cumprod(1.0 + returns)))


def regime_labels(benchmark_close, window: int = 60, volatility_threshold: float | None = None) -> pd.DataFrame:
    """Causal labels of every bar t >= 1 (row t): the return on bar t is labelled from closes
    up to t-1.

    ``trailing_volatility``: std (ddof=1) of the ``window`` benchmark bar returns ending at t-1;
    ``threshold``: ``volatility_threshold`` when given (fit it on bars before the segment), else
    the expanding median of ``trailing_volatility`` over rows up to t (all known at t-1);
    ``volatile``: trailing volatility above the threshold; ``trailing_return``: benchmark return
    from close t-1-window to close t-1; ``up``: that return above 0. Rows without a full window
    are NA. The expanding median depends on where ``benchmark_close`` starts: pass the series
    from its first bar so every fold reads the same labels.
    """
    close = _series(benchmark_close, "benchmark closes")
    if (close <= 0).any():
        raise ValueError("benchmark closes must be positive")
    if int(window) != window or window < 2:
        raise ValueError(f"window must be a whole number of bars >= 2, got {window}")
    window = int(window)
    levels = pd.Series(close)
    returns = levels.pct_change()
    # Row t reads returns t-window .. t-1 and closes t-1-window .. t-1: shift by one bar.
    volatility = returns.rolling(window).std(ddof=1).shift(1)
    trend = (levels / levels.shift(window) - 1.0).shift(1)
    if volatility_threshold is None:
        threshold = volatility.expanding().median()
    else:
        if not (math.isfinite(volatility_threshold) and volatility_threshold >= 0):
            raise ValueError(f"volatility_threshold must be finite and >= 0, got {volatility_threshold}")
        threshold = pd.Series(float(volatility_threshold), index=levels.index).where(volatility.notna())
    volatile = (volatility > threshold).astype("boolean").where(volatility.notna(), pd.NA)
    up = (trend > 0).astype("boolean").where(trend.notna(), pd.NA)
    return pd.DataFrame({"trailing_volatility": volatility, "threshold": threshold, "volatile": volatile,
                         "trailing_return": trend, "up": up})


def _regime_stats(returns: np.ndarray, total_bars: int, ppy: float) -> dict[str, float]:
    if returns.size == 0:
        return {"bars": 0, "share": 0.0, "total_return": 0.0, "annualized_return": 0.0, "sharpe": 0.0}
    nav = np.concatenate(([1.0], np.cumprod(1.0 + returns)))
    return {"bars": int(returns.size), "share": float(returns.size / total_bars), "total_return": total_return(nav),
            "annualized_return": annualized_return(nav, ppy), "sharpe": sharpe_ratio(nav, ppy)}


def regime_results(policy_returns: pd.Series, benchmark_close, timestamps, window: int = 60, ppy: float = 252.0,
                   volatility_threshold: float | None = None) -> dict[str, dict[str, float]]:
    """The policy's results in each regime: ``{volatile, calm, up, down: {bars, share,
    total_return, annualized_return, sharpe}}``.

    ``policy_returns`` is indexed by the timestamp of the bar each return ends on (e.g.
    ``pd.Series(bar_returns(test.nav), index=test.timestamps[1:])``); ``benchmark_close`` and
    ``timestamps`` are the benchmark's closes and their bars, covering the policy's bars and the
    history before them (later bars may be included: no label reads them). ``share`` is over
    all the policy's returns, so bars still inside the first ``window`` (unlabelled) make the
    volatile and calm shares sum to less than 1. Returns of a regime are compounded in time
    order, as if that regime's bars were contiguous.
    """
    if not isinstance(policy_returns, pd.Series):
        raise ValueError("policy_returns must be a pandas Series indexed by the timestamp each return ends on")
    stamps = pd.Index(pd.to_datetime(pd.Series(timestamps)))
    close = _series(benchmark_close, "benchmark closes")
    if close.size != len(stamps):
        raise ValueError(f"benchmark_close has {close.size} bars but timestamps has {len(stamps)}")
    if not stamps.is_monotonic_increasing or stamps.has_duplicates:
        raise ValueError("timestamps must be strictly increasing")
    returns = _series(policy_returns.to_numpy(), "policy returns")
    if returns.size == 0:
        raise ValueError("policy_returns is empty")
    index = pd.Index(pd.to_datetime(policy_returns.index))
    if not index.is_monotonic_increasing or index.has_duplicates:
        raise ValueError("policy_returns' timestamps must be strictly increasing")
    position = stamps.get_indexer(index)
    if (position < 1).any():
        missing = policy_returns.index[position < 1][0]
        raise ValueError(f"policy return at {missing} has no benchmark bar (and bar before it) in timestamps")
    labels = regime_labels(close, window, volatility_threshold).iloc[position]
    volatile, up = labels["volatile"], labels["up"]
    # Unlabelled bars (NA) belong to neither side.
    masks = {"volatile": volatile, "calm": ~volatile, "up": up, "down": ~up}
    return {name: _regime_stats(returns[mask.fillna(False).to_numpy(dtype=bool)], returns.size, ppy)
            for name, mask in masks.items()}
