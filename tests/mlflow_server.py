"""A real `mlflow server` on loopback that a test can kill outright and start again on the same port."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from tests.servers import BIN, free_port, wait_until_up


class MlflowServer:
    """SQLite backend and served artifacts in ``folder``; ``url`` stays the same across restarts."""

    def __init__(self, folder: Path, port: int | None = None):
        self.folder = folder
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 120) -> "MlflowServer":
        self.starts += 1
        log = open(self.folder / f"mlflow-server-{self.starts}.log", "wb")
        # Its own session: the CLI starts uvicorn as a child, and a kill must take both.
        self.process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.folder / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.folder, start_new_session=True,
            env={**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false"})
        log.close()
        wait_until_up(f"{self.url}/health", self.process, "mlflow server", timeout=timeout)
        return self

    def kill(self) -> None:
        """As a crash would: SIGKILL to the server and its workers, no shutdown."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
