"""How many CPU threads one training may use: its share of the cores, not the whole machine.

torch starts with one intra-op thread per core. That suits a training that runs alone and hurts
as soon as trainings share the cores: Airflow runs the mapped fold trainings of a run side by
side, and then each training's OpenMP threads spin-wait for team-mates that another training has
pushed off a core (on a 2-core VM, two threads trained 6x slower than one while a second training
ran). So a training gets the cores this process may use divided by the trainings that may run at
once on its worker, at least one, unless its config names a count (``ppo.threads``).

How many trainings share a worker's cores, first match wins:

1. ``ML_TRAINING_SLOTS``: set it where the worker is configured (the compose file sets it to the
   worker's task slots; one per GPU worker).
2. Not inside an Airflow task (the CLI, a notebook, a benchmark): 1, the process trains alone.
3. CeleryExecutor: the worker's task slots, ``AIRFLOW__CELERY__WORKER_CONCURRENCY`` (Airflow's
   default 16). A slot count given only as ``airflow celery worker --concurrency N`` is not visible
   to the task: set ``ML_TRAINING_SLOTS`` there.
4. LocalExecutor (Airflow's default executor): its worker processes, ``AIRFLOW__CORE__PARALLELISM``
   (Airflow's default 32).
5. Any other executor (KubernetesExecutor: a pod per task): 1.

Only environment variables are read, never airflow.cfg: the ``ml`` package does not import Airflow.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

SLOTS_VARIABLE = "ML_TRAINING_SLOTS"
# Airflow's defaults for the settings below, used when the environment does not name them.
CELERY_WORKER_CONCURRENCY = 16
LOCAL_PARALLELISM = 32


def cores_available() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_budget(requested: int | None, concurrent_tasks: int, cores: int | None = None) -> int:
    """Threads for one training: ``requested`` (at most ``cores``) or its share of the cores, at least 1."""
    cores = cores_available() if cores is None else cores
    if requested is not None:
        return max(1, min(requested, cores))
    return max(1, cores // max(1, concurrent_tasks))


def _positive_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} = {value!r}: must be a whole number >= 1") from None
    if number < 1:
        raise ValueError(f"{name} = {value!r}: must be a whole number >= 1")
    return number


def training_slots() -> tuple[int, str]:
    """How many trainings may run at once on this worker, and the setting that says so."""
    slots = _positive_int(SLOTS_VARIABLE)
    if slots is not None:
        return slots, SLOTS_VARIABLE
    # Airflow exports the task's context (AIRFLOW_CTX_DAG_ID, ...) while the task runs.
    if "AIRFLOW_CTX_DAG_ID" not in os.environ:
        return 1, "not an Airflow task"
    executor = os.environ.get("AIRFLOW__CORE__EXECUTOR", "LocalExecutor")
    if "CeleryExecutor" in executor:
        name = "AIRFLOW__CELERY__WORKER_CONCURRENCY"
        return _positive_int(name) or CELERY_WORKER_CONCURRENCY, name
    if "LocalExecutor" in executor:
        name = "AIRFLOW__CORE__PARALLELISM"
        return _positive_int(name) or LOCAL_PARALLELISM, name
    return 1, f"{executor} runs one task per worker"


def training_threads(requested: int | None) -> tuple[int, str]:
    """The thread budget of a training on this worker, and why, in words for the log."""
    cores = cores_available()
    if requested is not None:
        threads = thread_budget(requested, 1, cores)
        capped = f", capped at the {cores} cores this process may use" if threads < requested else ""
        return threads, f"ppo.threads = {requested}{capped}"
    slots, source = training_slots()
    threads = thread_budget(None, slots, cores)
    return threads, f"{cores} cores / {slots} concurrent training task{'s' * (slots != 1)} ({source})"


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """torch's intra-op threads set to ``n`` inside the block, the caller's count restored after it."""
    previous = torch.get_num_threads()
    if n != previous:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
