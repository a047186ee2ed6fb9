"""Publishing a trained run: export the policy to ONNX, check parity, register, apply the gate.

    export_model -> register

Both read the run folder that the earlier stages filled and return small references.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from ml.agent.policy import load_policy
from ml.config import PipelineConfig
from ml.env.risk import STATE_SCALARS, RiskOverlay
from ml.evaluation.html_report import render_html_report
from ml.market.features import FEATURE_SET_VERSION
from ml.market.series import MarketSeries
from ml.pipeline.rundir import (RunFolder, code_version, load_agent, read_config, read_json, read_market,
                                training_fingerprint, write_json)
from ml.release import registry
from ml.release.export import check_parity, export_onnx, real_windows
from ml.release.gate import compare_on_unseen_window, evaluate_gate
from ml.release.tracking import prepare_store, store_client
from ml.serving import Policy


def export_model(run_dir: Path) -> dict:
    """ONNX of the most recent fold's policy, checked against torch on real windows."""
    run = RunFolder(run_dir)
    config = read_config(run)
    data = read_json(run.data)
    tracking = read_json(run.tracking)
    latest = read_json(run.folds)[-1]
    _, checkpoint = load_agent(run, latest["index"])
    policy = load_policy(checkpoint)
    space = policy.action_space
    policy.risk = RiskOverlay.from_config(config, space.n_assets)
    metadata = {
        "lookback": config.lookback, "interval": data["interval"], "symbol": data["symbol"],
        "feature_set_version": FEATURE_SET_VERSION,
        "features": ",".join(policy.features.names),
        "action_semantics": space.semantics(),
        "action_mode": space.mode,
        "close_only": str(data["close_only"]).lower(),
        "training_window": f"{latest['train']['start']}/{latest['train']['end']}",
        "validation_window": f"{latest['validation']['start']}/{latest['validation']['end']}",
        "dataset_hash": data["dataset_hash"], "mlflow_run_id": tracking["run_id"],
        "code_version": code_version(),
    }
    if config.data.symbols:
        metadata["symbols"] = ",".join(config.data.symbols)  # the order of the asset axis
    if policy.risk is not None:  # the overlay in the graph; ml.serving derives the session input from these
        metadata["risk"] = json.dumps(dataclasses.asdict(config.risk), sort_keys=True)
        metadata["risk_state"] = ",".join(STATE_SCALARS + ("entry_price[asset]", "stop_cooldown[asset]"))
    path = export_onnx(policy, run.model, metadata)
    ohlcv = read_market(run, config, torch.device("cpu")).ohlcv.numpy()
    first, last = latest["test"]["first_bar"], latest["test"]["last_bar"]
    windows, positions = real_windows(policy, ohlcv, first, last, config.gate.parity_windows)
    parity = check_parity(policy, path, windows, positions, config.gate.parity_tolerance)
    examples = {"ohlcv": windows[:4], "position": positions[:4]}
    if policy.risk is not None:
        examples |= dict(zip(("nav", "session", "risk_state"), (t.numpy() for t in policy.risk.example_inputs(4))))
    np.savez(run.parity_windows, **examples)
    write_json(run.parity, parity.as_dict())
    return {"onnx": str(path), "parity": parity.as_dict()}


