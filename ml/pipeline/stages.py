"""The training pipeline as stages that hand over through files in one run folder.

    load -> validate -> start tracking -> plan folds -> train (per fold) -> evaluate
    -> export ONNX -> register   (the last two in ``ml.pipeline.publish``)

Each stage reads what earlier stages wrote into the run folder and returns a
small JSON-able reference, so the Airflow tasks call these same functions and
pass only paths and ids through XCom. ``run_pipeline`` runs them in-process.
A single asset is a portfolio of one: every stage runs the same code for both.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ml.agent.policy import policy_checkpoint
from ml.agent.ppo import resolve_device
from ml.config import PipelineConfig
from ml.data.schema import content_hash
from ml.data.sources import load_bars
from ml.data.validation import ValidationConfig, require_valid
from ml.env.action_space import make_action_space
from ml.evaluation.html_report import render_html_report
from ml.evaluation.plots import (plot_equity_and_drawdown, plot_exposure_histogram, plot_fold_bars,
                                 plot_mean_weights)
from ml.evaluation.cpcv import cpcv_report
from ml.evaluation.splits import CPCVFold, Fold, cpcv_folds, cpcv_groups, walk_forward_folds
from ml.evaluation.risk_report import intervention_log, risk_metrics, run_risk
from ml.evaluation.robustness import fold_robustness, run_robustness
from ml.evaluation.walkforward import (aggregate, backtest_policy, evaluate_fold, selection_allowance,
                                      train_fold)
from ml.market.calendar import periods_per_year
from ml.market.series import MarketSeries, align_bars
from ml.pipeline.rundir import (HISTORY, POLICY, TRAIN_STATE, TRAINING, VALIDATION_RETURNS, RunFolder, code_version,
                                load_agent, load_agent_at, market_timestamps, read_bars, read_config,
                                read_cpcv_folds, read_folds, read_json, read_market, save_config, symbol_frames,
                                write_json)
from ml.release.tracking import RunMetrics, flatten, log_metrics, resolve_tracking, start_run

log = logging.getLogger(__name__)
REPORT_SCHEMA_VERSION = "2.3"
# Training metrics the tracking server did not get by the end of a fold; evaluate sends them.
PENDING_METRICS = "pending_metrics.jsonl"


# 1. Load ---------------------------------------------------------------------------------

def load_data(run_dir: Path, config: PipelineConfig) -> dict:
    """Pull bars from the configured source into the run's snapshot, with its content hash."""
    run = RunFolder(run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    save_config(run, config)
    data = config.data
    frames = [load_bars(data.source, symbol=symbol, interval=data.interval, path=data.path,
                        start=data.start, end=data.end, auto_adjust=data.auto_adjust)
              for symbol in config.symbols]
    bars = pd.concat(frames, ignore_index=True)  # every symbol in one table
    bars.to_parquet(run.bars, index=False)
    summary = {
        "symbol": ",".join(config.symbols), "interval": data.interval,
        "source": str(bars["source"].iloc[0]), "rows": len(bars),
        "first": min(f["timestamp"].iloc[0] for f in frames).isoformat(),
        "last": max(f["timestamp"].iloc[-1] for f in frames).isoformat(), "dataset_hash": content_hash(bars),
        "close_only": all(bool(f["open"].isna().all()) for f in frames),
    }
    if data.symbols:
        summary["symbols"] = list(data.symbols)
        summary["common_bars"] = len(align_bars(dict(zip(data.symbols, frames)))[0])
    write_json(run.data, summary)
    log.info("loaded %d bars of %s %s from %s (%s to %s), dataset hash %s", len(bars), summary["symbol"],
             data.interval, summary["source"], summary["first"][:10], summary["last"][:10], summary["dataset_hash"])
    return summary


# 2. Validate -----------------------------------------------------------------------------

def validate_data(run_dir: Path) -> dict:
    """Great Expectations gate, every symbol on its own; raises DataValidationError naming the failed rules."""
    run = RunFolder(run_dir)
    config = read_config(run)
    results = {}
    for symbol, frame in symbol_frames(read_bars(run), config.symbols).items():
        origin = f"{config.data.source}:{config.data.path or symbol}"
        try:
            results[symbol] = require_valid(frame, origin, ValidationConfig(calendar=config.data.calendar))
        except Exception as exc:
            failed = getattr(exc, "result", None)
            if failed is not None:
                write_json(run.validation, {symbol: failed.as_dict()})
            raise
    write_json(run.validation, {symbol: result.as_dict() for symbol, result in results.items()})
    for symbol, result in results.items():
        log.info("%s passed the data quality gate: suite %s, %d rules, %d rows, dataset hash %s", symbol,
                 result.suite, len(result.rules), result.rows, read_json(run.data)["dataset_hash"])
    first = next(iter(results.values()))
    return {"suite": first.suite, "rows": sum(r.rows for r in results.values()), "rules": len(first.rules)}


# 3. Tracking -----------------------------------------------------------------------------

def start_tracking(run_dir: Path, run_name: str | None = None) -> dict:
    """Open the MLflow run every later stage logs to; its id goes into the ONNX metadata."""
    run = RunFolder(run_dir)
    if run.tracking.exists():  # a retried task continues the same MLflow run
        return read_json(run.tracking)
    config = read_config(run)
    data = read_json(run.data)
    uri, artifact_root = resolve_tracking(config.registry.tracking_uri, config.registry.artifact_root, run.root)
    run_id = start_run(uri, artifact_root, config.registry.experiment, run_name or run.root.name,
                       params=flatten(config.to_dict()),
                       tags={"dataset_hash": data["dataset_hash"], "code_version": code_version(),
                             "symbol": data["symbol"], "interval": data["interval"]})
    tracking = {"tracking_uri": uri, "run_id": run_id}
    write_json(run.tracking, tracking)
    log.info("MLflow run %s opened in experiment %s at %s", run_id, config.registry.experiment, uri)
    return tracking


# 4. Train --------------------------------------------------------------------------------

def plan_folds(run_dir: Path) -> list[int]:
    """Lay out the walk-forward folds (folds.json); returns their indices, one training task each.

    With ``splits.method: cpcv`` the CPCV splits are laid out too (cpcv_folds.json); the fold
    tasks train them (``train_fold_seeds``).
    """
    run = RunFolder(run_dir)
    config = read_config(run)
    timestamps = market_timestamps(run, config)
    folds = walk_forward_folds(timestamps, config.lookback, config.splits)
    if config.splits.method == "cpcv":
        splits = cpcv_folds(len(timestamps), config.lookback, config.splits)
        write_json(run.cpcv_folds, [{"index": s.index, "test_groups": list(s.test_groups),
                                     "validation_group": s.validation_group} | s.dates(timestamps) for s in splits])
    write_json(run.folds, [f.as_dict() | f.dates(timestamps) for f in folds])
    return [f.index for f in folds]


def train_fold_seeds(run_dir: Path, fold_index: int, device: str | None = None) -> dict:
    """Train one fold once per seed; keep the seed with the best validation score.

    Each seed's checkpoint is kept (the report shows the spread across seeds); a retry
    skips seeds that finished and resumes the one that was interrupted. With ``splits.method:
    cpcv`` the task of fold i then trains the CPCV splits i, i + K, i + 2K, ... (K folds) the same
    way, so the tasks that the folds map train every split. Returns the fold's summary.
    """
    run = RunFolder(run_dir)
    config = read_config(run)
    folds = read_folds(run)
    jobs = [(folds[fold_index], run.fold(fold_index), partial(run.seed, fold_index), {"fold": fold_index},
             f"fold{fold_index}")]
    if config.splits.method == "cpcv":
        jobs += [(split, run.cpcv_split(split.index), partial(run.cpcv_seed, split.index),
                  {"cpcv_split": split.index}, f"cpcv{split.index}")
                 for split in read_cpcv_folds(run)[fold_index::len(folds)]]
    jobs = [job for job in jobs if not (job[1] / TRAINING).exists()]
    if jobs:
        tracking = read_json(run.tracking)
        torch_device = resolve_device(device or config.ppo.device)
        series = read_market(run, config, torch_device)
        # Kept while the tracking server is away: an outage never stops training.
        metrics = RunMetrics(tracking["tracking_uri"], tracking["run_id"], spill=run.fold(fold_index) / PENDING_METRICS)
        summaries = [_train_seeds(config, series, *job, metrics, torch_device) for job in jobs]
        metrics.close()  # waits a minute for an absent server, then leaves the rest in PENDING_METRICS
        for (_, folder, *_), summary in zip(jobs, summaries):
            write_json(folder / TRAINING, summary)
    return read_json(run.fold(fold_index) / TRAINING)


def _train_seeds(config: PipelineConfig, series: MarketSeries, fold: Fold | CPCVFold, folder: Path,
                 seed_folder, identity: dict, label: str, metrics: RunMetrics, torch_device: torch.device) -> dict:
    """Every seed of one fold or CPCV split; the best on validation is copied into ``folder``."""
    seeds = []
    for seed in config.seeds:
        seed_dir = seed_folder(seed)
        if not (seed_dir / TRAINING).exists():
            seed_config = replace(config, ppo=replace(config.ppo, seed=seed))

            def log_update(values: dict, step: int, prefix: str = f"{label}/seed{seed}/") -> None:
                metrics.log({prefix + k: v for k, v in values.items()}, step)
                if "validation_score" in values:  # training progress at INFO, once per validation
                    log.info("%s: %d of %d steps, %.0f steps/s, validation %s %.3f", prefix.rstrip("/"), step,
                             config.ppo.total_timesteps, values["steps_per_second"], config.selection_metric,
                             values["validation_score"])

            result = train_fold(series, fold, seed_config, log_update, checkpoint_path=seed_dir / TRAIN_STATE)
            torch.save(policy_checkpoint(result.agent, series.feature_module), seed_dir / POLICY)
            write_json(seed_dir / HISTORY, result.history)
            np.save(seed_dir / VALIDATION_RETURNS, np.asarray(result.validation_returns, dtype="float64"))
            write_json(seed_dir / TRAINING, {
                "seed": seed, "best_update": result.best_update, "validation_score": result.best_score,
                "steps_per_second": result.steps_per_second, "updates": len(result.history),
                "timesteps": result.history[-1]["global_step"] if result.history else 0,
                "resumed_from_update": result.resumed_from_update, "collapse_alarm": result.collapse_alarm})
        seeds.append(read_json(seed_dir / TRAINING))
    best = max(seeds, key=lambda s: s["validation_score"])
    for name in (POLICY, HISTORY):
        shutil.copyfile(seed_folder(best["seed"]) / name, folder / name)
    log.info("%s trained: seed %s selected on validation (%.3f)", label, best["seed"], best["validation_score"])
    return identity | {
        "selected_seed": best["seed"], "best_update": best["best_update"],
        "validation_score": best["validation_score"], "selection_metric": config.selection_metric,
        "timesteps": min(s.get("timesteps", 0) for s in seeds),
        "steps_per_second": float(np.mean([s["steps_per_second"] for s in seeds])),
        "device": str(torch_device), "collapse_alarm": best["collapse_alarm"], "seeds": seeds}


def train_folds(run_dir: Path, device: str | None = None) -> dict:
    """Every fold in turn (the DAG maps one task per fold instead)."""
    summaries = [train_fold_seeds(run_dir, index, device) for index in plan_folds(run_dir)]
    return {"folds": len(summaries), "device": summaries[0]["device"]}


# 5. Evaluate -----------------------------------------------------------------------------

def evaluate(run_dir: Path) -> dict:
    """Backtest each fold's selected policy and the baselines on its test window; write report.json."""
    run = RunFolder(run_dir)
    config = read_config(run)
    data = read_json(run.data)
    series = read_market(run, config, torch.device("cpu"))
    space = make_action_space(config.action, series.n_assets)
    fold_reports, all_curves, all_tests, all_baselines = [], [], [], []
    images = {}
    tuning = read_json(run.tuning) if run.tuning.exists() else None  # the study that picked this config
    run_folds = read_json(run.folds)
    for fold in read_folds(run):
        fold_dir = run.fold(fold.index)
        training = read_json(fold_dir / TRAINING)
        agent, _ = load_agent(run, fold.index)
        # Every validation score any seed's selection looked at is a trial for the deflated Sharpe.
        trials = [h["validation_score"] for s in training["seeds"]
                  for h in read_json(run.seed(fold.index, s["seed"]) / HISTORY) if "validation_score" in h]
        if tuning is not None:  # and every trial of the hyperparameter search, scored on this fold
            trials += [t["intermediate"][str(fold.index)] for t in tuning["trials"]
                       if t["intermediate"].get(str(fold.index)) is not None]
        report, test, baselines = evaluate_fold(agent, series, fold, config,
                                                trials if config.selection_metric == "sharpe" else None)
        report["training"] = training
        report["seeds"] = seed_spread(run, fold, series, config, training)
        extras, ledger = fold_robustness(test, baselines, series, fold, config, space,
                                         validation_trials(run, fold.index, training, tuning, run_folds))
        report.update(extras)
        ledger.to_csv(run.test_trades(fold.index), index=False)
        if test.interventions is not None:
            intervention_log(test).to_csv(run.test_risk(fold.index), index=False)
            report["risk_log"] = run.test_risk(fold.index).name
        test.frame().to_csv(run.test_equity(fold.index), index=False)
        curves = pd.DataFrame({"timestamp": test.timestamps, "policy": test.nav,
                               **{name: bt.nav for name, bt in baselines.items()}})
        curves.to_csv(run.test_baselines(fold.index), index=False)
        images[f"Fold {fold.index}: equity and drawdown vs baselines (test)"] = plot_equity_and_drawdown(
            curves, run.plot(f"fold_{fold.index}_equity"), title=f"Fold {fold.index} test")
        report["equity_curve"] = run.test_equity(fold.index).name
        report["trade_ledger"] = run.test_trades(fold.index).name
        fold_reports.append(report)
        all_curves.append(curves)
        all_tests.append(test)
        all_baselines.append(baselines)
    benchmark = space.benchmark
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "symbol": data["symbol"], "interval": data["interval"], "source": data["source"],
        "dataset_hash": data["dataset_hash"], "rows": data["rows"],
        "costs": config.costs.__dict__, "lookback": config.lookback, "action_mode": space.mode,
        **({"symbols": list(config.data.symbols)} if config.data.symbols
           else {"exposure_levels": list(config.action.exposure_levels)}),
        "benchmark": benchmark, "selection_metric": config.selection_metric,
        "ppo_total_timesteps": config.ppo.total_timesteps, "ppo_batch_size": config.ppo.batch_size,
        "folds": fold_reports, "aggregate": aggregate(fold_reports),
        **run_robustness(fold_reports, all_curves, all_tests, all_baselines, config, space),
    }
    risk = run_risk(fold_reports, dataclasses.asdict(config.risk))
    if risk is not None:
        report["risk"] = risk
    if config.splits.method == "cpcv":
        report["cpcv"] = evaluate_cpcv(run, config, series)
    if tuning is not None:
        report["tuning"] = tuning_section(tuning, config)
        images.update({caption: run.plots / name for caption, name in tuning.get("figures", {}).items()})
    images["Test Sharpe per fold"] = plot_fold_bars(report, run.plot("fold_sharpe"))
    images["Test total return per fold"] = plot_fold_bars(report, run.plot("fold_return"), metric="total_return")
    if "test_mean_weights" in fold_reports[0]["policy"]:
        images["Allocation on test bars"] = plot_mean_weights(report, run.plot("weights"))
    else:
        images["Decisions on test bars"] = plot_exposure_histogram(report, run.plot("exposure"))
    report["figures"] = {caption: path.name for caption, path in images.items()}  # re-rendered at registration
    write_json(run.report, report)
    render_html_report(run.report_html, report, images)
    mean, held = report["aggregate"]["policy"], report["aggregate"]["baselines"][benchmark]
    log.info("test, mean of %d folds: policy Sharpe %.2f, return %+.2f%%; %s Sharpe %.2f, return %+.2f%%; "
             "report %s", len(fold_reports), mean["sharpe"], 100 * mean["total_return"], benchmark, held["sharpe"],
             100 * held["total_return"], run.report_html)
    tracking = read_json(run.tracking)
    flat = {}
    for fold in fold_reports:
        flat.update({f"test/fold{fold['index']}/policy/{k}": v for k, v in fold["policy"]["test"].items()})
        flat.update({f"test/fold{fold['index']}/{benchmark}/{k}": v
                     for k, v in fold["baselines"][benchmark].items()})
    flat.update({f"test/mean/policy/{k}": v for k, v in report["aggregate"]["policy"].items()})
    flat.update({f"test/mean/{benchmark}/{k}": v
                 for k, v in report["aggregate"]["baselines"][benchmark].items()})
    if risk is not None:
        flat.update(risk_metrics(risk))
    if "cpcv" in report:
        flat.update({f"cpcv/path_sharpe/{k}": v for k, v in report["cpcv"]["path_sharpe"]["policy"].items()
                     if k != "values"})
        flat["cpcv/pbo"] = report["cpcv"]["pbo"]["value"] if report["cpcv"]["pbo"] else None
    log_metrics(tracking["tracking_uri"], tracking["run_id"], flat)  # an absent server fails here in seconds
    for fold in fold_reports:  # then what training could not send
        kept = run.fold(fold["index"]) / PENDING_METRICS
        RunMetrics(tracking["tracking_uri"], tracking["run_id"], spill=kept).close(wait=0)
    return {"report": str(run.report), "collapse_alarm": report["aggregate"]["collapse_alarm"]}


