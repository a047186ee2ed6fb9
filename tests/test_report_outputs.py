"""Figures and the HTML report, built from a report dict shaped like the pipeline's report.json."""

from __future__ import annotations

import base64
import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from ml.evaluation.html_report import aggregate_verdict, fold_verdict, render_html_report
from ml.evaluation.metrics import summarize
from ml.evaluation.plots import plot_equity_and_drawdown, plot_exposure_histogram, plot_fold_bars
from ml.evaluation.statistics import probabilistic_sharpe_ratio, sharpe_ci

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PPY = 252


def backtest(market: np.ndarray, position: np.ndarray, cost_rate: float = 0.0005):
    """NAV, traded notional and money paid of holding ``position`` over ``market`` returns."""
    traded = np.abs(np.diff(np.concatenate(([0.0], position))))
    returns = position * market - cost_rate * traded
    nav = np.concatenate(([1.0], np.cumprod(1.0 + returns)))
    return nav, traded, cost_rate * traded * nav[:-1]


def synthetic_fold(index: int, start: str, policy_position: np.ndarray, market: np.ndarray, seed: int):
    """One fold's report entry and its test equity curves, as ml.evaluation.walkforward.evaluate_fold builds them."""
    n = market.size
    timestamps = pd.bdate_range(start, periods=n + 1, tz="UTC")
    close = pd.Series(np.cumprod(1.0 + market))
    fast, slow = close.rolling(5).mean(), close.rolling(20).mean()
    # Rules decide on the previous close, so they never hold the bar they have already seen.
    positions = {
        "policy": policy_position,
        "buy_and_hold": np.ones(n),
        "cash": np.zeros(n),
        "ma_crossover": (fast > slow).astype(float).shift(1, fill_value=0.0).to_numpy(),
        "momentum": np.sign(close.pct_change(20)).shift(1).fillna(0.0).to_numpy(),
        "random": np.random.default_rng(seed).choice([-1.0, 0.0, 1.0], size=n),
    }
    curves, results = {"timestamp": timestamps}, {}
    for name, position in positions.items():
        nav, traded, cost = backtest(market, position)
        curves[name] = nav
        results[name] = summarize(nav, position, traded, cost, PPY)
    policy_test = results.pop("policy")
    policy_test["sharpe_ci_low"], policy_test["sharpe_ci_high"] = sharpe_ci(curves["policy"], PPY, n_resamples=300)
    policy_test["psr"] = probabilistic_sharpe_ratio(np.diff(curves["policy"]) / curves["policy"][:-1])
    levels, counts = np.unique(policy_position, return_counts=True)

    def span(first: int, last: int) -> dict:
        stamps = pd.bdate_range(pd.Timestamp(start) - pd.offsets.BDay(600), periods=600 + n + 1, tz="UTC")
        return {"start": stamps[first].isoformat(), "end": stamps[last].isoformat(),
                "first_bar": first, "last_bar": last}

    fold = {
        "index": index,
        "train": span(0, 400), "validation": span(410, 590), "test": span(600, 600 + n),
        "policy": {"validation": dict(policy_test), "test": policy_test,
                   "collapse": {"alarm": False, "dominant_exposure": float(levels[np.argmax(counts)]),
                                "dominant_share": float(counts.max() / n)},
                   "test_exposure_histogram": {f"{v:+.2f}": float(c / n) for v, c in zip(levels, counts)}},
        "baselines": results,
        "equity_curve": f"fold_{index}_test_equity.csv",
    }
    return fold, pd.DataFrame(curves)


