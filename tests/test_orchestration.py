"""DAG Params and asset events -> pipeline config, without Airflow."""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace

from ml.orchestration import config_from_params, newest_asset_event, run_dir_for

PARAMS = {"source": "sample", "symbol": "GSPC", "interval": "1d", "data_path": None, "start": None,
          "timesteps": 8192, "device": "cpu", "n_folds": 3, "promote": False, "seeds": [3, 4],
          "num_envs": None, "num_steps": None, "config_file": None}


def test_params_map_onto_the_config():
    config = config_from_params(PARAMS)
    assert (config.data.source, config.data.symbol) == ("sample", "GSPC")
    assert config.ppo.total_timesteps == 8192 and config.ppo.device == "cpu"
    assert config.splits.n_folds == 3 and config.seeds == (3, 4) and config.registry.promote is False


def test_a_run_triggered_by_the_lake_trains_on_the_newest_changed_symbol():
    def event(minute, symbol):
        return SimpleNamespace(timestamp=datetime(2026, 11, 20, 21, minute, tzinfo=timezone.utc),
                               extra={"symbol": symbol, "interval": "1d", "lake_root": "s3://market-data"})

    events = {"market_data_curated": [event(31, "KO"), event(45, "SPY"), event(40, "GSPC")]}
    newest = newest_asset_event(events)
    assert newest["symbol"] == "SPY"
    config = config_from_params(PARAMS, newest)
    assert (config.data.source, config.data.symbol, config.data.path) == ("lake", "SPY", "s3://market-data")
    assert newest_asset_event({}) is None and newest_asset_event(None) is None


def test_run_folders_are_safe_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("ML_RUNS_DIR", str(tmp_path))
    path = run_dir_for("ppo_training", "manual__2026-11-21T22:43:20.634018+00:00")
    assert path.parent == tmp_path / "ppo_training" and ":" not in path.name and "+" not in path.name


def test_pipeline_loads_curated_bars_from_the_lake(tmp_path):
    from ml.config import config_from_dict
    from ml.data.ingest import ingest_symbol
    from ml.data.lake import Lake
    from ml.pipeline import load_data

    root = tmp_path / "lake"
    assert ingest_symbol(str(root), "KO", source="sample")["status"] == "updated"
    _, curated_hash = Lake(str(root)).snapshot("KO", "1d")
    summary = load_data(tmp_path / "run", config_from_dict({"data": {"source": "lake", "symbol": "KO",
                                                                      "path": str(root)}}))
    assert summary["rows"] == 8313 and summary["close_only"] is True
    assert summary["dataset_hash"] == curated_hash  # the whole series: the same content hash as the lake's


def test_a_config_file_turns_a_dag_run_into_a_portfolio_run():
    from tests.conftest import ROOT

    config = config_from_params({**PARAMS, "config_file": str(ROOT / "docs" / "portfolio-config.yaml")})
    assert bool(config.data.symbols) and config.data.symbols == ("GSPC", "KO") and config.action.mode == "portfolio"
    assert config.model_name == "ppo_GSPC_KO_1d" and config.ppo.total_timesteps == 8192
