"""The promotion gate: which version may become `champion`.

The gate is an explicit policy (``GateConfig``); every decision is written
onto the model version with its numbers and reasons (``ml.release.registry``),
and alias moves happen under the registry lock (``ml.release.lock``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ml.config import GateConfig, PipelineConfig
from ml.env.action_space import make_action_space
from ml.env.risk import RiskOverlay
from ml.evaluation.backtest import run_backtest
from ml.evaluation.statistics import sharpe_difference_bound
from ml.market.calendar import periods_per_year
from ml.market.series import MarketSeries
from ml.serving import Policy


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    numbers: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, ok: bool, reason: str, **numbers: float) -> None:
        self.checks[name] = bool(ok)
        self.reasons.append(("PASS " if ok else "FAIL ") + reason)
        self.numbers.update(numbers)
        self.passed = all(self.checks.values())

    def as_dict(self) -> dict:
        return {"passed": self.passed, "reasons": self.reasons, "checks": self.checks, "numbers": self.numbers}


def evaluate_gate(report: dict, parity: dict, gate: GateConfig, collapse_share: float,
                  champion_comparison: dict | None = None) -> GateDecision:
    """Apply the configured rules to a run's report; ``champion_comparison`` when a champion exists."""
    decision = GateDecision(passed=True)
    decision.add("onnx_parity", parity["passed"],
                 f"onnx parity: max |ort - torch| = {parity['max_abs_diff']:.2e} "
                 f"(tolerance {parity['tolerance']:.0e}) on {parity['windows']} real windows",
                 parity_max_abs_diff=parity["max_abs_diff"])
    tests = [fold["policy"]["test"] for fold in report["folds"]]
    finite = all(t.get(k) is not None and math.isfinite(t[k]) for t in tests
                 for k in ("total_return", "sharpe", "max_drawdown"))
    decision.add("finite_test_metrics", finite, "test metrics finite on every fold")
    trained = min(int(fold.get("training", {}).get("timesteps", 0)) for fold in report["folds"])
    if gate.min_timesteps:
        requested = report.get("ppo_total_timesteps")
        rounded = (f"; ppo.total_timesteps {requested:,} runs in whole updates of {report['ppo_batch_size']:,} steps"
                   if requested and requested != trained else "")
        decision.add("training_budget", trained >= gate.min_timesteps,
                     f"training budget: {trained:,} environment steps in the shortest fold "
                     f"(floor {gate.min_timesteps:,}{rounded})", trained_timesteps=trained)
    else:
        decision.reasons.append("OFF training-budget floor (disabled in the gate config)")
    if not gate.require_learned:
        decision.reasons.append("OFF learned-something rule (disabled in the gate config)")
    if not gate.require_no_collapse:
        decision.reasons.append("OFF no-collapse rule (disabled in the gate config)")
    if not gate.require_beats_cash:
        decision.reasons.append("OFF beats-cash rule (disabled in the gate config)")
    for rule, setting in (("beats-benchmark", gate.benchmark_psr), ("overfitting (PBO)", gate.max_pbo),
                          ("cost-survival", gate.cost_multiple)):
        if setting is None:
            decision.reasons.append(f"OFF {rule} rule (disabled in the gate config)")
    if gate.require_learned:
        _learned_something(decision, report)
    if gate.benchmark_psr is not None:
        _beats_benchmark(decision, report, gate.benchmark_psr)
    if gate.max_pbo is not None:
        _not_overfit(decision, report, gate.max_pbo)
    if gate.cost_multiple is not None:
        _survives_costs(decision, report, gate.cost_multiple)
    if gate.require_no_collapse:
        collapsed = [f["index"] for f in report["folds"] if f["policy"]["collapse"]["alarm"]]
        decision.add("no_collapse", not collapsed,
                     "no collapse alarm" if not collapsed else
                     f"collapse alarm on fold(s) {collapsed}: the deterministic policy made one decision "
                     f"on >= {collapse_share:.0%} of test bars")
    if gate.require_beats_cash and finite:
        mean_return = float(np.mean([t["total_return"] for t in tests]))
        decision.add("beats_cash", mean_return > gate.cash_margin,
                     f"mean test total return after costs {mean_return:+.2%} vs cash 0.00% "
                     f"(margin {gate.cash_margin:+.2%})", mean_test_total_return=mean_return)
    if not gate.compare_with_champion:
        decision.reasons.append("OFF champion comparison (disabled in the gate config)")
    if champion_comparison is not None:
        if champion_comparison.get("skipped"):
            decision.add("beats_champion", False, f"cannot compare with champion: {champion_comparison['skipped']}")
        else:
            c, h = champion_comparison["challenger_sharpe"], champion_comparison["champion_sharpe"]
            low, confidence = champion_comparison["difference_low"], champion_comparison["confidence"]
            decision.add("beats_champion", low > gate.champion_margin,
                         f"Sharpe {c:.2f} vs champion v{champion_comparison['champion_version']} {h:.2f} "
                         f"on {champion_comparison['start']}..{champion_comparison['end']} "
                         f"({champion_comparison['bars']} bars unseen by both): the difference {c - h:+.2f} is "
                         f"above {low:+.2f} with {confidence:.0%} confidence (margin {gate.champion_margin:.2f})",
                         challenger_sharpe=c, champion_sharpe=h, sharpe_difference_low=low)
    return decision


