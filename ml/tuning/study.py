"""Optuna studies over the pipeline: one trial at a time, on validation windows only.

A trial trains the walk-forward folds of its config (``ml.pipeline``: load, validate, plan
folds, train per fold) in its own folder and scores the mean of the folds' selected
validation scores. It never evaluates: the test windows stay unread until the best config is
retrained by the full pipeline, whose evaluation counts every trial of the study
(``tuning.json``) in the deflated Sharpe and the PBO.

Storage is any Optuna RDB URL (``sqlite:///study.db``, ``postgresql+psycopg2://...``), so a
scheduler can run ``run_trial`` one task per trial, from any process.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import warnings
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
import optuna  # noqa: E402
import sqlalchemy  # noqa: E402
from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances  # noqa: E402

from ml.config import ConfigError, PipelineConfig, config_from_dict, merge
from ml.pipeline import load_data, plan_folds, run_pipeline, start_tracking, train_fold_seeds, validate_data
from ml.pipeline.rundir import RunFolder, write_json
from ml.tuning.space import SearchSpace

log = logging.getLogger(__name__)
TrialState = optuna.trial.TrialState


def create_study(name: str, storage: str, seed: int | None = None, startup_trials: int = 5) -> optuna.Study:
    """The study ``name`` in ``storage``, created on first use (maximize, median pruning).

    The sampler and the pruner are not stored: each process builds them again, and both read
    the finished trials from the storage.
    """
    try:
        url = sqlalchemy.engine.make_url(storage)
    except sqlalchemy.exc.ArgumentError:
        raise ConfigError(f"storage {storage!r}: not a database URL (e.g. sqlite:///study.db)") from None
    if url.get_backend_name() == "sqlite" and url.database:  # SQLite creates the file, not its folder
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    try:
        study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction="maximize",
                                    pruner=optuna.pruners.MedianPruner(n_startup_trials=startup_trials))
        # Each call builds its sampler afresh: seeded alike, it would propose the same values again,
        # so the seed moves on with the trials the study holds.
        offset = len(study.get_trials(deepcopy=False)) if seed is not None else 0
        study.sampler = optuna.samplers.TPESampler(seed=None if seed is None else seed + offset,
                                                   n_startup_trials=startup_trials)
        return study
    except (ImportError, sqlalchemy.exc.SQLAlchemyError) as exc:
        raise ConfigError(f"storage {_shown(storage)}: cannot open ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]})") from None


def _load(name: str, storage: str) -> optuna.Study:
    """An existing study, for reading: a mistyped name is refused rather than created empty."""
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise ConfigError(f"study {name!r}: not found in {_shown(storage)}") from None
    except (ImportError, sqlalchemy.exc.SQLAlchemyError) as exc:
        raise ConfigError(f"storage {_shown(storage)}: cannot open ({type(exc).__name__})") from None


def _shown(storage: str) -> str:
    """The URL without its password (it goes into files and logs)."""
    try:
        return sqlalchemy.engine.make_url(storage).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return repr(storage)


def trial_folder(out_dir: Path, number: int) -> Path:
    return Path(out_dir) / "trials" / f"trial_{number}"


def _validated(folder: Path, out_dir: Path, summary: dict, config: PipelineConfig) -> None:
    """The data quality gate, run once per dataset: trials of one study share the same bars."""
    cached = Path(out_dir) / "trials" / "validated" / f"{summary['dataset_hash']}_{config.data.calendar}.json"
    run = RunFolder(folder)
    if cached.exists():
        shutil.copyfile(cached, run.validation)
        return
    validate_data(folder)
    cached.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run.validation, cached)


def run_trial(name: str, storage: str, base_config: PipelineConfig, space: SearchSpace, out_dir: Path,
              seed: int | None = None, startup_trials: int = 5) -> dict:
    """Ask one trial, train its folds, report each fold's validation score, tell the result."""
    study = create_study(name, storage, seed, startup_trials)
    trial = study.ask()
    folder = trial_folder(out_dir, trial.number).resolve()
    trial.set_user_attr("folder", str(folder))
    try:
        overrides = space.overrides(trial)
        config = config_from_dict(merge(base_config.to_dict(), overrides))
        trial.set_user_attr("config", json.loads(json.dumps(config.to_dict(), default=str)))
        # Trials log training metrics to one store beside them, never to the base config's registry.
        store = (Path(out_dir) / "trials" / "mlflow.db").resolve()
        trial_config = config_from_dict(merge(config.to_dict(), {"registry": {
            "tracking_uri": f"sqlite:///{store}", "artifact_root": None, "experiment": f"tuning_{name}",
            "promote": False}}))
        _validated(folder, out_dir, load_data(folder, trial_config), trial_config)
        start_tracking(folder, f"{name}_trial_{trial.number}")
        scores = []
        folds = plan_folds(folder)
        for fold in folds:
            score = train_fold_seeds(folder, fold)["validation_score"]
            if score is None or not math.isfinite(score):
                raise ValueError(f"fold {fold}: the validation score is not a finite number")
            scores.append(float(score))
            trial.report(score, fold)
            if fold != folds[-1] and trial.should_prune():  # after the last fold there is nothing to save
                return _record(study.tell(trial, state=TrialState.PRUNED))
        finished = study.tell(trial, sum(scores) / len(scores))
    except BaseException as exc:  # the trial is closed as failed, and the error goes on
        trial.set_user_attr("error", f"{type(exc).__name__}: {str(exc)[:300]}")
        study.tell(trial, state=TrialState.FAIL)
        raise
    return _record(finished)


