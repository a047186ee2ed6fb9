"""DAG parse time per file, as the dag-processor pays it.

    .venv/bin/python benchmarks/dag_parse.py [--repeats 7]

Each measurement runs in a fresh interpreter that first imports ``airflow.sdk`` (the
dag-processor has it loaded already), then times executing one DAG file. Prints the
median and maximum per file, plus the interpreter's one-off airflow import time for
reference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, runpy, sys, time
t0 = time.perf_counter()
import airflow.sdk  # noqa: F401  (already loaded in a dag-processor)
t1 = time.perf_counter()
runpy.run_path(sys.argv[1])
t2 = time.perf_counter()
heavy = [m for m in ("torch", "mlflow", "great_expectations", "onnx", "pandas") if m in sys.modules]
print(json.dumps({"airflow_import": t1 - t0, "parse": t2 - t1, "heavy": heavy}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    env = {**os.environ, "AIRFLOW_HOME": os.environ.get("AIRFLOW_HOME", str(ROOT / ".local" / "airflow"))}
    load = os.getloadavg()[0]
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores; "
          f"date: {datetime.date.today().isoformat()}; 1-min load at start {load:.2f}")
    print(f"command: .venv/bin/python benchmarks/dag_parse.py --repeats {args.repeats}\n")
    print("| DAG file | parse median (ms) | parse max (ms) | heavy modules imported | airflow.sdk import (ms, once per process) |")
    print("|---|---|---|---|---|")
    for path in sorted((ROOT / "dags").glob("*.py")):
        samples = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, env=env,
                                 check=True)
            samples.append(json.loads(out.stdout.strip().splitlines()[-1]))
        parse = [s["parse"] * 1000 for s in samples]
        imports = [s["airflow_import"] * 1000 for s in samples]
        print(f"| {path.name} | {statistics.median(parse):.1f} | {max(parse):.1f} | "
              f"{', '.join(samples[0]['heavy']) or 'none'} | {statistics.median(imports):.0f} |")
    print(f"\n1-min load at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
