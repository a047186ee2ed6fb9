"""What the Airflow tasks need from ``ml`` besides the stages: run folders and Params -> config.

Kept free of Airflow imports so it is testable on its own.

Anyone who can trigger a DAG run types its Params, so a path Param only reaches the file system
inside the folders this deployment allows (resolved, symlinks followed):

* ``config_file``: under ``$ML_CONFIG_ROOT``, default the project's ``docs/`` and
  ``$AIRFLOW_HOME/ml-configs``; a ``.yaml``, ``.yml`` or ``.json`` file.
* ``data_path`` (a bars file for source ``file``, a lake root for source ``lake``) and a lake root
  named by a triggering asset event: under ``$ML_DATA_ROOT``, default ``$AIRFLOW_HOME/data`` and
  the default lake root (``$ML_LAKE_ROOT``, which may be an ``s3://`` URI).

Both variables hold comma-separated folders (or ``s3://bucket/prefix`` URIs for data) and replace
the defaults. The CLI does not go through here: a user on their own machine reads any file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ml.config import ConfigError, PipelineConfig, load_config
from ml.data.lake import default_root as default_lake_root

RUNS_DIR_ENV = "ML_RUNS_DIR"
CONFIG_ROOT_ENV = "ML_CONFIG_ROOT"
DATA_ROOT_ENV = "ML_DATA_ROOT"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
DATA_SUFFIXES = (".csv", ".parquet", ".pq")


def runs_root() -> Path:
    return Path(os.environ.get(RUNS_DIR_ENV, Path.cwd() / "runs")).resolve()


def run_dir_for(dag_id: str, run_id: str) -> Path:
    """One folder per DAG run, always inside the DAG's folder; a retried task finds what earlier attempts wrote.

    A run id is set by whoever triggers the run: anything but letters, digits, '_', '.' and '-'
    becomes '_', and a name of dots only ('.', '..') would leave the folder, so it is prefixed.
    """
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id)
    if not safe.strip("."):
        safe = f"run_{safe}"
    return runs_root() / dag_id / safe


def ingest_locations(params: dict) -> tuple[str, str | None]:
    """The market_data Params that name storage (lake root, source folder), checked against the data roots."""
    path = params.get("path")
    return (confined(params["lake_root"], "lake_root", data_roots()),
            confined(path, "path", data_roots()) if path else None)


def newest_asset_event(events) -> dict | None:
    """``extra`` of the newest event among those that triggered a run (events coalesce)."""
    flat = [event for group in (events or {}).values() for event in group]
    if not flat:
        return None
    return dict(max(flat, key=lambda event: event.timestamp).extra or {})


def _airflow_home() -> Path:
    return Path(os.environ.get("AIRFLOW_HOME") or "~/airflow").expanduser()


def _roots(env: str, defaults: list[str]) -> list[str]:
    value = os.environ.get(env)
    roots = [part.strip() for part in value.split(",")] if value else defaults
    return [root for root in roots if root]


def config_roots() -> list[str]:
    """Folders a ``config_file`` Param may name a file in (``$ML_CONFIG_ROOT``)."""
    return _roots(CONFIG_ROOT_ENV, [str(PROJECT_ROOT / "docs"), str(_airflow_home() / "ml-configs")])


def data_roots() -> list[str]:
    """Folders (or ``s3://`` prefixes) a ``data_path`` Param may name (``$ML_DATA_ROOT``)."""
    return _roots(DATA_ROOT_ENV, [str(_airflow_home() / "data"), default_lake_root()])


def _is_uri(value: str) -> bool:
    return "://" in value


def confined(value: str, param: str, roots: list[str], suffixes: tuple[str, ...] = ()) -> str:
    """``value`` resolved, when it lies inside one of ``roots``; else a ConfigError naming the Param.

    Local paths are resolved (``..`` and symlinks included) and compared by path components, so
    ``/data2`` is not inside ``/data``. A URI must start with a root URI, and holds no ``..``.
    """
    if _is_uri(value):
        inside = ".." not in value.split("/") and any(
            value.rstrip("/") == root.rstrip("/") or value.startswith(root.rstrip("/") + "/")
            for root in roots if _is_uri(root))
        found = value
    else:
        path = Path(value).expanduser().resolve()
        inside = any(path.is_relative_to(Path(root).expanduser().resolve()) for root in roots if not _is_uri(root))
        found = str(path)
    if not inside:
        env = CONFIG_ROOT_ENV if param == "config_file" else DATA_ROOT_ENV
        raise ConfigError(f"{param} = {value}: outside the allowed roots {roots} (set {env} to allow another)")
    if suffixes and not found.lower().endswith(suffixes):
        raise ConfigError(f"{param} = {value}: must be a {', '.join(suffixes)} file")
    return found


def _given(params: dict, key: str) -> bool:
    """Whether the user set this Param: null (and an empty string) leave the config's value."""
    return params.get(key) not in (None, "")


def config_from_params(params: dict, asset_event: dict | None = None) -> PipelineConfig:
    """The pipeline config of a DAG run: built-in defaults, then ``config_file``, then the Params the
    user set, then the triggering asset event's symbol. A null Param changes nothing, so a config
    file is never overridden by a Param's default.

    A run triggered by the curated-data asset trains on the lake partition that changed. Paths
    are confined to the configured roots first (see the module docstring); the symbol and every
    other value are checked by the config.
    """
    config_file = params.get("config_file")
    if config_file:
        config_file = confined(config_file, "config_file", config_roots(), CONFIG_SUFFIXES)
    data = {key: params[key] for key in ("source", "symbol", "interval", "start") if _given(params, key)}
    if _given(params, "data_path"):
        source = data.get("source") or load_config(config_file or None).data.source
        data["path"] = confined(params["data_path"], "data_path", data_roots(),
                                DATA_SUFFIXES if source == "file" else ())
    if asset_event and asset_event.get("symbol"):
        data.update(source="lake", symbol=asset_event["symbol"])
        if asset_event.get("interval"):
            data["interval"] = asset_event["interval"]
        if asset_event.get("lake_root"):
            data["path"] = confined(str(asset_event["lake_root"]), "asset event lake_root", data_roots())
    ppo = {name: int(params[key]) for key, name in (("timesteps", "total_timesteps"), ("num_envs", "num_envs"),
                                                     ("num_steps", "num_steps")) if _given(params, key)}
    if _given(params, "device"):
        ppo["device"] = params["device"]
    overrides: dict = {"data": data, "ppo": ppo}
    if _given(params, "promote"):
        overrides["registry"] = {"promote": bool(params["promote"])}
    if _given(params, "n_folds"):
        overrides["splits"] = {"n_folds": int(params["n_folds"])}
    if params.get("seeds"):
        overrides["seeds"] = [int(seed) for seed in params["seeds"]]
    return load_config(config_file or None, overrides)
