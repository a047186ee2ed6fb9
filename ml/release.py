"""Releasing a trained run: export the policy to ONNX, check parity, register, apply the gate.

    export_model -> register

Both read the run folder that ``ml.pipeline`` filled and return small references.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ml.config import PipelineConfig
from ml.features import FEATURE_SET_VERSION
from ml.data.schema import ohlcv_array
from ml.policy import load_policy
from ml.portfolio import align_bars
from ml.rundir import code_version, load_agent, read_bars, read_config, read_json, symbol_frames, write_json


def export_model(run_dir: Path) -> dict:
    """ONNX of the most recent fold's policy, checked against torch on real windows."""
    from ml.export import check_parity, export_onnx, real_windows

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    data = read_json(run_dir / "data.json")
    tracking = read_json(run_dir / "tracking.json")
    folds = read_json(run_dir / "folds.json")
    latest = folds[-1]
    agent, checkpoint = load_agent(run_dir, latest["index"])
    policy = load_policy(checkpoint)
    metadata = {
        "lookback": config.lookback, "interval": data["interval"], "symbol": data["symbol"],
        "feature_set_version": FEATURE_SET_VERSION,
        "features": ",".join(policy.features.names),
        "action_semantics": action_semantics(config),
        "action_mode": config.ppo.action_mode,
        "close_only": str(data["close_only"]).lower(),
        "training_window": f"{latest['train']['start']}/{latest['train']['end']}",
        "validation_window": f"{latest['validation']['start']}/{latest['validation']['end']}",
        "dataset_hash": data["dataset_hash"], "mlflow_run_id": tracking["run_id"],
        "code_version": code_version(),
    }
    if config.portfolio:
        metadata["symbols"] = ",".join(config.data.symbols)  # the order of the asset axis
    path = export_onnx(policy, run_dir / "model.onnx", metadata)
    ohlcv = (align_bars(symbol_frames(read_bars(run_dir), config.data.symbols))[1] if config.portfolio
             else ohlcv_array(read_bars(run_dir)))
    first, last = latest["test"]["first_bar"], latest["test"]["last_bar"]
    windows, positions = real_windows(ohlcv, config.lookback, first, last, config.gate.parity_windows,
                                      list(config.ppo.exposure_levels))
    parity = check_parity(policy, path, windows, positions, config.gate.parity_tolerance)
    np.savez(run_dir / "parity_windows.npz", ohlcv=windows[:4], position=positions[:4])
    write_json(run_dir / "parity.json", parity.as_dict())
    return {"onnx": str(path), "parity": parity.as_dict()}


def action_semantics(config: PipelineConfig) -> str:
    if config.portfolio:
        return ("target_weights: fraction of NAV held in each asset (order of `symbols`) after the next bar's "
                "open, long-only, summing to at most 1; the rest is cash")
    ppo = config.ppo
    return ("target_exposure: fraction of NAV held in the asset after the next bar's open, "
            f"in [{ppo.min_exposure}, {ppo.max_exposure}]; "
            + (f"levels {list(ppo.exposure_levels)}" if ppo.action_mode == "discrete" else "continuous"))


def register(run_dir: Path) -> dict:
    """Log artifacts, register the ONNX version, apply the gate, move aliases under the registry lock."""
    from mlflow.tracking import MlflowClient

    from ml import registry
    from ml.promotion import compare_on_unseen_window, evaluate_gate, registry_lock

    run_dir = Path(run_dir)
    done = run_dir / "registration.json"
    if done.exists():  # a retry never registers or promotes twice
        return read_json(done)
    config = read_config(run_dir)
    data = read_json(run_dir / "data.json")
    tracking = read_json(run_dir / "tracking.json")
    report = read_json(run_dir / "report.json")
    parity = read_json(run_dir / "parity.json")
    uri, run_id, name = tracking["tracking_uri"], tracking["run_id"], config.model_name

    client = MlflowClient(uri)
    for artifact in ["report.json", "report.html", "config.json", "data.json", "validation.json", "folds.json",
                     "parity.json", *sorted(p.name for p in run_dir.glob("fold_*_test_*.csv"))]:
        client.log_artifact(run_id, str(run_dir / artifact), artifact_path="report")
    client.log_artifacts(run_id, str(run_dir / "plots"), artifact_path="report/plots")
    example = np.load(run_dir / "parity_windows.npz")
    second_input = "weights" if config.portfolio else "position"
    version = registry.register_onnx(uri, run_id, name, run_dir / "model.onnx",
                                     {"ohlcv": example["ohlcv"], second_input: example["position"]},
                                     tags={"dataset_hash": data["dataset_hash"], "code_version": code_version()})

    with registry_lock(uri, name):
        champion = registry.alias_version(uri, name, registry.CHAMPION)
        comparison = None
        if champion and champion != version and config.gate.compare_with_champion:
            comparison = _compare_with_champion(run_dir, config, uri, name, champion, compare_on_unseen_window)
        decision = evaluate_gate(report, parity, config.gate, comparison).as_dict()
        benchmark = report.get("benchmark", "buy_and_hold")
        policy, hold = report["aggregate"]["policy"], report["aggregate"]["baselines"][benchmark]
        description = (
            f"Gate {'PASSED' if decision['passed'] else 'FAILED'}: " + "; ".join(decision["reasons"])
            + f". Mean test Sharpe {policy['sharpe']:.2f} vs {benchmark.replace('_', ' ')} {hold['sharpe']:.2f}; "
            f"total return {policy['total_return']:+.2%} vs {hold['total_return']:+.2%}."
        )
        registry.record_decision(uri, name, version, decision, description)
        client.set_registered_model_alias(name, registry.CHALLENGER, version)
        promoted = bool(decision["passed"] and config.registry.promote)
        if promoted:
            registry.move_champion(uri, name, version, "passed the promotion gate")
    client.set_tag(run_id, "gate.passed", str(decision["passed"]).lower())
    client.set_terminated(run_id)
    result = {"model_name": name, "version": version, "champion": promoted,
              "champion_version": registry.alias_version(uri, name, registry.CHAMPION),
              "previous_champion": champion, "gate": decision, "champion_comparison": comparison,
              "tracking_uri": uri, "run_id": run_id, "promote_requested": config.registry.promote}
    write_json(done, result)
    return result


def _compare_with_champion(run_dir: Path, config: PipelineConfig, uri: str, name: str, champion: str,
                           compare) -> dict:
    """Both models on the latest test window, cut to the bars the champion never trained on."""
    from ml import registry
    from ml.serving import Policy

    champion_path = registry.download_model(uri, name, champion)
    metadata = Policy(champion_path, prefer_gpu=False).metadata
    # The champion was selected on its validation window: that counts as seen too.
    seen_until = metadata.get("validation_window") or metadata.get("training_window", "")
    if "/" not in seen_until:
        return {"skipped": f"champion v{champion} records no training window"}
    latest = read_json(run_dir / "folds.json")[-1]
    window = (latest["test"]["first_bar"], latest["test"]["last_bar"])
    gap = latest["test"]["first_bar"] - latest["validation"]["last_bar"]
    return compare(run_dir / "model.onnx", champion_path, champion, seen_until.split("/")[1],
                   read_bars(run_dir), window, gap, config)
