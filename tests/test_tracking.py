"""MLflow tracking without process-wide state, and with a tracking store that is absent or fresh.

Real stores only: SQLite files, and `mlflow server` on loopback, killed and restarted mid-training.
"""

from __future__ import annotations

import ast
import logging
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import mlflow
import numpy as np
import pytest
import torch

from ml.agent.policy import ActorCritic, ExportPolicy
from ml.config import config_from_dict
from ml.env.action_space import DiscreteExposure
from ml.market.features import FeatureModule
from ml.pipeline import load_data, plan_folds, start_tracking, train_fold_seeds, validate_data
from ml.pipeline.rundir import RunFolder
from ml.pipeline.stages import PENDING_METRICS
from ml.release import registry
from ml.release.export import export_onnx
from ml.release.tracking import RunMetrics, TrackingUnavailable, log_metrics, start_run, store_client
from ml.serving import Policy
from tests.conftest import ROOT
from tests.mlflow_server import MlflowServer
from tests.servers import free_port
from tests.test_pipeline import TINY

MODEL = "ppo_TEST_1d"
# Calls that change what every MLflow user in the process sees.
GLOBAL_SETTERS = {"set_tracking_uri", "set_registry_uri", "set_experiment", "start_run", "autolog"}


def mlflow_state_changes(tree: ast.AST) -> list[tuple[int, str]]:
    """MLflow's process-wide setters, and writes to $MLFLOW_* (item assignment or deletion,
    setdefault/pop, or an update/clear that may touch them)."""
    found = []

    def is_environ(node) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "environ"
                or isinstance(node, ast.Name) and node.id == "environ")

    def mlflow_key(node) -> bool:  # a key that is not a literal may be anything
        return not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or node.value.startswith("MLFLOW_")

    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            found += [(node.lineno, "os.environ[...] =") for t in targets
                      if isinstance(t, ast.Subscript) and is_environ(t.value) and mlflow_key(t.slice)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            method = node.func.attr
            if is_environ(node.func.value) and (
                    method in ("update", "clear", "popitem")
                    or method in ("setdefault", "pop", "__setitem__", "__delitem__") and node.args
                    and mlflow_key(node.args[0])):
                found.append((node.lineno, f"os.environ.{method}"))
            elif method in GLOBAL_SETTERS or method == "putenv" and node.args and mlflow_key(node.args[0]):
                found.append((node.lineno, method))
    return sorted(found)


def test_the_scan_finds_what_it_forbids():
    code = ("import os, mlflow\nmlflow.set_tracking_uri('x')\nos.environ['MLFLOW_TRACKING_URI'] = 'x'\n"
            "os.environ.pop('MLFLOW_TRACKING_URI')\nmlflow.set_registry_uri('x')\nwith mlflow.start_run(): pass\n"
            "os.environ.setdefault('MLFLOW_HTTP_REQUEST_MAX_RETRIES', '0')\nos.environ[key] = 'x'\n"
            "os.environ.setdefault('GX_ANALYTICS_ENABLED', 'false')\nos.environ.get('MLFLOW_TRACKING_URI')\n")
    assert [what for _, what in mlflow_state_changes(ast.parse(code))] == [
        "set_tracking_uri", "os.environ[...] =", "os.environ.pop", "set_registry_uri", "start_run",
        "os.environ.setdefault", "os.environ[...] ="]


def test_no_ml_module_changes_process_wide_mlflow_state():
    wrong = [f"{path.relative_to(ROOT)}:{line} {what}" for path in sorted((ROOT / "ml").rglob("*.py"))
             for line, what in mlflow_state_changes(ast.parse(path.read_text()))]
    assert not wrong, "process-wide state changed in ml/:\n" + "\n".join(wrong)


def new_store(folder) -> tuple[str, str, object]:
    """A SQLite store with one run, and an ONNX policy whose metadata names that run."""
    folder.mkdir()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    run_id = start_run(uri, (folder / "artifacts").as_uri(), "tracking", "run", {}, {})
    torch.manual_seed(0)
    module = FeatureModule(64)
    path = export_onnx(ExportPolicy(module, ActorCritic(module.n_features, DiscreteExposure((0.0, 1.0)))),
                       folder / "model.onnx", {"lookback": 64, "mlflow_run_id": run_id})
    return uri, run_id, path


def crown(store) -> None:
    """Register the store's policy, record a passed gate and make it champion."""
    uri, run_id, path = store
    example = {"ohlcv": (np.random.default_rng(0).random((2, 64, 5)) + 1).astype(np.float32),
               "position": np.zeros((2, 1), np.float32)}
    version = registry.register_onnx(uri, run_id, MODEL, path, example, tags={"store": path.parent.name})
    registry.record_decision(uri, MODEL, version, {"passed": True, "reasons": ["test"], "numbers": {}}, "test")
    registry.promote(uri, MODEL, version)


def test_two_stores_in_one_process_never_see_each_other(tmp_path):
    """Registration and loading run in threads against two stores holding the same model name."""
    before = (mlflow.get_tracking_uri(), {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")})
    stores = [new_store(tmp_path / name) for name in "ab"]  # torch's exporter is not thread-safe
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(crown, stores))
    for (uri, run_id, _), name in zip(stores, "ab"):
        version = store_client(uri).get_model_version_by_alias(MODEL, registry.CHAMPION)
        assert version.run_id == run_id and version.tags["store"] == name

    def load(index: int) -> tuple[str, str]:
        uri, run_id, _ = stores[index % 2]
        policy = Policy.load(f"models:/{MODEL}@champion", tracking_uri=uri, prefer_gpu=False)
        return run_id, policy.metadata["mlflow_run_id"]

    with ThreadPoolExecutor(8) as pool:
        loads = list(pool.map(load, range(48)))
    assert len(loads) == 48 and all(expected == got for expected, got in loads), loads
    assert {got for _, got in loads} == {run_id for _, run_id, _ in stores}
    assert (mlflow.get_tracking_uri(), {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}) == before


# Tracking server absent ------------------------------------------------------------------

def tiny_config(uri: str, **ppo):
    return config_from_dict({**TINY, "ppo": {**TINY["ppo"], **ppo}, "registry": {"tracking_uri": uri}})


def test_an_unreachable_server_fails_fast_in_one_line(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    load_data(tmp_path, tiny_config(uri))
    validate_data(tmp_path)
    began = time.monotonic()
    with pytest.raises(TrackingUnavailable) as refused:
        start_tracking(tmp_path)
    assert time.monotonic() - began < 15
    assert str(refused.value) == f"MLflow tracking server {uri} is unreachable: Connection refused"
    assert not (tmp_path / "tracking.json").exists()


def test_the_cli_names_the_unreachable_server_without_a_traceback(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    config = tmp_path / "config.yaml"
    config.write_text(f"registry:\n  tracking_uri: {uri}\n")
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ml", "pipeline", "--data", "sample:GSPC", "--out",
                           str(tmp_path / "out"), "--config", str(config)], capture_output=True, text=True, cwd=ROOT)
    elapsed = time.monotonic() - began
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == \
        f"tracking error: MLflow tracking server {uri} is unreachable: Connection refused"
    assert "Traceback" not in proc.stderr
    assert elapsed < 120  # loading and validating the data included; MLflow's own retries take minutes


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.seen = threading.Event()

    def emit(self, record):
        self.messages.append(record.getMessage())
        self.seen.set()


def test_training_outlives_a_server_outage_and_its_metrics_arrive(tmp_path):
    """The server is killed once the run has metrics; training goes on; after a restart on the same
    port every update's metrics are in the run."""
    with MlflowServer(tmp_path) as server:
        run_dir = tmp_path / "run"
        # 16 updates of one seed on one fold: long enough to lose the server part-way.
        load_data(run_dir, tiny_config(server.url, total_timesteps=8192, num_envs=16, num_steps=32))
        validate_data(run_dir)
        run_id = start_tracking(run_dir)["run_id"]
        plan_folds(run_dir)
        warnings = Warnings()
        logging.getLogger("ml.release.tracking").addHandler(warnings)
        failures = []

        def outage():
            try:
                client = store_client(server.url)
                while not client.get_run(run_id).data.metrics:  # the first update's metrics are in
                    time.sleep(0.05)
                server.kill()
                if not warnings.seen.wait(60):
                    failures.append("no warning after the kill")
                server.start()
            except Exception as exc:  # reported by the test thread
                failures.append(repr(exc))

        chaos = threading.Thread(target=outage)
        chaos.start()
        try:
            training = train_fold_seeds(run_dir, 0)
        finally:
            chaos.join(120)
            logging.getLogger("ml.release.tracking").removeHandler(warnings)
        assert not failures, failures
        assert server.starts == 2
        assert training["seeds"][0]["updates"] == 16
        assert "unreachable" in warnings.messages[0] and "keeping the metrics" in warnings.messages[0]
        spill = RunFolder(run_dir).fold(0) / PENDING_METRICS
        if spill.exists():  # a restart slower than the fold end's minute: the evaluate stage sends them
            assert len(warnings.messages) == 2 and str(spill) in warnings.messages[1], warnings.messages
            assert RunMetrics(server.url, run_id, spill=spill).close(wait=0)
        else:
            assert len(warnings.messages) == 1, warnings.messages
        # Every update logged its loss, before, during and after the outage, once.
        history = store_client(server.url).get_metric_history(run_id, "fold0/seed1/loss/policy")
        assert len(history) == 16 and len({m.step for m in history}) == 16


def test_metrics_that_miss_the_fold_end_wait_in_the_run_folder(tmp_path):
    """A server still away when the fold ends: the metrics go to a file, and the next stage sends them."""
    with MlflowServer(tmp_path) as server:
        run_id = start_run(server.url, "", "outage", "run", {}, {})
        spill = tmp_path / PENDING_METRICS
        metrics = RunMetrics(server.url, run_id, spill=spill)
        metrics.log({"loss": 1.0}, step=1)
        server.kill()
        metrics.log({"loss": 0.5}, step=2)
        assert not metrics.close(wait=0) and spill.exists()
        with pytest.raises(TrackingUnavailable):
            log_metrics(server.url, run_id, {"loss": 0.25}, step=3)
        server.start()
        assert RunMetrics(server.url, run_id, spill=spill).close(wait=0) and not spill.exists()
        history = store_client(server.url).get_metric_history(run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5)]


# A fresh shared SQLite store --------------------------------------------------------------

def _first_run(uri: str, root: str, name: str, start, results) -> None:
    start.wait()  # both processes (imports done) reach MLflow's table creation together
    try:
        run_id = start_run(uri, root, "shared", name, {"seed": 1}, {})
        log_metrics(uri, run_id, {"loss": 1.0}, step=1)
        results.put((name, "ok"))
    except Exception as exc:
        results.put((name, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"))


def test_two_first_runs_on_a_fresh_sqlite_store_both_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(2), ctx.Queue()
    workers = [ctx.Process(target=_first_run, args=(uri, (tmp_path / "artifacts").as_uri(), name, start, results))
               for name in ("first", "second")]
    for worker in workers:
        worker.start()
    outcomes = dict(results.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(30)
    assert outcomes == {"first": "ok", "second": "ok"}, outcomes
    runs = store_client(uri).search_runs([store_client(uri).get_experiment_by_name("shared").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["first", "second"]
