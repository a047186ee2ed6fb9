"""Helpers to run real Airflow services on loopback for end-to-end tests.

Every process is started in its own session (its own process group) and tagged through its
environment with a unique marker, so that teardown can find and end everything a cluster
started, including task processes that Airflow's supervisor moves into process groups of
their own. Waits are poll loops with deadlines; nothing here blocks without a bound.

Standard library, ``psutil`` and ``requests`` only (both come with Airflow).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import requests

AIRFLOW = str(Path(sys.executable).parent / "airflow")
MARKER_ENV = "RLTRADE_TEST_CLUSTER"


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 1.0,
               on_timeout: Callable[[], str] | None = None) -> Any:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds.

    Exceptions raised by ``check`` count as "not yet" (the last one is reported), except
    AssertionError, which fails at once (a check's way to say "this will never happen").
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - a service that is not up yet
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            extra = f"\n{on_timeout()}" if on_timeout else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}{extra}")
        time.sleep(interval)


def wait_for_http(url: str, timeout: float, what: str | None = None,
                  proc: subprocess.Popen | None = None, on_timeout: Callable[[], str] | None = None) -> None:
    """Wait until ``url`` answers 200; fail early when ``proc`` (the server) has exited."""
    def check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what or url}: server exited with {proc.returncode}"
                                 + (f"\n{on_timeout()}" if on_timeout else ""))
        return requests.get(url, timeout=5).status_code == 200

    wait_until(check, timeout, what or url, interval=1.0, on_timeout=on_timeout)


def tail(path: Path, chars: int = 4000) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"<{path}: {exc}>"
    return text[-chars:]


class Cluster:
    """Airflow processes sharing one environment (one AIRFLOW_HOME); stopped all together."""

    def __init__(self, home: Path, env: dict[str, str], budget: float = 480):
        self.home = Path(home)
        self.deadline = time.monotonic() + budget  # for everything this cluster's test waits on
        self.logs = self.home / "service-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.marker = uuid.uuid4().hex
        self.env = {**env, "AIRFLOW_HOME": str(self.home), MARKER_ENV: self.marker}
        self.procs: dict[str, subprocess.Popen] = {}
        self._files: list = []

    def left(self, cap: float) -> float:
        """``cap`` seconds, or what is left of the test's budget when that is less."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the test's time budget is spent\n{self.report()}")
        return min(cap, left)

    # -- one-shot commands -------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 300, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """``airflow ARGS`` to completion, in its own process group, killed at ``timeout``."""
        proc = subprocess.Popen([AIRFLOW, *args], env={**self.env, **(env or {})}, cwd=self.home,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            raise TimeoutError(f"airflow {' '.join(args)} ran past {timeout}s:\n{out[-4000:]}") from None
        finally:
            _kill_group(proc.pid, signal.SIGKILL)  # anything it left behind in its group
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
        if check and proc.returncode != 0:
            raise AssertionError(f"airflow {' '.join(args)} exited {proc.returncode}:\n{out[-4000:]}")
        return result

    # -- long-running services ---------------------------------------------------------------
    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``airflow ARGS`` in a new session; output goes to service-logs/NAME.log."""
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self._files.append(log)
        proc = subprocess.Popen([AIRFLOW, *args], env={**self.env, **(env or {})}, cwd=self.home,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def assert_running(self) -> None:
        dead = {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}
        assert not dead, f"services exited: {dead}\n{self.report()}"

    def stop(self, grace: float = 20) -> None:
        """SIGTERM every service's process group, then SIGKILL what is left, then sweep.

        The sweep ends every process whose environment carries this cluster's marker (task
        processes run in process groups of their own and may outlive their parents).
        """
        for proc in self.procs.values():
            if proc.poll() is None:
                _kill_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs.values():
            _kill_group(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.sweep()
        for handle in self._files:
            handle.close()
        self._files.clear()

    def marked_processes(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["pid"]):
            if proc.pid == os.getpid():
                continue
            try:
                if proc.environ().get(MARKER_ENV) == self.marker:
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
                continue
        return found

    def sweep(self) -> None:
        leftovers = self.marked_processes()
        for proc in leftovers:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=10)

    # -- diagnostics -------------------------------------------------------------------------
    def task_logs(self, chars: int = 3000) -> str:
        parts = []
        for path in sorted((self.home / "logs").rglob("*.log")):
            if "dag_id=" in str(path):
                parts.append(f"----- {path.relative_to(self.home)}\n{tail(path, chars)}")
        return "\n".join(parts) or "<no task logs>"

    def report(self, chars: int = 3000) -> str:
        parts = [f"===== {name} (exit {proc.poll()})\n{tail(self.logs / f'{name}.log', chars)}"
                 for name, proc in self.procs.items()]
        parts.append(f"===== task logs\n{self.task_logs(chars)}")
        return "\n".join(parts)


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Api:
    """A small client of the Airflow REST API v2 with a SimpleAuthManager token."""

    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()

    def login(self, username: str, password: str) -> None:
        resp = requests.post(f"{self.base_url}/auth/token", json={"username": username, "password": password},
                             timeout=30)
        assert resp.status_code in (200, 201), f"POST /auth/token: {resp.status_code} {resp.text[:500]}"
        self.session.headers["Authorization"] = f"Bearer {resp.json()['access_token']}"

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        return self.session.request(method, f"{self.base_url}{path}", **kwargs)

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def ok_json(self, method: str, path: str, **kwargs) -> dict:
        resp = self.request(method, path, **kwargs)
        assert resp.status_code in (200, 201), f"{method} {path}: {resp.status_code} {resp.text[:1000]}"
        return resp.json()


def write_simple_auth_passwords(path: Path, users: dict[str, str]) -> None:
    Path(path).write_text(json.dumps(users) + "\n")
