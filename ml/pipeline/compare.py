"""Model options judged on the same symbols, folds and seeds: each variant config beside the reference.

    python -m ml compare --data DIR --symbols GSPC KO ... --config base.yaml --name mlp \\
        --variant conv=encoder.yaml --seeds 1 2 3 --out runs/compare

Per symbol, fold and seed, every config trains its policy with the pipeline's own fold training
(selection on validation) and is backtested on the fold's test window; buy-and-hold runs once
per fold on the same bars and costs. When a config selects among rule strategies, each rule runs
alone too, and the best of them on each test window (known only in hindsight) is reported beside.
The folds are laid out once per symbol, so every config must keep the reference's lookback and splits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from ml.agent.ppo import resolve_device
from ml.config import ConfigError, PipelineConfig
from ml.env.action_space import make_action_space
from ml.env.risk import RiskOverlay
from ml.evaluation.backtest import run_baselines
from ml.evaluation.comparison import BEST_RULE, PASSIVE, backtest_row, summarize_comparison
from ml.evaluation.splits import walk_forward_folds
from ml.evaluation.walkforward import backtest_policy, train_fold
from ml.market.calendar import periods_per_year
from ml.market.series import prepare_series
from ml.pipeline.rundir import write_json

log = logging.getLogger(__name__)
RESULT_FILE = "compare.json"


def check_comparable(configs: dict[str, PipelineConfig]) -> None:
    """Every config must see the same folds and trade one symbol."""
    names = list(configs)
    reference = configs[names[0]]
    for name, config in configs.items():
        if not config.action.one_asset:
            raise ConfigError(f"{name}: compares single-symbol policies; action.mode portfolio is not one")
        if config.lookback != reference.lookback or config.splits != reference.splits:
            raise ConfigError(f"{name}: lookback and splits must equal {names[0]}'s, so that every "
                              "model is judged on the same folds")
        if config.costs != reference.costs or config.data != reference.data or config.ppo.device != reference.ppo.device:
            raise ConfigError(f"{name}: costs, data and ppo.device must equal {names[0]}'s: a variant changes "
                              "the model, not the market it is judged on")
        if config.action.selects_strategies and config.risk != reference.risk:
            raise ConfigError(f"{name}: a rule-selection variant keeps {names[0]}'s risk rules, so that it, its "
                              "rules alone and buy-and-hold run under the same ones")


def run_comparison(configs: dict[str, PipelineConfig], frames: dict[str, pd.DataFrame], seeds: list[int],
                   out_dir: Path) -> dict:
    """Train and backtest every config on every symbol, fold and seed; write ``compare.json`` and return it.

    ``configs``: model name -> config, the reference first."""
    check_comparable(configs)
    names = list(configs)
    reference = configs[names[0]]
    device = resolve_device(reference.ppo.device)
    ppy = periods_per_year(reference.data.interval, reference.data.calendar)
    space = make_action_space(reference.action, 1)
    # The first config that selects among rules sets the rules judged alone, in its exposure range.
    selector = next((name for name, config in configs.items() if config.action.selects_strategies), None)
    rules = [rule for rule in configs[selector].action.strategies if rule != PASSIVE] if selector else []
    judged = names[1:] + names[:1] + [PASSIVE] + rules + ([BEST_RULE] if selector else [])
    out_dir = Path(out_dir)
    result = {"models": names, "judged": judged, "symbols": list(frames), "seeds": seeds,
              "configs": {name: config.to_dict() for name, config in configs.items()}, "complete": False, "rows": []}
    write_json(out_dir / RESULT_FILE, result)  # an unwritable folder fails now, not after the training
    rows, started = result["rows"], time.perf_counter()
    for symbol, frame in frames.items():
        # The features differ when a config adds the return window for its encoder.
        series = {name: prepare_series({symbol: frame}, config.lookback, device, config.return_window,
                                     config.action.selects_strategies)
                  for name, config in configs.items()}
        folds = walk_forward_folds(series[names[0]].timestamps, reference.lookback, reference.splits)
        for fold in folds:
            # Folds are named by their test window's first day: symbols with other histories have
            # other test years, and the summary pairs and resamples by period.
            period = fold.dates(series[names[0]].timestamps)["test"]["start"][:10]
            hold = run_baselines(series[names[0]], fold.test, reference.costs, space, names=(space.benchmark,),
                                 periods_per_year=ppy, risk=RiskOverlay.from_config(reference, 1))
            rows.append(backtest_row(period, None, symbol, PASSIVE, hold[space.benchmark], ppy))
            if selector:
                rows += rule_rows(configs[selector], series[selector], fold, period, symbol, ppy)
            for seed in seeds:
                for name, config in configs.items():
                    seeded = replace(config, ppo=replace(config.ppo, seed=seed, progress=False))
                    agent = train_fold(series[name], fold, seeded).agent
                    rows.append(backtest_row(period, seed, symbol, name,
                                             backtest_policy(agent, series[name], fold.test, seeded), ppy))
            log.info("%s fold %d (test from %s): %s trained with seeds %s", symbol, fold.index, period,
                     ", ".join(names), seeds)
            write_json(out_dir / RESULT_FILE, result)  # the backtests so far survive a later failure
    # Variants first: the table reads "conv beats mlp in k of n".
    result |= {"summary": summarize_comparison(rows, judged),
               "wall_seconds": round(time.perf_counter() - started, 1), "complete": True}
    write_json(out_dir / RESULT_FILE, result)
    return result


def rule_rows(config: PipelineConfig, series, fold, period: str, symbol: str, ppy: float) -> list[dict]:
    """Each rule the config selects among, alone on the fold's test window (buy-and-hold has its own
    row), and a copy of the best one's row as ``best_rule_in_hindsight`` naming it."""
    space = make_action_space(config.action, 1)
    tests = run_baselines(series, fold.test, config.costs, space, names=space.strategies, periods_per_year=ppy,
                          risk=RiskOverlay.from_config(config, 1))
    rows = {name: backtest_row(period, None, symbol, name, tests[name], ppy) for name in space.strategies}
    best = max(rows.values(), key=lambda row: row["sharpe"])
    return [row for name, row in rows.items() if name != PASSIVE] + [best | {"model": BEST_RULE, "rule": best["model"]}]
