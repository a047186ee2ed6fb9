"""Links from the Airflow UI to the MLflow UI, where runs, metrics, reports and registered models live.

- Browse menu: the MLflow experiments and the model registry.
- Task buttons ("Extra Links" on a task instance): its MLflow run, the registered model version, and
  report.html in the run's artifacts. As Airflow 3 does for operator links, the task that knows the
  ids pushes each address into XCom under the link's key (``push_mlflow_links``); the API server
  reads it back when the UI asks for the task's links. A task that pushed nothing shows no button.

``MLFLOW_UI_URL`` (default http://127.0.0.1:5000) is the MLflow UI as the browser reaches it.
"""

from __future__ import annotations

import logging
import os

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink

MLFLOW_UI_URL = os.environ.get("MLFLOW_UI_URL", "http://127.0.0.1:5000")

log = logging.getLogger(__name__)


class _PushedLink(BaseOperatorLink):
    """A link whose address the task pushed into XCom under ``xcom_key``."""

    def get_link(self, operator, *, ti_key) -> str:
        # Runs in the API server, which reads XCom from the metadata database as Airflow's own links do.
        from airflow.serialization.definitions.operatorlink import XComOperatorLink

        return XComOperatorLink(name=self.name, xcom_key=self.xcom_key).get_link(operator, ti_key=ti_key)


class MlflowRunLink(_PushedLink):
    name = "MLflow run"


class ModelVersionLink(_PushedLink):
    name = "Registered model version"


class ReportLink(_PushedLink):
    name = "report.html"


# Which address of ml.orchestration.mlflow_ui_links each button shows.
TASK_LINKS = {"run": MlflowRunLink(), "model_version": ModelVersionLink(), "report": ReportLink()}


def push_mlflow_links(result: dict, ti=None) -> dict[str, str]:
    """Give the running task its MLflow buttons; returns the addresses by kind.

    ``result``: what ``ml.pipeline`` returned about the MLflow run: ``tracking_uri`` and ``run_id``
    (``start_tracking``), plus ``model_name`` and ``version`` once registered (``register``).
    """
    from ml.orchestration import mlflow_ui_links

    if ti is None:
        from airflow.sdk import get_current_context

        ti = get_current_context()["ti"]
    links = mlflow_ui_links(result, os.environ.get("MLFLOW_UI_URL", MLFLOW_UI_URL))
    for kind, url in links.items():
        ti.xcom_push(key=TASK_LINKS[kind].xcom_key, value=url)
        log.info("%s: %s", TASK_LINKS[kind].name, url)
    return links


class MlflowLinkPlugin(AirflowPlugin):
    name = "mlflow_link"
    external_views = [
        {"name": "MLflow", "href": MLFLOW_UI_URL, "destination": "nav", "category": "browse"},
        {"name": "MLflow models", "href": f"{MLFLOW_UI_URL}/#/models", "destination": "nav", "category": "browse"},
    ]
    global_operator_extra_links = list(TASK_LINKS.values())
