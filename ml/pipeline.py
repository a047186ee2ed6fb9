"""The training pipeline as stages that hand over through files in one run directory.

    load -> validate -> start tracking -> plan folds -> train (per fold) -> evaluate
    -> export ONNX -> register   (the last two in ``ml.release``)

Each stage reads what earlier stages wrote into ``run_dir`` and returns a
small JSON-able reference, so the Airflow tasks call these same functions and
pass only paths and ids through XCom. ``run_pipeline`` runs them in-process.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ml.config import PipelineConfig
from ml.data.schema import content_hash
from ml.data.sources import load_bars
from ml.data.validation import ValidationConfig, require_valid
from ml.evaluation.splits import Fold, walk_forward_folds
from ml.portfolio import align_bars
from ml.policy import policy_checkpoint
from ml.ppo import resolve_device
from ml.rundir import (code_version, load_agent, market_timestamps, read_bars, read_config, read_folds, read_json,
                       read_market, save_config, symbol_frames, write_json)

log = logging.getLogger(__name__)
REPORT_SCHEMA_VERSION = "1.1"


# 1. Load ---------------------------------------------------------------------------------

def load_data(run_dir: Path, config: PipelineConfig) -> dict:
    """Pull bars from the configured source into the run's snapshot, with its content hash."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(run_dir, config)
    data = config.data
    frames = [load_bars(data.source, symbol=symbol, interval=data.interval, path=data.path,
                        start=data.start, end=data.end, auto_adjust=data.auto_adjust)
              for symbol in (data.symbols or (data.symbol,))]
    bars = pd.concat(frames, ignore_index=True)  # a portfolio keeps its symbols in one table
    bars.to_parquet(run_dir / "bars.parquet", index=False)
    summary = {
        "symbol": ",".join(data.symbols) if data.symbols else data.symbol, "interval": data.interval,
        "source": str(bars["source"].iloc[0]), "rows": len(bars),
        "first": min(f["timestamp"].iloc[0] for f in frames).isoformat(),
        "last": max(f["timestamp"].iloc[-1] for f in frames).isoformat(), "dataset_hash": content_hash(bars),
        "close_only": all(bool(f["open"].isna().all()) for f in frames),
    }
    if data.symbols:
        summary["symbols"] = list(data.symbols)
        summary["common_bars"] = len(align_bars(dict(zip(data.symbols, frames)))[0])
    write_json(run_dir / "data.json", summary)
    return summary


# 2. Validate -----------------------------------------------------------------------------

def validate_data(run_dir: Path) -> dict:
    """Great Expectations gate; raises DataValidationError naming the failed rules."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    bars = read_bars(run_dir)
    symbols = config.data.symbols or (config.data.symbol,)
    frames = symbol_frames(bars, symbols) if config.portfolio else {config.data.symbol: bars}
    results = {}
    for symbol, frame in frames.items():  # every symbol passes the gate on its own
        origin = f"{config.data.source}:{config.data.path or symbol}"
        try:
            results[symbol] = require_valid(frame, origin, ValidationConfig(calendar=config.data.calendar))
        except Exception as exc:
            failed = getattr(exc, "result", None)
            if failed is not None:
                write_json(run_dir / "validation.json", failed.as_dict())
            raise
    if config.portfolio:
        write_json(run_dir / "validation.json", {s: r.as_dict() for s, r in results.items()})
    else:
        write_json(run_dir / "validation.json", results[config.data.symbol].as_dict())
    first = next(iter(results.values()))
    return {"suite": first.suite, "rows": sum(r.rows for r in results.values()), "rules": len(first.rules)}


# 3. Tracking -----------------------------------------------------------------------------

def start_tracking(run_dir: Path, run_name: str | None = None) -> dict:
    """Open the MLflow run every later stage logs to; its id goes into the ONNX metadata."""
    from ml.registry import flatten, resolve_tracking, start_run

    run_dir = Path(run_dir)
    existing = run_dir / "tracking.json"
    if existing.exists():  # a retried task continues the same MLflow run
        return read_json(existing)
    config = read_config(run_dir)
    data = read_json(run_dir / "data.json")
    uri, artifact_root = resolve_tracking(config.registry.tracking_uri, config.registry.artifact_root, run_dir)
    run_id = start_run(uri, artifact_root, config.registry.experiment, run_name or run_dir.name,
                       params=flatten(config.to_dict()),
                       tags={"dataset_hash": data["dataset_hash"], "code_version": code_version(),
                             "symbol": data["symbol"], "interval": data["interval"]})
    tracking = {"tracking_uri": uri, "run_id": run_id}
    write_json(existing, tracking)
    return tracking


# 4. Train --------------------------------------------------------------------------------

def plan_folds(run_dir: Path) -> list[int]:
    """Lay out the walk-forward folds (folds.json); returns their indices, one training task each."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    timestamps = market_timestamps(run_dir, config)
    folds = walk_forward_folds(timestamps, config.lookback, config.splits)
    write_json(run_dir / "folds.json", [f.as_dict() | f.dates(timestamps) for f in folds])
    return [f.index for f in folds]


