"""The Airflow plugin pieces: operators and the registry hook call `ml`, fail clearly, and route training."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "plugins"))  # as Airflow does for its plugins folder

from airflow.sdk.exceptions import AirflowFailException  # noqa: E402
from ml_operators import DataQualityOperator, MlflowRegistryHook, PPOTrainingOperator  # noqa: E402


def test_data_quality_operator_passes_real_data_and_fails_naming_the_rule(tmp_path, shared_market, gspc_bars):
    summary = DataQualityOperator(task_id="gate", path=str(shared_market / "GSPC.csv")).execute({})
    assert summary["suite"] == "bars_ohlcv" and summary["rows"] == 5031
    bad = gspc_bars.copy()
    bad.loc[10, "high"] = bad.loc[10, "low"] * 0.5
    path = tmp_path / "BAD.csv"
    bad.rename(columns={"timestamp": "Date"}).to_csv(path, index=False)
    with pytest.raises(AirflowFailException, match="high >= close"):
        DataQualityOperator(task_id="gate", path=str(path)).execute({})
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(AirflowFailException, match="empty"):
        DataQualityOperator(task_id="gate", path=str(tmp_path / "empty.csv")).execute({})


def test_training_operator_routes_to_the_training_queue_and_trains_a_fold(tmp_path, monkeypatch):
    monkeypatch.setenv("ML_TRAINING_QUEUE", "gpu")
    monkeypatch.setenv("ML_TRAINING_POOL", "gpu")
    routed = PPOTrainingOperator(task_id="train", run_dir="x", fold=0)
    assert (routed.queue, routed.pool) == ("gpu", "gpu")
    on_cpu = PPOTrainingOperator(task_id="train_cpu", run_dir="x", fold=0, device="cpu")
    assert on_cpu.queue != "gpu" and on_cpu.pool != "gpu"

    from ml import pipeline
    from ml.config import config_from_dict
    from tests.test_pipeline import TINY

    run_dir = tmp_path / "run"
    pipeline.load_data(run_dir, config_from_dict(TINY))
    pipeline.start_tracking(run_dir)
    assert pipeline.plan_folds(run_dir) == [0, 1]
    result = PPOTrainingOperator(task_id="train", run_dir=str(run_dir), fold=1, device="cpu").execute({})
    assert result == {"fold": 1, "device": "cpu", "selected_seed": 1}
    assert (run_dir / "folds" / "fold_1" / "policy.pt").exists()


def test_registry_hook_needs_a_tracking_uri_and_refuses_bad_moves(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(AirflowFailException, match="no MLflow tracking URI"):
        MlflowRegistryHook()
    hook = MlflowRegistryHook(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert hook.champion("nothing_here") is None
    with pytest.raises(AirflowFailException, match="nothing_here: no registered model of that name"):
        hook.rollback("nothing_here")


def test_plugin_links_the_mlflow_ui(monkeypatch):
    monkeypatch.setenv("MLFLOW_UI_URL", "http://mlflow.example:5000")
    import importlib

    import mlflow_link

    importlib.reload(mlflow_link)
    views = {view["name"]: view for view in mlflow_link.MlflowLinkPlugin.external_views}
    assert views["MLflow"]["href"] == "http://mlflow.example:5000"
    assert views["MLflow models"]["href"].endswith("/#/models")
