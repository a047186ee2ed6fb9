"""What the risk overlay did on the test windows: when each rule fired, how much exposure it took
off, and the policy and the benchmark with and without it on the same bars and costs.

"Without" runs the same trained policy (and the same benchmark) with nothing between the
target and the fill, so the difference is the overlay's doing alone.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ml.env.risk import BREAKERS, RULES
from ml.evaluation.backtest import Backtest

RESULT_KEYS = ("total_return", "annualized_return", "annualized_volatility", "sharpe", "max_drawdown",
               "average_exposure", "annual_turnover")
FIRED = 1e-9  # exposure removed (or added) below this is no intervention


def rule_activity(backtest: Backtest) -> dict[str, dict]:
    """Per rule: decision bars it changed, their share, the gross exposure it removed on them
    (negative: added, as volatility targeting does in calm markets), its trips and the first
    and last bar it acted on."""
    stamps = backtest.timestamps.iloc[:-1].dt.strftime("%Y-%m-%d %H:%M").str.removesuffix(" 00:00").to_numpy()
    out = {}
    for i, rule in enumerate(RULES):
        removed = backtest.interventions[:, i]
        acted = np.abs(removed) > FIRED
        dates = stamps[acted]
        out[rule] = {
            "bars": int(acted.sum()), "share": float(acted.mean()) if acted.size else 0.0,
            "mean_exposure_removed": float(removed[acted].mean()) if acted.any() else 0.0,
            "first": str(dates[0]) if dates.size else None, "last": str(dates[-1]) if dates.size else None,
        }
        if rule in BREAKERS:
            out[rule]["trips"] = int(backtest.trips[:, BREAKERS.index(rule)].sum())
    return out


def intervention_log(backtest: Backtest) -> pd.DataFrame:
    """Every decision of a backtest through the overlay: the policy's target, the executed one, the
    exposure each rule removed and the breakers that tripped (one row per decision bar)."""
    frame = {"timestamp": backtest.timestamps.iloc[:-1].to_numpy()}
    for i, symbol in enumerate(backtest.symbols):
        suffix = f"_{symbol}" if len(backtest.symbols) > 1 else ""
        frame[f"policy_target{suffix}"] = backtest.decision[:, i]
        frame[f"executed_target{suffix}"] = backtest.executed[:, i]
    frame |= {f"removed_{rule}": backtest.interventions[:, i] for i, rule in enumerate(RULES)}
    frame |= {f"tripped_{rule}": backtest.trips[:, i] for i, rule in enumerate(BREAKERS)}
    return pd.DataFrame(frame)


def fold_risk(managed: dict[str, Backtest], unmanaged: dict[str, Backtest], ppy: float) -> dict:
    """One fold's risk section: the policy's rule activity and each name's results with and without the overlay."""

    def results(backtests: dict[str, Backtest]) -> dict:
        return {name: {k: bt.metrics(ppy)[k] for k in RESULT_KEYS} for name, bt in backtests.items()}

    return {"rules": rule_activity(managed["policy"]), "with_overlay": results(managed),
            "without_overlay": results(unmanaged)}


def run_risk(folds: list[dict], config: dict) -> dict | None:
    """The run's risk section: the settings, the rules' activity summed over folds, and the mean
    results with and without the overlay. None when the run had no overlay."""
    sections = [f["risk"] for f in folds if "risk" in f]
    if not sections:
        return None
    rules = {}
    for rule in RULES:
        rows = [s["rules"][rule] for s in sections]
        bars = sum(r["bars"] for r in rows)
        rules[rule] = {"bars": bars, "folds_acting": sum(r["bars"] > 0 for r in rows),
                       "mean_exposure_removed": (sum(r["mean_exposure_removed"] * r["bars"] for r in rows) / bars
                                                 if bars else 0.0)}
        if rule in BREAKERS:
            rules[rule]["trips"] = sum(r["trips"] for r in rows)

    def mean(side: str) -> dict:
        names = sections[0][side]
        return {name: {k: float(np.mean([s[side][name][k] for s in sections])) for k in RESULT_KEYS}
                for name in names}

    return {"settings": config, "rules": rules, "with_overlay": mean("with_overlay"),
            "without_overlay": mean("without_overlay")}


def risk_metrics(risk: dict) -> dict[str, float]:
    """The run's risk section as flat MLflow metrics."""
    flat = {}
    for side in ("with_overlay", "without_overlay"):
        for name, values in risk[side].items():
            flat.update({f"risk/{side}/{name}/{k}": v for k, v in values.items()})
    for rule, values in risk["rules"].items():
        flat[f"risk/rules/{rule}/bars"] = values["bars"]
        if "trips" in values:
            flat[f"risk/rules/{rule}/trips"] = values["trips"]
    return flat
