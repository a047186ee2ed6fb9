"""Combinatorial purged cross-validation results: each split's policy on its test groups, recombined into paths.

Every CPCV split trained its own policy (``ml.evaluation.splits.cpcv_folds``). Each test group is
backtested once by every split that tests it, starting flat at the group's first bar. A backtest
path (``cpcv_paths``) takes one split's result per group, so it covers the whole history once;
its bar returns are the groups' returns back to back. The benchmark runs on the same group
segments with the same costs and risk overlay. The path Sharpe ratios are a distribution of
out-of-sample outcomes, where walk-forward gives one. Nothing here feeds back into selection.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ml.agent.policy import ActorCritic
from ml.agent.threads import torch_threads
from ml.config import PipelineConfig
from ml.env.action_space import make_action_space
from ml.env.risk import RiskOverlay
from ml.evaluation.backtest import Backtest, run_baselines
from ml.evaluation.metrics import summarize
from ml.evaluation.overfitting import probability_of_backtest_overfitting
from ml.evaluation.splits import CPCVFold, cpcv_paths
from ml.evaluation.walkforward import backtest_policy
from ml.market.calendar import periods_per_year
from ml.market.series import MarketSeries

PBO_BLOCKS = 8  # CSCV blocks of each split's validation bars, as for the walk-forward folds


def chain(backtests: list[Backtest]) -> dict[str, np.ndarray]:
    """Backtests one after another as one account: NAV compounds across them, costs scale with it.

    Each backtest starts flat at NAV 1; the next one starts with the NAV the previous ended on.
    """
    nav, position, traded, cost, scale = [np.ones(1)], [], [], [], 1.0
    for backtest in backtests:
        nav.append(scale * backtest.nav[1:])
        position.append(np.abs(backtest.weights[1:]).sum(axis=1))
        traded.append(backtest.traded)
        cost.append(scale * backtest.cost)
        scale *= float(backtest.nav[-1])
    return {"nav": np.concatenate(nav), "position": np.concatenate(position), "traded": np.concatenate(traded),
            "cost": np.concatenate(cost)}


def chained_metrics(backtests: list[Backtest], ppy: float) -> dict[str, float]:
    joined = chain(backtests)
    return summarize(joined["nav"], joined["position"], joined["traded"], joined["cost"], ppy)


def distribution(values: list[float]) -> dict:
    array = np.asarray(values, dtype="float64")
    return {"values": [float(v) for v in array], "mean": float(array.mean()),
            "std": float(array.std(ddof=1)) if array.size > 1 else 0.0, "min": float(array.min()),
            "median": float(np.median(array)), "max": float(array.max())}


def split_pbo(validation_returns: np.ndarray | None) -> dict | None:
    """PBO (CSCV) over every checkpoint x seed a split's selection scored on its validation bars."""
    if validation_returns is None or validation_returns.shape[0] < 2 or validation_returns.shape[1] < PBO_BLOCKS:
        return None
    return probability_of_backtest_overfitting(validation_returns.T, n_blocks=PBO_BLOCKS)


def cpcv_report(agents: dict[int, ActorCritic], series: MarketSeries, folds: list[CPCVFold], groups: list[tuple],
                config: PipelineConfig, trainings: dict[int, dict],
                validation_returns: dict[int, np.ndarray | None]) -> tuple[dict, pd.DataFrame]:
    """The report's ``cpcv`` section, and the path NAV curves (timestamp, path_K..., benchmark).

    ``agents``, ``trainings`` and ``validation_returns`` are per split index: the kept policy, its
    training summary, and the validation returns [trials, bars] of every checkpoint its seeds scored.
    """
    # Every bar of every path is a one-row forward: one thread runs those fastest, on a busy machine too.
    with torch_threads(1):
        return _cpcv_report(agents, series, folds, groups, config, trainings, validation_returns)


