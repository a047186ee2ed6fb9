"""What users wait for: a universe retrained through the real DAG, from trigger to registered models.

    .venv/bin/python benchmarks/universe.py [--symbols AAPL AMD ...] [--start 2003-01-01]
                                            [--timesteps N] [--data ../shared/data/market]

Curates the daily series of ``--symbols`` (default: the ten 1990-2022 stocks of
``../shared/data/market``) into a fresh lake, starts the embedded deployment's Airflow
(api-server, scheduler and dag-processor with the LocalExecutor on SQLite, ``ML_TRAINING_SLOTS``
= the cores, as ``scripts/env.sh`` sets it), triggers one ``ppo_training`` run with
``{"universe": [...], "source": "lake", "start": ...}`` and the built-in defaults otherwise (one
test fold per year back to the start of the data, 500k PPO steps per fold, every baseline, stress,
cost and overfitting analysis) and waits for it to finish.

Reports the wall time from trigger to the run's end, the per-stage split (for each task: the span
from its first start to its last end, and the task time summed over its mapped instances), and
the machine's CPU utilization over the run (from /proc/stat). Prints a Markdown table for
docs/benchmarks.md with the machine, the date and the command; ``--json`` writes the raw numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.airflow_services import Api, Cluster, wait_for_http, wait_until, write_simple_auth_passwords  # noqa: E402
from tests.test_airflow_services import ADMIN, base_env  # noqa: E402

DAG_ID = "ppo_training"
STOCKS = ["AAPL", "AMD", "BAC", "BBY", "CVX", "GE", "HD", "JNJ", "JPM", "KO"]
STAGES = ["plan_universe", "load_data", "validate_data", "start_tracking", "plan_folds", "fold_tasks", "train",
          "evaluate", "export_onnx", "register", "summary"]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


class CpuSampler(threading.Thread):
    """Utilization of all cores over ``interval`` windows, until stopped."""

    def __init__(self, interval: float = 5.0):
        super().__init__(daemon=True)
        self.interval, self.samples, self.stopped = interval, [], threading.Event()
        self.start_times = cpu_times()

    def run(self) -> None:
        last = cpu_times()
        while not self.stopped.wait(self.interval):
            now = cpu_times()
            self.samples.append((now[0] - last[0]) / max(now[1] - last[1], 1))
            last = now

    def mean(self) -> float:
        end = cpu_times()
        return (end[0] - self.start_times[0]) / max(end[1] - self.start_times[1], 1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def curate(lake: Path, data: Path, symbols: list[str]) -> float:
    """The market_data DAG's work, in-process: each CSV through the gate into the curated lake."""
    from ml.data.ingest import ingest_symbol

    started = time.monotonic()
    for symbol in symbols:
        result = ingest_symbol(str(lake), symbol, "1d", "file", path=str(data / f"{symbol}.csv"))
        if result["status"] != "updated":
            raise SystemExit(f"{symbol}: ingest {result['status']}: {result['error']}")
    return time.monotonic() - started


def environment(home: Path, port: int, lake: Path) -> dict[str, str]:
    """The test clusters' environment (LocalExecutor on SQLite, loopback), sized like scripts/env.sh."""
    env = base_env(home, port, "LocalExecutor", f"sqlite:///{home}/airflow.db")
    env.pop("AIRFLOW__CORE__PARALLELISM")  # Airflow's default, as the embedded setup leaves it
    env.update({"ML_DATA_ROOT": str(lake), "ML_TRAINING_SLOTS": str(len(os.sched_getaffinity(0)))})
    return env


def task_instances(api: Api, run_id: str) -> list[dict]:
    """Every task instance of the run, page by page (the API returns at most 100 at a time)."""
    found: list[dict] = []
    while True:
        page = api.ok_json("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances",
                           params={"limit": 100, "offset": len(found)})
        found += page["task_instances"]
        if not page["task_instances"] or len(found) >= page["total_entries"]:
            return found