def _record(trial: optuna.trial.FrozenTrial) -> dict:
    # Choices are stored as their JSON text (``space.Param.suggest``): shown as the values they are.
    params = {name: json.loads(value) if isinstance(trial.distributions.get(name),
                                                    optuna.distributions.CategoricalDistribution) else value
              for name, value in trial.params.items()}
    return {"number": trial.number, "state": trial.state.name, "params": params, "value": trial.value,
            "intermediate": {int(k): v for k, v in sorted(trial.intermediate_values.items())},
            "folder": trial.user_attrs.get("folder"), **({"error": trial.user_attrs["error"]}
                                                         if "error" in trial.user_attrs else {})}


def trial_record(name: str, storage: str) -> list[dict]:
    """Every trial of the study: number, state, params, value, per-fold scores, trial folder."""
    return [_record(t) for t in _load(name, storage).get_trials(deepcopy=False)]


def best_config(name: str, storage: str) -> tuple[PipelineConfig, dict]:
    """The config of the study's best completed trial, and that trial's record."""
    study = _load(name, storage)
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        raise ConfigError(f"study {name!r}: no completed trial yet")
    best = study.best_trial
    return config_from_dict(best.user_attrs["config"]), _record(best)


def tuning_summary(name: str, storage: str) -> dict:
    """What the final run's evaluation reads (``tuning.json``): the study and every trial."""
    _, best = best_config(name, storage)
    return {"study": name, "storage": _shown(storage), "best_trial": best["number"], "best_value": best["value"],
            "trials": trial_record(name, storage)}


def plot_study(name: str, storage: str, folder: Path) -> dict[str, str]:
    """Optimization history and parameter importances (fANOVA) as PNGs in ``folder``: {caption: file name}."""
    study = _load(name, storage)
    plots = {"tuning_history.png": ("Hyperparameter search: validation score of every trial",
                                    plot_optimization_history),
             "tuning_importance.png": ("Hyperparameter search: parameter importances (fANOVA)",
                                       plot_param_importances)}
    folder.mkdir(parents=True, exist_ok=True)
    figures = {}
    for file_name, (caption, plot) in plots.items():
        # Optuna's plots switch matplotlib's style sheet for the whole process: rc_context puts it back.
        with warnings.catch_warnings(), matplotlib.rc_context():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the matplotlib backend's
            try:
                axes = plot(study)
            except (ValueError, RuntimeError) as error:  # e.g. importances need two completed trials
                log.info("study %s: no %s plot: %s", name, file_name, error)
                continue
            figure = axes.get_figure()
            figure.savefig(folder / file_name, dpi=110, bbox_inches="tight")
            plt.close(figure)
        figures[caption] = file_name
    return figures


def retrain_folder(out_dir: Path, trials: int) -> Path:
    """A new folder for the retrained best config, named by the study's size; an earlier
    retrain is kept (its run folder backs a registered version), never overwritten."""
    base = Path(out_dir) / f"best_after_{trials}_trials"
    run_dir, again = base, 1
    while run_dir.exists():
        again += 1
        run_dir = base.with_name(f"{base.name}_{again}")
    return run_dir


def tune(name: str, storage: str, base_config: PipelineConfig, space: SearchSpace, out_dir: Path, n_trials: int,
         retrain: bool = True, seed: int | None = None, startup_trials: int = 5,
         on_trial: Callable[[dict], None] | None = None) -> dict | None:
    """Run ``n_trials`` more trials, then retrain the best config with the full pipeline in
    ``out_dir/best_after_N_trials`` (N: the trials the study holds).

    ``tuning.json`` goes into the run folder before evaluation, so the report counts the study.
    Returns the registry result of the retrained model (None with ``retrain=False``).
    """
    for _ in range(n_trials):
        record = run_trial(name, storage, base_config, space, out_dir, seed, startup_trials)
        if on_trial is not None:
            on_trial(record)
    if not retrain:
        return None
    config, _ = best_config(name, storage)
    # The final model goes to the base config's registry (the trials' store is for their metrics only).
    config = config_from_dict(merge(config.to_dict(), {"registry": base_config.to_dict()["registry"]}))
    summary = tuning_summary(name, storage)
    run_dir = retrain_folder(out_dir, len(summary["trials"]))
    # The study's plots go with the run's own: into report.html and the MLflow run's report/plots.
    summary["figures"] = plot_study(name, storage, RunFolder(run_dir).plots)
    write_json(RunFolder(run_dir).tuning, summary)
    return run_pipeline(config, run_dir)