def aggregate(folds: list[dict]) -> dict:
    from ml.evaluation.walkforward import aggregate as pipeline_aggregate  # the pipeline's own definition

    return pipeline_aggregate(folds)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    rng = np.random.default_rng(0)
    n = 252
    rising = rng.normal(0.0008, 0.01, n)  # a bull year: hard to beat buy-and-hold by switching
    choppy = rng.normal(0.0, 0.01, n)
    # Fold 0: the policy is mostly flat in a bull year. Fold 1: it calls the sign of 60% of bars.
    losing = np.where(rng.random(n) < 0.8, 0.0, 0.5)
    winning = np.sign(choppy) * np.where(rng.random(n) < 0.6, 1.0, -1.0)
    fold0, curves0 = synthetic_fold(0, "2022-01-03", losing, rising, seed=0)
    fold1, curves1 = synthetic_fold(1, "2023-01-02", winning, choppy, seed=1)
    folds = [fold0, fold1]
    report = {
        "schema_version": 3, "symbol": "S&P<500>", "interval": "1d", "source": "test", "rows": 2000,
        "dataset_hash": "sha256:0123abcd", "costs": {"commission_bps": 1.0, "slippage_bps": 2.0},
        "lookback": 60, "exposure_levels": [-1.0, -0.5, 0.0, 0.5, 1.0], "selection_metric": "sharpe",
        "folds": folds, "aggregate": aggregate(folds),
    }
    report = json.loads(json.dumps(report))  # exactly what a reader of report.json gets
    out = tmp_path_factory.mktemp("run")
    images = {
        "Fold 0 test equity and drawdown": plot_equity_and_drawdown(curves0, out / "fold_0_equity.png"),
        "Fold 1 test equity and drawdown": plot_equity_and_drawdown(curves1, out / "fold_1_equity.png"),
        "Sharpe per fold": plot_fold_bars(report, out / "fold_sharpe.png"),
        "Total return per fold": plot_fold_bars(report, out / "fold_return.png", metric="total_return"),
        "Policy exposure": plot_exposure_histogram(report, out / "exposure.png"),
    }
    html = render_html_report(out / "report.html", report, images)
    return report, images, html


def test_figures_are_written_as_non_empty_pngs(run):
    _, images, _ = run
    for path in images.values():
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, path


def test_synthetic_folds_lose_then_win(run):
    report, _, _ = run
    first, second = report["folds"]
    assert first["policy"]["test"]["sharpe"] < first["baselines"]["buy_and_hold"]["sharpe"]
    assert first["policy"]["test"]["total_return"] < first["baselines"]["buy_and_hold"]["total_return"]
    assert second["policy"]["test"]["sharpe"] > second["baselines"]["buy_and_hold"]["sharpe"]
    assert second["policy"]["test"]["total_return"] > second["baselines"]["buy_and_hold"]["total_return"]


def test_html_has_one_row_per_fold_verdicts_and_embedded_images(run):
    report, images, html_path = run
    assert html_path == html_path.parent / "report.html"
    html = html_path.read_text(encoding="utf-8")
    assert len(re.findall(r'<tr class="fold-row"', html)) == len(report["folds"])
    assert len(re.findall(r'<table class="fold-detail"', html)) == len(report["folds"])
    assert "The policy does NOT beat buy-and-hold" in html  # fold 0, stated plainly
    assert "The policy beats buy-and-hold on both Sharpe" in html  # fold 1
    assert len(re.findall(r'<p class="verdict[^"]*" data-fold=', html)) == len(report["folds"])
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) == len(images)
    assert all(base64.b64decode(uri).startswith(PNG_MAGIC) for uri in uris)
    assert "<img" in html and 'src="fold_' not in html  # no link to a file beside the page


def test_html_header_and_tables_show_the_reported_numbers(run):
    report, _, html_path = run
    html = html_path.read_text(encoding="utf-8")
    assert "sha256:0123abcd" in html and "1d" in html
    assert "S&amp;P&lt;500&gt;" in html and "S&P<500>" not in html  # report text is escaped
    assert "2022-01-03" in html and "2023-01-02" in html  # fold test start dates
    assert "+00:00" not in html and "T00:00" not in html  # daily UTC stamps print as dates
    assert "Sharpe 95% interval" in html and "<th>PSR</th>" in html
    policy = report["folds"][1]["policy"]["test"]
    assert f"{policy['sharpe']:.2f}" in html
    assert f"[{policy['sharpe_ci_low']:.2f}, {policy['sharpe_ci_high']:.2f}]" in html
    assert f"{policy['max_drawdown']:+.2%}" in html
    assert 'id="aggregate"' in html and "folds policy has higher Sharpe" in html


