"""The policy the HTTP service answers with, following ``models:/NAME@ALIAS`` as the alias moves.

A background thread asks the registry every ``reload_interval`` seconds which version the alias
points at. A new version is downloaded and loaded beside the one in use, then swapped in by one
assignment. A request takes the served model once, when it starts: requests in flight finish on
the version they began with, and none is dropped or fails while the alias moves. A version that
cannot be loaded, or a registry that does not answer, leaves the current version serving; the
failure is reported (``reload_error``) until a later check succeeds.

``models:/NAME/VERSION`` and a local ``.onnx`` path are served as they are, never reloaded.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ml.config import first_line
from ml.release.registry import alias_version, download_model
from ml.serving import ModelLoadError, Policy

log = logging.getLogger(__name__)

_ALIAS_URI = re.compile(r"models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)")
_VERSION_URI = re.compile(r"models:/(?P<name>[^/@]+)/(?P<version>[^/@]+)")
# A version that failed to load is tried again after one reload interval, then twice as long each
# time up to this: a broken artifact is not downloaded every few seconds.
MAX_RETRY_DELAY_S = 600.0


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _discard_download(path: Path) -> None:
    """Remove the temporary folder a registry download made (one per load; the session holds the model)."""
    temp = Path(tempfile.gettempdir()).resolve()
    for folder in Path(path).resolve().parents:
        if folder.parent == temp and folder.name.startswith("tmp"):
            shutil.rmtree(folder, ignore_errors=True)
            return


@dataclass(frozen=True)
class Served:
    """One loaded version: what a request uses from start to end."""

    policy: Policy
    version: str | None  # the registry version; None for a local file
    loaded_at: str  # ISO 8601, UTC


class Champion:
    """The served policy of ``uri``; ``policy_options`` are ``Policy``'s keyword settings.

    Loads the model at once: a model that cannot be loaded raises ``ModelLoadError`` here,
    before the service listens. ``start()`` begins following the alias.
    """

    def __init__(self, uri: str, tracking_uri: str | None = None, reload_interval: float = 30.0,
                 **policy_options):
        self.uri = uri
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        self.reload_interval = reload_interval
        self.policy_options = policy_options
        alias, fixed = _ALIAS_URI.fullmatch(uri), _VERSION_URI.fullmatch(uri)
        self.name = (alias or fixed)["name"] if alias or fixed else None
        self.alias = alias["alias"] if alias else None
        self.last_check: str | None = None
        self.reload_error: str | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed: tuple[str, float, float] | None = None  # version, retry after (monotonic), delay
        if self.name is not None:
            self._check_store()
        if self.follows:
            self._served = self._load_version(self._alias_target())
        elif fixed:
            self._served = self._load_version(fixed["version"])
        else:  # a local file
            self._served = Served(Policy.load(uri, **policy_options).self_contained(), None, _now())
        self.last_check = self._served.loaded_at

    @property
    def follows(self) -> bool:
        """Whether the model is named by an alias (and so may move)."""
        return self.alias is not None

    @property
    def served(self) -> Served:
        return self._served

    def _check_store(self) -> None:
        """A registry URI needs a named store, and a SQLite one must exist: MLflow would create an
        empty ``mlflow.db`` wherever the service runs and then find no model in it."""
        if not self.tracking_uri:
            raise ModelLoadError(f"{self.uri}: no MLflow store named: pass --tracking-uri or set MLFLOW_TRACKING_URI")
        if self.tracking_uri.startswith("sqlite:///"):
            database = Path(self.tracking_uri.removeprefix("sqlite:///").split("?", 1)[0])
            if not database.is_file():
                raise ModelLoadError(f"{self.uri}: no MLflow store at {database} (tracking URI {self.tracking_uri})")

    def _alias_target(self) -> str:
        try:
            version = alias_version(self.tracking_uri, self.name, self.alias)
        except Exception as exc:  # MlflowException, or a connection error from an unreachable store
            raise ModelLoadError(f"{self.uri}: {first_line(exc)}") from None
        if version is None:
            raise ModelLoadError(f"{self.uri}: no version of {self.name} has the alias '{self.alias}'")
        return version

    def _load_version(self, version: str) -> Served:
        """The registry's version, downloaded and loaded; errors name the model (and the version an alias gave)."""
        where = f"{self.uri} (v{version})" if self.follows else self.uri
        try:
            path = download_model(self.tracking_uri, self.name, version)
            try:
                policy = Policy(path, **self.policy_options).self_contained()
            finally:
                _discard_download(path)
        except (ModelLoadError, FileNotFoundError) as exc:
            raise ModelLoadError(f"{where}: {first_line(exc)}") from None
        return Served(policy, version, _now())

    def check(self) -> bool:
        """Ask where the alias points and swap in a new version; True when the served version changed."""
        version = None
        try:
            version = self._alias_target()
            if version == self._served.version:
                self.reload_error, self._failed = None, None
                return False
            if self._failed and self._failed[0] == version and time.monotonic() < self._failed[1]:
                return False  # failed before: its error stands until the retry is due
            served = self._load_version(version)
        except Exception as exc:  # whatever the cause, the version in use keeps serving
            self.reload_error = first_line(exc)
            if version is not None:  # the registry answered; that version did not load
                same = self._failed is not None and self._failed[0] == version
                delay = min(2 * self._failed[2], MAX_RETRY_DELAY_S) if same else self.reload_interval
                self._failed = (version, time.monotonic() + delay, delay)
            log.warning("still serving v%s: %s", self._served.version, self.reload_error)
            return False
        finally:
            self.last_check = _now()
        self.reload_error, self._failed = None, None
        previous, self._served = self._served.version, served  # one assignment: the swap
        log.info("%s: serving v%s (was v%s)", self.uri, version, previous)
        return True

    def _follow(self) -> None:
        while not self._stopping.wait(self.reload_interval):
            self.check()

    def start(self) -> None:
        """Follow the alias in a background thread (nothing to follow for a fixed version or a file)."""
        if self.follows and self.reload_interval > 0 and self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._follow, name="champion-follower", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
