"""Hyperparameter search: trials on validation folds only, a study continued by a second process,
and a retrained best config whose report counts every trial in the deflated Sharpe and the PBO."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import optuna
import pytest
import yaml

from ml.cli import main
from ml.config import ConfigError, config_from_dict, load_config, merge
from ml.tuning import Param, SearchSpace, default_space, load_space, trial_record, tune
from tests.conftest import ROOT
from tests.test_dags import AIRFLOW, airflow_env  # noqa: F401  (the fixture)
from tests.test_pipeline import TINY

SPACE = {"ppo.learning_rate": {"log_uniform": ["1e-5", "1e-3"]}, "ppo.ent_coef": {"uniform": [0.0, 0.05]},
         "ppo.hidden": {"choice": [[32, 32], [64, 64]]}, "lookback": {"choice": [64, 80]}}
FIRST, SECOND = 6, 2  # trials run in this process, then by the CLI in a second one


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune")
    base = {**TINY, "registry": {"tracking_uri": f"sqlite:///{out / 'mlflow.db'}"}}
    (out / "base.yaml").write_text(yaml.safe_dump(base))
    (out / "space.yaml").write_text(yaml.safe_dump(SPACE))
    storage = f"sqlite:///{out / 'study.db'}"
    config = config_from_dict(base)
    # Two startup trials: the median pruner judges the rest after their first fold.
    first = []
    tune("s", storage, config, load_space(out / "space.yaml", config), out, FIRST, retrain=False, seed=0,
         startup_trials=2, on_trial=first.append)
    done = subprocess.run([sys.executable, "-m", "ml", "tune", "--config", str(out / "base.yaml"),
                           "--trials", str(SECOND), "--study", "s", "--storage", storage, "--out", str(out),
                           "--space", str(out / "space.yaml"), "--seed", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, storage, first, done.stdout


def test_trials_are_scored_on_folds_and_pruned(study):
    _, storage, first, _ = study
    assert [t["number"] for t in first] == list(range(FIRST))
    records = trial_record("s", storage)
    assert len(records) == FIRST + SECOND
    states = [t["state"] for t in records]
    assert set(states) <= {"COMPLETE", "PRUNED"}
    assert "PRUNED" in states  # the pruner stopped a trial below the median after its first fold
    for t in records:
        # One intermediate value per fold trained; a pruned trial stopped after its first.
        assert list(t["intermediate"]) == ([0] if t["state"] == "PRUNED" else [0, 1])
        if t["state"] == "COMPLETE":
            assert t["value"] == pytest.approx(np.mean(list(t["intermediate"].values())))
        assert set(t["params"]) == set(SPACE)


def test_a_second_process_continues_the_study(study):
    _, _, _, stdout = study
    lines = [line for line in stdout.splitlines() if line.startswith("trial ")]
    assert [int(line.split()[1]) for line in lines] == list(range(FIRST, FIRST + SECOND))
    assert all(line.split()[2] in ("COMPLETE", "PRUNED") and "ppo.learning_rate" in line for line in lines)
    assert '"version"' in stdout  # the retrained model's registry result


def test_trials_never_read_the_test_windows(study):
    out, _, _, _ = study
    folders = sorted((out / "trials").glob("trial_*"))
    assert len(folders) == FIRST + SECOND
    for folder in folders:
        assert (folder / "folds" / "fold_0" / "training.json").exists()
        assert not (folder / "report.json").exists()
        assert not list(folder.glob("fold_*_test_*.csv")) and not (folder / "model.onnx").exists()


def test_the_best_run_counts_every_trial(study):
    out, storage, _, _ = study
    best = out / f"best_after_{FIRST + SECOND}_trials"  # named by the study's size; never overwritten
    tuning = json.loads((best / "tuning.json").read_text())
    report = json.loads((best / "report.json").read_text())
    section = report["tuning"]
    pruned = sum(t["state"] == "PRUNED" for t in tuning["trials"])
    assert section["study"] == "s" and section["trials_pruned"] == pruned
    assert section["trials_completed"] >= FIRST + SECOND - pruned
    assert section["best_trial"] == tuning["best_trial"]
    assert section["inflation"] == pytest.approx(section["best_validation_score"] - section["selection_allowance"])
    for fold in report["folds"]:
        own = [h for h in json.loads((best / "folds" / f"fold_{fold['index']}" / "seed_1" / "history.json").read_text())
               if "validation_score" in h]
        scored = [t for t in tuning["trials"] if str(fold["index"]) in t["intermediate"]]
        assert fold["policy"]["test"]["dsr_trials"] == len(own) + len(scored) > len(own)
        # The PBO sees more candidates than the run's own checkpoints (trials with the same validation bars).
        own_rows = np.load(best / "folds" / f"fold_{fold['index']}" / "seed_1" / "validation_returns.npy").shape[0]
        assert fold["pbo"]["n_trials"] > own_rows
    page = (best / "report.html").read_text()
    assert "Hyperparameter search" in page
    # The study's plots: on the report page and in the MLflow run, beside the run's own.
    assert set(tuning["figures"].values()) == {"tuning_history.png", "tuning_importance.png"}
    from ml.release.tracking import store_client

    registration = json.loads((best / "registration.json").read_text())
    logged = {a.path for a in store_client(registration["tracking_uri"]).list_artifacts(registration["run_id"],
                                                                                        "report/plots")}
    for caption, name in tuning["figures"].items():
        assert (best / "plots" / name).stat().st_size > 10_000 and caption in page
        assert f"report/plots/{name}" in logged


@pytest.mark.parametrize("space, named", [
    ({"ppo.learning_rat": {"uniform": [0, 1]}}, "ppo.learning_rat"),
    ({"ppo.hidden": {"choice": [[0]]}}, "ppo.hidden"),
    ({"ppo.ent_coef": {"uniform": [0.05, 0.0]}}, "ppo.ent_coef"),
    ({"lookback": {"choice": [32, 64]}}, "lookback"),
])
def test_a_bad_space_file_is_one_line_naming_the_field(tmp_path, capsys, space, named):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    code = main(["tune", "--trials", "1", "--study", "x", "--storage", f"sqlite:///{tmp_path / 's.db'}",
                 "--out", str(tmp_path / "out"), "--space", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(path) in err and named in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "s.db").exists()


def test_airflow_dags_test_ppo_tuning_runs_8_trials_and_registers_the_best(airflow_env, tmp_path):  # noqa: F811
    """The DAG: eight trial tasks, then the best config retrained, registered and counted."""
    from ml.release.tracking import store_client

    config_file = tmp_path / "tiny.yaml"  # under ML_CONFIG_ROOT (the test session's temp folder)
    config_file.write_text(yaml.safe_dump({"data": {"start": "2009-01-01"}, **{key: TINY[key] for key in ("ppo", "splits", "gate")}}))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"ppo.learning_rate": {"log_uniform": [1e-5, 1e-3]},
                                                        "ppo.ent_coef": {"uniform": [0.0, 0.05]}}))
    env = {**airflow_env, "ML_RUNS_DIR": str(tmp_path / "runs")}
    conf = {"study": "gspc_dag", "trials": 8, "symbol": "GSPC", "config_file": str(config_file),
            "space_file": str(tmp_path / "space.yaml")}
    proc = subprocess.run([AIRFLOW, "dags", "test", "ppo_tuning", "-c", json.dumps(conf)], env=env,
                          capture_output=True, text=True, cwd=env["AIRFLOW_HOME"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    folder = tmp_path / "runs" / "ppo_tuning" / "gspc_dag"
    records = trial_record("gspc_dag", f"sqlite:///{tmp_path / 'runs' / 'ppo_tuning' / 'optuna.db'}")
    assert len(records) == 8 and {t["state"] for t in records} <= {"COMPLETE", "PRUNED"}
    best = folder / "best_after_8_trials"
    report = json.loads((best / "report.json").read_text())
    section = report["tuning"]
    assert section["trials_completed"] + section["trials_pruned"] == 8
    for fold in report["folds"]:
        assert fold["policy"]["test"]["dsr_trials"] >= section["trials_completed"] + 1
    registration = json.loads((best / "registration.json").read_text())
    version = store_client(env["MLFLOW_TRACKING_URI"]).get_model_version(registration["model_name"],
                                                                         registration["version"])
    assert version.run_id == registration["run_id"]

    refused = subprocess.run([AIRFLOW, "dags", "test", "ppo_tuning", "-c", json.dumps({**conf, "study": "../x"})],
                             env=env, capture_output=True, text=True, cwd=env["AIRFLOW_HOME"])
    assert refused.returncode != 0 and not (tmp_path / "runs" / "x").exists()


def test_the_study_plots_leave_matplotlib_settings_as_they_were(tmp_path):
    """Optuna's plots switch the style sheet process-wide; the report's own plots must not change."""
    import matplotlib

    from ml.tuning.study import plot_study

    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="p", storage=storage, direction="maximize")
    study.optimize(lambda t: t.suggest_float("a", 0, 1) - t.suggest_float("b", 0, 1) ** 2, n_trials=6)
    before = dict(matplotlib.rcParams)
    figures = plot_study("p", storage, tmp_path / "plots")
    assert dict(matplotlib.rcParams) == before
    assert sorted(figures.values()) == ["tuning_history.png", "tuning_importance.png"]


def test_the_default_space_fits_the_config_it_searches():
    single = {p.field for p in default_space(load_config()).params}
    assert {"ppo.encoder", "action.mode", "risk.target_volatility", "env.drawdown_penalty", "ppo.critic_quantiles",
            "ppo.cvar_weight", "ppo.regime_states"} <= single
    # A portfolio keeps its weights, the plain MLP and no regime model; the rest of the search still applies.
    portfolio = {p.field for p in default_space(load_config(ROOT / "docs" / "portfolio-config.yaml")).params}
    assert portfolio == single - {"ppo.encoder", "action.mode", "ppo.regime_states"}


def test_a_parameter_that_needs_another_is_searched_only_where_that_one_is_on(tmp_path):
    """The CVaR weight needs a quantile critic: a trial without one never sets it, so no trial is refused."""
    space = SearchSpace((Param("ppo.critic_quantiles", "choice", choices=(0, 32)),
                         Param("ppo.cvar_weight", "choice", choices=(0.0, 0.5), needs="ppo.critic_quantiles")))
    space.check(load_config())
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        config = config_from_dict(merge(load_config().to_dict(), space.overrides(trial)))  # never refused
        seen.add((config.ppo.critic_quantiles, "ppo.cvar_weight" in trial.params, config.ppo.cvar_weight))
    assert seen == {(0, False, 0.0), (32, True, 0.0), (32, True, 0.5)}
    # A base with a CVaR term: trials without quantiles turn it off, so none is refused.
    cvar_base = config_from_dict({"ppo": {"critic_quantiles": 32, "cvar_weight": 0.5}})
    space.check(cvar_base)
    overrides = space.overrides(optuna.trial.FixedTrial({"ppo.critic_quantiles": "0"}))
    assert config_from_dict(merge(cvar_base.to_dict(), overrides)).ppo.cvar_weight == 0.0
    with pytest.raises(ConfigError, match="ppo.cvar_weight: needs ppo.critic_quantiles"):
        SearchSpace(space.params[1:]).check(load_config())
    with pytest.raises(ConfigError, match="a value that turns it on"):
        SearchSpace((Param("ppo.critic_quantiles", "choice", choices=(0,)), space.params[1])).check(load_config())
