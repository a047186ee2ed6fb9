"""MLflow tracking and model registry: one run per pipeline run, versions with aliases.

The run is opened once (its id goes into the ONNX metadata) and every later
stage logs to it by id, so the stages can run in separate Airflow tasks.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import mlflow
import onnx
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from ml.release.lock import registry_lock
from ml.serving import create_session, cuda_driver_present, resolve_model_path

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


@contextlib.contextmanager
def fluent_tracking(tracking_uri: str):
    """MLflow's fluent API reads a process-wide URI, which ``set_tracking_uri`` also exports to
    ``$MLFLOW_TRACKING_URI``: set it for this block only, so one run's store never leaks into the
    next pipeline run in the same process."""
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def start_run(tracking_uri: str, artifact_root: str, experiment: str, run_name: str,
              params: dict, tags: dict) -> str:
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
    """One batched call; non-finite values are left out (MLflow cannot chart them)."""
    now = int(time.time() * 1000)
    batch = [Metric(key.replace("+", "p"), float(value), now, step or 0) for key, value in metrics.items()
             if isinstance(value, (int, float)) and math.isfinite(value)]
    for begin in range(0, len(batch), 1000):  # the store's per-call limit
        MlflowClient(tracking_uri).log_batch(run_id, metrics=batch[begin:begin + 1000])


def register_onnx(tracking_uri: str, run_id: str, model_name: str, onnx_path: Path,
                  input_example: dict, tags: dict) -> str:
    """Log the ONNX model under the run and register it; returns the version.

    Idempotent per run: a retried task finds the version this run already registered.
    """
    client = MlflowClient(tracking_uri)
    existing = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    if existing:
        return str(existing[0].version)
    session = create_session(onnx_path)
    outputs = session.run(None, input_example)  # every output goes into the signature
    signature = infer_signature(input_example, {o.name: value for o, value in zip(session.get_outputs(), outputs)})
    providers = (["CUDAExecutionProvider"] if cuda_driver_present() else []) + ["CPUExecutionProvider"]
    with fluent_tracking(tracking_uri), mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)), name="model", signature=signature, input_example=input_example,
            registered_model_name=model_name, tags=tags, onnx_execution_providers=providers,
        )
    return str(info.registered_model_version)


def alias_version(tracking_uri: str, model_name: str, alias: str) -> str | None:
    try:
        return str(MlflowClient(tracking_uri).get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def download_model(tracking_uri: str, model_name: str, version: str) -> Path:
    """The version's ONNX file on local disk."""
    return resolve_model_path(f"models:/{model_name}/{version}", tracking_uri)


def record_decision(tracking_uri: str, model_name: str, version: str, decision: dict, description: str) -> None:
    client = MlflowClient(tracking_uri)
    client.set_model_version_tag(model_name, version, "gate.passed", str(decision["passed"]).lower())
    client.set_model_version_tag(model_name, version, "gate.reasons", " | ".join(decision["reasons"])[:5000])
    client.set_model_version_tag(model_name, version, "gate.numbers", json.dumps(decision["numbers"])[:5000])
    client.update_model_version(model_name, version, description=description[:5000])


def move_champion(tracking_uri: str, model_name: str, version: str, reason: str) -> str | None:
    """Point `champion` at a version that passed its gate; returns the previous champion."""
    client = MlflowClient(tracking_uri)
    if client.get_model_version(model_name, version).tags.get("gate.passed") != "true":
        raise PromotionError(f"{model_name} v{version} did not pass its gate and cannot become champion")
    previous = alias_version(tracking_uri, model_name, CHAMPION)
    client.set_registered_model_alias(model_name, CHAMPION, version)
    if previous and previous != version:
        client.set_model_version_tag(model_name, version, "previous_champion", previous)
    client.set_model_version_tag(model_name, version, "champion_reason", reason[:5000])
    return previous


class PromotionError(RuntimeError):
    pass


def promote(tracking_uri: str, model_name: str, version: str) -> dict:
    """Manual promotion of a version that passed its gate."""
    with registry_lock(tracking_uri, model_name):
        previous = move_champion(tracking_uri, model_name, version, "promoted by hand")
    return {"model_name": model_name, "champion": version, "previous": previous}


def rollback(tracking_uri: str, model_name: str, to_version: str | None = None) -> dict:
    """Re-point `champion` to an earlier version (default: the one it replaced)."""
    client = MlflowClient(tracking_uri)
    with registry_lock(tracking_uri, model_name):
        current = alias_version(tracking_uri, model_name, CHAMPION)
        if current is None:
            raise PromotionError(f"{model_name} has no champion to roll back")
        target = to_version or client.get_model_version(model_name, current).tags.get("previous_champion")
        if not target:
            raise PromotionError(f"{model_name} v{current} records no previous champion; pass --to VERSION")
        if int(target) >= int(current) and to_version is None:
            raise PromotionError(f"previous champion v{target} is not earlier than v{current}")
        move_champion(tracking_uri, model_name, target, f"rollback from v{current}")
        client.set_model_version_tag(model_name, current, "rolled_back_to", target)
    return {"model_name": model_name, "champion": target, "previous": current}
