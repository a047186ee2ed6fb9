"""Command line: ``python -m ml <command>``.

    pipeline       run every stage in-process on a file, the sample or yfinance
    data validate  run the quality gate on one file (exit 0 = passes)
    data ingest    pull symbols into the versioned lake (raw -> gate -> curated or quarantine)
    data build-suites  rewrite the committed GX suites from their definitions
    summary        what the registry holds for a model: versions, aliases, gate, metrics
    registry promote | rollback   move `champion` by hand (only to versions that passed their gate)
    serve          decide target exposures from a bars file with a registered or local model
                   (--http: answer over HTTP, following the champion alias as it moves)
    tune           hyperparameter search on the validation folds (Optuna), then retrain the best
                   config with the full pipeline; the report counts every trial
    forward        paper-trade champions on the new curated bars, then monitor them (as the
                   forward_test DAG does); exit 1 when a monitoring rule breached
    panel          one policy trained across many symbols, judged on each of them and on a
                   held-out symbol beside per-symbol policies and buy-and-hold
    compare        model options (config variants) on the same symbols, folds and seeds
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import sys
from pathlib import Path

from ml.config import SYMBOL_RULE, ConfigError, first_line, is_symbol, load_config

# Each command imports what it needs inside its function: `serve` must run on numpy and
# onnxruntime alone, and `--help` or `config` must not wait for torch.


def _symbol(value: str) -> str:
    """argparse type: a ticker (``ml.config.SYMBOL_PATTERN``), refused with the rule before any file is named."""
    if not is_symbol(value):
        raise argparse.ArgumentTypeError(f"{value!r} {SYMBOL_RULE}")
    return value


def _age(value: str) -> datetime.timedelta:
    """argparse type: ``90m``, ``36h``, ``3d``, ``2w`` (or seconds: ``45s``)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", value)
    if not found:
        raise argparse.ArgumentTypeError(f"{value!r}: a number and a unit s, m, h, d or w (e.g. 36h, 3d)")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[found.group(2)]
    return datetime.timedelta(**{unit: float(found.group(1))})


