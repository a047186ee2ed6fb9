"""End to end through real Airflow services on loopback (no network beyond 127.0.0.1).

1. As the UI does it: api-server, scheduler and dag-processor on SQLite with the LocalExecutor;
   log in, unpause `ppo_training`, trigger it over the REST API v2 with a tiny config, wait for
   success, then serve the `champion` it registered in MLflow on a real window. A bad conf is
   refused with HTTP 400 before any run exists.
2. Distributed: the same run with the CeleryExecutor on a fresh PostgreSQL database and Redis,
   with a `default` worker and a `gpu` worker (concurrency 1); `train` goes to the `gpu` queue
   and pool (ML_TRAINING_QUEUE / ML_TRAINING_POOL) and must run on the gpu worker, every other
   task on the default worker.

Each test is bounded (deadlines on every wait) and stops every process it started, also on
failure: services run in their own process groups and a final sweep ends anything carrying the
cluster's environment marker (Airflow moves task processes into process groups of their own).
Bounds can be raised on a slow machine: AIRFLOW_E2E_STARTUP_TIMEOUT, AIRFLOW_E2E_RUN_TIMEOUT and
AIRFLOW_E2E_BUDGET (seconds; the budget caps all of one test's waits together).

Needs the Postgres drivers psycopg2 and asyncpg for test 2 (docker/requirements-stack.txt), and
PostgreSQL and Redis on 127.0.0.1 (started here when installed but down; the test fails, saying why, when absent).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from tests.airflow_services import Api, Cluster, wait_for_http, wait_until, write_simple_auth_passwords
from tests.conftest import ROOT
from tests.servers import free_port

pytestmark = pytest.mark.slow

DAG_ID = "ppo_training"
MODEL_NAME = "ppo_GSPC_1d"
ADMIN = "admin"
TINY_CONFIG = {
    "ppo": {"num_envs": 64, "num_steps": 32, "eval_every": 1},
    "splits": {"n_folds": 2, "test_months": 6, "validation_months": 6, "min_train_bars": 300},
    # Tiny budgets: only the soundness rules apply (the budget floor and profitability rules are off).
    "gate": {"parity_windows": 64, "require_no_collapse": False, "require_beats_cash": False,
             "require_learned": False, "min_timesteps": 0, "benchmark_psr": None, "max_pbo": None,
             "cost_multiple": None},
}
TASK_IDS = ["plan_universe", "load_data", "validate_data", "start_tracking", "plan_folds", "fold_tasks", "train",
            "evaluate", "export_onnx", "register", "summary"]

# Generous bounds: the machine is small and shared. A healthy run takes far less (~2 min).
STARTUP_TIMEOUT = float(os.environ.get("AIRFLOW_E2E_STARTUP_TIMEOUT", 180))  # services up, DAG listed
RUN_TIMEOUT = float(os.environ.get("AIRFLOW_E2E_RUN_TIMEOUT", 420))  # triggered run to success
BUDGET = float(os.environ.get("AIRFLOW_E2E_BUDGET", 600))  # hard cap on each test's waits, all together
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 5


# ----------------------------------------------------------------------------------------------
# Shared setup
# ----------------------------------------------------------------------------------------------
def base_env(home: Path, port: int, executor: str, sql_conn: str) -> dict[str, str]:
    """The environment every component of one test cluster shares."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "MLFLOW_", "ML_"))}  # nothing from a developer's shell
    env.update({
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__EXECUTOR": executor,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sql_conn,
        # Workers report task state to the API server (Airflow 3): point them at this one.
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        # Secrets every component must share (the scheduler signs the task tokens the API checks).
        "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "simple_auth_manager_passwords.json"),
        # Only triggered runs: unpausing must not start the nightly run with the default
        # (production-sized) Params, which max_active_runs=1 would put ahead of the test's run.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
        "ML_RUNS_DIR": str(home / "runs"),
        "ML_CONFIG_ROOT": str(home.parent),  # where tiny_conf writes the config_file the runs name
        "GX_ANALYTICS_ENABLED": "false",
        "MLFLOW_ENABLE_TELEMETRY": "false",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def tiny_conf(tmp: Path, **overrides) -> dict:
    config_file = tmp / "tiny.json"
    config_file.write_text(json.dumps(TINY_CONFIG))
    return {"source": "sample", "symbol": "GSPC", "start": "2009-01-01", "timesteps": 4096,
            "config_file": str(config_file), **overrides}


def start_core_services(cluster: Cluster, port: int) -> Api:
    """api-server, scheduler, dag-processor; returns a logged-in client once the DAG is listed."""
    password = secrets.token_urlsafe(12)
    write_simple_auth_passwords(cluster.env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"],
                                {ADMIN: password})
    base_url = f"http://127.0.0.1:{port}"
    api_server = cluster.start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1")
    cluster.start("scheduler", "scheduler")
    cluster.start("dag-processor", "dag-processor")
    wait_for_http(f"{base_url}/api/v2/monitor/health", cluster.left(STARTUP_TIMEOUT), "api-server health",
                  proc=api_server, on_timeout=cluster.report)
    api = Api(base_url)
    api.login(ADMIN, password)

    def dag_listed():
        cluster.assert_running()
        errors = api.ok_json("GET", "/api/v2/importErrors")["import_errors"]
        broken = [e for e in errors if Path(e["filename"]).name == f"{DAG_ID}.py"]
        assert not broken, f"{DAG_ID} failed to import: {broken}"
        return api.get(f"/api/v2/dags/{DAG_ID}").status_code == 200

    wait_until(dag_listed, cluster.left(STARTUP_TIMEOUT), f"the DAG {DAG_ID} to be listed", interval=2,
               on_timeout=cluster.report)
    return api


def unpause(api: Api) -> None:
    dag = api.ok_json("PATCH", f"/api/v2/dags/{DAG_ID}", json={"is_paused": False})
    assert dag["is_paused"] is False


def trigger(api: Api, conf: dict) -> str:
    run = api.ok_json("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf})
    assert run["state"] in ("queued", "running"), run
    return run["dag_run_id"]


def durations(tis: dict[str, dict]) -> str:
    return ", ".join(f"{label} {ti['duration'] or 0:.0f}s" for label, ti in tis.items())


def task_instances(api: Api, run_id: str) -> dict[str, dict]:
    """The run's task instances by label: `task_id`, or `task_id[i]` for a mapped one."""
    body = api.ok_json("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
    return {(ti["task_id"] if ti["map_index"] < 0 else f"{ti['task_id']}[{ti['map_index']}]"): ti
            for ti in body["task_instances"]}


def assert_all_succeeded(tis: dict[str, dict]) -> None:
    assert {label: ti["state"] for label, ti in tis.items()} == {label: "success" for label in tis}
    missing = set(TASK_IDS) - {ti["task_id"] for ti in tis.values()}
    assert not missing, f"tasks never ran: {missing}"


def wait_for_success(api: Api, cluster: Cluster, run_id: str) -> dict:
    """Poll the run until success; fail at once when it (or a task) fails, with all the logs."""
    def finished():
        cluster.assert_running()
        run = api.ok_json("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
        tis = task_instances(api, run_id)
        bad = {t: ti["state"] for t, ti in tis.items() if ti["state"] in ("failed", "up_for_retry", "upstream_failed")}
        assert run["state"] != "failed" and not bad, (
            f"run {run_id} {run['state']}, tasks {bad}\n{cluster.report()}")
        return run if run["state"] == "success" else None

    def states():
        try:
            tis = task_instances(api, run_id)
            return f"task states: { {t: ti['state'] for t, ti in tis.items()} }\n{cluster.report()}"
        except Exception as exc:  # noqa: BLE001
            return f"<no task states: {exc!r}>\n{cluster.report()}"

    return wait_until(finished, cluster.left(RUN_TIMEOUT), f"run {run_id} to succeed", interval=3, on_timeout=states)


def check_champion_serves(env: dict[str, str], run_id: str) -> None:
    from mlflow.tracking import MlflowClient

    from ml.orchestration import run_dir_for
    from ml.release.registry import CHAMPION, alias_version
    from ml.serving import Policy

    uri = env["MLFLOW_TRACKING_URI"]
    version = alias_version(uri, MODEL_NAME, CHAMPION)
    assert version is not None, f"no {CHAMPION} alias on {MODEL_NAME}"
    assert MlflowClient(uri).get_model_version(MODEL_NAME, version).tags["gate.passed"] == "true"

    run_dirs = list((Path(env["ML_RUNS_DIR"]) / DAG_ID).iterdir())
    assert len(run_dirs) == 1, run_dirs  # one folder per DAG run, and the test made one run
    assert run_dirs[0].name == run_dir_for(DAG_ID, run_id).name
    run_dir = run_dirs[0] / "GSPC"  # the run's one target
    report = json.loads((run_dir / "report.json").read_text())
    assert len(report["folds"]) == 2

    policy = Policy.load(f"models:/{MODEL_NAME}@{CHAMPION}", tracking_uri=uri)
    windows = np.load(run_dir / "parity_windows.npz")
    exposure = policy.decide(windows["ohlcv"], windows["position"])
    assert exposure.shape == (len(windows["ohlcv"]), 1)
    assert np.isin(exposure, report["exposure_levels"]).all()


# ----------------------------------------------------------------------------------------------
# 1. SQLite + LocalExecutor, driven like the UI
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def local_cluster(tmp_path):
    home = tmp_path / "airflow"
    home.mkdir()
    port = free_port()
    env = base_env(home, port, "LocalExecutor", f"sqlite:///{home}/airflow.db")
    cluster = Cluster(home, env, budget=BUDGET)
    try:
        cluster.cli("db", "migrate", timeout=cluster.left(300))
        api = start_core_services(cluster, port)
        yield cluster, api
    finally:
        cluster.stop()
        assert not cluster.marked_processes(), "processes survived the cluster's teardown"


def test_local_executor_trains_and_serves_through_rest_api(local_cluster, tmp_path):
    cluster, api = local_cluster
    started = time.monotonic()
    unpause(api)

    # A bad conf is refused up front (Param validation), and no run is created.
    bad = api.request("POST", f"/api/v2/dags/{DAG_ID}/dagRuns",
                      json={"logical_date": None, "conf": tiny_conf(tmp_path, timesteps=5)})
    assert bad.status_code == 400, f"{bad.status_code} {bad.text[:500]}"
    assert "timesteps" in bad.text or "1024" in bad.text, bad.text[:500]
    assert api.ok_json("GET", f"/api/v2/dags/{DAG_ID}/dagRuns")["total_entries"] == 0

    run_id = trigger(api, tiny_conf(tmp_path))
    wait_for_success(api, cluster, run_id)
    tis = task_instances(api, run_id)
    assert_all_succeeded(tis)
    print(f"\nLocalExecutor run {run_id} succeeded in {time.monotonic() - started:.0f}s ({durations(tis)})")

    check_champion_serves(cluster.env, run_id)


def test_curated_data_events_retrain_every_changed_symbol(tmp_path):
    """market_data curates two symbols of the training universe; the asset events it emits trigger
    ppo_training, which retrains every symbol whose curated data changed, from the lake."""
    from mlflow.tracking import MlflowClient

    home = tmp_path / "airflow"
    home.mkdir()
    lake = tmp_path / "lake"
    port = free_port()
    env = base_env(home, port, "LocalExecutor", f"sqlite:///{home}/airflow.db")
    # The deployment's training config, as production sets it: the universe, from the lake.
    config_file = tmp_path / "training.json"
    config_file.write_text(json.dumps({
        **TINY_CONFIG, "ppo": {**TINY_CONFIG["ppo"], "total_timesteps": 4096},
        "data": {"source": "lake", "path": str(lake), "start": "2009-01-01", "universe": ["GSPC", "KO"]}}))
    # Asset-triggered runs need the scheduler to create runs.
    env.update({"AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "True", "ML_TRAINING_CONFIG": str(config_file),
                "ML_DATA_ROOT": str(tmp_path),
                # One task at a time per DAG: two ingest tasks that finish in the same instant both
                # link the fresh asset alias on SQLite, and one fails (UNIQUE asset_alias_asset).
                "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "1"})
    cluster = Cluster(home, env, budget=BUDGET + 300)
    try:
        cluster.cli("db", "migrate", timeout=cluster.left(300))
        api = start_core_services(cluster, port)

        def runs(dag_id: str) -> list[dict]:
            cluster.assert_running()
            return api.ok_json("GET", f"/api/v2/dags/{dag_id}/dagRuns")["dag_runs"]

        def finished(dag_id: str, run_type: str):
            found = [run for run in runs(dag_id) if run["run_type"] == run_type]
            return found if found and all(run["state"] in ("success", "failed") for run in found) else None

        # Unpausing starts the newest nightly run at once. The lake is still empty: each symbol
        # fails at load, and the run fails naming them.
        for dag_id in (DAG_ID, "market_data"):
            api.ok_json("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})
        (nightly,) = wait_until(lambda: finished(DAG_ID, "scheduled"), cluster.left(300), "the nightly run",
                                interval=3, on_timeout=cluster.report)
        assert nightly["state"] == "failed"
        summary = json.loads((Path(env["ML_RUNS_DIR"]) / DAG_ID / run_dir_name(nightly["dag_run_id"])
                              / "summary.json").read_text())
        assert [(row["target"], row["outcome"], row["why"].split(":")[0]) for row in summary["targets"]] == [
            ("GSPC", "failed", "load"), ("KO", "failed", "load")]

        ingest = api.ok_json("POST", "/api/v2/dags/market_data/dagRuns", json={"logical_date": None, "conf": {
            "symbols": ["GSPC", "KO"], "source": "sample", "lake_root": str(lake)}})["dag_run_id"]

        def market_data_done():
            state = next(run["state"] for run in runs("market_data") if run["dag_run_id"] == ingest)
            assert state != "failed", f"market_data failed\n{cluster.report()}"
            return state == "success"

        wait_until(market_data_done, cluster.left(300), "market_data to succeed", interval=3,
                   on_timeout=cluster.report)
        triggered = wait_until(lambda: finished(DAG_ID, "asset_triggered"), cluster.left(RUN_TIMEOUT + 300),
                               "the asset-triggered run", interval=5, on_timeout=cluster.report)
        assert {run["state"] for run in triggered} == {"success"}, f"{triggered}\n{cluster.report()}"
    finally:
        cluster.stop()
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    for run in triggered:
        folder = Path(env["ML_RUNS_DIR"]) / DAG_ID / run_dir_name(run["dag_run_id"])
        rows = {row["target"]: row for row in json.loads((folder / "summary.json").read_text())["targets"]}
        assert set(rows) == {"GSPC", "KO"}, rows  # the whole universe, whichever events it was handed
        for symbol, row in rows.items():
            assert row["outcome"] in ("trained", "skipped"), row  # skipped: an earlier triggered run trained it
            config = json.loads((folder / symbol / "config.json").read_text())
            assert (config["data"]["source"], config["data"]["path"]) == ("lake", str(lake))
            # Trained by this run or an earlier one: the newest model was trained on these curated bars.
            lake_hash = json.loads((folder / symbol / "data.json").read_text())["dataset_hash"]
            newest = max(client.search_model_versions(f"name = 'ppo_{symbol}_1d'"), key=lambda v: int(v.version))
            assert newest.tags["dataset_hash"] == lake_hash, (symbol, row)


def run_dir_name(run_id: str) -> str:
    from ml.orchestration import run_dir_for

    return run_dir_for(DAG_ID, run_id).name


# ----------------------------------------------------------------------------------------------
# 2. PostgreSQL + Redis + CeleryExecutor, two workers (default, gpu)
# ----------------------------------------------------------------------------------------------
def _pg_connect(dbname: str = "postgres"):
    import psycopg2

    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname, connect_timeout=5)
    conn.autocommit = True
    return conn


def _ensure(name: str, ping, start_cmd: list[str] | None) -> None:
    try:
        ping()
        return
    except Exception:  # noqa: BLE001 - not running: start it below
        pass
    if start_cmd is None or shutil.which(start_cmd[0]) is None:
        pytest.fail(f"{name} is not running on 127.0.0.1 and is not installed here, so the test cannot start it: "
                    f"install it (the python-svc machines and CI have it) or start it before the test")
    subprocess.run(start_cmd, check=True, timeout=60, capture_output=True)
    wait_until(lambda: ping() or True, 60, f"{name} to accept connections")


def ensure_postgres() -> None:
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    cmd = (["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"] if versions else None)
    _ensure("PostgreSQL", lambda: _pg_connect().close(), cmd)


def ensure_redis() -> None:
    import redis

    for folder in ("/var/lib/redis", "/var/log/redis"):
        os.makedirs(folder, exist_ok=True)
    cmd = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", str(REDIS_PORT),
           "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log"]
    _ensure("Redis", lambda: redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_timeout=5).ping(), cmd)


def write_hostname_module(folder: Path) -> None:
    """A `[core] hostname_callable` that reports the worker's own name.

    Both workers run on this machine, so the default (the FQDN) would be the same for both;
    each worker gets its own AIRFLOW_TEST_WORKER_HOSTNAME and its tasks report that.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "airflow_test_hostname.py").write_text(
        "import os\nimport socket\n\n\n"
        "def hostname():\n"
        "    return os.environ.get('AIRFLOW_TEST_WORKER_HOSTNAME') or socket.getfqdn()\n")


@pytest.fixture
def celery_cluster(tmp_path):
    import redis

    ensure_postgres()
    ensure_redis()
    broker = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, socket_timeout=5)
    db_name = f"airflow_test_{uuid.uuid4().hex[:12]}"
    home = tmp_path / "airflow"
    home.mkdir()
    port = free_port()
    pg_url = f"{PG_USER}@{PG_HOST}:{PG_PORT}/{db_name}"
    env = base_env(home, port, "CeleryExecutor", f"postgresql+psycopg2://{pg_url}")
    hostname_dir = tmp_path / "pythonpath"
    write_hostname_module(hostname_dir)
    env.update({
        "AIRFLOW__CELERY__BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}",
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg (3): name the installed driver.
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql+psycopg2://{pg_url}",
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": "default",
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "airflow_test_hostname.hostname",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hostname_dir), os.environ.get("PYTHONPATH")])),
        "ML_TRAINING_QUEUE": "gpu",
        "ML_TRAINING_POOL": "gpu",
    })
    cluster = Cluster(home, env, budget=BUDGET)
    workers = {"default": f"default-{uuid.uuid4().hex[:6]}", "gpu": f"gpu-{uuid.uuid4().hex[:6]}"}

    conn = _pg_connect()
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{db_name}"')
        broker.flushdb()
        cluster.cli("db", "migrate", timeout=cluster.left(300))
        cluster.cli("pools", "set", "gpu", "1", "GPU training slots", timeout=cluster.left(120))
        api = start_core_services(cluster, port)
        cluster.start("worker-default", "celery", "worker", "-q", "default", "--concurrency", "2",
                      "--celery-hostname", f"{workers['default']}@%h",
                      env={"AIRFLOW_TEST_WORKER_HOSTNAME": workers["default"]})
        cluster.start("worker-gpu", "celery", "worker", "-q", "gpu", "--concurrency", "1",
                      "--celery-hostname", f"{workers['gpu']}@%h",
                      env={"AIRFLOW_TEST_WORKER_HOSTNAME": workers["gpu"]})
        wait_for_celery_workers(cluster, workers)
        yield cluster, api, workers
    finally:
        try:
            cluster.stop()
        finally:
            try:
                broker.flushdb()
            finally:
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = %s AND pid <> pg_backend_pid()", (db_name,))
                    cur.execute(f'DROP DATABASE IF EXISTS "{db_name}"')
                conn.close()
        assert not cluster.marked_processes(), "processes survived the cluster's teardown"


def wait_for_celery_workers(cluster: Cluster, workers: dict[str, str]) -> None:
    """Both workers answer a Celery ping and consume their queue."""
    from celery import Celery

    app = Celery(broker=cluster.env["AIRFLOW__CELERY__BROKER_URL"])
    try:
        def ready():
            cluster.assert_running()
            replies = app.control.inspect(timeout=2).active_queues() or {}
            queues = {node.split("@")[0]: {q["name"] for q in qs} for node, qs in replies.items()}
            return all(queue in queues.get(name, set()) for queue, name in workers.items())

        wait_until(ready, cluster.left(STARTUP_TIMEOUT), "both Celery workers", interval=2, on_timeout=cluster.report)
    finally:
        app.close()


def worker_task_ids(log: Path) -> list[str]:
    """Task ids a Celery worker executed, from its "Executing workload" log lines."""
    text = log.read_text(errors="replace")
    return [m.group(1) for line in text.splitlines() if "Executing workload" in line
            for m in [re.search(r"task_id=([A-Za-z0-9_.-]+)/", line)] if m]


def test_celery_executor_sends_training_to_the_gpu_worker(celery_cluster, tmp_path):
    cluster, api, workers = celery_cluster
    started = time.monotonic()
    unpause(api)
    run_id = trigger(api, tiny_conf(tmp_path))
    wait_for_success(api, cluster, run_id)
    tis = task_instances(api, run_id)
    print(f"\nCeleryExecutor run {run_id} succeeded in {time.monotonic() - started:.0f}s ({durations(tis)})")
    assert_all_succeeded(tis)

    # `train` (one instance, or one per fold when mapped) ran on the gpu worker, from the gpu
    # queue and pool; every other task on the default worker.
    trains = [ti for ti in tis.values() if ti["task_id"] == "train"]
    for ti in trains:
        path = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/train"
        if ti["map_index"] >= 0:
            path += f"/{ti['map_index']}"
        one = api.ok_json("GET", path)
        assert (one["queue"], one["pool"], one["hostname"]) == ("gpu", "gpu", workers["gpu"]), one
    others = {label: (ti["queue"], ti["hostname"]) for label, ti in tis.items() if ti["task_id"] != "train"}
    assert others == {label: ("default", workers["default"]) for label in others}, others

    # The gpu pool has one slot: training instances never overlapped.
    spans = sorted((datetime.fromisoformat(ti["start_date"]), datetime.fromisoformat(ti["end_date"]))
                   for ti in trains)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end, f"train instances overlapped in the 1-slot gpu pool: {spans}"

    # The workers' own logs agree on who executed what.
    executed = {name: worker_task_ids(cluster.logs / f"worker-{name}.log") for name in workers}
    assert executed["gpu"] == ["train"] * len(trains), executed
    assert sorted(executed["default"]) == sorted(ti["task_id"] for ti in tis.values() if ti["task_id"] != "train"), executed

    check_champion_serves(cluster.env, run_id)