def train_fold_seeds(run_dir: Path, fold_index: int, device: str | None = None) -> dict:
    """Train one fold once per seed; keep the seed with the best validation score.

    Each seed's checkpoint is kept (the report shows the spread across seeds); a retry
    skips seeds that finished and resumes the one that was interrupted.
    """
    from dataclasses import replace

    from ml.portfolio_walkforward import train_portfolio_fold
    from ml.registry import log_metrics
    from ml.walkforward import train_fold

    run_dir = Path(run_dir)
    fold_dir = run_dir / "folds" / f"fold_{fold_index}"
    if (fold_dir / "training.json").exists():
        return read_json(fold_dir / "training.json")
    config = read_config(run_dir)
    tracking = read_json(run_dir / "tracking.json")
    fold = read_folds(run_dir)[fold_index]
    torch_device = resolve_device(device or config.ppo.device)
    series = read_market(run_dir, config, torch_device)
    train_one = train_portfolio_fold if config.portfolio else train_fold
    seeds = []
    for seed in config.seeds:
        seed_dir = fold_dir / f"seed_{seed}"
        if not (seed_dir / "training.json").exists():
            seed_config = replace(config, ppo=replace(config.ppo, seed=seed))

            def log_update(metrics: dict, step: int, prefix: str = f"fold{fold_index}/seed{seed}/") -> None:
                log_metrics(tracking["tracking_uri"], tracking["run_id"],
                            {prefix + k: v for k, v in metrics.items()}, step)

            result = train_one(series, fold, seed_config, log_update, checkpoint_path=seed_dir / "train_state.pt")
            torch.save(policy_checkpoint(result.agent, series.feature_module, config.ppo.hidden),
                       seed_dir / "policy.pt")
            write_json(seed_dir / "history.json", result.history)
            write_json(seed_dir / "training.json", {
                "seed": seed, "best_update": result.best_update, "validation_score": result.best_score,
                "steps_per_second": result.steps_per_second, "updates": len(result.history),
                "resumed_from_update": result.resumed_from_update, "collapse_alarm": result.collapse_alarm})
        seeds.append(read_json(seed_dir / "training.json"))
    best = max(seeds, key=lambda s: s["validation_score"])
    for name in ("policy.pt", "history.json"):
        shutil.copyfile(fold_dir / f"seed_{best['seed']}" / name, fold_dir / name)
    summary = {"fold": fold_index, "selected_seed": best["seed"], "best_update": best["best_update"],
               "validation_score": best["validation_score"], "selection_metric": config.selection_metric,
               "steps_per_second": float(np.mean([s["steps_per_second"] for s in seeds])),
               "device": str(torch_device), "collapse_alarm": best["collapse_alarm"], "seeds": seeds}
    write_json(fold_dir / "training.json", summary)
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
    from ml.evaluation.html_report import render_html_report
    from ml.evaluation.plots import (plot_equity_and_drawdown, plot_exposure_histogram, plot_fold_bars,
                                     plot_mean_weights)
    from ml.portfolio_walkforward import evaluate_portfolio_fold
    from ml.registry import log_metrics
    from ml.walkforward import aggregate, evaluate_fold

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    data = read_json(run_dir / "data.json")
    series = read_market(run_dir, config, torch.device("cpu"))
    evaluate_one = evaluate_portfolio_fold if config.portfolio else evaluate_fold
    benchmark = benchmark_name(config)
    fold_reports = []
    images = {}
    for fold in read_folds(run_dir):
        fold_dir = run_dir / "folds" / f"fold_{fold.index}"
        training = read_json(fold_dir / "training.json")
        agent, _ = load_agent(run_dir, fold.index)
        # Every validation score any seed's selection looked at is a trial for the deflated Sharpe.
        trials = [h["validation_score"] for s in training["seeds"]
                  for h in read_json(fold_dir / f"seed_{s['seed']}" / "history.json") if "validation_score" in h]
        report, test, baselines = evaluate_one(agent, series, fold, config,
                                               trials if config.selection_metric == "sharpe" else None)
        report["training"] = training
        report["seeds"] = seed_spread(run_dir, fold, series, config, training)
        equity = test.frame()
        equity.to_csv(run_dir / f"fold_{fold.index}_test_equity.csv", index=False)
        curves = pd.DataFrame({"timestamp": test.timestamps, "policy": test.nav,
                               **{name: bt.nav for name, bt in baselines.items()}})
        curves.to_csv(run_dir / f"fold_{fold.index}_test_baselines.csv", index=False)
        images[f"Fold {fold.index}: equity and drawdown vs baselines (test)"] = plot_equity_and_drawdown(
            curves, run_dir / "plots" / f"fold_{fold.index}_equity.png", title=f"Fold {fold.index} test")
        report["equity_curve"] = f"fold_{fold.index}_test_equity.csv"
        fold_reports.append(report)
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "symbol": data["symbol"], "interval": data["interval"], "source": data["source"],
        "dataset_hash": data["dataset_hash"], "rows": data["rows"],
        "costs": config.costs.__dict__, "lookback": config.lookback, "action_mode": config.ppo.action_mode,
        **({"symbols": list(config.data.symbols)} if config.portfolio
           else {"exposure_levels": list(config.ppo.exposure_levels)}),
        "benchmark": benchmark, "selection_metric": config.selection_metric,
        "folds": fold_reports, "aggregate": aggregate(fold_reports),
    }
    write_json(run_dir / "report.json", report)
    images["Test Sharpe per fold"] = plot_fold_bars(report, run_dir / "plots" / "fold_sharpe.png")
    images["Test total return per fold"] = plot_fold_bars(report, run_dir / "plots" / "fold_return.png",
                                                          metric="total_return")
    if config.portfolio:
        images["Allocation on test bars"] = plot_mean_weights(report, run_dir / "plots" / "weights.png")
    else:
        images["Decisions on test bars"] = plot_exposure_histogram(report, run_dir / "plots" / "exposure.png")
    render_html_report(run_dir, report, images)
    tracking = read_json(run_dir / "tracking.json")
    flat = {}
    for fold in fold_reports:
        flat.update({f"test/fold{fold['index']}/policy/{k}": v for k, v in fold["policy"]["test"].items()})
        flat.update({f"test/fold{fold['index']}/{benchmark}/{k}": v
                     for k, v in fold["baselines"][benchmark].items()})
    flat.update({f"test/mean/policy/{k}": v for k, v in report["aggregate"]["policy"].items()})
    flat.update({f"test/mean/{benchmark}/{k}": v
                 for k, v in report["aggregate"]["baselines"][benchmark].items()})
    log_metrics(tracking["tracking_uri"], tracking["run_id"], flat)
    return {"report": str(run_dir / "report.json"), "collapse_alarm": report["aggregate"]["collapse_alarm"]}