def evaluate_cpcv(run: RunFolder, config: PipelineConfig, series: MarketSeries) -> dict:
    """Each CPCV split's policy on its test groups, recombined into backtest paths (cpcv_paths.csv)."""
    splits = read_cpcv_folds(run)
    missing = [s.index for s in splits if not (run.cpcv_split(s.index) / TRAINING).exists()]
    if missing:
        raise RuntimeError(f"cpcv splits {missing} have not been trained: run the fold training tasks first")
    trainings = {s.index: read_json(run.cpcv_split(s.index) / TRAINING) for s in splits}
    section, curves = cpcv_report(
        {s.index: load_agent_at(run.cpcv_split(s.index))[0] for s in splits}, series, splits,
        cpcv_groups(len(series.timestamps), config.lookback, config.splits), config, trainings,
        {s.index: trial_matrix([run.cpcv_seed(s.index, seed["seed"]) for seed in trainings[s.index]["seeds"]])
         for s in splits})
    curves.to_csv(run.cpcv_curves, index=False)
    return section | {"path_curves": run.cpcv_curves.name}


def validation_trials(run: RunFolder, fold: int, training: dict, tuning: dict | None = None,
                      run_folds: list[dict] | None = None) -> np.ndarray | None:
    """Validation bar returns of every checkpoint any seed's selection scored, [trials, bars].

    With ``tuning``, each search trial's checkpoints on the same fold join, when that trial's
    validation window is this run's, bar for bar.
    """
    own = trial_matrix([run.seed(fold, s["seed"]) for s in training["seeds"]])
    if tuning is None or own is None:
        return own
    rows, here = [own], next(f["validation"] for f in run_folds if f["index"] == fold)
    for trial in tuning["trials"]:
        if str(fold) not in trial["intermediate"] or not trial.get("folder"):
            continue
        folder = RunFolder(trial["folder"])
        if not folder.folds.exists():
            log.info("fold %d: trial %d left out of the PBO: %s is gone", fold, trial["number"], folder.root)
            continue
        window = next((f["validation"] for f in read_json(folder.folds) if f["index"] == fold), None)
        matrix = trial_matrix(sorted(folder.fold(fold).glob("seed_*")))
        if window != here or matrix is None or matrix.shape[1] != own.shape[1]:
            log.info("fold %d: trial %d left out of the PBO: its validation bars are not this run's",
                     fold, trial["number"])
            continue
        rows.append(matrix)
    return np.concatenate(rows)