def _learned_something(decision: GateDecision, report: dict) -> None:
    """On validation, the policy beats every null baseline (random, cash) in most folds, after taking
    off what picking the best of its checkpoints would score by luck alone."""
    folds = report["folds"]

    def beats_nulls(fold: dict) -> bool:
        skill = fold["policy"]["validation"]["sharpe"] - fold["policy"].get("selection_allowance", 0.0)
        nulls = fold.get("validation_baselines") or {"missing": {"sharpe": math.inf}}
        return all(skill > null["sharpe"] for null in nulls.values())

    wins = sum(beats_nulls(fold) for fold in folds)
    names = sorted({name for fold in folds for name in fold.get("validation_baselines", {})}) or ["random", "cash"]
    allowance = float(np.mean([f["policy"].get("selection_allowance", 0.0) for f in folds]))
    decision.add("learned_something", wins > len(folds) / 2,
                 f"validation Sharpe, less {allowance:.2f} for picking the best checkpoint (mean over folds), above "
                 f"{' and '.join(names)} in {wins} of {len(folds)} folds (need a majority)",
                 validation_folds_beating_nulls=wins)


def onnx_decide(policy: Policy, ohlcv: np.ndarray):
    """A backtest decision function that runs an exported model on raw windows of ``ohlcv`` [T, A, 5].

    It returns the policy's own target; the backtest applies the risk overlay of the run, if any.
    """
    session, lookback = policy.session, policy.lookback
    # The graph's own names and window shape: [1, L, 5] + position, or [1, L, A, 5] + weights.
    (window_input, window_shape), (position_input, _), *risk_inputs = [(i.name, i.shape) for i in session.get_inputs()]
    target_output = session.get_outputs()[0].name
    shape = (1, *window_shape[1:])
    # A model with an overlay wants the account too; its first output (the policy's target) does not read it.
    account = ({"nav": np.ones((1, 1), np.float32), "session": np.zeros((1, 2), np.float32),
                "risk_state": policy.initial_risk_state(np.ones(1))} if risk_inputs else {})

    def decide(_features, position, t):
        window = ohlcv[t - lookback + 1:t + 1].reshape(shape).astype(np.float32)
        held = position.reshape(1, -1).cpu().numpy().astype(np.float32)
        out = session.run([target_output], {window_input: window, position_input: held, **account})[0]
        return torch.as_tensor(out.reshape(-1))

    return decide