def benchmark_name(config: PipelineConfig) -> str:
    """The passive baseline a policy is judged against: equal weight for a portfolio, else buy-and-hold."""
    return "equal_weight" if config.portfolio else "buy_and_hold"


def seed_spread(run_dir: Path, fold: Fold, series, config: PipelineConfig, training: dict) -> dict:
    """Each seed's test result (reported, never used for selection) and their spread."""
    from ml.evaluation.metrics import periods_per_year
    from ml.portfolio_walkforward import backtest_portfolio_policy
    from ml.walkforward import backtest_policy

    backtest = backtest_portfolio_policy if config.portfolio else backtest_policy
    ppy = periods_per_year(config.data.interval, config.data.calendar)
    per_seed = []
    for seed in training["seeds"]:
        agent, _ = load_agent(run_dir, fold.index, seed["seed"])
        metrics = backtest(agent, series, fold.test, config).metrics(ppy)
        per_seed.append({"seed": seed["seed"], "validation_score": seed["validation_score"],
                         "selected": seed["seed"] == training["selected_seed"],
                         **{k: metrics[k] for k in ("total_return", "sharpe", "max_drawdown")}})
    spread = {k: {"mean": float(np.mean([s[k] for s in per_seed])), "std": float(np.std([s[k] for s in per_seed])),
                  "min": float(np.min([s[k] for s in per_seed])), "max": float(np.max([s[k] for s in per_seed]))}
              for k in ("total_return", "sharpe")}
    return {"per_seed": per_seed, "test_spread": spread}


def run_pipeline(config: PipelineConfig, out_dir: Path) -> dict:
    """All stages in-process (``python -m ml pipeline``); same functions as the DAG tasks."""
    from ml.release import export_model, register

    out_dir = Path(out_dir)
    load_data(out_dir, config)
    validate_data(out_dir)
    start_tracking(out_dir)
    train_folds(out_dir)
    evaluate(out_dir)
    export_model(out_dir)
    return register(out_dir)
