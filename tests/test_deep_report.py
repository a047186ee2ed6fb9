"""A pipeline run's report carries the deep evaluation under stable keys, the gate reads it, the page opens
with the verdict, and nothing the evaluation adds (stress windows, cost replays, PBO, SPA) changes what
training selected."""

from __future__ import annotations

import hashlib
import json
import re

import pandas as pd
import pytest

from ml.config import config_from_dict
from ml.pipeline import evaluate, run_pipeline

CONFIG = {
    "data": {"source": "sample", "symbol": "GSPC"},
    "ppo": {"total_timesteps": 8192, "num_envs": 64, "num_steps": 32, "eval_every": 1, "progress": False},
    "splits": {"n_folds": 2},
    "gate": {"parity_windows": 32},
    # The overlay on: every section below is computed through it, and the report shows it.
    "risk": {"target_volatility": 0.15, "max_drawdown": 0.05, "drawdown_exposure": 0.25, "drawdown_cooldown_bars": 10,
             "stop_loss": 0.03, "session_loss_limit": 0.015},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("deep")
    result = run_pipeline(config_from_dict(CONFIG), out)
    return out, result, json.loads((out / "report.json").read_text())


def test_report_carries_every_section_under_stable_keys(run):
    out, _, report = run
    assert report["schema_version"] == "2.3"
    for key in ("stress", "cost_sensitivity", "pbo", "trades", "spa", "gate", "model", "active_return"):
        assert key in report, key
    assert report["cost_sensitivity"]["multiples"] == ["0x", "1x", "2x", "5x"]
    assert set(report["cost_sensitivity"]["edge_disappears_at"]) == {"buy_and_hold", "cash"}
    assert report["pbo"]["trials"] >= 4 and 0.0 <= report["pbo"]["value"] <= 1.0
    assert 0.0 <= report["spa"]["p_value"] <= 1.0 and "buy_and_hold" in report["spa"]["models"]
    for fold in report["folds"]:
        assert {"trades", "beta_alpha", "regimes", "cost_sensitivity", "pbo", "validation_baselines"} <= set(fold)
        ledger = pd.read_csv(out / fold["trade_ledger"])
        assert len(ledger) == fold["trades"]["count"]
        equity = pd.read_csv(out / fold["equity_curve"])
        # The trades' P&L (fractions of the starting NAV) adds up to the test window's NAV change.
        assert ledger["pnl"].sum() == pytest.approx(equity["nav"].iloc[-1] - equity["nav"].iloc[0], abs=1e-6)
        # At 1x costs the replay is the policy's own test backtest.
        assert fold["cost_sensitivity"]["1x"]["policy_sharpe"] == pytest.approx(fold["policy"]["test"]["sharpe"],
                                                                               abs=1e-9)


def test_the_gate_reads_the_deep_evaluation(run):
    _, result, report = run
    gate = report["gate"]
    assert gate == result["gate"]
    assert {"beats_benchmark", "low_pbo", "survives_costs", "training_budget", "learned_something"} <= set(gate["checks"])
    assert gate["numbers"]["active_return_psr"] == report["active_return"]["psr"]
    assert gate["numbers"]["pbo"] == report["pbo"]["value"]
    assert gate["numbers"]["sharpe_at_cost_multiple"] == report["cost_sensitivity"]["mean_test_sharpe"]["policy"]["2x"]
    assert not gate["passed"] and not result["champion"]  # 8,192 steps: below the budget floor
    assert report["model"] == {"name": "ppo_GSPC_1d", "version": result["version"], "champion": False,
                               "run_id": result["run_id"], "tracking_uri": result["tracking_uri"]}


def test_the_page_opens_with_the_verdict_and_the_gate(run):
    out, result, _ = run
    page = (out / "report.html").read_text(encoding="utf-8")
    text = re.sub(r"<[^>]+>", " ", page)
    money, gate, folds = (text.index("Does this model deserve money?"), text.index("Promotion gate: FAILED"),
                          text.index("Folds"))
    assert money < gate < folds
    assert "No: the promotion gate refused it (trained below the budget floor" in text
    assert f"version {result['version']}" in text and result["run_id"] in text
    for title in ("Validation and test", "Seed spread", "Cost sensitivity", "Trades (test)", "PBO", "SPA p-value",
                  "Risk overlay (test, mean over folds)"):
        assert title in text, title


def test_the_risk_overlay_is_reported_and_exported(run):
    import numpy as np
    from mlflow.tracking import MlflowClient

    from ml.serving import Policy

    out, result, report = run
    risk = report["risk"]
    assert risk["settings"]["target_volatility"] == 0.15
    assert risk["rules"]["volatility_target"]["bars"] > 0 and risk["rules"]["drawdown_breaker"]["trips"] >= 1
    for fold in report["folds"]:
        # "With" is what was traded: the fold's own test metrics, and its benchmark's.
        assert fold["risk"]["with_overlay"]["policy"]["sharpe"] == fold["policy"]["test"]["sharpe"]
        assert fold["risk"]["with_overlay"]["buy_and_hold"]["sharpe"] == fold["baselines"]["buy_and_hold"]["sharpe"]
        # Volatility targeting alone, beside the managed and the plain buy-and-hold.
        assert "buy_and_hold_vol_target" in fold["baselines"]
        assert fold["risk"]["without_overlay"]["buy_and_hold"]["average_exposure"] == pytest.approx(1.0, abs=1e-3)
        log = pd.read_csv(out / fold["risk_log"])
        assert len(log) == fold["policy"]["test"]["bars"]
        fired = (log["removed_volatility_target"].abs() > 1e-9).sum()
        assert fired == fold["risk"]["rules"]["volatility_target"]["bars"]
        assert log["tripped_drawdown_breaker"].sum() == fold["risk"]["rules"]["drawdown_breaker"]["trips"]
    metrics = MlflowClient(result["tracking_uri"]).get_run(result["run_id"]).data.metrics
    assert metrics["risk/with_overlay/policy/sharpe"] == pytest.approx(risk["with_overlay"]["policy"]["sharpe"])
    assert metrics["risk/rules/drawdown_breaker/trips"] == risk["rules"]["drawdown_breaker"]["trips"]
    policy = Policy(out / "model.onnx", prefer_gpu=False)
    assert policy.risk["max_drawdown"] == 0.05
    assert [i.name for i in policy.session.get_inputs()] == ["ohlcv", "position", "nav", "session", "risk_state"]
    assert json.loads((out / "parity.json").read_text())["passed"]
    assert np.load(out / "parity_windows.npz")["risk_state"].shape == (4, 8)


def digest(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(paths) if p.is_file()}


def test_evaluation_never_changes_what_training_selected(run, monkeypatch):
    out, _, report = run
    selected = digest(list(out.glob("folds/fold_*/*")) + list(out.glob("folds/fold_*/seed_*/*")))
    # Other stress windows and cost multiples change the report's sections, never the selection.
    import ml.evaluation.robustness as robustness
    monkeypatch.setattr(robustness, "COST_MULTIPLES", (0.0, 1.0, 2.0, 3.0, 5.0))
    evaluate(out)
    again = json.loads((out / "report.json").read_text())
    assert again["cost_sensitivity"]["multiples"] == ["0x", "1x", "2x", "3x", "5x"]
    assert digest(list(out.glob("folds/fold_*/*")) + list(out.glob("folds/fold_*/seed_*/*"))) == selected
    for before, after in zip(report["folds"], again["folds"]):
        assert after["training"] == before["training"]
        assert after["policy"]["validation"] == before["policy"]["validation"]
        assert after["policy"]["test"] == before["policy"]["test"]


def test_a_gate_with_rules_switched_off_never_reads_as_a_yes(run):
    from ml.evaluation.summary_sections import money_verdict

    _, _, report = run
    relaxed = {"passed": True, "checks": {"onnx_parity": True},
               "reasons": ["PASS onnx parity", "OFF beats-cash rule (disabled in the gate config)",
                           "OFF overfitting (PBO) rule (disabled in the gate config)"]}
    verdict = money_verdict(report | {"gate": relaxed})
    assert verdict.startswith("Not shown: its gate passed it only with 2 rule(s) switched off "
                              "(beats-cash, overfitting)")
    full = {"passed": True, "checks": {"onnx_parity": True}, "reasons": ["PASS onnx parity"]}
    assert money_verdict(report | {"gate": full}).startswith("Yes, by every rule of the promotion gate.")
