"""The training pipeline: stages that hand over through one run folder (``rundir``).

    load_data -> validate_data -> start_tracking -> plan_folds -> train_fold_seeds (per fold)
    -> evaluate -> export_model -> register

The Airflow tasks call these functions one by one; ``run_pipeline`` runs them in-process.
"""

from __future__ import annotations

from pathlib import Path

from ml.config import PipelineConfig
from ml.pipeline.publish import export_model, register
from ml.pipeline.stages import (REPORT_SCHEMA_VERSION, evaluate, load_data, plan_folds, start_tracking,
                                train_fold_seeds, train_folds, validate_data)

__all__ = ["REPORT_SCHEMA_VERSION", "evaluate", "export_model", "load_data", "plan_folds", "register",
           "run_pipeline", "start_tracking", "train_fold_seeds", "train_folds", "validate_data"]


def run_pipeline(config: PipelineConfig, out_dir: Path) -> dict:
    """All stages in-process (``python -m ml pipeline``); the same functions as the DAG tasks."""
    load_data(out_dir, config)
    validate_data(out_dir)
    start_tracking(out_dir)
    train_folds(out_dir)
    evaluate(out_dir)
    export_model(out_dir)
    return register(out_dir)