def _pipeline(args: argparse.Namespace) -> int:
    from ml.pipeline import run_pipeline
    from ml.release.tracking import TrackingUnavailable

    overrides: dict = {}
    if args.data:
        if args.data.startswith("sample:"):
            overrides["data"] = {"source": "sample", "symbol": args.data.split(":", 1)[1]}
        else:
            overrides["data"] = {"source": "file", "path": str(Path(args.data).resolve()),
                                 **({"symbol": args.symbol} if args.symbol else {"symbol": Path(args.data).stem})}
    if args.timesteps:
        overrides["ppo"] = {"total_timesteps": args.timesteps}
    if args.device:
        overrides.setdefault("ppo", {})["device"] = args.device
    config = load_config(args.config, overrides)  # refused here, before any work, when a field is invalid
    try:
        result = run_pipeline(config, Path(args.out))
    except TrackingUnavailable as exc:  # one line naming the store, not a traceback
        print(f"tracking error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


def _tune(args: argparse.Namespace) -> int:
    import optuna

    from ml.release.tracking import TrackingUnavailable
    from ml.tuning import default_space, load_space, tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is printed below
    if args.trials < 0:
        print(f"tune: --trials {args.trials}: must be 0 or more", file=sys.stderr)
        return 2
    config = load_config(args.config)  # the base config and the space are refused before any trial
    space = load_space(args.space, config) if args.space else default_space(config)

    def show(trial: dict) -> None:
        score = "-" if trial["value"] is None else f"{trial['value']:.4f}"
        print(f"trial {trial['number']} {trial['state']} score {score} {json.dumps(trial['params'])}", flush=True)

    try:
        result = tune(args.study, args.storage, config, space, Path(args.out), args.trials,
                      retrain=not args.no_retrain, seed=args.seed, on_trial=show)
    except TrackingUnavailable as exc:
        print(f"tracking error: {exc}", file=sys.stderr)
        return 1
    if result is not None:
        print(json.dumps(result, indent=2))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from ml.data.schema import DataError
    from ml.data.sources import load_file
    from ml.data.validation import ValidationConfig, validate_bars

    try:
        bars = load_file(args.path, symbol=args.symbol, interval=args.interval)
    except DataError as exc:
        print(f"REJECTED {exc}", file=sys.stderr)
        return 2
    result = validate_bars(bars, str(args.path), ValidationConfig(calendar=args.calendar))
    print(("PASSED " if result.success else "FAILED ") + result.describe())
    return 0 if result.success else 1


def _ingest(args: argparse.Namespace) -> int:
    """Pull symbols into the lake through the gate; exit 1 when any symbol was not curated."""
    from ml.data.ingest import ingest_many

    results = ingest_many(args.lake, args.symbols, interval=args.interval, source=args.source,
                          start=args.start, path=args.path)
    for result in results:
        print(json.dumps(result, default=str))
    return 0 if all(r["status"] in ("updated", "unchanged") for r in results) else 1


def _build_suites(_args: argparse.Namespace) -> int:
    from ml.data.validation import build_suites

    for path in build_suites():
        print(f"wrote {path}")
    return 0


def _summary(args: argparse.Namespace) -> int:
    from ml.release.summary import registry_summary

    print(registry_summary(args.model, args.tracking_uri))
    return 0


def _registry(args: argparse.Namespace) -> int:
    from ml.release import registry

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        print("no tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI", file=sys.stderr)
        return 2
    try:
        if args.registry_command == "promote":
            result = registry.promote(uri, args.model, args.version)
        else:
            result = registry.rollback(uri, args.model, args.to)
    except registry.PromotionError as exc:
        print(f"REFUSED {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


def _decide(policy, window, held, timestamps, args: argparse.Namespace):
    """The policy's target, and for a model with a risk overlay the executed target and the state to keep."""
    import numpy as np

    from ml.serving import InputError

    if policy.risk is None:
        return policy.decide(window, held, timestamps), {}
    state = None
    if args.risk_state:
        try:
            state = np.array([json.loads(args.risk_state)], dtype=np.float32)
        except (ValueError, TypeError):
            raise InputError("--risk-state: must be the JSON list of numbers the last decision printed") from None
    decision = policy.decide_with_risk(window, held, args.nav, timestamps, state)
    executed = [float(x) for x in decision.target[0]]
    return decision.policy_target, {"executed_target": executed if policy.symbols else executed[0],
                                    "risk_state": [float(x) for x in decision.state[0]]}


def _serve_http(args: argparse.Namespace) -> int:
    """The HTTP service: loads the model first, so a model that cannot be loaded is one line and exit 2."""
    from ml.service import Champion, run_http
    from ml.serving import ModelLoadError

    try:
        champion = Champion(args.model, tracking_uri=args.tracking_uri, reload_interval=args.reload_interval,
                            max_age=args.max_age, intra_op_threads=args.intra_op_threads)
    except ModelLoadError as exc:
        print(f"REJECTED {exc}", file=sys.stderr)
        return 2
    run_http(champion, args.host, args.port, max_batch=args.max_batch)
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Decide on the last ``lookback`` bars of a file: what a downstream service does each bar."""
    if args.http:
        return _serve_http(args)
    import numpy as np

    from ml.serving import InputError, ModelLoadError, Policy, bars_to_window, portfolio_window

    # One line and exit 2 for a model that cannot be loaded or bars that break a rule: the
    # message names the file, model or bar and the rule; a traceback would add nothing.
    try:
        policy = Policy.load(args.model, tracking_uri=args.tracking_uri, max_age=args.max_age).self_contained()
        if policy.symbols is not None:  # portfolio: one file per asset, in the model's order
            if len(args.bars) != len(policy.symbols):
                raise InputError(f"--bars: {len(args.bars)} file(s) for a model of assets {policy.symbols}")
            weights = args.weights or [0.0] * len(policy.symbols)
            window, timestamps = portfolio_window(args.bars, policy.lookback, return_timestamps=True)
            held = np.array([weights], dtype=np.float32)
            target, risk = _decide(policy, window, held, timestamps, args)
            decision = {"target_weights": dict(zip(policy.symbols, map(float, target[0]))), "weights": weights}
        else:
            if len(args.bars) != 1:
                raise InputError(f"--bars: one file for a single-asset model, got {len(args.bars)}")
            window, timestamps = bars_to_window(args.bars[0], policy.lookback, return_timestamps=True)
            target, risk = _decide(policy, window, np.array([[args.position]], dtype=np.float32), timestamps, args)
            decision = {"target_exposure": float(target[0, 0]), "position": args.position}
        decision |= risk
    except (InputError, ModelLoadError) as exc:
        print(f"REJECTED {exc}", file=sys.stderr)
        return 2
    print(json.dumps({**decision, "model": args.model, "lookback": policy.lookback,
                      "mlflow_run_id": policy.metadata.get("mlflow_run_id")}))
    return 0


def _forward(args: argparse.Namespace) -> int:
    """Trade and monitor each model: one line per rule; one line and exit 2 for what cannot run."""
    from ml import forward
    from ml.serving import ModelLoadError

    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        print("forward: no MLflow store named: pass --tracking-uri or set MLFLOW_TRACKING_URI", file=sys.stderr)
        return 2
    if args.min_bars < 2:
        print(f"forward: --min-bars {args.min_bars}: must be at least 2", file=sys.stderr)
        return 2
    rules = forward.MonitorRules(min_bars=args.min_bars, rollback=args.rollback_on_breach)
    ledger = forward.Ledger(args.ledger)
    breached = False
    try:
        for name in args.model or forward.champions(tracking_uri):
            workdir = Path(args.out) / forward.check_model_name(name)
            traded = forward.trade_champion(name, tracking_uri, ledger, workdir, args.lake)
            if "skipped" in traded:
                print(f"{name}: skipped: {traded['skipped']}")
                continue
            result = forward.monitor_champion(name, tracking_uri, ledger, workdir, rules, args.lake)
            print(f"{name} v{traded['version']}: {traded['new_bars']} new bar(s), NAV {traded['nav']:.4f} at "
                  f"{traded['last_bar']}; page {result['page']}")
            for check in result["checks"]:
                print(f"  {check['status'].upper():10} {check['rule']}: {check['detail']}")
            breached |= bool(result["breaches"])
    except (*forward.BAD_INPUT, ModelLoadError) as exc:
        if args.debug:
            raise
        print(f"forward: {exc}", file=sys.stderr)
        return 2
    finally:
        ledger.dispose()
    return 1 if breached else 0


def _print_comparison(summary: dict, models: list[str]) -> None:
    """Per symbol the mean test Sharpe of each model, and how often the first model beat each other."""
    first, others = models[0], models[1:]
    print(f"{'symbol':10}" + "".join(f"{m:>14}" for m in models) + f"   {first} beats " + " / ".join(others))
    for symbol, row in summary["per_symbol"].items():
        name = symbol + (" *" if row["held_out"] else "")
        print(f"{name:10}" + "".join(f"{row['sharpe'][m]:14.2f}" for m in models) + "   "
              + " / ".join(row["beats"][f"{first}>{other}"] for other in others))
    spread = summary["seed_spread"]
    print("by seed (mean over symbols and folds): " + "; ".join(
        f"{m} " + " ".join(f"{v:.2f}" for v in spread[m]["per_seed_mean"].values()) for m in spread))
    print("seed-to-seed std of one test Sharpe: " + "; ".join(
        f"{m} {spread[m]['std_within_cell']:.2f}" for m in spread))


def _load_folder(args: argparse.Namespace):
    from ml.data.sources import load_folder
    return load_folder(Path(args.data), args.symbols, args.start, args.end)


def _panel(args: argparse.Namespace) -> int:
    """Train and judge a panel policy; print the per-symbol table and where the files went."""
    from ml.data.schema import DataError
    from ml.pipeline.panel import run_panel

    if args.hold_out not in args.symbols:
        print(f"panel: --hold-out {args.hold_out} must be one of --symbols", file=sys.stderr)
        return 2
    config = load_config(args.config, _run_overrides(args))
    try:
        result = run_panel(config, _load_folder(args), args.hold_out, args.seeds, Path(args.out))
    except (DataError, ValueError, OSError, RuntimeError) as exc:  # bad bars or settings, an unwritable --out, no GPU
        if args.debug:
            raise
        print(f"panel: {first_line(exc)}", file=sys.stderr)
        return 2
    _print_comparison(result["summary"], ["panel", "per_symbol", "buy_and_hold"])
    print(f"mean test Sharpe over folds and seeds; * held out of the panel's training. "
          f"ONNX parity {'passed' if result['export']['parity_passed'] else 'FAILED'}; files in {args.out}")
    return 0 if result["export"]["parity_passed"] else 1


def _compare(args: argparse.Namespace) -> int:
    """Train every config on the same symbols, folds and seeds; print the per-symbol table."""
    from ml.config import config_from_dict, merge, read_config_file
    from ml.data.schema import DataError
    from ml.evaluation.comparison import RESERVED_NAMES
    from ml.pipeline.compare import run_comparison

    names = [args.name] + [variant.partition("=")[0] for variant in args.variant]
    for name, given in zip(names, [f"--name {args.name!r}"] + [f"--variant {v!r}" for v in args.variant]):
        if not re.fullmatch(r"[A-Za-z0-9_]{1,32}", name) or name in RESERVED_NAMES or names.count(name) > 1:
            print(f"compare: {given}: a model name of letters, digits and _, each once, and not a rule's "
                  f"({', '.join(RESERVED_NAMES)}) (a variant is NAME=CONFIG_FILE)", file=sys.stderr)
            return 2
    if any(not variant.partition("=")[2] for variant in args.variant):
        print("compare: --variant: must be NAME=CONFIG_FILE", file=sys.stderr)
        return 2
    base = read_config_file(args.config)
    # The command line's settings win over every file, the variants' too.
    configs = {args.name: config_from_dict(merge(base, _run_overrides(args)))}
    for variant in args.variant:
        name, _, path = variant.partition("=")
        configs[name] = config_from_dict(merge(merge(base, read_config_file(path)), _run_overrides(args)))
    try:
        result = run_comparison(configs, _load_folder(args), args.seeds, Path(args.out))
    except (DataError, ValueError, OSError, RuntimeError) as exc:  # bad bars or settings, an unwritable --out, no GPU
        if args.debug:
            raise
        print(f"compare: {first_line(exc)}", file=sys.stderr)
        return 2
    _print_comparison(result["summary"], result["judged"])
    print(f"mean test Sharpe over folds and seeds; files in {args.out}")
    return 0


def _run_overrides(args: argparse.Namespace) -> dict:
    overrides: dict = {"ppo": {}}
    if args.timesteps:
        overrides["ppo"]["total_timesteps"] = args.timesteps
    if args.device:
        overrides["ppo"]["device"] = args.device
    return overrides


def _config(args: argparse.Namespace) -> int:
    """Print the effective config (defaults, or a file merged over them) as YAML."""
    import yaml

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return list(value) if isinstance(value, tuple) else value

    header = ("# Every pipeline setting with its default. A config file names only what it changes:\n"
              "#   python -m ml pipeline --out runs/x --config my.yaml      (or the DAG Param config_file)\n"
              "# Regenerate: python -m ml config > docs/example-config.yaml\n")
    print(header + yaml.safe_dump(plain(load_config(args.file).to_dict()), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ml", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

    pipeline = commands.add_parser("pipeline", help="run the whole training pipeline in-process")
    pipeline.add_argument("--data", help="CSV/parquet path, or sample:SYMBOL (default: config / sample GSPC)")
    pipeline.add_argument("--symbol", type=_symbol, help="symbol name for a file (default: the file's stem)")
    pipeline.add_argument("--out", required=True, help="run directory for report.json, model.onnx, curves")
    pipeline.add_argument("--timesteps", type=int, help="PPO timesteps per fold")
    pipeline.add_argument("--device", help="auto | cpu | cuda")
    pipeline.add_argument("--config", help="YAML/JSON config file (see docs/example-config.yaml)")
    pipeline.set_defaults(run=_pipeline)

    tune_cmd = commands.add_parser("tune", help="hyperparameter search on validation folds, then retrain the best")
    tune_cmd.add_argument("--config", help="base YAML/JSON config the searched fields are merged over")
    tune_cmd.add_argument("--trials", type=int, required=True, help="trials to run now (the study keeps earlier ones)")
    tune_cmd.add_argument("--study", required=True, help="study name (continued when it exists in the storage)")
    tune_cmd.add_argument("--storage", required=True,
                          help="Optuna storage URL: sqlite:///study.db or postgresql+psycopg2://...")
    tune_cmd.add_argument("--out", required=True, help="folder for the trial folders and the retrained run "
                                               "(best_after_N_trials/)")
    tune_cmd.add_argument("--space", help="YAML/JSON search space (default: learning rate, entropy, layers, "
                                          "lookback, turnover penalty)")
    tune_cmd.add_argument("--seed", type=int, help="sampler seed (reproducible proposals)")
    tune_cmd.add_argument("--no-retrain", action="store_true", help="only run the trials")
    tune_cmd.set_defaults(run=_tune)

    data = commands.add_parser("data", help="market data commands").add_subparsers(dest="data_command", required=True)
    validate = data.add_parser("validate", help="run the quality gate on a CSV/parquet file")
    validate.add_argument("path")
    validate.add_argument("--symbol", type=_symbol)
    validate.add_argument("--interval", default="1d")
    validate.add_argument("--calendar", default="equity", choices=["equity", "crypto"])
    validate.set_defaults(run=_validate)
    ingest = data.add_parser("ingest", help="pull symbols into the data lake (raw -> gate -> curated)")
    ingest.add_argument("symbols", nargs="+", type=_symbol)
    ingest.add_argument("--lake", help="lake root: a folder or s3://bucket/prefix (default $ML_LAKE_ROOT)")
    ingest.add_argument("--source", default="sample", choices=["sample", "file", "yfinance"])
    ingest.add_argument("--path", help="for --source file: a folder of SYMBOL.csv files or a {symbol} pattern")
    ingest.add_argument("--interval", default="1d")
    ingest.add_argument("--start")
    ingest.set_defaults(run=_ingest)
    suites = data.add_parser("build-suites", help="write the GX suites into great_expectations/")
    suites.set_defaults(run=_build_suites)

    summary = commands.add_parser("summary", help="registry summary of a model")
    summary.add_argument("--model", required=True)
    summary.add_argument("--tracking-uri")
    summary.set_defaults(run=_summary)

    config = commands.add_parser("config", help="print the effective pipeline config as YAML")
    config.add_argument("file", nargs="?", help="config file to merge over the defaults")
    config.set_defaults(run=_config)

    reg = commands.add_parser("registry", help="move the champion alias by hand").add_subparsers(
        dest="registry_command", required=True)
    promote = reg.add_parser("promote", help="make a version that passed its gate the champion")
    promote.add_argument("--model", required=True)
    promote.add_argument("--version", required=True)
    rollback = reg.add_parser("rollback", help="re-point champion to the version it replaced (or --to)")
    rollback.add_argument("--model", required=True)
    rollback.add_argument("--to", help="version to roll back to (default: the previous champion)")
    for sub in (promote, rollback):
        sub.add_argument("--tracking-uri")
        sub.set_defaults(run=_registry)

    serve = commands.add_parser("serve", help="target exposure (or portfolio weights) for the latest bars of "
                                              "CSV/parquet files")
    serve.add_argument("--model", required=True, help="models:/NAME@champion, models:/NAME/VERSION or a .onnx path")
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--bars", nargs="+",
                        help="CSV/parquet with at least `lookback` bars; a portfolio model takes one file per asset, "
                             "in the order of its symbols")
    source.add_argument("--http", action="store_true",
                        help="answer POST /decide and /decide/batch over HTTP instead (GET /health, /model); "
                             "a models:/NAME@ALIAS model is reloaded when the alias moves")
    serve.add_argument("--position", type=float, default=0.0, help="current exposure in [-1, 1]")
    serve.add_argument("--weights", type=float, nargs="+", help="portfolio: current weight of each asset")
    serve.add_argument("--nav", type=float, default=1.0,
                       help="risk-overlay models: the account's value at the last bar's close")
    serve.add_argument("--risk-state", help="risk-overlay models: the risk_state the previous decision printed "
                                            "(JSON list; none for a fresh account)")
    serve.add_argument("--max-age", type=_age,
                       help="refuse bars whose last timestamp is older than this (e.g. 36h, 3d; default: no limit)")
    serve.add_argument("--tracking-uri")
    http = serve.add_argument_group("HTTP service (--http)")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument("--reload-interval", type=float, default=30.0, metavar="SECONDS",
                      help="how often to ask the registry where the alias points (0: never)")
    http.add_argument("--max-batch", type=int, default=4096, help="most windows in one /decide/batch request")
    http.add_argument("--intra-op-threads", type=int,
                      help="onnxruntime threads per model call (default: one per core)")
    serve.set_defaults(run=_serve)

    fwd = commands.add_parser("forward", help="paper-trade champions on new curated bars and monitor them")
    fwd.add_argument("--model", action="append", help="registered model (repeatable; default: every champion)")
    fwd.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI)")
    fwd.add_argument("--lake", help="lake root: a folder or s3://bucket/prefix (default $ML_LAKE_ROOT)")
    fwd.add_argument("--ledger", help="SQLAlchemy URL of the ledger (default $ML_FORWARD_DB, else SQLite in "
                                      "$ML_RUNS_DIR/forward_test.db)")
    fwd.add_argument("--out", default="runs/forward_test/cli", help="folder for each model's page and files")
    fwd.add_argument("--min-bars", type=int, default=20, help="live bars before the rules judge (default 20)")
    fwd.add_argument("--rollback-on-breach", action="store_true", help="move champion back on a breach")
    fwd.set_defaults(run=_forward)

    panel = commands.add_parser("panel", help="one policy across many symbols, judged per symbol and on a "
                                              "held-out one beside per-symbol policies and buy-and-hold")
    panel.add_argument("--hold-out", type=_symbol, required=True, help="the symbol the panel never trains on")
    compare = commands.add_parser("compare", help="model options on the same symbols, folds and seeds, beside "
                                                  "the reference config and buy-and-hold")
    compare.add_argument("--name", default="base", help="the reference config's name in the table (default base)")
    compare.add_argument("--variant", action="append", default=[], required=True,
                         help="NAME=CONFIG_FILE: settings merged over --config (repeatable)")
    for command, run, what in ((panel, _panel, "panel.json and panel.onnx"), (compare, _compare, "compare.json")):
        command.add_argument("--data", required=True, help="folder of <SYMBOL>.csv bar files")
        command.add_argument("--symbols", nargs="+", type=_symbol, required=True, help="the symbols")
        command.add_argument("--seeds", nargs="+", type=int, default=[1], help="training seeds (default 1)")
        command.add_argument("--start", help="first date to read (default: every bar)")
        command.add_argument("--end", help="last date to read")
        command.add_argument("--timesteps", type=int, help="PPO timesteps per single-symbol policy and fold")
        command.add_argument("--device", help="auto | cpu | cuda")
        command.add_argument("--config", help="YAML/JSON config file")
        command.add_argument("--out", required=True, help=f"folder for {what}")
        command.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow", "great_expectations", "httpx", "onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as error:  # one line naming the field; the traceback only when asked for
        if args.debug:
            raise
        print(f"config error: {error}", file=sys.stderr)
        return 2
