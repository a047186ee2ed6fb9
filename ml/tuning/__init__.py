"""Hyperparameter search on the validation folds (Optuna), and the retrain of the best config."""

from __future__ import annotations

from ml.tuning.space import DEFAULT_SPACE, Param, SearchSpace, default_space, load_space
from ml.tuning.study import best_config, create_study, run_trial, trial_record, tune, tuning_summary

__all__ = ["DEFAULT_SPACE", "Param", "SearchSpace", "best_config", "create_study", "default_space", "load_space",
           "run_trial", "trial_record", "tune", "tuning_summary"]