def compare_on_unseen_window(challenger_onnx: Path, champion_onnx: Path, champion_version: str,
                             champion_train_end: str, series: MarketSeries, window: tuple[int, int],
                             gap: int, config: PipelineConfig) -> dict:
    """Backtest both exported models on the recent bars that neither trained on."""
    timestamps = series.timestamps
    first_unseen = int(timestamps.searchsorted(pd.Timestamp(champion_train_end), side="right")) + gap
    first, last = max(window[0], first_unseen), window[1]
    if last - first < 20:
        return {"skipped": f"fewer than 20 bars after both training windows (champion trained to {champion_train_end})"}
    ohlcv = series.ohlcv.numpy()
    ppy = periods_per_year(config.data.interval, config.data.calendar)
    sharpe, navs = {}, {}
    for name, path in (("challenger", challenger_onnx), ("champion", champion_onnx)):
        policy = Policy(path, prefer_gpu=False)
        if first < policy.lookback - 1:
            return {"skipped": f"{name} needs {policy.lookback} bars of history before the window"}
        backtest = run_backtest(onnx_decide(policy, ohlcv), series, (first, last), config.costs,
                                make_action_space(config.action, series.n_assets), ppy,
                                RiskOverlay.from_config(config, series.n_assets))
        sharpe[name], navs[name] = backtest.metrics(ppy)["sharpe"], backtest.nav
    confidence = config.gate.champion_confidence
    _, low = sharpe_difference_bound(navs["challenger"], navs["champion"], ppy, confidence)
    return {"challenger_sharpe": sharpe["challenger"], "champion_sharpe": sharpe["champion"],
            "difference_low": low, "confidence": confidence,
            "champion_version": champion_version, "start": timestamps.iloc[first].date().isoformat(),
            "end": timestamps.iloc[last].date().isoformat(), "bars": last - first}


def _beats_benchmark(decision: GateDecision, report: dict, threshold: float) -> None:
    """The active return over every test bar is positive with probability >= threshold (PSR vs 0)."""
    active = report.get("active_return")
    if not active or active.get("psr") is None:
        decision.add("beats_benchmark", False, "beats the benchmark: the report has no active-return statistics")
        return
    label = active["benchmark"].replace("_", " ")
    decision.add("beats_benchmark", active["psr"] >= threshold,
                 f"beats {label} after costs: probabilistic Sharpe of the active return {active['psr']:.1%} over "
                 f"{active['bars']} test bars (need {threshold:.0%}; annualized active return "
                 f"{active['annualized_mean']:+.2%})", active_return_psr=active["psr"])


def _not_overfit(decision: GateDecision, report: dict, limit: float) -> None:
    """The probability that the selection picked an overfit checkpoint stays below the limit."""
    pbo = report.get("pbo")
    if not pbo:
        decision.add("low_pbo", False, "probability of backtest overfitting: fewer than two trials to measure it")
        return
    decision.add("low_pbo", pbo["value"] < limit,
                 f"probability of backtest overfitting {pbo['value']:.0%} over {pbo['trials']} validation trials "
                 f"in {pbo['folds']} folds (must be below {limit:.0%})", pbo=pbo["value"])


def _survives_costs(decision: GateDecision, report: dict, multiple: float) -> None:
    """At ``multiple`` times the costs, the same test decisions still beat the benchmark and cash."""
    sensitivity = report.get("cost_sensitivity", {})
    key, sharpe = f"{multiple:g}x", sensitivity.get("mean_test_sharpe", {})
    benchmark = next((name for name in sharpe if name not in ("policy", "cash")), None)
    if benchmark is None or key not in sharpe.get("policy", {}):
        decision.add("survives_costs", False, f"edge at {key} costs: the report has no replay at that multiple")
        return
    policy, passive = sharpe["policy"][key], sharpe[benchmark][key]
    decision.add("survives_costs", policy > passive and policy > 0.0,
                 f"edge at {key} costs: mean test Sharpe {policy:.2f} vs {benchmark.replace('_', ' ')} {passive:.2f} "
                 f"and cash 0.00", sharpe_at_cost_multiple=policy)
