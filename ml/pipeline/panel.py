"""One policy across a universe, judged beside a model per symbol and buy-and-hold on the same folds.

    python -m ml panel --data DIR --symbols AAPL AMD ... --hold-out KO --seeds 1 2 3 --out DIR

Per fold and seed:
- the panel policy trains on every symbol but the held-out one, episodes drawn across them,
  each symbol's features standardized with its own training-window statistics; it keeps the
  checkpoint with the best mean validation score over those symbols;
- a per-symbol policy trains on each symbol alone (the pipeline's own fold training, same config
  and seed), the held-out symbol included, so every symbol has its specialist;
- every policy and buy-and-hold are backtested on each symbol's test window, same bars and costs.

Fair budget: the panel trains for ``total_timesteps`` times the number of its symbols, what the
per-symbol models of those symbols spend together. The most recent fold's panel (first seed) is
exported once to ONNX, every symbol's statistics in its metadata, parity checked on real windows
of every symbol, the held-out one included.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ml.agent.checkpoint import seed_everything
from ml.agent.policy import ActorCritic, PanelExportPolicy, model_options
from ml.agent.ppo import TrainResult, resolve_device, train
from ml.config import ConfigError, PipelineConfig
from ml.env.action_space import make_action_space
from ml.env.risk import RiskOverlay
from ml.env.trading_env import TradingEnv
from ml.evaluation.backtest import Backtest, run_baselines
from ml.evaluation.comparison import backtest_row, summarize_comparison
from ml.evaluation.metrics import bar_returns
from ml.evaluation.splits import Fold, walk_forward_folds
from ml.evaluation.walkforward import backtest_policy, selection_score, train_fold
from ml.market.calendar import periods_per_year
from ml.market.features import FEATURE_SET_VERSION
from ml.market.panel import Panel, build_panel
from ml.pipeline.rundir import code_version, write_json
from ml.release.export import check_parity, export_onnx, real_windows

log = logging.getLogger(__name__)
RESULT_FILE, MODEL_FILE = "panel.json", "panel.onnx"


def check_panel_config(config: PipelineConfig) -> None:
    if not config.action.one_asset or config.action.selects_strategies:
        raise ConfigError(f"action.mode {config.action.mode}: a panel policy trades one symbol at a time with "
                          "exposure levels or a continuous exposure (discrete or continuous)")
    if RiskOverlay.from_config(config, 1) is not None:
        raise ConfigError("the risk overlay is not supported for panel policies; turn the risk: rules off")
    if config.ppo.regime_states:
        raise ConfigError(f"ppo.regime_states = {config.ppo.regime_states}: the regime model is fitted on one "
                          "symbol's raw returns; a panel policy sees standardized ones (set it to 0)")


def train_panel(panel: Panel, fold: Fold, config: PipelineConfig, symbols: list[str], seed: int) -> TrainResult:
    """The panel policy of one fold and seed, trained on ``symbols`` and selected on their validation windows."""
    ppo = replace(config.ppo, seed=seed, total_timesteps=config.ppo.total_timesteps * len(symbols))
    seed_everything(seed, ppo.deterministic)
    stacked = panel.stacked(fold.train)
    # The features arrive standardized per symbol, so the policy's own normalization stays 0 and 1.
    agent = ActorCritic(panel.n_features, make_action_space(config.action, 1), **model_options(ppo))
    env_config = replace(config.env, periods_per_year=periods_per_year(config.data.interval, config.data.calendar))
    env = TradingEnv(stacked, ppo.num_envs, agent.action_space, config.costs, env_config, record_risk=False)

    def validate(candidate: ActorCritic) -> tuple[float, np.ndarray]:
        tests = [backtest_policy(candidate, stacked, panel.block(s, fold.validation), config, with_risk=False)
                 for s in symbols]
        score = float(np.mean([selection_score(bt, config) for bt in tests]))
        return score, np.mean([bar_returns(bt.nav) for bt in tests], axis=0)

    segments = [panel.block(s, fold.train) for s in symbols]
    return train(ppo, env, agent.to(stacked.device), segments, validate,
                 collapse_share=config.action.collapse_share)


def panel_backtests(agent: ActorCritic, panel: Panel, fold: Fold, config: PipelineConfig) -> dict[str, Backtest]:
    """The panel policy on every symbol's test window, each with its own training statistics."""
    stacked = panel.stacked(fold.train)
    return {s: backtest_policy(agent, stacked, panel.block(s, fold.test), config, with_risk=False)
            for s in panel.symbols}


