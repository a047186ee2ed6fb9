"""MLflow model registry: versions of the exported ONNX policy, the gate's decisions, aliases.

Every call goes through a client of the given store (``store_client``); tracking (runs, metrics)
is in ``ml.release.tracking``. Alias moves happen under the promotion lock (``ml.release.lock``)
and move `champion` only if it is still the version the decision was made against.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import mlflow.onnx
import onnx
from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature

from ml.release.lock import PromotionError, registry_lock
from ml.release.tracking import store_client
from ml.serving import create_session, cuda_driver_present, resolve_model_path

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER = "champion", "challenger"
_UNCHECKED = object()
MODEL_DESCRIPTION = (
    "PPO trading policy {name}, exported to ONNX by the ppo_training pipeline. Each version carries its "
    "gate decision (tags gate.passed, gate.reasons, gate.numbers) and a description of its test results; "
    "`champion` is the version services load (models:/{name}@champion), `challenger` the newest one.")


def rounded(value, digits: int = 4):
    """Numbers to ``digits`` significant digits, for people reading them on the version page."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, digits) for item in value]
    return value


class ChampionChanged(PromotionError):
    """`champion` moved after a decision was made against it."""


def register_onnx(tracking_uri: str, run_id: str, model_name: str, onnx_path: Path,
                  input_example: dict, tags: dict) -> str:
    """Log the ONNX model as the run's logged model and register it; returns the version.

    Idempotent per run: a retried task finds the version this run already registered.
    """
    client = store_client(tracking_uri)
    existing = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    if existing:
        log.info("%s v%s is already registered from MLflow run %s", model_name, existing[0].version, run_id)
        return str(existing[0].version)
    session = create_session(onnx_path)
    outputs = session.run(None, input_example)  # every output goes into the signature
    signature = infer_signature(input_example, {o.name: value for o, value in zip(session.get_outputs(), outputs)})
    providers = (["CUDAExecutionProvider"] if cuda_driver_present() else []) + ["CPUExecutionProvider"]
    # What mlflow.onnx.log_model does, with this client instead of the process-wide tracking URI.
    tags = {key: str(value) for key, value in tags.items()}
    model = client.create_logged_model(client.get_run(run_id).info.experiment_id, name="model",
                                       source_run_id=run_id, tags=tags)
    try:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / "model"
            mlflow.onnx.save_model(
                onnx.load(str(onnx_path)), str(local), signature=signature, input_example=input_example,
                onnx_execution_providers=providers,
                mlflow_model=Model(artifact_path=model.artifact_location, run_id=run_id,
                                   model_uuid=model.model_id, model_id=model.model_id))
            client.log_model_artifacts(model.model_id, str(local))
    except Exception:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    try:
        client.create_registered_model(model_name, description=MODEL_DESCRIPTION.format(name=model_name))
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):  # else: an earlier run made it
            raise
    # The artifact location as source (not models:/ID): a SQLite registry would look that ID up
    # through the process-wide tracking URI.
    version = client.create_model_version(model_name, source=model.artifact_location, run_id=run_id,
                                          tags=tags, model_id=model.model_id)
    log.info("registered %s v%s from MLflow run %s", model_name, version.version, run_id)
    return str(version.version)


