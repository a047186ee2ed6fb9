"""Latency and throughput of the HTTP service (`python -m ml serve --http`) on loopback, against
the in-process library (``Policy.decide``) on the same model and windows, in the same run.

    .venv/bin/python benchmarks/http_serving.py [--requests 4000] [--clients 1 4] [--batches 64 1024]

The model has the trained shape (see ``benchmarks/serving.py``: 13 features, 64x64 MLP, 5
levels, random weights) and is served from a local file: the model path is the same for a
registry alias, whose reloads happen in a background thread between requests. Server and library
both use one onnxruntime thread. Windows are real ones from the bundled GSPC sample, a different
one on every call; JSON bodies are encoded before timing, so the client's own encoding is not
counted. Single requests go over one kept-alive connection (``http.client``) and are timed one by
one, interleaved in rounds with the library calls so that load from other work hits both alike.
Concurrent clients each hold their own connection. Batch rows: the median time of one request
(or one library call) over >= 1 s. Prints a Markdown table (for docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ml.data.schema import ohlcv_array
from ml.data.sources import load_sample
from ml.release.export import export_onnx
from ml.serving import Policy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import LOOKBACK, build_policy, median_call_s, per_call_us, real_windows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_service(model: Path, port: int, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "ml", "serve", "--http", "--model", str(model), "--port", str(port),
         "--intra-op-threads", "1", "--max-batch", "65536"],
        cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return process
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.2)
    process.kill()
    sys.exit(f"the service did not start; its log: {log}")


class Connection:
    """One kept-alive HTTP/1.1 connection posting pre-encoded JSON bodies."""

    def __init__(self, port: int):
        self.http = http.client.HTTPConnection("127.0.0.1", port)

    def post(self, path: str, body: bytes) -> bytes:
        self.http.request("POST", path, body, {"Content-Type": "application/json"})
        response = self.http.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status} {data[:300]!r}")
        return data


def concurrent_rate(port: int, bodies: list[bytes], clients: int, seconds: float) -> float:
    """Requests per second answered with ``clients`` connections asking back to back."""
    counts, stop = [0] * clients, threading.Event()

    def client(k: int) -> None:
        connection = Connection(port)
        i = k
        while not stop.is_set():
            connection.post("/decide", bodies[i % len(bodies)])
            counts[k] += 1
            i += clients

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    begin = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - begin)


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=4000, help="timed single requests (and library calls)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4], help="concurrent connections")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each concurrent run")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 1024])
    args = parser.parse_args()
    command = " ".join([".venv/bin/python", "benchmarks/http_serving.py", *map(shlex.quote, sys.argv[1:])])
    load_start = os.getloadavg()[0]

    ohlcv = ohlcv_array(load_sample("GSPC"))
    folder = tempfile.TemporaryDirectory()
    path = export_onnx(build_policy(ohlcv), Path(folder.name) / "model.onnx", {"lookback": LOOKBACK})
    windows, positions = real_windows(ohlcv, 4096)
    bodies = [json.dumps({"ohlcv": windows[i].tolist(), "position": float(positions[i, 0])}).encode()
              for i in range(len(windows))]
    policy = Policy(path, prefer_gpu=False, intra_op_threads=1)
    port = free_port()
    service = start_service(path, port, Path(folder.name) / "service.log")
    rows = []
    try:
        connection = Connection(port)
        # The same decision both ways, before timing anything.
        answer = json.loads(connection.post("/decide", bodies[0]))["target_exposure"]
        assert abs(answer - float(policy.decide(windows[:1], positions[:1])[0, 0])) < 1e-6
        for i in range(500):  # warm-up: connection, thread pool, allocator
            connection.post("/decide", bodies[i % len(bodies)])
            policy.decide(windows[i:i + 1], positions[i:i + 1])

        rounds = 10
        per_round = args.requests // rounds
        single = {"HTTP POST /decide": [], "library Policy.decide": []}
        for _ in range(rounds):
            single["HTTP POST /decide"].append(per_call_us(
                lambda i: connection.post("/decide", bodies[i % len(bodies)]), per_round, 0))
            single["library Policy.decide"].append(per_call_us(
                lambda i: policy.decide(windows[i % 4096:i % 4096 + 1], positions[i % 4096:i % 4096 + 1]), per_round, 0))
        for name, parts in single.items():
            times = np.concatenate(parts)
            p50, p99 = np.percentile(times, [50, 99])
            rows.append(f"| single, 1 client | {name} | 1 | {p50:,.0f} | {p99:,.0f} | {1e6 / times.mean():,.0f} |")

        for clients in args.clients:
            rate = concurrent_rate(port, bodies, clients, args.seconds)
            rows.append(f"| single, {clients} concurrent client(s) | HTTP POST /decide | 1 | – | – | {rate:,.0f} |")

        connection = Connection(port)  # the server closes a connection idle for 5 s (uvicorn's keep-alive)
        for batch in args.batches:
            body = json.dumps({"windows": [{"ohlcv": windows[i].tolist(), "position": float(positions[i, 0])}
                                           for i in range(batch)]}).encode()
            http_s = median_call_s(lambda: connection.post("/decide/batch", body))
            library_s = median_call_s(lambda: policy.decide(windows[:batch], positions[:batch]))
            rows.append(f"| batch | HTTP POST /decide/batch ({len(body) / 1e6:.2f} MB body) | {batch} | "
                        f"{http_s * 1e6:,.0f} | – | {batch / http_s:,.0f} |")
            rows.append(f"| batch | library Policy.decide | {batch} | {library_s * 1e6:,.0f} | – | "
                        f"{batch / library_s:,.0f} |")
    finally:
        service.terminate()
        service.wait(timeout=30)

    import fastapi
    import uvicorn

    print(f"machine: {platform.node()}, {cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()} "
          f"{platform.release()}")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"command: `{command}`")
    print(f"versions: fastapi {fastapi.__version__}, uvicorn {uvicorn.__version__}, onnxruntime {ort.__version__} "
          f"(CPUExecutionProvider, 1 thread), numpy {np.__version__}, Python {platform.python_version()}")
    print(f"load average (1 min): {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    print(f"single: {per_round * rounds} timed calls per path in {rounds} interleaved rounds, after 500 warm-up "
          f"calls; concurrent: {args.seconds:g} s per row; batch: median of >= 5 calls and >= 1 s per row")
    print()
    print("| mode | path | windows per call | p50 us per call | p99 us | decisions/s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