def run_panel(config: PipelineConfig, frames: dict[str, pd.DataFrame], held_out: str, seeds: list[int],
              out_dir: Path) -> dict:
    """Train and judge the panel; write ``panel.json`` (every backtest's metrics and the summary) and
    ``panel.onnx`` into ``out_dir``; return the result."""
    check_panel_config(config)
    if held_out not in frames:
        raise ConfigError(f"held-out symbol {held_out!r} is not among the symbols {sorted(frames)}")
    device = resolve_device(config.ppo.device)
    panel = build_panel(frames, config.lookback, device, config.return_window)
    trained_on = [s for s in panel.symbols if s != held_out]
    folds = walk_forward_folds(panel.timestamps, config.lookback, config.splits)
    ppy = periods_per_year(config.data.interval, config.data.calendar)
    space = make_action_space(config.action, 1)
    log.info("panel of %d symbols (%s held out), %d bars each, %d folds, seeds %s", len(panel.symbols), held_out,
             panel.n_bars, len(folds), seeds)
    out_dir = Path(out_dir)
    result = {"symbols": panel.symbols, "held_out": held_out, "seeds": seeds,
              "folds": [fold.dates(panel.timestamps) | {"index": fold.index} for fold in folds],
              "panel_timesteps": config.ppo.total_timesteps * len(trained_on),
              "per_symbol_timesteps": config.ppo.total_timesteps, "complete": False, "rows": []}
    write_json(out_dir / RESULT_FILE, result)  # an unwritable folder fails now, not after the training
    rows, started, exported = result["rows"], time.perf_counter(), None
    for fold in folds:
        dates = fold.dates(panel.timestamps)
        for symbol in panel.symbols:
            series = panel.series[symbol]
            hold = run_baselines(series, fold.test, config.costs, space, names=(space.benchmark,),
                                 periods_per_year=ppy)[space.benchmark]
            rows.append(backtest_row(fold.index, None, symbol, "buy_and_hold", hold, ppy))
        for seed in seeds:
            trained = train_panel(panel, fold, config, trained_on, seed)
            for symbol, backtest in panel_backtests(trained.agent, panel, fold, config).items():
                rows.append(backtest_row(fold.index, seed, symbol, "panel", backtest, ppy))
            if fold is folds[-1] and exported is None:
                exported = trained.agent
            single = replace(config, ppo=replace(config.ppo, seed=seed, progress=False))
            for symbol in panel.symbols:
                specialist = train_fold(panel.series[symbol], fold, single).agent
                test = backtest_policy(specialist, panel.series[symbol], fold.test, config, with_risk=False)
                rows.append(backtest_row(fold.index, seed, symbol, "per_symbol", test, ppy))
            log.info("fold %d (test %s..%s) seed %d: panel and %d per-symbol policies trained", fold.index,
                     dates["test"]["start"][:10], dates["test"]["end"][:10], seed, len(panel.symbols))
        write_json(out_dir / RESULT_FILE, result)  # the backtests so far survive a later failure
    result |= {"summary": summarize(rows, held_out),
               "export": export_panel(exported, panel, folds[-1], config, held_out, out_dir / MODEL_FILE),
               "wall_seconds": round(time.perf_counter() - started, 1), "complete": True}
    write_json(out_dir / RESULT_FILE, result)
    return result


def export_panel(agent: ActorCritic, panel: Panel, fold: Fold, config: PipelineConfig, held_out: str,
                 path: Path) -> dict:
    """One ONNX for every symbol: the panel's statistics per symbol in the metadata; parity per symbol."""
    first_series = panel.series[panel.symbols[0]]
    policy = PanelExportPolicy(copy.deepcopy(first_series.feature_module).cpu(), copy.deepcopy(agent).cpu()).eval()
    stats = {s: panel.normalization(s, fold.train).cpu() for s in panel.symbols}
    dates = fold.dates(panel.timestamps)
    metadata = {
        "lookback": config.lookback, "interval": config.data.interval, "symbol": ",".join(panel.symbols),
        "panel_symbols": ",".join(s for s in panel.symbols if s != held_out), "held_out": held_out,
        "feature_set_version": FEATURE_SET_VERSION, "features": ",".join(policy.features.names),
        "action_semantics": policy.action_space.semantics(), "action_mode": policy.action_space.mode,
        "close_only": str(not bool(first_series.fill_at_open.all())).lower(),
        "training_window": f"{dates['train']['start']}/{dates['train']['end']}",
        "validation_window": f"{dates['validation']['start']}/{dates['validation']['end']}",
        "normalization": json.dumps({s: v.tolist() for s, v in stats.items()}),
        "code_version": code_version(),
    }
    export_onnx(policy, path, metadata)
    parity = {}
    for symbol in panel.symbols:
        ohlcv = panel.series[symbol].ohlcv.cpu().numpy()
        windows, positions = real_windows(policy, ohlcv, fold.test[0], fold.test[1], config.gate.parity_windows)
        normalization = np.broadcast_to(stats[symbol].numpy(), (len(windows),) + tuple(stats[symbol].shape))
        parity[symbol] = check_parity(policy, path, windows, positions, normalization=normalization).as_dict()
    return {"path": path.name, "fold": fold.index, "parity": parity,
            "parity_passed": all(p["passed"] for p in parity.values())}


def summarize(rows: list[dict], held_out: str) -> dict:
    """Panel against per-symbol policies and buy-and-hold on the same fold, seed and symbol."""
    return summarize_comparison(rows, ["panel", "per_symbol", "buy_and_hold"], held_out)
