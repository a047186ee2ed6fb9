"""MLflow tracking: where the store is, getting it ready, opening a run, sending metrics.

Every call goes through a client built for the given URI (``store_client``): nothing here reads or
writes MLflow's process-wide tracking or registry URI, so runs against different stores can share
a process (an Airflow worker, a notebook, threads).

A tracking server that does not answer costs seconds, not MLflow's minutes of retries: the store is
checked when a run opens, and metrics sent during training are kept (``RunMetrics``) while the
server is away and sent when it is back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path

from filelock import FileLock
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.service_pb2 import LogBatch, SearchExperiments
from mlflow.store.tracking.rest_store import RestStore
from mlflow.tracking import MlflowClient
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.proto_json_utils import message_to_json
from mlflow.utils.rest_utils import http_request, verify_rest_response

log = logging.getLogger(__name__)

# (connect, read) seconds. MLflow's own defaults retry for minutes; these calls give up at once and
# leave the decision (fail in one line, or keep the metrics) to the caller.
CHECK_TIMEOUT = (3.0, 5.0)
SEND_TIMEOUT = (3.0, 15.0)
BATCH_LIMIT = 1000  # the stores' per-call limit on metrics


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached; the message names the URI and why, in one line."""


def store_client(tracking_uri: str) -> MlflowClient:
    """A client of this store for tracking and registry alike (never the process-wide registry URI)."""
    return MlflowClient(tracking_uri, registry_uri=tracking_uri)


