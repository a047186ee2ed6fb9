"""Risk overlay study: one pipeline run per series with the overlay on, then a markdown table of
what the overlay changed, read from each run's report.json (``risk`` section).

The series are the bundled sample GSPC and every CSV in the market data folder. Each report
already holds the trained policy and the benchmark replayed with and without the overlay on the
same test folds and costs; this script only runs the pipeline and tabulates those means.

    .venv/bin/python scripts/risk_overlay_study.py --config docs/risk-config.yaml --out runs/risk-study
    .venv/bin/python scripts/risk_overlay_study.py --out runs/risk-study --report-only

Each run registers its model in a SQLite store in its own run folder (unless the config names
a tracking_uri), never in the store $MLFLOW_TRACKING_URI may name.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE = "sample:GSPC"
BREAKERS = ("drawdown_breaker", "stop_loss", "session_loss_limit")


def data_sources(market_dir: Path) -> list[tuple[str, str]]:
    """(run folder name, --data argument): the bundled sample first, then the folder's CSVs by name.
    The sample's folder has a prefix because the market folder may hold a GSPC.csv of its own."""
    csvs = sorted(market_dir.glob("*.csv"))
    if not csvs:
        sys.exit(f"no CSV files in {market_dir}")
    return [("sample_GSPC", SAMPLE)] + [(path.stem, str(path.resolve())) for path in csvs]


def run_one(name: str, data: str, config: Path, out: Path, timesteps: int | None) -> None:
    """One pipeline run into out/name; its log goes to out/logs/name.log."""
    command = [sys.executable, "-m", "ml", "pipeline", "--out", str((out / name).resolve()),
               "--config", str(config.resolve()), "--data", data]
    if timesteps:
        command += ["--timesteps", str(timesteps)]
    if data != SAMPLE:
        command += ["--symbol", name]
    # Without $MLFLOW_TRACKING_URI (in the child only) each run registers in a SQLite store in its own
    # folder: the sample and the market file both name a GSPC model, and no shared store should see either.
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(out / "logs" / f"{name}.log", "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    print(f"{name}: {'done' if code == 0 else f'FAILED (exit {code}, see the log)'} in "
          f"{time.monotonic() - started:.0f} s", file=sys.stderr)


def risk_row(label: str, report: dict) -> dict:
    """The numbers of one table row: means over the run's test folds, with ('on') and without ('off') the overlay."""
    risk = report["risk"]
    benchmark = report["benchmark"]
    row = {"label": label, "benchmark": benchmark, "folds": len(report["folds"]), "data": report["dataset_hash"],
           "test": f"{report['folds'][0]['test']['start'][:7]} to {report['folds'][-1]['test']['end'][:7]}",
           "trips": {rule: risk["rules"][rule]["trips"] for rule in BREAKERS}}
    for who, name in (("policy", "policy"), ("benchmark", benchmark)):
        for side, key in (("off", "without_overlay"), ("on", "with_overlay")):
            row[who, side] = risk[key][name]
    return row


def markdown_table(rows: list[dict]) -> str:
    """Per series: Sharpe, max drawdown and total return, 'without -> with' the overlay, and breaker trips."""
    metrics = (("sharpe", "Sharpe", "{:.2f}"), ("max_drawdown", "max DD", "{:.1%}"),
               ("total_return", "return", "{:.1%}"))

    def line(label: str, test: str, numbers: dict, trips: str) -> str:
        cells = [f"{fmt.format(numbers[who, 'off'][key])} → {fmt.format(numbers[who, 'on'][key])}"
                 for who in ("policy", "benchmark") for key, _, fmt in metrics]
        return "| " + " | ".join([label, test, *cells, trips]) + " |"

    header = (["series", "test years"] + [f"{who} {title}" for who in ("policy", "benchmark") for _, title, _ in metrics]
              + ["trips DD/stop/day"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    # A file holding the same bars as an earlier row (same dataset hash) is listed but left out of the mean.
    first_with: dict[str, str] = {}
    distinct = []
    for row in rows:
        label = row["label"]
        if row["data"] in first_with:
            label += f" (same bars as {first_with[row['data']]})"
        else:
            first_with[row["data"]] = row["label"]
            distinct.append(row)
        lines.append(line(label, row["test"], row, "/".join(str(row["trips"][rule]) for rule in BREAKERS)))
    # The mean row weights every distinct series alike; trips are summed.
    sides = [(who, side) for who in ("policy", "benchmark") for side in ("off", "on")]
    mean = {pair: {key: sum(r[pair][key] for r in distinct) / len(distinct) for key, _, _ in metrics} for pair in sides}
    total_trips = "/".join(str(sum(r["trips"][rule] for r in distinct)) for rule in BREAKERS)
    lines.append(line(f"**mean of {len(distinct)}**", "", mean, f"{total_trips} (sum)"))
    folds = "/".join(str(n) for n in sorted({row["folds"] for row in rows}))
    benchmarks = ", ".join(sorted({row["benchmark"] for row in rows}))
    note = (f"Cells are 'without → with' the overlay, means over each series' {folds} test folds; benchmark: "
            f"{benchmarks}. Trips: the policy's drawdown-breaker, stop-loss and session-loss-limit trips, "
            "summed over folds.")
    return "\n".join(lines + ["", note]) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="study folder: one run folder per series")
    parser.add_argument("--config", type=Path, default=Path("docs/risk-config.yaml"), help="pipeline config (overlay on)")
    parser.add_argument("--market-dir", type=Path, default=REPO.parent / "shared" / "data" / "market",
                        help="folder of daily CSVs, one series each (default: ../shared/data/market "
                             "next to the repository)")
    parser.add_argument("--timesteps", type=int, help="PPO timesteps per fold (default: the config's)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run folder names to run or read (e.g. sample_GSPC AAPL)")
    parser.add_argument("--report-only", action="store_true", help="do not train: re-read existing run folders")
    parser.add_argument("--table", type=Path, help="where to write the markdown table (default: OUT/risk-table.md)")
    args = parser.parse_args()

    sources = [(name, data) for name, data in data_sources(args.market_dir) if not args.only or name in args.only]
    if not args.report_only:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, data in sources:
            run_one(name, data, args.config, args.out, args.timesteps)

    rows = []
    for name, data in sources:
        report_path = args.out / name / "report.json"
        if not report_path.exists():
            print(f"{name}: no {report_path}, left out of the table", file=sys.stderr)
            continue
        report = json.loads(report_path.read_text())
        if "risk" not in report:
            print(f"{name}: report has no risk section (overlay off?), left out", file=sys.stderr)
            continue
        rows.append(risk_row(f"{report['symbol']} (sample)" if data == SAMPLE else report["symbol"], report))
    if not rows:
        print("no reports to tabulate", file=sys.stderr)
        return 1
    table = markdown_table(rows)
    table_path = args.table or args.out / "risk-table.md"
    table_path.write_text(table)
    print(table)
    return 0 if len(rows) == len(sources) else 1


if __name__ == "__main__":
    sys.exit(main())
