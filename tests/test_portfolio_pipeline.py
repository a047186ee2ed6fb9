"""Portfolio mode through the whole pipeline: report, ONNX contract, registry, champion comparison, serving."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pandas as pd
import pytest

from ml.config import ConfigError, config_from_dict
from ml.pipeline import run_pipeline
from ml.market.series import align_bars
from ml.pipeline.rundir import symbol_frames
from ml.release.summary import registry_summary
from ml.serving import InputError, Policy

PORTFOLIO = {
    # GSPC has open/high/low/volume, KO is close-only: a mixed portfolio fills each asset its own way.
    "data": {"source": "sample", "symbols": ["GSPC", "KO"], "start": "2009-01-01"},
    "action": {"mode": "portfolio"},
    "ppo": {"total_timesteps": 4096, "num_envs": 64, "num_steps": 32, "eval_every": 1},
    "splits": {"n_folds": 2, "test_months": 6, "validation_months": 6, "min_train_bars": 300},
    # A 4096-step policy cannot be expected to make money: only the soundness rules of the gate apply.
    # Tiny budgets: only the soundness rules apply (the budget floor and profitability rules are off).
    "gate": {"parity_windows": 64, "require_no_collapse": False, "require_beats_cash": False,
             "require_learned": False, "min_timesteps": 0, "benchmark_psr": None, "max_pbo": None,
             "cost_multiple": None},
}


@pytest.fixture(scope="module")
def portfolio_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("portfolio")
    store = {"tracking_uri": f"sqlite:///{out / 'mlflow.db'}"}
    first = run_pipeline(config_from_dict({**PORTFOLIO, "registry": store}), out / "first")
    # A second nightly run with a champion in place exercises the comparison on unseen bars.
    later = {**PORTFOLIO, "data": {**PORTFOLIO["data"], "start": "2009-07-01"}, "registry": store}
    second = run_pipeline(config_from_dict(later), out / "second")
    return out, first, second


def test_portfolio_config_is_checked_by_field():
    with pytest.raises(ConfigError, match="set action.mode: portfolio"):
        config_from_dict({"data": {"symbols": ["GSPC", "KO"]}})
    with pytest.raises(ConfigError, match="needs data.symbols"):
        config_from_dict({"action": {"mode": "portfolio"}})
    with pytest.raises(ConfigError, match="at least two distinct symbols"):
        config_from_dict({"data": {"symbols": ["GSPC", "GSPC"]}, "action": {"mode": "portfolio"}})
    assert config_from_dict(PORTFOLIO).model_name == "ppo_GSPC_KO_1d"


def test_report_compares_with_equal_weight_and_each_asset_held_alone(portfolio_run):
    out, first, _ = portfolio_run
    report = json.loads((out / "first" / "report.json").read_text())
    assert report["symbols"] == ["GSPC", "KO"] and report["benchmark"] == "equal_weight"
    bars = pd.read_parquet(out / "first" / "bars.parquet")
    timestamps, _ = align_bars(symbol_frames(bars, ("GSPC", "KO")))
    for fold in report["folds"]:
        assert set(fold["baselines"]) == {"cash", "equal_weight", "random", "hold_GSPC", "hold_KO"}
        weights = fold["policy"]["test_mean_weights"]
        assert set(weights) == {"GSPC", "KO", "cash"} and sum(weights.values()) == pytest.approx(1.0)
        curve = pd.read_csv(out / "first" / fold["equity_curve"])
        assert list(curve.columns) == ["timestamp", "nav", "weight_GSPC", "weight_KO", "position"]
        assert fold["policy"]["test"]["total_return"] == pytest.approx(curve["nav"].iloc[-1] - 1.0)
        assert (curve[["weight_GSPC", "weight_KO"]] >= -1e-9).all().all()
        # Folds are laid on the bars both symbols have.
        assert pd.Timestamp(fold["test"]["end"]) <= timestamps.iloc[-1]
    assert "equal weight" in (out / "first" / "report.html").read_text()
    assert (out / "first" / "plots" / "weights.png").stat().st_size > 5_000


def test_exported_model_follows_the_portfolio_contract(portfolio_run):
    out, first, _ = portfolio_run
    model = onnx.load(str(out / "first" / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["ohlcv", "weights"]
    assert [o.name for o in model.graph.output] == ["target_weights", "value"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["symbols"] == "GSPC,KO" and meta["action_mode"] == "portfolio"
    assert "target_weights" in meta["action_semantics"]
    parity = json.loads((out / "first" / "parity.json").read_text())
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-5


def test_champion_serves_weights_and_refuses_bad_input(portfolio_run):
    out, first, _ = portfolio_run
    assert first["gate"]["passed"] and first["champion"]
    policy = Policy.load(f"models:/{first['model_name']}@champion", tracking_uri=first["tracking_uri"])
    assert policy.symbols == ["GSPC", "KO"]
    bars = pd.read_parquet(out / "first" / "bars.parquet")
    _, ohlcv = align_bars(symbol_frames(bars, ("GSPC", "KO")))
    window = ohlcv[-policy.lookback:][None]
    weights = policy.decide(window, np.array([[0.3, 0.3]], np.float32))
    assert weights.shape == (1, 2) and (weights >= 0).all() and weights.sum() <= 1 + 1e-6
    with pytest.raises(InputError, match=r"must be \[batch, 64, 2, 5\]"):
        policy.decide(window[:, :, :1], np.zeros((1, 2), np.float32))
    # Held weights drift past 1 after a fill (costs, prices); past the sanity bound they are refused.
    policy.decide(window, np.array([[0.52, 0.5]], np.float32))
    with pytest.raises(InputError, match="sum to at most 10"):
        policy.decide(window, np.array([[8.0, 8.0]], np.float32))
    broken = window.copy()
    broken[0, 10, 1, 3] = np.nan
    with pytest.raises(InputError, match="window 0 asset KO contains NaN"):
        policy.decide(broken, np.zeros((1, 2), np.float32))


def test_second_run_is_compared_with_the_champion_on_unseen_bars(portfolio_run):
    _, first, second = portfolio_run
    comparison = second["champion_comparison"]
    assert comparison is not None and second["previous_champion"] == first["version"]
    assert "skipped" not in comparison, comparison
    assert np.isfinite(comparison["challenger_sharpe"]) and np.isfinite(comparison["champion_sharpe"])
    assert comparison["bars"] >= 20
    assert "beats_champion" in second["gate"]["checks"]
    summary = registry_summary(first["model_name"], first["tracking_uri"])
    assert "equal weight" in summary and "buy-and-hold" not in summary


def test_serve_cli_decides_weights_from_one_file_per_asset(portfolio_run, capsys):
    from ml.cli import main
    from tests.conftest import ROOT

    out, _, _ = portfolio_run
    model, sample = str(out / "first" / "model.onnx"), ROOT / "ml" / "sample"
    assert main(["serve", "--model", model, "--bars", str(sample / "GSPC.csv"), str(sample / "KO.csv"),
                 "--weights", "0.2", "0.3"]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert set(decision["target_weights"]) == {"GSPC", "KO"} and decision["weights"] == [0.2, 0.3]
    assert 0.0 <= sum(decision["target_weights"].values()) <= 1.0 + 1e-6
    # The window is the assets' last common bars, each in contract order: what training saw.
    from ml.data.sources import load_sample
    from ml.serving import portfolio_window

    _, aligned = align_bars({s: load_sample(s) for s in ("GSPC", "KO")})
    window = portfolio_window([sample / "GSPC.csv", sample / "KO.csv"], 64)
    np.testing.assert_allclose(window[0], aligned[-64:], rtol=1e-6)
    assert main(["serve", "--model", model, "--bars", str(sample / "GSPC.csv")]) == 2
    assert "for a model of assets ['GSPC', 'KO']" in capsys.readouterr().err
