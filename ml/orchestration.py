"""What the Airflow tasks need from ``ml`` besides the stages: run folders and Params -> config.

Kept free of Airflow imports so it is testable on its own.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ml.config import PipelineConfig, load_config

RUNS_DIR_ENV = "ML_RUNS_DIR"


def runs_root() -> Path:
    return Path(os.environ.get(RUNS_DIR_ENV, Path.cwd() / "runs")).resolve()


def run_dir_for(dag_id: str, run_id: str) -> Path:
    """One folder per DAG run; a retried task finds what earlier attempts wrote."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id)
    return runs_root() / dag_id / safe


def config_from_params(params: dict) -> PipelineConfig:
    """Map the DAG's Params onto the pipeline config (a config file, then explicit Params)."""
    data = {"source": params["source"], "symbol": params["symbol"], "interval": params["interval"]}
    if params.get("data_path"):
        data["path"] = params["data_path"]
    if params.get("start"):
        data["start"] = params["start"]
    overrides = {
        "data": data,
        "ppo": {"total_timesteps": int(params["timesteps"]), "device": params["device"]},
        "splits": {"n_folds": int(params["n_folds"])},
        "registry": {"promote": bool(params["promote"])},
    }
    if params.get("seeds"):
        overrides["seeds"] = [int(seed) for seed in params["seeds"]]
    for key in ("num_envs", "num_steps"):
        if params.get(key):
            overrides["ppo"][key] = int(params[key])
    return load_config(params.get("config_file") or None, overrides)