def register(run_dir: Path) -> dict:
    """Log artifacts, register the ONNX version, apply the gate, move aliases under the registry lock."""
    run = RunFolder(run_dir)
    if run.registration.exists():  # a retry never registers or promotes twice
        return read_json(run.registration)
    config = read_config(run)
    data = read_json(run.data)
    tracking = read_json(run.tracking)
    report = read_json(run.report)
    parity = read_json(run.parity)
    uri, run_id, name = tracking["tracking_uri"], tracking["run_id"], config.model_name

    prepare_store(uri)  # a server that does not answer fails here in seconds, in one line
    client = store_client(uri)
    example = np.load(run.parity_windows)
    policy = Policy(run.model, prefer_gpu=False)
    # ohlcv, then position or weights, then the risk overlay's inputs when it has one
    input_names = [i.name for i in policy.session.get_inputs()]
    arrays = [example[key] for key in ("ohlcv", "position", "nav", "session", "risk_state") if key in example]
    version = registry.register_onnx(uri, run_id, name, run.model, dict(zip(input_names, arrays)),
                                     tags={"dataset_hash": data["dataset_hash"], "code_version": code_version(),
                                           "config_hash": training_fingerprint(config)})

    def judge(champion: str | None) -> dict:
        if champion == version and run.judgement.exists():
            # A retry after this version was promoted: keep the decision that promoted it, with its
            # champion comparison, instead of judging it against itself.
            return {key: value for key, value in read_json(run.judgement).items() if key != "champion"}
        comparison = None
        if champion and champion != version and config.gate.compare_with_champion:
            comparison = _compare_with_champion(run, config, uri, name, champion)
        decision = evaluate_gate(report, parity, config.gate, config.action.collapse_share, comparison).as_dict()
        benchmark = report["benchmark"]
        policy_mean, hold = report["aggregate"]["policy"], report["aggregate"]["baselines"][benchmark]
        description = (
            f"Gate {'PASSED' if decision['passed'] else 'FAILED'}: " + "; ".join(decision["reasons"])
            + f". Mean test Sharpe {policy_mean['sharpe']:.2f} vs {benchmark.replace('_', ' ')} {hold['sharpe']:.2f}; "
            f"total return {policy_mean['total_return']:+.2%} vs {hold['total_return']:+.2%}."
        )
        judged = {"decision": decision, "description": description, "comparison": comparison}
        write_json(run.judgement, judged | {"champion": champion})  # before any alias moves
        return judged

    # Judged and moved under the promotion lock; judged again if champion moved in the meantime.
    judged = registry.judge_and_promote(uri, name, version, judge, promote=config.registry.promote)
    decision, comparison, champion, promoted = (judged["decision"], judged["comparison"],
                                                judged["champion_before"], judged["promoted"])
    if champion == version:  # promoted by an earlier attempt: the champion it replaced is on record
        champion = read_json(run.judgement).get("champion")
    # The report now says what became of the model, at its top; then it goes to the run.
    report["gate"] = decision
    report["model"] = {"name": name, "version": version, "champion": promoted, "run_id": run_id, "tracking_uri": uri}
    write_json(run.report, report)
    render_html_report(run.report_html, report, {caption: run.plots / png
                                                 for caption, png in report.get("figures", {}).items()})
    for artifact in run.report_artifacts():
        client.log_artifact(run_id, str(artifact), artifact_path="report")
    client.log_artifacts(run_id, str(run.plots), artifact_path="report/plots")
    client.set_tag(run_id, "gate.passed", str(decision["passed"]).lower())
    client.set_terminated(run_id)
    result = {"model_name": name, "version": version, "champion": promoted,
              "champion_version": registry.alias_version(uri, name, registry.CHAMPION),
              "previous_champion": champion, "gate": decision, "champion_comparison": comparison,
              "tracking_uri": uri, "run_id": run_id, "promote_requested": config.registry.promote}
    write_json(run.registration, result)
    return result


def _compare_with_champion(run: RunFolder, config: PipelineConfig, uri: str, name: str, champion: str) -> dict:
    """Both models on the latest test window, cut to the bars the champion never trained on."""
    champion_path = registry.download_model(uri, name, champion)
    metadata = Policy(champion_path, prefer_gpu=False).metadata
    # The champion was selected on its validation window: that counts as seen too.
    seen_until = metadata.get("validation_window") or metadata.get("training_window", "")
    if "/" not in seen_until:
        return {"skipped": f"champion v{champion} records no training window"}
    latest = read_json(run.folds)[-1]
    window = (latest["test"]["first_bar"], latest["test"]["last_bar"])
    gap = latest["test"]["first_bar"] - latest["validation"]["last_bar"]
    series: MarketSeries = read_market(run, config, torch.device("cpu"))
    return compare_on_unseen_window(run.model, champion_path, champion, seen_until.split("/")[1], series, window,
                                    gap, config)
