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


def newest_asset_event(events) -> dict | None:
    """``extra`` of the newest event among those that triggered a run (events coalesce)."""
    flat = [event for group in (events or {}).values() for event in group]
    if not flat:
        return None
    return dict(max(flat, key=lambda event: event.timestamp).extra or {})


def config_from_params(params: dict, asset_event: dict | None = None) -> PipelineConfig:
    """Map the DAG's Params onto the pipeline config (a config file, then explicit Params).

    A run triggered by the curated-data asset trains on the lake partition that changed.
    """
    data = {"source": params["source"], "symbol": params["symbol"], "interval": params["interval"]}
    if params.get("data_path"):
        data["path"] = params["data_path"]
    if asset_event and asset_event.get("symbol"):
        data.update(source="lake", symbol=asset_event["symbol"],
                    interval=asset_event.get("interval", data["interval"]))
        if asset_event.get("lake_root"):
            data["path"] = asset_event["lake_root"]
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