def test_uncertainty_columns_only_when_the_report_has_them(run, tmp_path):
    report, _, _ = run
    plain = json.loads(json.dumps(report))
    for fold in plain["folds"]:
        for key in ("sharpe_ci_low", "sharpe_ci_high", "psr"):
            del fold["policy"]["test"][key]
    html = render_html_report(tmp_path / "report.html", plain, {}).read_text(encoding="utf-8")
    assert "Sharpe 95% interval" not in html and "PSR" not in html and "<img" not in html
    assert plot_fold_bars(plain, tmp_path / "bars.png").read_bytes().startswith(PNG_MAGIC)


def fold_of(policy: dict, hold: dict, cash: dict | None = None, alarm: bool = False) -> dict:
    cash = cash or {"sharpe": 0.0, "total_return": 0.0}
    return {"index": 0, "policy": {"test": policy, "collapse": {"alarm": alarm, "dominant_exposure": 1.0,
                                                                 "dominant_share": 0.99}},
            "baselines": {"buy_and_hold": hold, "cash": cash}}


def test_verdict_never_rounds_up():
    tie = fold_verdict(fold_of({"sharpe": 0.8, "total_return": 0.1}, {"sharpe": 0.8, "total_return": 0.1}))
    assert "does NOT beat buy-and-hold: Sharpe 0.80 vs 0.80" in tie  # a tie is not a win
    close = fold_verdict(fold_of({"sharpe": 0.8641, "total_return": 0.05},
                                 {"sharpe": 0.8644, "total_return": 0.06}))
    assert "does NOT beat buy-and-hold: Sharpe 0.8641 vs 0.8644" in close  # not "0.86 vs 0.86"
    mixed = fold_verdict(fold_of({"sharpe": 1.1, "total_return": 0.05}, {"sharpe": 0.9, "total_return": 0.08}))
    assert "does NOT clearly beat buy-and-hold: higher Sharpe (1.10 vs 0.90) but lower total return" in mixed
    losing = fold_verdict(fold_of({"sharpe": -0.3, "total_return": -0.02},
                                  {"sharpe": -0.5, "total_return": -0.04}))
    assert "beats buy-and-hold on both" in losing
    assert "does NOT beat cash: Sharpe -0.30 vs 0.00, total return -2.00% vs +0.00%" in losing


def test_verdict_reports_uncertainty_and_collapse():
    policy = {"sharpe": 1.2, "total_return": 0.2, "sharpe_ci_low": 0.1, "sharpe_ci_high": 2.3, "psr": 0.9}
    near = fold_verdict(fold_of({**policy, "psr": 0.9496}, {"sharpe": 0.9, "total_return": 0.15}))
    assert "(PSR): 94.9%, below the usual 95% bar" in near  # cut, not rounded up to 95%
    text = fold_verdict(fold_of(policy, {"sharpe": 0.9, "total_return": 0.15}, alarm=True))
    assert "Buy-and-hold's Sharpe lies inside the policy's interval [0.10, 2.30]" in text
    assert "(PSR): 90.0%, below the usual 95% bar, so a positive Sharpe is not established" in text
    assert "Collapse alarm: the policy chose exposure +1.00 on 99% of test bars." in text


def test_aggregate_verdict_states_the_fold_count(run):
    report, _, _ = run
    text = aggregate_verdict(report)
    beaten = report["aggregate"]["folds_beating"]["buy_and_hold"]["sharpe"]
    assert f"higher Sharpe in {beaten} folds" in text
    policy = report["aggregate"]["policy"]["sharpe"]
    hold = report["aggregate"]["baselines"]["buy_and_hold"]["sharpe"]
    assert ("does NOT beat buy-and-hold" in text) == (not policy > hold)
    assert math.isfinite(policy)
