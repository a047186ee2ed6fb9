"""The per-model promotion lock that serializes alias moves (promotion, rollback).

Two layers, taken in this order:

- a file lock (``filelock``: fcntl on POSIX, msvcrt on Windows) beside a SQLite store, else in the
  temp directory: it excludes the processes of one host;
- a lease on the registered model itself (the tag ``promotion.lease``: owner and expiry), which
  workers on different hosts sharing a tracking server all see. MLflow has no conditional write,
  so a lease is taken by writing it, waiting a moment and reading it back: of two workers that
  wrote at nearly the same time, only the last writer finds its own name and goes on.

The lease narrows the race to near-simultaneous writes; it does not close it. Callers therefore
also re-read the champion just before moving it and redo a decision made against a champion
that has changed since (``registry.move_champion`` with ``expected``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import socket
import tempfile
import time
import uuid
from pathlib import Path

from filelock import FileLock
from mlflow.exceptions import MlflowException

from ml.release.tracking import is_server, sqlite_path, store_client

log = logging.getLogger(__name__)
LEASE_TAG = "promotion.lease"


class PromotionError(RuntimeError):
    """An alias move that was refused; the message names the model, the version and why."""


def lock_folder(tracking_uri: str) -> Path:
    database = sqlite_path(tracking_uri)
    if database is not None:
        return database.parent
    if tracking_uri.startswith("file:"):
        return Path(tracking_uri[len("file:"):].lstrip("/")).parent
    return Path(tempfile.gettempdir())


def lock_file_name(model_name: str) -> str:
    """A file name for the model's lock: registry names may hold any character, file names may not."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", model_name)[:80].lstrip(".")
    return f".{safe}-{hashlib.sha256(model_name.encode()).hexdigest()[:12]}.promotion.lock"


class Lease:
    """The registry-level lease on one model's aliases; see the module docstring."""

    def __init__(self, tracking_uri: str, model_name: str, ttl: float, settle: float):
        self.tracking_uri, self.model_name, self.ttl, self.settle = tracking_uri, model_name, ttl, settle
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.client = store_client(tracking_uri)

    def holder(self) -> dict | None:
        """The lease as recorded on the model, or None when there is none (or it is unreadable)."""
        try:
            value = self.client.get_registered_model(self.model_name).tags.get(LEASE_TAG)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise PromotionError(f"{self.model_name}: no registered model of that name") from None
            raise
        try:
            lease = json.loads(value)
            return {"owner": str(lease["owner"]), "expires": float(lease["expires"])}
        except (TypeError, ValueError, KeyError):  # none, or not a lease this code wrote
            return None

    def acquire(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while True:
            holder = self.holder()
            if holder is None or holder["owner"] == self.owner or holder["expires"] < time.time():
                try:
                    self.client.set_registered_model_tag(
                        self.model_name, LEASE_TAG,
                        json.dumps({"owner": self.owner, "expires": time.time() + self.ttl}))
                except MlflowException:  # two first writes of the tag at once: the store keeps one
                    pass
                # A worker that read the old value when we did writes within this pause; then the
                # read below shows its name, not ours, and we wait for it.
                time.sleep(self.settle)
                holder = self.holder()
                if holder is not None and holder["owner"] == self.owner:
                    return
            if time.monotonic() >= deadline:
                raise PromotionError(f"{self.model_name}: the promotion lease is held by "
                                     f"{holder['owner'] if holder else 'another worker'}; gave up after {wait:.0f} s")
            time.sleep(random.uniform(0.2, 0.6))  # apart from the other waiters

    def release(self) -> None:
        try:
            holder = self.holder()
            if holder is not None and holder["owner"] == self.owner:
                self.client.delete_registered_model_tag(self.model_name, LEASE_TAG)
        except (MlflowException, PromotionError) as exc:  # it expires on its own
            log.warning("%s: could not release the promotion lease (%s); it expires within %.0f s",
                        self.model_name, str(exc).splitlines()[0], self.ttl)


@contextlib.contextmanager
def registry_lock(tracking_uri: str, model_name: str, ttl: float = 300.0, wait: float | None = None):
    """Hold the model's promotion lock (file lock, then registry lease) for the block.

    ``ttl``: how long a lease outlives a worker that died holding it; ``wait``: how long to wait
    for another holder (default: ``ttl`` and a minute).
    """
    folder = lock_folder(tracking_uri)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / lock_file_name(model_name))):
        # Across hosts only the lease excludes; on one host the file lock already does.
        lease = Lease(tracking_uri, model_name, ttl, settle=1.0 if is_server(tracking_uri) else 0.1)
        lease.acquire(ttl + 60.0 if wait is None else wait)
        try:
            yield lease
        finally:
            lease.release()