def _cpcv_report(agents: dict[int, ActorCritic], series: MarketSeries, folds: list[CPCVFold], groups: list[tuple],
                 config: PipelineConfig, trainings: dict[int, dict],
                 validation_returns: dict[int, np.ndarray | None]) -> tuple[dict, pd.DataFrame]:
    splits = config.splits
    ppy = periods_per_year(config.data.interval, config.data.calendar)
    space = make_action_space(config.action, series.n_assets)
    risk = RiskOverlay.from_config(config, series.n_assets)
    agents = {index: agent.to(series.device).eval() for index, agent in agents.items()}
    # One backtest per (split, test group), and the benchmark once per group: it learns nothing.
    tested = {(fold.index, group): backtest_policy(agents[fold.index], series, segment, config)
              for fold in folds for group, segment in zip(fold.test_groups, fold.test)}
    segments = {g: s for fold in folds for g, s in zip(fold.test_groups, fold.test)}
    benchmark = {g: run_baselines(series, segments[g], config.costs, space, seed=0, names=(space.benchmark,),
                                  periods_per_year=ppy, risk=risk)[space.benchmark] for g in sorted(segments)}

    split_rows, pbos = [], []
    for fold in folds:
        pbo = split_pbo(validation_returns.get(fold.index))
        pbos += [pbo] if pbo else []
        validation = backtest_policy(agents[fold.index], series, fold.validation, config)
        split_rows.append({
            "index": fold.index, "test_groups": list(fold.test_groups), "validation_group": fold.validation_group,
            **fold.dates(series.timestamps),
            "training": trainings[fold.index],
            "policy": {"validation": validation.metrics(ppy),
                       "test": chained_metrics([tested[fold.index, g] for g in fold.test_groups], ppy)},
            "benchmark": {"test": chained_metrics([benchmark[g] for g in fold.test_groups], ppy)},
            "pbo": pbo})

    recombined = cpcv_paths(splits.n_groups, splits.n_test_groups)
    benchmark_path = [benchmark[g] for g in range(splits.n_groups)]
    benchmark_metrics = chained_metrics(benchmark_path, ppy)
    path_rows, curves = [], {}
    for path in range(recombined.shape[1]):
        pieces = [tested[int(recombined[g, path]), g] for g in range(splits.n_groups)]
        path_rows.append({"index": path, "splits": [int(s) for s in recombined[:, path]],
                          "policy": chained_metrics(pieces, ppy), "benchmark": benchmark_metrics})
        curves[f"path_{path}"] = chain(pieces)["nav"]
    # The groups' segments share their boundary bars, so the path's bars are each group's but the first.
    stamps = pd.concat([benchmark_path[0].timestamps] + [b.timestamps.iloc[1:] for b in benchmark_path[1:]])
    frame = pd.DataFrame({"timestamp": stamps.to_numpy(), **curves, space.benchmark: chain(benchmark_path)["nav"]})

    policy_sharpes = [row["policy"]["sharpe"] for row in path_rows]
    beating = sum(s > benchmark_metrics["sharpe"] for s in policy_sharpes)
    section = {
        "n_groups": splits.n_groups, "n_test_groups": splits.n_test_groups, "n_splits": len(folds),
        "n_paths": len(path_rows), "benchmark": space.benchmark,
        "groups": [{"index": g, "start": series.timestamps.iloc[a].isoformat(),
                    "end": series.timestamps.iloc[b].isoformat(), "first_bar": int(a), "last_bar": int(b)}
                   for g, (a, b) in enumerate(groups)],
        "splits": split_rows,
        "paths": path_rows,
        "path_sharpe": {"policy": distribution(policy_sharpes),
                        space.benchmark: distribution([benchmark_metrics["sharpe"]] * len(path_rows))},
        "paths_beating_benchmark": f"{beating}/{len(path_rows)}",
        "pbo": ({"value": float(np.mean([p["pbo"] for p in pbos])), "splits": len(pbos),
                 "trials": int(sum(p["n_trials"] for p in pbos)),
                 "per_split": [row["pbo"]["pbo"] if row["pbo"] else None for row in split_rows]}
                if pbos else None),
    }
    return section, frame
