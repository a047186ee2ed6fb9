"""Each training trains on its share of the cores: the budget for an executor's settings, the
trainer applying it and handing the caller's thread count back, and a fan-out that agrees with it."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import replace

import pytest
import torch
import yaml

from ml.agent import threads
from ml.agent.threads import thread_budget, torch_threads, training_slots, training_threads
from tests.conftest import ROOT

# Every setting the budget reads; each test starts from none of them.
SETTINGS = ("ML_TRAINING_SLOTS", "AIRFLOW_CTX_DAG_ID", "AIRFLOW__CORE__EXECUTOR",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY", "AIRFLOW__CORE__PARALLELISM")


@pytest.fixture
def worker(monkeypatch):
    """Set the environment of a worker: ``worker(cores=4, AIRFLOW__CORE__EXECUTOR=...)``."""
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)

    def configure(cores: int, airflow_task: bool = True, **settings: str) -> None:
        monkeypatch.setattr(threads, "cores_available", lambda: cores)
        if airflow_task:  # what Airflow exports while a task runs
            monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", "ppo_training")
        for name, value in settings.items():
            monkeypatch.setenv(name, value)

    return configure


@pytest.mark.parametrize("requested, tasks, cores, want", [
    (None, 1, 2, 2),    # alone: every core
    (None, 2, 2, 1),    # two trainings on two cores: one thread each
    (None, 3, 2, 1),    # more trainings than cores: never below one
    (None, 4, 16, 4),
    (None, 3, 16, 5),   # the share rounds down: 15 threads busy, not 18
    (8, 1, 2, 2),       # a request is capped at the cores
    (1, 1, 16, 1),      # and taken as it is below them
    (3, 8, 16, 3),      # whatever the slots say
])
def test_thread_budget(requested, tasks, cores, want):
    assert thread_budget(requested, tasks, cores) == want


def test_cores_available_is_the_process_affinity(monkeypatch):
    # Pinned to one core (a container's cpuset, taskset) on a bigger machine: one core, not all.
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 64)
    assert threads.cores_available() == 1
    monkeypatch.delattr(threads.os, "sched_getaffinity")  # macOS, Windows
    assert threads.cores_available() == 64


@pytest.mark.parametrize("settings, want", [
    # A LocalExecutor runs up to `parallelism` tasks at once, Airflow's default 32.
    ({"AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "AIRFLOW__CORE__PARALLELISM": "2"}, 2),
    ({"AIRFLOW__CORE__EXECUTOR": "LocalExecutor"}, 32),
    ({}, 32),  # no executor named: Airflow's default executor is the LocalExecutor
    # A Celery worker runs up to its worker_concurrency, Airflow's default 16.
    ({"AIRFLOW__CORE__EXECUTOR": "CeleryExecutor", "AIRFLOW__CELERY__WORKER_CONCURRENCY": "4",
      "AIRFLOW__CORE__PARALLELISM": "64"}, 4),
    ({"AIRFLOW__CORE__EXECUTOR": "CeleryExecutor"}, 16),
    ({"AIRFLOW__CORE__EXECUTOR": "CeleryExecutor,KubernetesExecutor",
      "AIRFLOW__CELERY__WORKER_CONCURRENCY": "3"}, 3),
    ({"AIRFLOW__CORE__EXECUTOR": "KubernetesExecutor", "AIRFLOW__CORE__PARALLELISM": "64"}, 1),  # a pod per task
    # The explicit override wins over every executor setting.
    ({"ML_TRAINING_SLOTS": "3", "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
      "AIRFLOW__CELERY__WORKER_CONCURRENCY": "8"}, 3),
])
def test_concurrent_training_tasks_inside_an_airflow_task(worker, settings, want):
    worker(cores=8, **settings)
    assert training_slots()[0] == want


def test_outside_airflow_a_training_is_alone_unless_told(worker, monkeypatch):
    # The CLI after `source scripts/env.sh` names an executor but runs no task.
    worker(cores=8, airflow_task=False, AIRFLOW__CORE__EXECUTOR="LocalExecutor", AIRFLOW__CORE__PARALLELISM="4")
    assert training_slots()[0] == 1
    monkeypatch.setenv("ML_TRAINING_SLOTS", "2")
    assert training_slots()[0] == 2


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_slot_count_is_refused_by_name(worker, value):
    worker(cores=2, ML_TRAINING_SLOTS=value)
    with pytest.raises(ValueError, match="ML_TRAINING_SLOTS"):
        training_slots()


def test_training_threads_says_why(worker):
    worker(cores=4, AIRFLOW__CORE__EXECUTOR="CeleryExecutor", AIRFLOW__CELERY__WORKER_CONCURRENCY="2")
    assert training_threads(None) == (2, "4 cores / 2 concurrent training tasks (AIRFLOW__CELERY__WORKER_CONCURRENCY)")
    assert training_threads(8) == (4, "ppo.threads = 8, capped at the 4 cores this process may use")
    assert training_threads(3) == (3, "ppo.threads = 3")


def test_torch_threads_sets_and_restores_the_callers_count():
    outer = torch.get_num_threads()
    inner = outer + 1
    with torch_threads(inner) as n:
        assert n == inner and torch.get_num_threads() == inner
    assert torch.get_num_threads() == outer
    with pytest.raises(RuntimeError, match="boom"), torch_threads(inner):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == outer


def _tiny_training(ppo_changes: dict):
    """Two PPO updates on a synthetic series; returns the torch thread counts seen by validation."""
    from ml.agent.policy import ActorCritic
    from ml.agent.ppo import train
    from ml.config import config_from_dict
    from ml.env.action_space import make_action_space
    from ml.env.trading_env import TradingEnv
    from ml.evaluation.splits import walk_forward_folds
    from ml.market.series import prepare_series
    from tests.conftest import synthetic_bars

    bars = synthetic_bars(1000, seed=3)
    config = config_from_dict({
        "ppo": {"total_timesteps": 2 * 32 * 16, "num_envs": 32, "num_steps": 16, "eval_every": 1,
                "progress": False, **ppo_changes},
        "splits": {"n_folds": 1, "test_months": 6, "validation_months": 6, "min_train_bars": 300},
    })
    series = prepare_series(bars, config.lookback, torch.device("cpu"))
    fold = walk_forward_folds(bars["timestamp"], config.lookback, config.splits)[0]
    agent = ActorCritic(series.features.shape[1], make_action_space(config.action, series.n_assets),
                        config.ppo.hidden)
    env = TradingEnv(series, config.ppo.num_envs, agent.action_space)
    seen: list[int] = []

    def validate(candidate) -> float:
        seen.append(torch.get_num_threads())  # runs inside the training loop, on its threads
        return 0.0

    train(config.ppo, env, agent, fold.train, validate)
    return seen


def test_train_runs_on_its_share_of_the_worker_and_restores_the_callers_threads(worker, caplog):
    # A Celery worker with 2 task slots on 4 cores: 2 threads per training. The caller holds 1
    # thread, so a trainer that ignored the budget would be seen training on 1.
    worker(cores=4, AIRFLOW__CORE__EXECUTOR="CeleryExecutor", AIRFLOW__CELERY__WORKER_CONCURRENCY="2")
    with torch_threads(1), caplog.at_level(logging.INFO, logger="ml.agent.ppo"):
        seen = _tiny_training({})
        assert torch.get_num_threads() == 1
    assert seen == [2, 2]
    assert "training with 2 CPU threads: 4 cores / 2 concurrent training tasks" in caplog.text


def test_train_takes_ppo_threads_over_the_worker_share(worker, caplog):
    worker(cores=4, AIRFLOW__CORE__EXECUTOR="LocalExecutor", AIRFLOW__CORE__PARALLELISM="4")
    with torch_threads(2), caplog.at_level(logging.INFO, logger="ml.agent.ppo"):
        seen = _tiny_training({"threads": 3})
        assert torch.get_num_threads() == 2
    assert seen == [3, 3]
    assert "training with 3 CPU threads: ppo.threads = 3" in caplog.text


def test_compose_workers_divide_their_cores_by_their_task_slots():
    compose = yaml.safe_load((ROOT / "docker" / "docker-compose.yml").read_text())
    services = compose["services"]
    cpu = services["airflow-worker"]["environment"]
    # Same variable for the slots Celery gives the worker and the slots the budget divides by.
    assert cpu["ML_TRAINING_SLOTS"] == cpu["AIRFLOW__CELERY__WORKER_CONCURRENCY"]
    gpu = services["airflow-worker-gpu"]
    command = gpu["command"]
    assert command[command.index("--concurrency") + 1] == gpu["environment"]["ML_TRAINING_SLOTS"] == "1"
    # The control plane does not set it: the DAG must not cap trainings cluster-wide.
    for name in ("airflow-scheduler", "airflow-dag-processor"):
        assert "ML_TRAINING_SLOTS" not in services[name]["environment"], name


def _training_task(monkeypatch, slots: str | None):
    if slots is None:
        monkeypatch.delenv("ML_TRAINING_SLOTS", raising=False)
    else:
        monkeypatch.setenv("ML_TRAINING_SLOTS", slots)
    spec = importlib.util.spec_from_file_location("ppo_training_dag_under_test", ROOT / "dags" / "ppo_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ppo_training().get_task("train")


def test_embedded_dag_runs_at_most_the_training_slots_at_once(monkeypatch):
    assert _training_task(monkeypatch, "2").max_active_tis_per_dag == 2
    assert _training_task(monkeypatch, None).max_active_tis_per_dag is None
