"""PPO training throughput when trainings share the machine: N at once against one alone.

    .venv/bin/python benchmarks/contention.py [--trainings 1 2 4] [--envs 4096] [--updates 4]

Starts N training processes at once (N in --trainings), each the same short PPO training on the
bundled GSPC sample (``throughput.py``'s ``ppo_steps_per_second``: the last walk-forward fold,
rollout length 64, one validation backtest at the end), twice:

- "budget": every process gets ``ML_TRAINING_SLOTS=N``, so ``ml.agent.threads`` gives each
  training cores / N threads, as an Airflow worker with N training slots would;
- "fixed": ``ML_TRAINING_SLOTS=1``, so each training takes every core, as torch does by default.

The processes load data and warm up first, then start training together. Total steps/s is the
env steps of all N trainings over the wall time from the first start to the last finish. The
reference, one training alone on every core, is measured again right before each row, because the
VM's speed drifts. Other processes on the machine take cores from every case, so each case also
says how many cores they kept busy meanwhile (from /proc/stat, less the trainings' own CPU time).
Prints a Markdown table (for docs/benchmarks.md) with the machine, the date and the load averages.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_averages() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def train_when_told(envs: int, updates: int) -> None:
    """One training process: set up and warm up, say ready, train on "go", report as JSON."""
    import torch

    from ml.agent.threads import training_threads
    from ml.data.sources import load_sample
    from ml.market.series import prepare_series
    from throughput import ppo_steps_per_second  # this folder is on sys.path when run as a script

    series = prepare_series(load_sample("GSPC"), 64, torch.device("cpu"))
    ppo_steps_per_second(series, envs, envs * 64, "cpu")  # kernels, caches and allocator warm
    print("ready", flush=True)
    sys.stdin.readline()
    timesteps = envs * 64 * updates
    start = time.monotonic()  # one clock for all processes on Linux (CLOCK_MONOTONIC)
    rate = ppo_steps_per_second(series, envs, timesteps, "cpu")
    end = time.monotonic()
    print(json.dumps({"steps": timesteps, "start": start, "end": end, "rate": rate,
                      "threads": training_threads(None)[0]}), flush=True)


def read_until(worker: subprocess.Popen, prefix: str) -> str | None:
    """The worker's first output line that starts with ``prefix`` (None if it ended first)."""
    for line in worker.stdout:
        if line.startswith(prefix):
            return line
    return None


def busy_cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process's finished children)."""
    ticks = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = ticks
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ((user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"),
            children.ru_utime + children.ru_stime)


def run_together(count: int, slots: int, envs: int, updates: int) -> dict:
    """``count`` trainings started together, each told that ``slots`` trainings share the cores.

    ``other`` is how many cores other processes kept busy meanwhile (set-up included): the
    machine's busy time less the trainings' own.
    """
    machine_before, ours_before, started = *busy_cpu_seconds(), time.monotonic()
    result = _run_together(count, slots, envs, updates)
    machine_after, ours_after = busy_cpu_seconds()
    result["other"] = max(0.0, (machine_after - machine_before) - (ours_after - ours_before)) / (
        time.monotonic() - started)
    return result


def _run_together(count: int, slots: int, envs: int, updates: int) -> dict:
    env = {**os.environ, "ML_TRAINING_SLOTS": str(slots)}
    env.pop("AIRFLOW_CTX_DAG_ID", None)
    logs = [tempfile.TemporaryFile(mode="w+") for _ in range(count)]
    workers = [subprocess.Popen([sys.executable, __file__, "--worker", "--envs", str(envs), "--updates", str(updates)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                cwd=ROOT)
               for log in logs]
    try:
        for worker, log in zip(workers, logs):
            if read_until(worker, "ready") is None:
                log.seek(0)
                raise RuntimeError(f"a training process failed to start:\n{log.read()[-3000:]}")
        for worker in workers:  # all set up: start them as close together as the pipes allow
            worker.stdin.write("go\n")
            worker.stdin.flush()
        results = [json.loads(read_until(worker, "{")) for worker in workers]
    finally:
        for worker in workers:
            worker.stdin.close()
            if worker.wait(timeout=60) != 0:
                raise RuntimeError(f"a training process exited with {worker.returncode}")
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"total": sum(r["steps"] for r in results) / wall, "threads": results[0]["threads"],
            "each": [r["rate"] for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trainings", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--envs", type=int, default=4096, help="parallel episodes per training")
    parser.add_argument("--updates", type=int, default=4, help="PPO updates per training")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        train_when_told(args.envs, args.updates)
        return

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {platform.node()}, {cpu_model()}, {cores} cores; date: {datetime.date.today().isoformat()}")
    print(f"load averages (1, 5, 15 min) at start: {load_averages()}")
    print(f"each training: GSPC sample, {args.envs} parallel episodes, {args.updates} updates of 64 steps "
          f"({args.envs * 64 * args.updates:,} env steps)\n", flush=True)
    rows = []
    for count in args.trainings:
        # The VM's speed drifts from minute to minute: each row has its own reference, just before it.
        load = os.getloadavg()[0]
        alone = run_together(1, 1, args.envs, args.updates)
        budget = run_together(count, count, args.envs, args.updates)
        fixed = run_together(count, 1, args.envs, args.updates)
        rows.append((count, load, alone, budget, fixed))
        print(f"  {count} at once (1-min load {load:.2f} before): alone {alone['total']:,.0f} steps/s, "
              f"budget {budget['total']:,.0f} steps/s ({budget['threads']} thread(s) each), "
              f"fixed {fixed['total']:,.0f} steps/s ({fixed['threads']} thread(s) each); other processes "
              f"kept {alone['other']:.2f} / {budget['other']:.2f} / {fixed['other']:.2f} cores busy", flush=True)

    print("\n| trainings at once | one alone, steps/s | budget: threads each | budget: total steps/s "
          "| vs one alone | fixed: threads each | fixed: total steps/s | vs one alone "
          "| cores busy with other processes (alone / budget / fixed) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for count, load, alone, budget, fixed in rows:
        reference = alone["total"]
        print(f"| {count} | {reference:,.0f} | {budget['threads']} | {budget['total']:,.0f} "
              f"| {budget['total'] / reference:.2f}x | {fixed['threads']} | {fixed['total']:,.0f} "
              f"| {fixed['total'] / reference:.2f}x "
              f"| {alone['other']:.2f} / {budget['other']:.2f} / {fixed['other']:.2f} |")
    print(f"\nload averages (1, 5, 15 min) at end: {load_averages()}")


if __name__ == "__main__":
    main()