def tuning_section(tuning: dict, config: PipelineConfig) -> dict:
    """The search behind this config: trial counts, and how much of the best score luck explains."""
    states = [t["state"] for t in tuning["trials"]]
    scores = [t["value"] for t in tuning["trials"] if t["state"] == "COMPLETE" and t["value"] is not None]
    allowance = None
    if config.selection_metric == "sharpe":  # the allowance is a Sharpe ratio's
        allowance = selection_allowance(scores, periods_per_year(config.data.interval, config.data.calendar))
    best = tuning["best_value"]
    return {"study": tuning["study"], "trials_completed": states.count("COMPLETE"),
            "trials_pruned": states.count("PRUNED"), "trials_failed": states.count("FAIL"),
            "best_trial": tuning["best_trial"], "best_validation_score": best, "selection_allowance": allowance,
            "inflation": best - allowance if allowance is not None and best is not None else None}


def trial_matrix(seed_dirs: list[Path]) -> np.ndarray | None:
    """The seeds' validation returns of every scored checkpoint, stacked: [trials, bars]."""
    rows = [np.load(folder / VALIDATION_RETURNS) for folder in seed_dirs if (folder / VALIDATION_RETURNS).exists()]
    rows = [r for r in rows if r.ndim == 2 and r.shape[0]]
    return np.concatenate(rows) if rows else None


def seed_spread(run: RunFolder, fold: Fold, series: MarketSeries, config: PipelineConfig, training: dict) -> dict:
    """Each seed's test result (reported, never used for selection) and their spread."""
    ppy = periods_per_year(config.data.interval, config.data.calendar)
    per_seed = []
    for seed in training["seeds"]:
        agent, _ = load_agent(run, fold.index, seed["seed"])
        metrics = backtest_policy(agent, series, fold.test, config).metrics(ppy)
        per_seed.append({"seed": seed["seed"], "validation_score": seed["validation_score"],
                         "selected": seed["seed"] == training["selected_seed"],
                         **{k: metrics[k] for k in ("total_return", "sharpe", "max_drawdown")}})
    spread = {k: {"mean": float(np.mean([s[k] for s in per_seed])), "std": float(np.std([s[k] for s in per_seed])),
                  "min": float(np.min([s[k] for s in per_seed])), "max": float(np.max([s[k] for s in per_seed]))}
              for k in ("total_return", "sharpe")}
    return {"per_seed": per_seed, "test_spread": spread}
