"""The per-model lock that serializes alias moves (promotion, rollback).

A file lock (``filelock``: fcntl on POSIX, msvcrt on Windows) beside a local
store, else in the temp directory. With a remote tracking server, runs of one
model must also be serialized by the scheduler (the training DAG runs with
max_active_runs=1).
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from filelock import FileLock


def lock_folder(tracking_uri: str) -> Path:
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///"):]).parent
    if tracking_uri.startswith("file:"):
        return Path(tracking_uri[len("file:"):].lstrip("/")).parent
    return Path(tempfile.gettempdir())


@contextlib.contextmanager
def registry_lock(tracking_uri: str, model_name: str):
    """Hold the model's promotion lock for the block."""
    folder = lock_folder(tracking_uri)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / f".{model_name}.promotion.lock")):
        yield