def is_server(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store, else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///"):].split("?", 1)[0])


def resolve_tracking(tracking_uri: str | None, artifact_root: str | None, out_dir: Path) -> tuple[str, str]:
    """Tracking URI (config, then $MLFLOW_TRACKING_URI, then SQLite in ``out_dir``) and artifact root."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"
    if artifact_root is None:
        database = sqlite_path(uri)
        # Beside a SQLite file; for a server, "" lets the server decide.
        artifact_root = (database.parent / "mlartifacts").resolve().as_uri() if database else ""
    return uri, artifact_root


def _reason(exc: BaseException) -> str:
    """The short cause inside MLflow's and requests' long connection messages."""
    text = str(exc)
    if "timed out" in text or "Timeout" in text:
        return "no answer within the timeout"
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    return found.group(1).strip() if found else text.splitlines()[0][:200]


def check_server(tracking_uri: str) -> None:
    """Raise TrackingUnavailable within seconds unless an http(s) URI answers MLflow's API."""
    endpoint, method = RestStore._METHOD_TO_INFO[SearchExperiments]
    try:
        response = http_request(get_default_host_creds(tracking_uri), endpoint, method, max_retries=0,
                                backoff_factor=0, timeout=CHECK_TIMEOUT, raise_on_status=False,
                                json={"max_results": 1})
    except MlflowException as exc:
        raise TrackingUnavailable(f"MLflow tracking server {tracking_uri} is unreachable: {_reason(exc)}") from None
    status = response.status_code
    if status >= 500:
        raise TrackingUnavailable(f"MLflow tracking server {tracking_uri} is unreachable: HTTP {status}")
    if status in (401, 403):
        raise TrackingUnavailable(f"MLflow tracking server {tracking_uri} refused the credentials (HTTP {status}): "
                                  "check MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN")
    if status != 200:
        raise TrackingUnavailable(f"{tracking_uri} answers HTTP {status} to {endpoint}: "
                                  "not an MLflow tracking server at that URI")


def prepare_store(tracking_uri: str) -> None:
    """Make the store ready before a run's first call.

    A tracking server must answer. A SQLite store is created once, under a file lock beside the
    database: MLflow creates the tables on a client's first use, and two processes doing that at
    the same time on a fresh file collide (one fails with "table ... already exists").
    """
    if is_server(tracking_uri):
        check_server(tracking_uri)
        return
    database = sqlite_path(tracking_uri)
    if database is None:
        return
    if not database.parent.is_dir():
        raise TrackingUnavailable(f"{tracking_uri}: the folder {database.parent} does not exist")
    with FileLock(str(database.parent / f".{database.name}.init.lock")):
        client = store_client(tracking_uri)
        client.search_experiments(max_results=1)  # creates the tracking tables and the default experiment
        client.search_registered_models(max_results=1)  # opens the registry store on the same tables


def start_run(tracking_uri: str, artifact_root: str, experiment: str, run_name: str,
              params: dict, tags: dict) -> str:
    prepare_store(tracking_uri)
    client = store_client(tracking_uri)
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


def as_metrics(metrics: dict, step: int | None = None) -> list[Metric]:
    """MLflow metrics stamped now; non-finite values are left out (MLflow cannot chart them)."""
    now = int(time.time() * 1000)
    return [Metric(key.replace("+", "p"), float(value), now, step or 0) for key, value in metrics.items()
            if isinstance(value, (int, float)) and math.isfinite(value)]


def _post_batch(tracking_uri: str, run_id: str, batch: list[Metric]) -> None:
    """One log-batch request without MLflow's retries; TrackingUnavailable when the server does not answer."""
    endpoint, method = RestStore._METHOD_TO_INFO[LogBatch]
    body = json.loads(message_to_json(LogBatch(run_id=run_id, metrics=[m.to_proto() for m in batch])))
    try:
        response = http_request(get_default_host_creds(tracking_uri), endpoint, method, max_retries=0,
                                backoff_factor=0, timeout=SEND_TIMEOUT, json=body)
    except MlflowException as exc:  # refused, timed out, reset, or a 5xx: the server is away
        raise TrackingUnavailable(f"MLflow tracking server {tracking_uri} is unreachable: {_reason(exc)}") from None
    verify_rest_response(response, endpoint)  # a 4xx is a real error, not an outage


def send_batch(tracking_uri: str, run_id: str, batch: list[Metric]) -> None:
    """One call of at most BATCH_LIMIT metrics; a server that does not answer raises TrackingUnavailable."""
    if is_server(tracking_uri):
        _post_batch(tracking_uri, run_id, batch)
    else:
        store_client(tracking_uri).log_batch(run_id, metrics=batch)


def log_metrics(tracking_uri: str, run_id: str, metrics: dict, step: int | None = None) -> None:
    """Send now; a tracking server that does not answer raises TrackingUnavailable in seconds."""
    batch = as_metrics(metrics, step)
    for begin in range(0, len(batch), BATCH_LIMIT):
        send_batch(tracking_uri, run_id, batch[begin:begin + BATCH_LIMIT])


class RunMetrics:
    """Metrics of one run that survive a tracking-server outage.

    ``log`` sends at once while the server answers. When it does not, the metrics are kept in
    memory (one WARNING per outage) and the caller goes on; the next ``log`` after
    ``retry_every`` seconds sends them all. ``close`` waits up to ``wait`` seconds for the server
    and writes what it still could not send to ``spill`` (JSON lines), which the next
    ``RunMetrics`` on that file sends first.
    """

    def __init__(self, tracking_uri: str, run_id: str, spill: Path | None = None, retry_every: float = 30.0):
        self.tracking_uri, self.run_id, self.spill, self.retry_every = tracking_uri, run_id, spill, retry_every
        self.pending: list[Metric] = []
        if spill is not None and spill.exists():
            self.pending = [Metric(m["key"], m["value"], m["timestamp"], m["step"])
                            for m in map(json.loads, spill.read_text().splitlines()) if m]
        self._next_try = 0.0
        self._away = False

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.pending += as_metrics(metrics, step)
        if time.monotonic() >= self._next_try:
            self.send()

    def send(self) -> bool:
        """Try to send everything kept; True when nothing is left."""
        try:
            while self.pending:
                batch = self.pending[:BATCH_LIMIT]
                send_batch(self.tracking_uri, self.run_id, batch)
                del self.pending[:len(batch)]  # a later retry resends only the rest
        except TrackingUnavailable as exc:
            self._next_try = time.monotonic() + self.retry_every
            if not self._away:
                log.warning("%s; keeping the metrics (%d so far) and going on, retrying every %.0f s",
                            exc, len(self.pending), self.retry_every)
            self._away = True
            return False
        if self._away:
            log.info("MLflow tracking server %s answers again: buffered metrics sent", self.tracking_uri)
        self._away = False
        if self.spill is not None:  # sent: a later stage must not send them again
            self.spill.unlink(missing_ok=True)
        return True

    def close(self, wait: float = 60.0) -> bool:
        """Send what is kept, waiting up to ``wait`` seconds for the server; True when all went out."""
        deadline = time.monotonic() + wait
        while self.pending and not self.send() and time.monotonic() < deadline:
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        if not self.pending:
            if self.spill is not None:
                self.spill.unlink(missing_ok=True)
            return True
        if self.spill is None:
            return False
        partial = self.spill.with_name(self.spill.name + ".partial")
        partial.write_text("".join(json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp,
                                               "step": m.step}) + "\n" for m in self.pending))
        partial.replace(self.spill)  # whole or not at all
        log.warning("MLflow tracking server %s still unreachable: %d metrics kept in %s, sent by the next "
                    "stage that logs", self.tracking_uri, len(self.pending), self.spill)
        return False
