"""The forward test: paper trading of every champion on the curated bars, and its monitoring.

    trade_champion(name)    -> decide, fill and record every new bar (``paper``, ``ledger``)
    monitor_champion(name)  -> the rules (``monitor``), the page (``page``), the MLflow run

The ``forward_test`` DAG calls the two for each model with a champion whenever ``market_data``
updates the lake; ``python -m ml forward`` runs them by hand.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ml.data.schema import DataError
from ml.forward.ledger import Ledger
from ml.forward.monitor import MonitorRules, monitor, nav_band
from ml.forward.page import render_page
from ml.forward.paper import ForwardError, check_model_name, lake_series, load_champion, trade
from ml.release.lock import PromotionError
from ml.release.registry import rollback
from ml.release.tracking import log_metrics, resolve_tracking, start_run, store_client

__all__ = ["BAD_INPUT", "ForwardError", "Ledger", "MonitorRules", "champions", "check_model_name", "monitor_champion",
           "trade_champion"]

log = logging.getLogger(__name__)
EXPERIMENT = "forward_test"
# What a retry will not fix: a bad model name, bars that break a rule, a lake without the symbol.
BAD_INPUT = (ForwardError, DataError)


def champions(tracking_uri: str) -> list[str]:
    """Every registered model that has a champion, by name."""
    client = store_client(tracking_uri)
    return sorted(model.name for model in client.search_registered_models(max_results=1000)
                  if "champion" in (model.aliases or {}))


def trade_champion(model_name: str, tracking_uri: str, ledger: Ledger, workdir: Path,
                   lake_root: str | None = None) -> dict:
    """Paper-trade the champion of ``model_name`` on every curated bar since the ledger's last."""
    champion = load_champion(tracking_uri, model_name, workdir)
    if champion is None:
        return {"model_name": model_name, "skipped": "no champion"}
    return trade(champion, lake_series(champion.config, lake_root), ledger)


def monitor_champion(model_name: str, tracking_uri: str, ledger: Ledger, workdir: Path,
                     rules: MonitorRules = MonitorRules(), lake_root: str | None = None) -> dict:
    """The rules over the champion's current segment; writes forward_test.html and monitoring.json
    into ``workdir``, logs both and the live statistics to the segment's MLflow run, and rolls
    ``champion`` back on a breach when ``rules.rollback`` is set. Returns the result with
    ``breaches`` (empty when every rule holds)."""
    champion = load_champion(tracking_uri, model_name, workdir)
    segment = ledger.current_segment(model_name)
    if champion is None or segment is None or segment.version != champion.version:
        reason = "no champion" if champion is None else f"v{champion.version} has not traded yet"
        return {"model_name": model_name, "skipped": reason, "breaches": []}
    rows = ledger.rows(segment.id)
    series = lake_series(champion.config, lake_root)
    result = monitor(champion, series, rows, rules)
    band = nav_band(champion.report_dir, len(rows), rules.band)
    workdir = Path(workdir)
    page = workdir / "forward_test.html"
    page.write_text(render_page(segment, rows, result, band, ledger.segments(model_name)))
    (workdir / "monitoring.json").write_text(json.dumps(result, indent=2))
    result["page"] = str(page)
    result["segment"] = segment.id
    result["tracking_uri"] = tracking_uri
    result["run_id"] = _log_to_mlflow(tracking_uri, segment, result, workdir)
    for check in result["checks"]:
        (log.warning if check["status"] == "breach" else log.info)("%s v%s: %s: %s: %s", model_name,
                                                                   champion.version, check["rule"],
                                                                   check["status"], check["detail"])
    if result["breaches"] and rules.rollback:
        result["rollback"] = _roll_back(tracking_uri, model_name)
    return result


def _log_to_mlflow(tracking_uri: str, segment, result: dict, workdir: Path) -> str:
    """One MLflow run per ledger segment, found again by its tags on every later run."""
    client = store_client(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    found = client.search_runs([experiment.experiment_id], max_results=1,
                               filter_string=f"tags.forward_segment = '{segment.id}' and "
                                             f"tags.model_name = '{segment.model_name}'") if experiment else []
    if found:
        run_id = found[0].info.run_id
    else:
        _, artifact_root = resolve_tracking(tracking_uri, None, workdir)
        run_id = start_run(tracking_uri, artifact_root, EXPERIMENT,
                           f"forward/{segment.model_name}/v{segment.version}/segment {segment.id}",
                           params={"model_name": segment.model_name, "version": segment.version,
                                   "start_bar": segment.start_bar, "training_run_id": segment.training_run_id},
                           tags={"forward_segment": str(segment.id), "model_name": segment.model_name,
                                 "model_version": segment.version})
    if result["live"]:
        log_metrics(tracking_uri, run_id, {f"forward/{k}": v for k, v in result["live"].items()}
                    | {"forward/breaches": len(result["breaches"])}, step=result["bars"])
    client.log_artifact(run_id, str(workdir / "forward_test.html"), artifact_path="report")
    client.log_artifact(run_id, str(workdir / "monitoring.json"), artifact_path="report")
    return run_id


def _roll_back(tracking_uri: str, model_name: str) -> dict:
    try:
        moved = rollback(tracking_uri, model_name)
    except PromotionError as error:
        log.error("%s: monitoring asked for a rollback, which is not possible: %s", model_name, error)
        return {"rolled_back": False, "why": str(error)}
    log.warning("%s: champion rolled back from v%s to v%s after a monitoring breach", model_name,
                moved["previous"], moved["champion"])
    return {"rolled_back": True, **moved}
