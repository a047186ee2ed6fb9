"""Is the champion still the policy its backtest described? Rules over a ledger segment.

- Backtest band: the forward Sharpe, drawdown, turnover and exposure beside the distribution of
  the same statistics over every window of as many bars in the model's own test backtests
  (``fold_*_test_equity.csv`` of its training run). Live outside the band's quantiles on the
  losing side is a breach: Sharpe below it, a deeper drawdown, more turnover, exposure outside.
- Action collapse: the share of live decisions at the most frequent one (the training gate's
  rule and threshold, ``action.collapse_share``).
- Feature drift: the one-bar features of the live bars (return and range of each bar) against
  the training window, two-sample Kolmogorov-Smirnov; a breach needs both a large statistic and
  a small p-value. The other features are shown but not judged: their windows overlap (a 60-bar
  trend moves little in a month of live bars), so the test's independent draws do not hold.

Rules judge only once the segment has ``min_bars`` bars; before that they say so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from numpy.lib.stride_tricks import sliding_window_view
from scipy.stats import ks_2samp

from ml.evaluation.metrics import max_drawdown, sharpe_ratio
from ml.forward.ledger import BarRow, iso
from ml.market.series import MarketSeries

STATISTICS = ("sharpe", "max_drawdown", "turnover", "exposure")
# Features computed from one bar each, so consecutive live values are close to independent draws.
PER_BAR_FEATURES = ("log_return_1", "range_1")


@dataclass(frozen=True)
class MonitorRules:
    min_bars: int = 20  # live bars (returns) before any rule judges
    band: tuple[float, float] = (0.01, 0.99)  # quantiles of the backtest windows that bound live
    collapse_share: float | None = None  # None: the model's action.collapse_share
    drift_max_ks: float = 0.5  # a feature drifted when its KS statistic is above this ...
    drift_p_value: float = 0.001  # ... and its p-value below this
    rollback: bool = False  # move champion back to the previous version on a breach


@dataclass
class Check:
    rule: str
    status: str  # "ok", "breach" or "not judged"
    detail: str
    value: float | None = None
    low: float | None = None
    high: float | None = None


def live_statistics(rows: list[BarRow], ppy: float) -> dict:
    """The segment's statistics: NAV from its first bar, gross exposure and turnover."""
    nav = np.array([row.nav for row in rows])
    weights = np.array([row.weights for row in rows])
    return window_statistics(nav, np.abs(weights[1:]).sum(axis=1), np.abs(np.diff(weights, axis=0)).sum(axis=1), ppy)


def window_statistics(nav: np.ndarray, exposure: np.ndarray, turnover: np.ndarray, ppy: float) -> dict:
    """One window's statistics, with the report's definitions (``ml.evaluation.metrics``): NAV at
    each bar's close from the window's start, and the exposure and turnover of its bars."""
    return {"sharpe": sharpe_ratio(nav, ppy), "max_drawdown": max_drawdown(nav), "turnover": float(turnover.mean()),
            "exposure": float(exposure.mean())}


