"""The whole pipeline in-process: report, curves, ONNX, registry aliases, and honest failure paths."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from ml.config import config_from_dict
from ml.data.validation import DataValidationError
from ml.pipeline import REPORT_SCHEMA_VERSION, load_data, run_pipeline, validate_data
from ml.release.registry import CHALLENGER, CHAMPION, alias_version
from ml.serving import Policy
from tests.conftest import ROOT

TINY = {
    "data": {"source": "sample", "symbol": "GSPC", "start": "2009-01-01"},
    "ppo": {"total_timesteps": 4096, "num_envs": 64, "num_steps": 32, "eval_every": 1},
    "splits": {"n_folds": 2, "test_months": 6, "validation_months": 6, "min_train_bars": 300},
    # A 4096-step policy cannot be expected to make money: this run checks the plumbing, so only
    # the soundness rules of the gate apply (the profit rules have their own tests).
    # Tiny budgets: only the soundness rules apply (the budget floor and profitability rules are off).
    "gate": {"parity_windows": 64, "require_no_collapse": False, "require_beats_cash": False,
             "require_learned": False, "min_timesteps": 0, "benchmark_psr": None, "max_pbo": None,
             "cost_multiple": None},
}


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # A module fixture is set up before the per-test environment isolation: name the store.
    store = {"tracking_uri": f"sqlite:///{out / 'mlflow.db'}"}
    result = run_pipeline(config_from_dict({**TINY, "registry": store}), out)
    return out, result


def test_report_has_folds_baselines_and_aggregate(pipeline_run):
    out, _ = pipeline_run
    report = json.loads((out / "report.json").read_text())
    assert report["schema_version"] == REPORT_SCHEMA_VERSION
    assert report["symbol"] == "GSPC" and report["interval"] == "1d" and len(report["dataset_hash"]) == 64
    assert len(report["folds"]) == 2
    for fold in report["folds"]:
        assert fold["train"]["end"] < fold["validation"]["start"] < fold["test"]["start"]
        assert {"buy_and_hold", "cash", "ma_crossover", "momentum", "random"} <= set(fold["baselines"])
        assert fold["baselines"]["cash"]["total_return"] == 0.0
        for metrics in (fold["policy"]["test"], fold["baselines"]["buy_and_hold"]):
            assert np.isfinite(metrics["sharpe"]) and metrics["bars"] > 100
        curve = pd.read_csv(out / fold["equity_curve"])
        assert list(curve.columns) == ["timestamp", "nav", "position"]
        assert curve["nav"].iloc[0] == 1.0
        # The reported total return is the curve's, not a number from elsewhere.
        assert fold["policy"]["test"]["total_return"] == pytest.approx(curve["nav"].iloc[-1] - 1.0)
    assert "folds_beating" in report["aggregate"]
    for fold in report["folds"]:
        assert [s["seed"] for s in fold["seeds"]["per_seed"]] == [1]
        assert fold["seeds"]["per_seed"][0]["selected"] and fold["training"]["selected_seed"] == 1
        assert fold["policy"]["test"]["sharpe"] == pytest.approx(fold["seeds"]["per_seed"][0]["sharpe"])
        assert fold["policy"]["test"]["sharpe_ci_low"] <= fold["policy"]["test"]["sharpe"] \
            <= fold["policy"]["test"]["sharpe_ci_high"]
        assert 0.0 <= fold["policy"]["test"]["psr"] <= 1.0
    assert (out / "report.html").stat().st_size > 10_000


def test_registry_holds_a_champion_whose_onnx_runs(pipeline_run):
    out, result = pipeline_run
    uri, name = result["tracking_uri"], result["model_name"]
    assert result["gate"]["passed"] and result["champion"]
    assert alias_version(uri, name, CHAMPION) == result["version"]
    assert alias_version(uri, name, CHALLENGER) == result["version"]
    version = MlflowClient(uri).get_model_version(name, result["version"])
    assert version.tags["gate.passed"] == "true"
    assert "PASS onnx parity" in version.tags["gate.reasons"]
    # What the version page shows: numbers a person can read, the hashes that decide a retrain.
    numbers = json.loads(version.tags["gate.numbers"])
    floats = [value for value in numbers.values() if isinstance(value, float)]
    assert floats and all(value == float(f"{value:.4g}") for value in floats)
    assert version.tags["dataset_hash"] and version.tags["config_hash"]
    assert f"models:/{name}@champion" in MlflowClient(uri).get_registered_model(name).description

    policy = Policy.load(f"models:/{name}@champion", tracking_uri=uri)
    meta = policy.metadata
    for key in ("lookback", "interval", "feature_set_version", "action_semantics", "training_window",
                "dataset_hash", "mlflow_run_id", "code_version"):
        assert meta.get(key), key
    assert meta["mlflow_run_id"] == result["run_id"]
    bars = pd.read_parquet(out / "bars.parquet")
    window = bars[["open", "high", "low", "close", "volume"]].to_numpy("float32")[-policy.lookback:]
    exposure = policy.decide(window[None], np.zeros((1, 1), np.float32))
    assert exposure.shape == (1, 1) and -1.0 <= exposure[0, 0] <= 1.0


def test_run_logged_params_metrics_and_report(pipeline_run):
    _, result = pipeline_run
    client = MlflowClient(result["tracking_uri"])
    run = client.get_run(result["run_id"])
    assert run.data.tags["dataset_hash"]
    assert "test/mean/policy/sharpe" in run.data.metrics and "test/mean/buy_and_hold/sharpe" in run.data.metrics
    assert any(k.startswith("fold0/seed1/loss/") for k in run.data.metrics)
    assert run.data.params["ppo.total_timesteps"] == "4096"
    artifacts = {a.path for a in client.list_artifacts(result["run_id"], "report")}
    assert "report/report.json" in artifacts


def test_failed_parity_leaves_the_previous_champion(pipeline_run, tmp_path):
    """A second run whose gate fails registers a challenger but never moves champion."""
    _, first = pipeline_run
    uri = first["tracking_uri"]
    # The tolerance must be positive; one far below float32 resolution fails like zero would.
    config = config_from_dict({**TINY, "gate": {**TINY["gate"], "parity_tolerance": 1e-12},
                               "registry": {"tracking_uri": uri}})
    result = run_pipeline(config, tmp_path / "second")
    if result["gate"]["checks"]["onnx_parity"]:
        pytest.fail("parity with tolerance 1e-12 was expected to fail on float32 features")
    assert not result["champion"]
    assert alias_version(uri, first["model_name"], CHAMPION) == first["version"]
    assert alias_version(uri, first["model_name"], CHALLENGER) == result["version"]
    # With a champion in place, both models were backtested on bars neither had seen.
    comparison = result["champion_comparison"]
    assert comparison["champion_version"] == first["version"] and comparison["bars"] >= 20
    assert any("vs champion v" in reason for reason in result["gate"]["reasons"])
    version = MlflowClient(uri).get_model_version(first["model_name"], result["version"])
    assert version.tags["gate.passed"] == "false" and "FAIL onnx parity" in version.tags["gate.reasons"]


def test_bad_data_stops_before_training(tmp_path, gspc_bars):
    bad = gspc_bars.copy()
    bad.loc[100, "close"] *= 100
    path = tmp_path / "GLITCH.csv"
    bad.rename(columns={"timestamp": "Date"}).to_csv(path, index=False)
    run_dir = tmp_path / "run"
    load_data(run_dir, config_from_dict({"data": {"source": "file", "path": str(path), "symbol": "GLITCH"}}))
    with pytest.raises(DataValidationError, match="no abnormal one-bar jump"):
        validate_data(run_dir)
    assert json.loads((run_dir / "validation.json").read_text())["GLITCH"]["success"] is False
    assert not (run_dir / "tracking.json").exists()


def test_cli_pipeline_writes_report_model_and_curves(tmp_path, shared_market):
    config = tmp_path / "tiny.yaml"
    tiny = {k: v for k, v in TINY.items() if k != "data"}
    config.write_text(json.dumps({**tiny, "data": {"start": "2009-01-01"}}))
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "ml", "pipeline", "--data", str(shared_market / "GSPC.csv"),
                           "--out", str(out), "--timesteps", "2048", "--config", str(config)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("report.json", "model.onnx", "fold_0_test_equity.csv", "fold_1_test_equity.csv"):
        assert (out / name).exists(), name
    assert json.loads((out / "config.json").read_text())["ppo"]["total_timesteps"] == 2048


def test_cli_refuses_a_bad_config_in_one_line_before_any_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo:\n  gamma: 7\n")
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, "-m", "ml", "pipeline", "--out", str(out), "--config", str(bad)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == ["config error: ppo.gamma = 7: must be in (0, 1]"], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_a_pipeline_run_leaves_no_tracking_uri_behind(pipeline_run):
    """The next run in the same process (a worker, a notebook) must not inherit this run's store."""
    import os

    assert "MLFLOW_TRACKING_URI" not in os.environ
