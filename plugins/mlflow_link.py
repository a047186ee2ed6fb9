"""Links from the Airflow UI to the MLflow UI, where runs, metrics and registered models live."""

from __future__ import annotations

import os

from airflow.plugins_manager import AirflowPlugin

MLFLOW_UI_URL = os.environ.get("MLFLOW_UI_URL", "http://127.0.0.1:5000")


class MlflowLinkPlugin(AirflowPlugin):
    name = "mlflow_link"
    external_views = [
        {"name": "MLflow", "href": MLFLOW_UI_URL, "destination": "nav", "category": "browse"},
        {"name": "MLflow models", "href": f"{MLFLOW_UI_URL}/#/models", "destination": "dag"},
    ]