def backtest_paths(report_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bar returns, gross exposure and turnover of the model's test backtests, folds in order."""
    returns, exposure, turnover = [], [], []
    for path in sorted(Path(report_dir).glob("fold_*_test_equity.csv"), key=lambda p: int(p.name.split("_")[1])):
        frame = pd.read_csv(path)
        columns = [c for c in frame.columns if c.startswith("weight_")] or ["position"]
        weights = frame[columns].to_numpy()
        nav = frame["nav"].to_numpy()
        returns.append(nav[1:] / nav[:-1] - 1.0)
        exposure.append(np.abs(weights[1:]).sum(axis=1))
        turnover.append(np.abs(np.diff(weights, axis=0)).sum(axis=1))
    if not returns:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    return np.concatenate(returns), np.concatenate(exposure), np.concatenate(turnover)


def backtest_band(report_dir: Path, bars: int, ppy: float, quantiles: tuple[float, float]) -> dict | None:
    """Quantiles of each statistic over every ``bars``-bar window of the test backtests (None: too short)."""
    returns, exposure, turnover = backtest_paths(report_dir)
    if len(returns) < bars or bars < 2:
        return None
    stats = [window_statistics(np.concatenate([[1.0], np.cumprod(1.0 + path)]), held, traded, ppy)
             for path, held, traded in zip(*(sliding_window_view(a, bars) for a in (returns, exposure, turnover)))]
    windows = {name: np.array([row[name] for row in stats]) for name in STATISTICS}
    return {name: {"low": float(np.quantile(values, quantiles[0])), "high": float(np.quantile(values, quantiles[1])),
                   "median": float(np.median(values))} for name, values in windows.items()} | {
        "windows": len(stats)}


def nav_band(report_dir: Path, horizon: int, quantiles: tuple[float, float]) -> pd.DataFrame:
    """For h = 0..horizon bars from a segment's start, the NAV quantiles of the backtests' h-bar windows."""
    returns, _, _ = backtest_paths(report_dir)
    growth = np.concatenate([[0.0], np.cumsum(np.log1p(returns))])
    rows = [(0, 1.0, 1.0, 1.0)]
    for h in range(1, min(horizon, len(returns)) + 1):
        paths = np.exp(growth[h:] - growth[:-h])
        rows.append((h, *np.quantile(paths, [quantiles[0], 0.5, quantiles[1]])))
    return pd.DataFrame(rows, columns=["bars", "low", "median", "high"])


def band_checks(live: dict, band: dict | None, bars: int, quantiles: tuple[float, float]) -> list[Check]:
    if band is None:
        return [Check("backtest band", "not judged", f"the test backtests hold fewer than {bars} bars")]
    share = f"{quantiles[0]:.0%}-{quantiles[1]:.0%} of {band['windows']} backtest windows of {bars} bars"
    checks = []
    for name in STATISTICS:
        value, low, high = float(live[name]), band[name]["low"], band[name]["high"]
        breach = {"sharpe": value < low, "max_drawdown": value < low,
                  "turnover": value > high, "exposure": not low - 1e-9 <= value <= high + 1e-9}[name]
        where = "inside" if low - 1e-9 <= value <= high + 1e-9 else ("below" if value < low else "above")
        checks.append(Check(f"forward {name} within the backtest band", "breach" if breach else "ok",
                            f"forward {name} {value:.4g} is {where} [{low:.4g}, {high:.4g}] ({share})",
                            value, low, high))
    return checks


def collapse_check(champion, rows: list[BarRow], share_limit: float) -> Check:
    decisions = torch.tensor([row.decision for row in rows], dtype=torch.float32)
    report = champion.action_space.collapse_report(decisions, share_limit)
    dominant = report.get("dominant_exposure", report.get("dominant_weights"))  # one asset / a portfolio
    shown = ", ".join(f"{v:+.2f}" for v in dominant) if isinstance(dominant, list) else f"{dominant:+.2f}"
    return Check("action collapse", "breach" if report["alarm"] else "ok",
                 f"{report['dominant_share']:.0%} of {len(rows)} live decisions at {shown} "
                 f"(limit {share_limit:.0%})", report["dominant_share"], None, share_limit)


def feature_names(series: MarketSeries) -> list[str]:
    names = list(series.feature_module.names)
    if series.n_assets == 1:
        return names
    return [f"{symbol}:{name}" for symbol in series.symbols for name in names]


def drift_checks(champion, series: MarketSeries, rows: list[BarRow], rules: MonitorRules) -> tuple[list[Check], list]:
    """One check per feature: the live bars' values against the training window's."""
    window = champion.policy.metadata.get("training_window", "")
    if "/" not in window:
        return [Check("feature drift", "not judged", "the model records no training window")], []
    start, end = (iso(pd.Timestamp(part)) if pd.Timestamp(part).tzinfo else iso(pd.Timestamp(part, tz="UTC"))
                  for part in window.split("/"))
    stamps = np.array([iso(t) for t in series.timestamps])
    features = series.features.double().numpy()
    training = features[(stamps >= start) & (stamps <= end)]
    live = features[np.isin(stamps, [row.bar_time for row in rows])]
    drifted, table = [], []
    for column, name in enumerate(feature_names(series)):
        train_values = training[:, column][np.isfinite(training[:, column])]
        live_values = live[:, column][np.isfinite(live[:, column])]
        result = ks_2samp(train_values, live_values)
        row = {"feature": name, "ks": float(result.statistic), "p_value": float(result.pvalue),
               "train_mean": float(train_values.mean()), "live_mean": float(live_values.mean()),
               "train_std": float(train_values.std()), "live_std": float(live_values.std())}
        row["judged"] = name.split(":")[-1] in PER_BAR_FEATURES
        row["drifted"] = row["judged"] and row["ks"] > rules.drift_max_ks and row["p_value"] < rules.drift_p_value
        table.append(row)
        if row["drifted"]:
            drifted.append(row)
    rule = f"KS statistic > {rules.drift_max_ks:g} with p < {rules.drift_p_value:g}"
    if drifted:
        named = "; ".join(f"{r['feature']} KS {r['ks']:.2f} (p {r['p_value']:.1e}), std {r['train_std']:.3g} -> "
                          f"{r['live_std']:.3g}" for r in drifted)
        return [Check("feature drift", "breach", f"{len(drifted)} one-bar feature(s) drifted ({rule}): "
                      f"{named}", max(r["ks"] for r in drifted), None, rules.drift_max_ks)], table
    worst = max((r for r in table if r["judged"]), key=lambda r: r["ks"])
    return [Check("feature drift", "ok", f"no one-bar feature drifted ({rule}); largest: {worst['feature']} KS "
                  f"{worst['ks']:.2f}", worst["ks"], None, rules.drift_max_ks)], table


def monitor(champion, series: MarketSeries, rows: list[BarRow], rules: MonitorRules) -> dict:
    """Every rule on a segment's rows; ``breaches`` lists the checks that failed."""
    bars = len(rows) - 1  # returns since the segment's first bar
    ppy = champion.periods_per_year
    share_limit = rules.collapse_share if rules.collapse_share is not None else champion.config.action.collapse_share
    live = live_statistics(rows, ppy) if bars >= 2 else None
    if bars < rules.min_bars:
        checks = [Check(rule, "not judged", f"{bars} live bars so far, rules judge from {rules.min_bars}")
                  for rule in ("backtest band", "action collapse", "feature drift")]
        drift_table = []
    else:
        band = backtest_band(champion.report_dir, bars, ppy, rules.band)
        checks = band_checks(live, band, bars, rules.band) + [collapse_check(champion, rows, share_limit)]
        drift, drift_table = drift_checks(champion, series, rows, rules)
        checks += drift
    summary = champion.action_space.decision_summary(np.array([row.decision for row in rows]), series.symbols)
    return {"model_name": champion.model_name, "version": champion.version, "bars": bars,
            "live": {k: float(v) for k, v in live.items()} if live else None,
            # the same summary the test report shows: shares of each exposure, or mean weights
            "actions": {key.replace("test_", "live_"): value for key, value in summary.items()},
            "checks": [asdict(c) for c in checks], "drift": drift_table,
            "breaches": [asdict(c) for c in checks if c.status == "breach"], "rules": asdict(rules)}