def alias_version(tracking_uri: str, model_name: str, alias: str) -> str | None:
    """The version the alias points at; None when the alias (or the model) does not exist."""
    try:
        return str(store_client(tracking_uri).get_model_version_by_alias(model_name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            return None
        raise  # an unreachable store is not "no champion"


def latest_version(tracking_uri: str, model_name: str) -> tuple[str, dict] | None:
    """The newest registered version of the model and its tags; None when the model has none."""
    versions = store_client(tracking_uri).search_model_versions(f"name = '{model_name}'")
    if not versions:
        return None
    newest = max(versions, key=lambda v: int(v.version))
    return str(newest.version), dict(newest.tags)


def download_model(tracking_uri: str, model_name: str, version: str) -> Path:
    """The version's ONNX file on local disk."""
    return resolve_model_path(f"models:/{model_name}/{version}", tracking_uri)


def record_decision(tracking_uri: str, model_name: str, version: str, decision: dict, description: str) -> None:
    client = store_client(tracking_uri)
    client.set_model_version_tag(model_name, version, "gate.passed", str(decision["passed"]).lower())
    client.set_model_version_tag(model_name, version, "gate.reasons", " | ".join(decision["reasons"])[:5000])
    client.set_model_version_tag(model_name, version, "gate.numbers", json.dumps(rounded(decision["numbers"]))[:5000])
    client.update_model_version(model_name, version, description=description[:5000])


def move_champion(tracking_uri: str, model_name: str, version: str, reason: str,
                  expected: str | None | object = _UNCHECKED) -> str | None:
    """Point `champion` at a version that passed its gate; returns the previous champion.

    ``expected``: the champion the decision was made against; when `champion` is no longer that
    version, nothing moves and ChampionChanged is raised. Call it under ``registry_lock``.
    """
    client = store_client(tracking_uri)
    if client.get_model_version(model_name, version).tags.get("gate.passed") != "true":
        raise PromotionError(f"{model_name} v{version} did not pass its gate and cannot become champion")
    previous = alias_version(tracking_uri, model_name, CHAMPION)
    if expected is not _UNCHECKED and previous != expected:
        raise ChampionChanged(f"{model_name}: champion is v{previous}, not v{expected} as when v{version} was judged")
    client.set_registered_model_alias(model_name, CHAMPION, version)
    log.info("%s: champion -> v%s (was %s): %s", model_name, version, f"v{previous}" if previous else "none", reason)
    if previous and previous != version:
        client.set_model_version_tag(model_name, version, "previous_champion", previous)
    client.set_model_version_tag(model_name, version, "champion_reason", reason[:5000])
    return previous


def judge_and_promote(tracking_uri: str, model_name: str, version: str, judge: Callable[[str | None], dict],
                      promote: bool, reason: str = "passed the promotion gate", attempts: int = 5) -> dict:
    """Under the promotion lock: judge ``version`` against the current champion, record the decision,
    point `challenger` at it and, when it passed and ``promote``, make it champion.

    ``judge(champion)`` returns at least ``decision`` (the gate's ``as_dict()``) and ``description``.
    If `champion` moved while the version was judged (a worker the lock did not exclude), the
    version is judged again against the new one. Returns the judge's answer with ``champion_before``
    (the champion it was judged against) and ``promoted``.
    """
    client = store_client(tracking_uri)
    with registry_lock(tracking_uri, model_name):
        for _ in range(attempts):
            champion = alias_version(tracking_uri, model_name, CHAMPION)
            judged = judge(champion)
            decision = judged["decision"]
            record_decision(tracking_uri, model_name, version, decision, judged["description"])
            log.info("%s v%s: promotion gate %s", model_name, version, "PASSED" if decision["passed"] else "FAILED")
            for rule in decision["reasons"]:
                log.info("  %s", rule)
            client.set_registered_model_alias(model_name, CHALLENGER, version)
            log.info("%s: challenger -> v%s", model_name, version)
            promoted = bool(decision["passed"] and promote)
            if not promoted:
                log.info("%s: champion stays %s (%s)", model_name, f"v{champion}" if champion else "unset",
                         "promotion is off (registry.promote)" if decision["passed"] else "the gate failed")
            if promoted:
                try:
                    move_champion(tracking_uri, model_name, version, reason, expected=champion)
                except ChampionChanged as exc:
                    log.info("%s; judging v%s again", exc, version)
                    continue
            return {**judged, "champion_before": champion, "promoted": promoted}
    raise PromotionError(f"{model_name}: champion moved {attempts} times while v{version} was judged; not promoted")


def promote(tracking_uri: str, model_name: str, version: str) -> dict:
    """Manual promotion of a version that passed its gate."""
    with registry_lock(tracking_uri, model_name):
        previous = move_champion(tracking_uri, model_name, version, "promoted by hand")
    return {"model_name": model_name, "champion": version, "previous": previous}


def rollback(tracking_uri: str, model_name: str, to_version: str | None = None) -> dict:
    """Re-point `champion` to an earlier version (default: the one it replaced)."""
    client = store_client(tracking_uri)
    with registry_lock(tracking_uri, model_name):
        current = alias_version(tracking_uri, model_name, CHAMPION)
        if current is None:
            raise PromotionError(f"{model_name} has no champion to roll back")
        target = to_version or client.get_model_version(model_name, current).tags.get("previous_champion")
        if not target:
            raise PromotionError(f"{model_name} v{current} records no previous champion; pass --to VERSION")
        if int(target) >= int(current) and to_version is None:
            raise PromotionError(f"previous champion v{target} is not earlier than v{current}")
        move_champion(tracking_uri, model_name, target, f"rollback from v{current}", expected=current)
        client.set_model_version_tag(model_name, current, "rolled_back_to", target)
    return {"model_name": model_name, "champion": target, "previous": current}
