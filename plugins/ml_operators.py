"""Classic Airflow operators and a hook around the `ml` package.

The bundled DAGs use TaskFlow and call `ml` directly; these are for DAGs written
with operators. Each one is a thin shell: the work happens in `ml`, imported
inside `execute` so that parsing a DAG stays fast.

    from ml_operators import DataQualityOperator, MlflowRegistryHook, PPOTrainingOperator
"""

from __future__ import annotations

import os

from airflow.sdk import BaseHook, BaseOperator
from airflow.sdk.exceptions import AirflowFailException


class MlflowRegistryHook(BaseHook):
    """The MLflow model registry: read and move the `champion` alias.

    The tracking URI comes from the argument, else ``$MLFLOW_TRACKING_URI``.
    """

    hook_name = "MLflow registry"

    def __init__(self, tracking_uri: str | None = None):
        super().__init__()
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not self.tracking_uri:
            raise AirflowFailException("no MLflow tracking URI: pass tracking_uri or set MLFLOW_TRACKING_URI")

    def champion(self, model_name: str) -> str | None:
        from ml.release.registry import CHAMPION, alias_version

        return alias_version(self.tracking_uri, model_name, CHAMPION)

    def promote(self, model_name: str, version: str) -> dict:
        return self._move(lambda registry: registry.promote(self.tracking_uri, model_name, version))

    def rollback(self, model_name: str, to_version: str | None = None) -> dict:
        return self._move(lambda registry: registry.rollback(self.tracking_uri, model_name, to_version))

    @staticmethod
    def _move(action) -> dict:
        from ml.release import registry

        try:
            return action(registry)
        except registry.PromotionError as exc:
            raise AirflowFailException(str(exc)) from exc  # a refused move is not worth retrying


class DataQualityOperator(BaseOperator):
    """Run the Great Expectations gate on a CSV/parquet file; fail (without retry) naming the broken rules."""

    template_fields = ("path", "symbol")

    def __init__(self, *, path: str, symbol: str | None = None, interval: str = "1d", calendar: str = "equity",
                 **kwargs):
        super().__init__(**kwargs)
        self.path, self.symbol, self.interval, self.calendar = path, symbol, interval, calendar

    def execute(self, context) -> dict:
        from ml.data.schema import DataError
        from ml.data.sources import load_file
        from ml.data.validation import ValidationConfig, validate_bars

        try:
            bars = load_file(self.path, symbol=self.symbol, interval=self.interval)
        except DataError as exc:
            raise AirflowFailException(str(exc)) from exc
        result = validate_bars(bars, str(self.path), ValidationConfig(calendar=self.calendar))
        if not result.success:
            raise AirflowFailException(result.describe())
        self.log.info(result.describe())
        return {"path": str(self.path), "suite": result.suite, "rows": result.rows}


class PPOTrainingOperator(BaseOperator):
    """Train one walk-forward fold of a pipeline run folder, routed to the training queue and pool.

    ``device="auto"`` trains on CUDA when the worker has a GPU. Unless ``queue``/``pool``
    are given, the task goes to ``$ML_TRAINING_QUEUE`` / ``$ML_TRAINING_POOL`` (the
    Docker stack's `gpu` worker), or to the defaults for ``device="cpu"``.
    """

    template_fields = ("run_dir",)

    def __init__(self, *, run_dir: str, fold: int, device: str = "auto", **kwargs):
        if device != "cpu":
            kwargs.setdefault("queue", os.environ.get("ML_TRAINING_QUEUE", "default"))
            kwargs.setdefault("pool", os.environ.get("ML_TRAINING_POOL", "default_pool"))
        super().__init__(**kwargs)
        self.run_dir, self.fold, self.device = run_dir, fold, device

    def execute(self, context) -> dict:
        from ml import pipeline

        summary = pipeline.train_fold_seeds(self.run_dir, self.fold, self.device)
        self.log.info("fold %d trained on %s: seed %s selected (validation %s %.3f)", self.fold,
                      summary["device"], summary["selected_seed"], summary["selection_metric"],
                      summary["validation_score"])
        return {"fold": self.fold, "device": summary["device"], "selected_seed": summary["selected_seed"]}