def stage_split(tis: list[dict]) -> dict[str, dict]:
    """Per task: instances, span from first start to last end, and summed task time (seconds)."""
    split = {}
    for stage in STAGES:
        runs = [ti for ti in tis if ti["task_id"] == stage and ti["start_date"] and ti["end_date"]]
        if not runs:
            continue
        starts = [datetime.datetime.fromisoformat(ti["start_date"]) for ti in runs]
        ends = [datetime.datetime.fromisoformat(ti["end_date"]) for ti in runs]
        split[stage] = {"instances": len(runs), "span_s": (max(ends) - min(starts)).total_seconds(),
                        "task_s": sum((e - s).total_seconds() for s, e in zip(starts, ends)),
                        "states": sorted({ti["state"] for ti in runs})}
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--symbols", nargs="+", default=STOCKS)
    parser.add_argument("--start", default="2003-01-01", help="first date: 20 years to the data's end in 2022")
    parser.add_argument("--timesteps", type=int, default=None, help="PPO steps per fold (default: built-in)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "market")
    parser.add_argument("--timeout", type=float, default=3 * 3600)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the Airflow home and run folders")
    args = parser.parse_args()
    missing = [s for s in args.symbols if not (args.data / f"{s}.csv").is_file()]
    if missing:
        raise SystemExit(f"{args.data}: no CSV for {', '.join(missing)}")

    home = Path(tempfile.mkdtemp(prefix="universe-bench-"))
    lake, port = home / "lake", free_port()
    print(f"curating {len(args.symbols)} symbols into {lake} ...", flush=True)
    curate_s = curate(lake, args.data, args.symbols)
    cluster = Cluster(home / "airflow", environment(home / "airflow", port, lake), budget=args.timeout + 600)
    try:
        cluster.cli("db", "migrate", timeout=600)
        write_simple_auth_passwords(cluster.env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"], {ADMIN: "bench"})
        api_server = cluster.start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(port))
        cluster.start("scheduler", "scheduler")
        cluster.start("dag-processor", "dag-processor")
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/api/v2/monitor/health", 300, "api-server", proc=api_server, on_timeout=cluster.report)
        api = Api(base)
        api.login(ADMIN, "bench")
        wait_until(lambda: api.get(f"/api/v2/dags/{DAG_ID}").status_code == 200, 300, "the DAG to be listed",
                   interval=2, on_timeout=cluster.report)
        api.ok_json("PATCH", f"/api/v2/dags/{DAG_ID}", json={"is_paused": False})
        conf = {"universe": args.symbols, "source": "lake", "data_path": str(lake), "start": args.start,
                "force": True}
        if args.timesteps:
            conf["timesteps"] = args.timesteps
        sampler = CpuSampler()
        sampler.start()
        started = time.monotonic()
        run = api.ok_json("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf})
        run_id = run["dag_run_id"]
        print(f"triggered {run_id}", flush=True)

        def finished():
            cluster.assert_running()
            state = api.ok_json("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")["state"]
            return state if state in ("success", "failed") else None

        state = wait_until(finished, args.timeout, "the run to finish", interval=10, on_timeout=cluster.report)
        wall = time.monotonic() - started
        sampler.stopped.set()
        utilization = sampler.mean()
        tis = task_instances(api, run_id)
        summary_path = home / "airflow" / "runs" / DAG_ID
        summaries = list(summary_path.glob("*/summary.json"))
        summary = json.loads(summaries[0].read_text()) if summaries else {}
    finally:
        cluster.stop()
    split = stage_split(tis)
    folds = split.get("train", {}).get("instances", 0)
    result = {"machine": f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores",
              "date": datetime.date.today().isoformat(), "command": " ".join(["benchmarks/universe.py", *sys.argv[1:]]),
              "symbols": args.symbols, "start": args.start, "state": state, "wall_s": wall, "curate_s": curate_s,
              "cpu_utilization": utilization, "folds": folds, "stages": split,
              "counts": summary.get("counts"), "targets": summary.get("targets")}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(f"\n{result['machine']}; {result['date']}; `{result['command']}`\n")
    print(f"{len(args.symbols)} symbols from {args.start}, {folds} fold trainings: run {state} in "
          f"{wall / 60:.1f} min from trigger (curating the lake first: {curate_s:.0f} s); "
          f"CPU utilization {utilization:.0%} of {len(os.sched_getaffinity(0))} cores; targets {summary.get('counts')}\n")
    print("| stage | tasks | span (min) | task time (min) | share of task time |")
    print("|---|---:|---:|---:|---:|")
    total = sum(stage["task_s"] for stage in split.values()) or 1
    for name, stage in split.items():
        print(f"| {name} | {stage['instances']} | {stage['span_s'] / 60:.1f} | {stage['task_s'] / 60:.1f} | "
              f"{stage['task_s'] / total:.0%} |")
    if not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    else:
        print(f"\nkept {home}")


if __name__ == "__main__":
    main()
