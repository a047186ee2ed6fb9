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

import logging
import os
import re
from pathlib import Path
from urllib.parse import quote

from ml.config import MODEL_NAME_PATTERN, ConfigError, PipelineConfig, load_config, merge
from ml.data.lake import default_root as default_lake_root
from ml.pipeline.universe import target_configs
from ml.release.tracking import store_client
from ml.tuning import SearchSpace, default_space, load_space

log = logging.getLogger(__name__)

RUNS_DIR_ENV = "ML_RUNS_DIR"
# Defaults of the scheduled run, which has no Params set: a config file and a universe of symbols.
TRAINING_CONFIG_ENV = "ML_TRAINING_CONFIG"
TRAINING_UNIVERSE_ENV = "ML_TRAINING_UNIVERSE"
TUNING_STORAGE_ENV = "ML_TUNING_STORAGE"
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


def asset_event_updates(events) -> list[dict]:
    """``extra`` of every triggering asset event, the newest per symbol and interval: events that
    arrive while a run is queued coalesce into one run, and each symbol in it must be retrained."""
    flat = sorted((event for group in (events or {}).values() for event in group), key=lambda e: e.timestamp)
    newest = {}
    for event in flat:
        extra = dict(event.extra or {})
        if extra.get("symbol"):
            newest[(extra["symbol"], extra.get("interval"))] = extra
    return list(newest.values())


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
        env = CONFIG_ROOT_ENV if param in ("config_file", "space_file") else DATA_ROOT_ENV
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
    config_file = params.get("config_file") or os.environ.get(TRAINING_CONFIG_ENV)
    if config_file:
        config_file = confined(config_file, "config_file", config_roots(), CONFIG_SUFFIXES)
    data = {key: params[key] for key in ("source", "symbol", "interval", "start") if _given(params, key)}
    if _given(params, "universe"):
        data["universe"] = list(params["universe"])
    elif _given(params, "symbol"):
        data["universe"] = []  # a symbol set by hand is a run of one
    if _given(params, "data_path"):
        source = data.get("source") or load_config(config_file or None).data.source
        data["path"] = confined(params["data_path"], "data_path", data_roots(),
                                DATA_SUFFIXES if source == "file" else ())
    if asset_event and asset_event.get("symbol"):
        data.update(source="lake", symbol=asset_event["symbol"], universe=[])
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
    config = load_config(config_file or None, overrides)
    if not (config_file or config.data.universe or _given(params, "symbol") or asset_event):
        universe = [part.strip() for part in os.environ.get(TRAINING_UNIVERSE_ENV, "").split(",") if part.strip()]
        if universe:
            config = load_config(None, merge(overrides, {"data": {"universe": universe}}))
    return config


def training_configs(params: dict, asset_events=None) -> list[PipelineConfig]:
    """One config per model a DAG run trains.

    Without triggering events: each symbol of the universe (the ``universe`` Param, else the
    config's ``data.universe``, else ``$ML_TRAINING_UNIVERSE`` when neither a symbol nor a config
    file is given), or the one symbol or portfolio.

    Triggered by curated-data events: with a universe, every symbol of it, from the lake the
    events name (the skip-unchanged check then retrains exactly those whose data changed, so an
    event lost or coalesced by the scheduler loses no retraining; a changed symbol outside the
    universe is named in the log and left). Without one, every symbol the events name.
    """
    updates = asset_event_updates(asset_events)
    if not updates:
        return target_configs(config_from_params(params))
    universe = config_from_params(params).data.universe
    if not universe:
        return [config_from_params(params, update) for update in updates]
    outside = sorted({update["symbol"] for update in updates} - set(universe))
    if outside:
        log.info("curated data changed for %s, outside the training universe %s: not trained",
                 ", ".join(outside), list(universe))
    newest = updates[-1]
    by_symbol = {update["symbol"]: update for update in updates}
    return [config_from_params(params, by_symbol.get(symbol, {**newest, "symbol": symbol})) for symbol in universe]


def mlflow_ui_links(result: dict, ui_url: str) -> dict[str, str]:
    """Addresses in the MLflow UI of what a stage reported, by kind: its ``run`` (``tracking_uri`` and
    ``run_id``) and, once registered (``model_name`` and ``version``), the ``model_version`` and the
    ``report`` that registration logged into the run's artifacts (``report_path`` names another page)."""
    base = ui_url.rstrip("/")
    experiment = store_client(result["tracking_uri"]).get_run(result["run_id"]).info.experiment_id
    run = f"{base}/#/experiments/{experiment}/runs/{result['run_id']}"
    links = {"run": run}
    if result.get("model_name") and result.get("version"):
        links["model_version"] = f"{base}/#/models/{quote(result['model_name'], safe='')}/versions/{result['version']}"
        links["report"] = f"{run}/artifacts/{result.get('report_path', 'report/report.html')}"
    return links


def tuning_plan(params: dict) -> tuple[str, str, Path, PipelineConfig, SearchSpace]:
    """The study a ``ppo_tuning`` run continues: name, Optuna storage (``$ML_TUNING_STORAGE``, else
    SQLite beside the runs), folder, base config (as ``ppo_training`` builds it from the Params)
    and search space (the ``space_file`` Param, under the config roots, else the default)."""
    study = params.get("study") or ""
    if not re.fullmatch(MODEL_NAME_PATTERN, study):
        raise ConfigError(f"study = {study!r}: letters, digits, '_', '.', '=' and '-' only, starting with a "
                          "letter or digit (it names the study's folder)")
    targets = target_configs(config_from_params(params))
    if len(targets) != 1:
        raise ConfigError(f"a study tunes one symbol or portfolio, the config names {len(targets)}: set the "
                          "symbol Param")
    config = targets[0]
    space_file = params.get("space_file")
    space = (load_space(confined(space_file, "space_file", config_roots(), CONFIG_SUFFIXES), config)
             if space_file else default_space(config))
    root = runs_root() / "ppo_tuning"
    storage = os.environ.get(TUNING_STORAGE_ENV) or f"sqlite:///{root / 'optuna.db'}"
    return study, storage, root / study, config, space
