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
from ml.evaluation.splits import Fold, walk_forward_folds
from ml.evaluation.risk_report import intervention_log, risk_metrics, run_risk
from ml.evaluation.robustness import fold_robustness, run_robustness
from ml.evaluation.walkforward import aggregate, backtest_policy, evaluate_fold, train_fold
from ml.market.calendar import periods_per_year
from ml.market.series import MarketSeries, align_bars
from ml.pipeline.rundir import (HISTORY, POLICY, TRAIN_STATE, TRAINING, VALIDATION_RETURNS, RunFolder, code_version,
                                load_agent, market_timestamps, read_bars, read_config, read_folds, read_json,
                                read_market, save_config, symbol_frames, write_json)
from ml.release.tracking import RunMetrics, flatten, log_metrics, resolve_tracking, start_run

log = logging.getLogger(__name__)
REPORT_SCHEMA_VERSION = "2.1"
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
    return tracking


# 4. Train --------------------------------------------------------------------------------

def plan_folds(run_dir: Path) -> list[int]:
    """Lay out the walk-forward folds (folds.json); returns their indices, one training task each."""
    run = RunFolder(run_dir)
    config = read_config(run)
    timestamps = market_timestamps(run, config)
    folds = walk_forward_folds(timestamps, config.lookback, config.splits)
    write_json(run.folds, [f.as_dict() | f.dates(timestamps) for f in folds])
    return [f.index for f in folds]


def train_fold_seeds(run_dir: Path, fold_index: int, device: str | None = None) -> dict:
    """Train one fold once per seed; keep the seed with the best validation score.

    Each seed's checkpoint is kept (the report shows the spread across seeds); a retry
    skips seeds that finished and resumes the one that was interrupted.
    """
    run = RunFolder(run_dir)
    fold_dir = run.fold(fold_index)
    if (fold_dir / TRAINING).exists():
        return read_json(fold_dir / TRAINING)
    config = read_config(run)
    tracking = read_json(run.tracking)
    fold = read_folds(run)[fold_index]
    torch_device = resolve_device(device or config.ppo.device)
    series = read_market(run, config, torch_device)
    # Kept while the tracking server is away: an outage never stops training.
    metrics = RunMetrics(tracking["tracking_uri"], tracking["run_id"], spill=fold_dir / PENDING_METRICS)
    seeds = []
    for seed in config.seeds:
        seed_dir = run.seed(fold_index, seed)
        if not (seed_dir / TRAINING).exists():
            seed_config = replace(config, ppo=replace(config.ppo, seed=seed))

            def log_update(values: dict, step: int, prefix: str = f"fold{fold_index}/seed{seed}/") -> None:
                metrics.log({prefix + k: v for k, v in values.items()}, step)

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
        shutil.copyfile(run.seed(fold_index, best["seed"]) / name, fold_dir / name)
    summary = {"fold": fold_index, "selected_seed": best["seed"], "best_update": best["best_update"],
               "validation_score": best["validation_score"], "selection_metric": config.selection_metric,
               "timesteps": min(s.get("timesteps", 0) for s in seeds),
               "steps_per_second": float(np.mean([s["steps_per_second"] for s in seeds])),
               "device": str(torch_device), "collapse_alarm": best["collapse_alarm"], "seeds": seeds}
    metrics.close()  # waits a minute for an absent server, then leaves the rest in PENDING_METRICS
    write_json(fold_dir / TRAINING, summary)
    log.info("fold %d trained: seed %s selected on validation (%.3f)", fold_index, best["seed"],
             best["validation_score"])
    return summary


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
    for fold in read_folds(run):
        fold_dir = run.fold(fold.index)
        training = read_json(fold_dir / TRAINING)
        agent, _ = load_agent(run, fold.index)
        # Every validation score any seed's selection looked at is a trial for the deflated Sharpe.
        trials = [h["validation_score"] for s in training["seeds"]
                  for h in read_json(run.seed(fold.index, s["seed"]) / HISTORY) if "validation_score" in h]
        report, test, baselines = evaluate_fold(agent, series, fold, config,
                                                trials if config.selection_metric == "sharpe" else None)
        report["training"] = training
        report["seeds"] = seed_spread(run, fold, series, config, training)
        extras, ledger = fold_robustness(test, baselines, series, fold, config, space,
                                         validation_trials(run, fold.index, training))
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
    images["Test Sharpe per fold"] = plot_fold_bars(report, run.plot("fold_sharpe"))
    images["Test total return per fold"] = plot_fold_bars(report, run.plot("fold_return"), metric="total_return")
    if "test_mean_weights" in fold_reports[0]["policy"]:
        images["Allocation on test bars"] = plot_mean_weights(report, run.plot("weights"))
    else:
        images["Decisions on test bars"] = plot_exposure_histogram(report, run.plot("exposure"))
    report["figures"] = {caption: path.name for caption, path in images.items()}  # re-rendered at registration
    write_json(run.report, report)
    render_html_report(run.report_html, report, images)
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
    log_metrics(tracking["tracking_uri"], tracking["run_id"], flat)  # an absent server fails here in seconds
    for fold in fold_reports:  # then what training could not send
        kept = run.fold(fold["index"]) / PENDING_METRICS
        RunMetrics(tracking["tracking_uri"], tracking["run_id"], spill=kept).close(wait=0)
    return {"report": str(run.report), "collapse_alarm": report["aggregate"]["collapse_alarm"]}


def validation_trials(run: RunFolder, fold: int, training: dict) -> np.ndarray | None:
    """Validation bar returns of every checkpoint any seed's selection scored, [trials, bars]."""
    files = [run.seed(fold, s["seed"]) / VALIDATION_RETURNS for s in training["seeds"]]
    rows = [np.load(path) for path in files if path.exists()]
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
