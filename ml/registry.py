"""MLflow tracking and model registry: one run per pipeline run, versions with aliases.

The run is opened once (its id goes into the ONNX metadata) and every later
stage logs to it by id, so the stages can run in separate Airflow tasks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

CHAMPION, CHALLENGER = "champion", "challenger"


def resolve_tracking(tracking_uri: str | None, artifact_root: str | None, out_dir: Path) -> tuple[str, str]:
    """Tracking URI (config, then $MLFLOW_TRACKING_URI, then SQLite in ``out_dir``) and artifact root."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"
    if artifact_root is None:
        if uri.startswith("sqlite:///"):
            artifact_root = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        else:
            artifact_root = ""  # a tracking server decides
    return uri, artifact_root


def start_run(tracking_uri: str, artifact_root: str, experiment: str, run_name: str,
              params: dict, tags: dict) -> str:
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        try:
            experiment_id = client.create_experiment(experiment, artifact_location=artifact_root or None)
        except MlflowException:  # created by a concurrent run in the meantime
            experiment_id = client.get_experiment_by_name(experiment).experiment_id
    else:
        experiment_id = found.experiment_id
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value)[:6000])
    return run.info.run_id


def flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def log_metrics(tracking_uri: str, run_id: str, metrics: dict, step: int | None = None) -> None:
    client = MlflowClient(tracking_uri)
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            client.log_metric(run_id, key.replace("+", "p"), float(value), step=step or 0)


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"passed": self.passed, "reasons": self.reasons, "checks": self.checks}


def sanity_gate(report: dict, parity: dict) -> GateDecision:
    """The checks every champion must pass: ONNX parity and finite test metrics on every fold."""
    checks, reasons = {}, []
    checks["onnx_parity"] = bool(parity["passed"])
    reasons.append(
        f"onnx parity {'passed' if parity['passed'] else 'FAILED'}: max |ort - torch| = "
        f"{parity['max_abs_diff']:.2e} (tolerance {parity['tolerance']:.0e}) on {parity['windows']} real windows"
    )
    finite = all(
        value is not None and math.isfinite(value)
        for fold in report["folds"] for key, value in fold["policy"]["test"].items()
        if key in ("total_return", "sharpe", "max_drawdown")
    )
    checks["finite_test_metrics"] = finite
    reasons.append("test metrics finite on every fold" if finite else "a fold has non-finite test metrics")
    return GateDecision(passed=all(checks.values()), reasons=reasons, checks=checks)


def register_onnx(tracking_uri: str, run_id: str, model_name: str, onnx_path: Path,
                  input_example: dict, tags: dict) -> str:
    """Log the ONNX model under the run and register it; returns the new version."""
    import onnx
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(tracking_uri)
    model = onnx.load(str(onnx_path))
    from ml.serving import create_session, cuda_driver_present

    outputs = create_session(onnx_path).run(None, input_example)
    providers = (["CUDAExecutionProvider"] if cuda_driver_present() else []) + ["CPUExecutionProvider"]
    signature = infer_signature(input_example, {"target_exposure": outputs[0]})
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(
            model, name="model", signature=signature, input_example=input_example,
            registered_model_name=model_name, tags=tags, onnx_execution_providers=providers,
        )
    return str(info.registered_model_version)


def set_aliases(tracking_uri: str, model_name: str, version: str, decision: GateDecision,
                promote: bool, description: str) -> bool:
    """Tag the version with the gate decision, make it `challenger`, and `champion` if it passed."""
    client = MlflowClient(tracking_uri)
    client.set_model_version_tag(model_name, version, "gate.passed", str(decision.passed).lower())
    client.set_model_version_tag(model_name, version, "gate.reasons", " | ".join(decision.reasons)[:5000])
    client.update_model_version(model_name, version, description=description[:5000])
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    if decision.passed and promote:
        client.set_registered_model_alias(model_name, CHAMPION, version)
        return True
    return False


def alias_version(tracking_uri: str, model_name: str, alias: str) -> str | None:
    try:
        return str(MlflowClient(tracking_uri).get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None
