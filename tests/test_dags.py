"""Airflow: the DAG folder parses cleanly, and `airflow dags test ppo_training` runs end to end."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT

AIRFLOW = str(Path(sys.executable).parent / "airflow")
TINY_CONFIG = {
    "ppo": {"num_envs": 64, "num_steps": 32, "eval_every": 1},
    "splits": {"n_folds": 2, "test_months": 6, "validation_months": 6, "min_train_bars": 300},
    # Tiny budgets: only the soundness rules apply (the budget floor and profitability rules are off).
    "gate": {"parity_windows": 64, "require_no_collapse": False, "require_beats_cash": False,
             "require_learned": False, "min_timesteps": 0, "benchmark_psr": None, "max_pbo": None,
             "cost_multiple": None},
}


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("airflow")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
        "ML_RUNS_DIR": str(home / "runs"),
        # The tests' config files live in their tmp_path folders: the config_file Param must find them there.
        "ML_CONFIG_ROOT": str(tmp_path_factory.getbasetemp()),
    }
    migrate = subprocess.run([AIRFLOW, "db", "migrate"], env=env, capture_output=True, text=True, cwd=home)
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    return env


def test_dag_folder_imports_without_errors(airflow_env, monkeypatch):
    for key in ("AIRFLOW_HOME", "AIRFLOW__CORE__DAGS_FOLDER", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"):
        monkeypatch.setenv(key, airflow_env[key])
    from airflow.dag_processing.dagbag import BundleDagBag

    bag = BundleDagBag(dag_folder=str(ROOT / "dags"), bundle_path=ROOT / "dags", bundle_name="dags-folder")
    assert bag.import_errors == {}
    dag = bag.dags["ppo_training"]
    assert [t.task_id for t in dag.topological_sort()] == [
        "plan_universe", "load_data", "validate_data", "start_tracking", "plan_folds", "fold_tasks", "train",
        "evaluate", "export_onnx", "register", "summary"]
    # One task per target at every stage, and one per fold of every target for training.
    for task_id in ("load_data", "validate_data", "start_tracking", "plan_folds", "train", "evaluate",
                    "export_onnx", "register"):
        assert "MappedOperator" in type(dag.get_task(task_id)).__name__, task_id
    # Nightly, and whenever the curated market data changes.
    assert type(dag.timetable).__name__ == "AssetOrTimeSchedule"
    assert "0 2 * * *" in repr(dag.timetable.timetable) and "market_data_curated" in str(dag.timetable.asset_condition)
    params = dag.params
    for name in ("source", "symbol", "interval", "timesteps", "device", "n_folds", "seeds", "promote"):
        assert params.get_param(name).description, name
    params.validate()  # defaults satisfy their own schema
    # Every data and training Param is empty by default (the config file decides), and the form
    # says what an empty one means without a file: the built-in default, read from the config code.
    from ml.config import config_from_dict

    defaults = config_from_dict({})
    built_in = {"source": defaults.data.source, "symbol": defaults.data.symbol, "interval": defaults.data.interval,
                "timesteps": defaults.ppo.total_timesteps, "num_envs": defaults.ppo.num_envs,
                "num_steps": defaults.ppo.num_steps, "device": defaults.ppo.device,
                "promote": str(defaults.registry.promote).lower()}
    for name, value in built_in.items():
        assert params.get_param(name).value is None, name
        assert f"(built-in: {value})" in params.get_param(name).description, name


def test_dag_file_imports_nothing_heavy_at_parse_time():
    code = (
        "import sys, runpy\n"
        f"runpy.run_path(r'{ROOT / 'dags' / 'ppo_training.py'}')\n"
        "heavy = [m for m in ('torch', 'mlflow', 'great_expectations', 'onnx', 'ml.pipeline') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_bad_params_are_refused_before_a_run(airflow_env):
    proc = subprocess.run([AIRFLOW, "dags", "test", "ppo_training", "-c", json.dumps({"timesteps": 5})],
                          env=airflow_env, capture_output=True, text=True, cwd=airflow_env["AIRFLOW_HOME"])
    assert proc.returncode != 0
    assert "timesteps" in (proc.stdout + proc.stderr)


def test_a_bad_config_file_fails_the_run_at_load_data_without_retries(airflow_env, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo:\n  gamma: 7\n")
    runs = tmp_path / "runs"  # its own runs folder: the other DAG tests count theirs
    env = {**airflow_env, "ML_RUNS_DIR": str(runs)}
    # Its own process group, so a run that hangs in retries (two backoff delays, minutes) is ended whole.
    proc = subprocess.Popen([AIRFLOW, "dags", "test", "ppo_training", "-c", json.dumps({"config_file": str(bad)})],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=env["AIRFLOW_HOME"], start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"a bad config was retried instead of failing at once: {log[-3000:]}")
    assert proc.returncode != 0, log[-3000:]
    assert "ppo.gamma = 7: must be in (0, 1]" in log, log[-3000:]
    assert "AirflowFailException" in log, log[-3000:]
    # One attempt, failed for good: never up for retry.
    assert "up_for_retry" not in log, log[-3000:]
    assert re.search(r"ppo_training FAILED: task=plan_universe .* try=1 ", log), log[-3000:]
    assert not runs.exists() or not any(runs.rglob("*")), sorted(runs.rglob("*"))


def test_airflow_dags_test_trains_registers_and_promotes(airflow_env, tmp_path):
    config_file = tmp_path / "tiny.json"
    config_file.write_text(json.dumps(TINY_CONFIG))
    conf = {"source": "sample", "symbol": "GSPC", "start": "2009-01-01", "timesteps": 4096, "seeds": [1, 2],
            "config_file": str(config_file)}
    proc = subprocess.run([AIRFLOW, "dags", "test", "ppo_training", "-c", json.dumps(conf)],
                          env=airflow_env, capture_output=True, text=True, cwd=airflow_env["AIRFLOW_HOME"])
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]

    from mlflow.tracking import MlflowClient

    from ml.release.registry import CHAMPION, alias_version
    from ml.serving import Policy

    uri = airflow_env["MLFLOW_TRACKING_URI"]
    version = alias_version(uri, "ppo_GSPC_1d", CHAMPION)
    assert version is not None, log[-3000:]
    assert MlflowClient(uri).get_model_version("ppo_GSPC_1d", version).tags["gate.passed"] == "true"

    run_dirs = list((Path(airflow_env["ML_RUNS_DIR"]) / "ppo_training").iterdir())
    assert len(run_dirs) == 1
    run_dir = run_dirs[0] / "GSPC"  # one folder per target of the run
    summary = json.loads((run_dirs[0] / "summary.json").read_text())
    assert [(row["target"], row["outcome"], row["version"]) for row in summary["targets"]] == [
        ("GSPC", "trained", version)]
    report = json.loads((run_dir / "report.json").read_text())
    assert len(report["folds"]) == 2
    assert all(len(fold["seeds"]["per_seed"]) == 2 for fold in report["folds"])
    assert json.loads((run_dir / "config.json").read_text())["ppo"]["total_timesteps"] == 4096

    policy = Policy.load("models:/ppo_GSPC_1d@champion", tracking_uri=uri)
    windows = np.load(run_dir / "parity_windows.npz")
    exposure = policy.decide(windows["ohlcv"], windows["position"])
    assert exposure.shape == (len(windows["ohlcv"]), 1)
    assert np.isin(exposure, report["exposure_levels"]).all()


def test_a_universe_run_trains_what_changed_and_a_failing_symbol_stops_only_itself(airflow_env, tmp_path):
    """Runs after the single-symbol test above, with the same settings: its GSPC model is current."""
    from mlflow.tracking import MlflowClient

    from ml.release.registry import CHAMPION, alias_version

    config_file = tmp_path / "tiny.json"
    config_file.write_text(json.dumps(TINY_CONFIG))
    uri = airflow_env["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri)
    gspc_versions = len(client.search_model_versions("name = 'ppo_GSPC_1d'"))
    assert gspc_versions >= 1, "the single-symbol DAG test registers GSPC first"

    def run(universe: list[str]) -> tuple[subprocess.CompletedProcess, dict]:
        conf = {"universe": universe, "source": "sample", "start": "2009-01-01", "timesteps": 4096,
                "seeds": [1, 2], "config_file": str(config_file)}
        proc = subprocess.run([AIRFLOW, "dags", "test", "ppo_training", "-c", json.dumps(conf)],
                              env=airflow_env, capture_output=True, text=True, cwd=airflow_env["AIRFLOW_HOME"])
        newest = max((Path(airflow_env["ML_RUNS_DIR"]) / "ppo_training").iterdir(), key=lambda p: p.stat().st_mtime)
        summary = json.loads((newest / "summary.json").read_text())
        return proc, {row["target"]: row for row in summary["targets"]}

    proc, rows = run(["GSPC", "KO", "NOPE"])
    log = proc.stdout + proc.stderr
    # NOPE has no data: its load fails at once (bad input is never retried) and the run fails,
    # naming it; GSPC is unchanged since its registered version; KO trains and is registered.
    assert proc.returncode != 0, log[-4000:]
    assert "1 of 3 targets failed: NOPE (load: DataError: no bundled sample for symbol 'NOPE'" in log, log[-4000:]
    assert "up_for_retry" not in log, log[-4000:]
    assert rows["NOPE"]["outcome"] == "failed"
    assert rows["GSPC"]["outcome"] == "skipped", rows["GSPC"]
    assert "was trained on the same data" in rows["GSPC"]["why"] and "the champion" in rows["GSPC"]["why"]
    assert len(client.search_model_versions("name = 'ppo_GSPC_1d'")) == gspc_versions
    assert rows["KO"]["outcome"] == "trained", rows["KO"]
    assert alias_version(uri, "ppo_KO_1d", CHAMPION) == rows["KO"]["version"]
    assert "unchanged: ppo_GSPC_1d" in log  # the skipped task says why in its log

    # Nothing changed since: the next run registers nothing and succeeds.
    proc, rows = run(["GSPC", "KO"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert {row["outcome"] for row in rows.values()} == {"skipped"}
    assert len(client.search_model_versions("name = 'ppo_KO_1d'")) == 1


def test_airflow_dags_test_market_data_curates_the_lake_and_reruns_change_nothing(airflow_env, tmp_path):
    from ml.data.lake import Lake

    lake_root = tmp_path / "lake"
    airflow_env = {**airflow_env, "ML_DATA_ROOT": str(tmp_path)}  # the lake_root Param must lie in a data root
    conf = json.dumps({"symbols": ["GSPC", "KO"], "source": "sample", "lake_root": str(lake_root)})
    first = subprocess.run([AIRFLOW, "dags", "test", "market_data", "-c", conf], env=airflow_env,
                           capture_output=True, text=True, cwd=airflow_env["AIRFLOW_HOME"])
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    lake = Lake(str(lake_root))
    hashes = {symbol: lake.snapshot(symbol, "1d")[1] for symbol in ("GSPC", "KO")}
    assert len(lake.read_curated("KO", "1d")) == 8313
    again = subprocess.run([AIRFLOW, "dags", "test", "market_data", "-c", conf], env=airflow_env,
                           capture_output=True, text=True, cwd=airflow_env["AIRFLOW_HOME"])
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert {symbol: lake.snapshot(symbol, "1d")[1] for symbol in ("GSPC", "KO")} == hashes
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    refused = subprocess.run([AIRFLOW, "dags", "test", "market_data", "-c",
                              json.dumps({"symbols": ["GSPC"], "source": "sample", "lake_root": str(outside)})],
                             env=airflow_env, capture_output=True, text=True, cwd=airflow_env["AIRFLOW_HOME"])
    assert refused.returncode != 0 and "outside the allowed roots" in refused.stdout + refused.stderr
    assert not outside.exists()  # nothing was written there


def test_airflow_dags_test_model_promotion(airflow_env):
    """Runs after the ppo_training test registered a champion in the same store."""
    from ml.release.registry import CHAMPION, alias_version

    uri = airflow_env["MLFLOW_TRACKING_URI"]
    champion = alias_version(uri, "ppo_GSPC_1d", CHAMPION)
    assert champion is not None, "the ppo_training DAG test registers the first champion"

    def run(conf):
        return subprocess.run([AIRFLOW, "dags", "test", "model_promotion", "-c", json.dumps(conf)],
                              env=airflow_env, capture_output=True, text=True, cwd=airflow_env["AIRFLOW_HOME"])

    promoted = run({"action": "promote", "model_name": "ppo_GSPC_1d", "version": champion})
    assert promoted.returncode == 0, (promoted.stdout + promoted.stderr)[-4000:]
    # Nothing to roll back to: the only champion replaced none. The DAG fails and says why.
    refused = run({"action": "rollback", "model_name": "ppo_GSPC_1d"})
    assert refused.returncode != 0
    assert "records no previous champion" in refused.stdout + refused.stderr
    assert alias_version(uri, "ppo_GSPC_1d", CHAMPION) == champion


def test_airflow_dags_test_trains_a_portfolio_from_a_config_file(airflow_env, tmp_path):
    """The same DAG runs portfolio mode when its config file names several symbols."""
    config_file = tmp_path / "portfolio.json"
    config_file.write_text(json.dumps({**TINY_CONFIG, "data": {"symbols": ["GSPC", "KO"]},
                                       "action": {"mode": "portfolio"}}))
    conf = {"source": "sample", "start": "2009-01-01", "timesteps": 4096, "config_file": str(config_file)}
    proc = subprocess.run([AIRFLOW, "dags", "test", "ppo_training", "-c", json.dumps(conf)],
                          env=airflow_env, capture_output=True, text=True, cwd=airflow_env["AIRFLOW_HOME"])
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]

    from ml.release.registry import CHAMPION, alias_version
    from ml.serving import Policy

    uri = airflow_env["MLFLOW_TRACKING_URI"]
    assert alias_version(uri, "ppo_GSPC_KO_1d", CHAMPION) is not None, log[-3000:]
    policy = Policy.load("models:/ppo_GSPC_KO_1d@champion", tracking_uri=uri)
    assert policy.symbols == ["GSPC", "KO"]
    run_dir = max((Path(airflow_env["ML_RUNS_DIR"]) / "ppo_training").iterdir(), key=lambda p: p.stat().st_mtime)
    windows = np.load(run_dir / "GSPC_KO" / "parity_windows.npz")
    weights = policy.decide(windows["ohlcv"], windows["position"])
    assert weights.shape == (len(windows["ohlcv"]), 2) and (weights.sum(axis=1) <= 1 + 1e-6).all()
