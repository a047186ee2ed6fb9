"""The promotion gate's rules, alias moves that never land on a failed version, rollback, and the serve CLI."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from ml.agent.policy import ActorCritic, ExportPolicy
from ml.config import ActionConfig, GateConfig
from ml.env.action_space import DiscreteExposure
from ml.market.features import FeatureModule
from ml.release import registry
from ml.release.export import export_onnx
from ml.release.gate import evaluate_gate as gate_decision
from ml.release.lock import registry_lock
from tests.conftest import ROOT

PARITY_OK = {"passed": True, "max_abs_diff": 3e-7, "tolerance": 1e-5, "windows": 64}


def evaluate_gate(report, parity, gate, champion_comparison=None):
    """The gate with the default collapse share of the action settings."""
    return gate_decision(report, parity, gate, ActionConfig().collapse_share, champion_comparison)


def report(returns=(0.05, 0.02), collapsed=(False, False)) -> dict:
    """Folds trained above the budget floor whose validation Sharpe beats random and cash."""
    return {"folds": [
        {"index": i, "training": {"timesteps": 500_000},
         "policy": {"validation": {"sharpe": 0.8}, "test": {"total_return": r, "sharpe": 1.0, "max_drawdown": -0.1},
                    "collapse": {"alarm": c}},
         "validation_baselines": {"cash": {"sharpe": 0.0}, "random": {"sharpe": -0.3}}}
        for i, (r, c) in enumerate(zip(returns, collapsed))],
        "active_return": {"benchmark": "buy_and_hold", "bars": 500, "annualized_mean": 0.03, "psr": 0.99},
        "pbo": {"value": 0.1, "folds": 2, "trials": 20},
        "cost_sensitivity": {"mean_test_sharpe": {"policy": {"2x": 0.9}, "buy_and_hold": {"2x": 0.5},
                                                  "cash": {"2x": 0.0}}}}


def test_gate_passes_a_sound_profitable_policy():
    decision = evaluate_gate(report(), PARITY_OK, GateConfig())
    assert decision.passed, decision.reasons
    assert set(decision.checks) == {"onnx_parity", "finite_test_metrics", "training_budget", "learned_something",
                                    "beats_benchmark", "low_pbo", "survives_costs", "no_collapse", "beats_cash"}
    assert decision.numbers["mean_test_total_return"] == pytest.approx(0.035)


@pytest.mark.parametrize("case, kwargs, failed_check, words", [
    ("parity", {"parity": {**PARITY_OK, "passed": False, "max_abs_diff": 2e-4}}, "onnx_parity", "2.00e-04"),
    ("collapse", {"report": report(collapsed=(False, True))}, "no_collapse", "fold(s) [1]"),
    ("loses money", {"report": report(returns=(0.01, -0.03))}, "beats_cash", "-1.00%"),
    ("nan metric", {"report": report(returns=(0.01, float("nan")))}, "finite_test_metrics", "finite"),
    ("worse than champion", {"comparison": {"challenger_sharpe": 0.4, "champion_sharpe": 0.9,
                                            "difference_low": -0.9, "confidence": 0.9,
                                            "champion_version": "3", "start": "2018-01-02",
                                            "end": "2018-12-31", "bars": 250}},
     "beats_champion", "0.40 vs champion v3 0.90"),
    ("no unseen window", {"comparison": {"skipped": "fewer than 20 bars"}}, "beats_champion", "cannot compare"),
])
def test_gate_refuses_with_the_reason_and_numbers(case, kwargs, failed_check, words):
    decision = evaluate_gate(kwargs.get("report", report()), kwargs.get("parity", PARITY_OK), GateConfig(),
                             kwargs.get("comparison"))
    assert not decision.passed
    assert decision.checks[failed_check] is False
    assert any(reason.startswith("FAIL") and words in reason for reason in decision.reasons), decision.reasons


def test_gate_rules_can_be_switched_off_and_margins_raised():
    relaxed = GateConfig(require_no_collapse=False, require_beats_cash=False, require_learned=False, min_timesteps=0,
                         benchmark_psr=None, max_pbo=None, cost_multiple=None)
    assert evaluate_gate(report(returns=(-0.2, -0.1), collapsed=(True, True)), PARITY_OK, relaxed).passed
    strict = GateConfig(cash_margin=0.05)
    assert not evaluate_gate(report(returns=(0.04, 0.04)), PARITY_OK, strict).passed
    comparison = {"challenger_sharpe": 1.0, "champion_sharpe": 0.9, "difference_low": 0.1, "confidence": 0.9,
                  "champion_version": "1", "start": "a", "end": "b", "bars": 100}
    assert evaluate_gate(report(), PARITY_OK, GateConfig(), comparison).passed
    assert not evaluate_gate(report(), PARITY_OK, GateConfig(champion_margin=0.2), comparison).passed


@pytest.fixture(scope="module")
def registry_template(tmp_path_factory):
    """A real SQLite registry with versions 1..4 of one model: 1, 2 and 4 passed their gate, 3 failed."""
    tmp_path = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    torch.manual_seed(0)
    module = FeatureModule(64)
    path = export_onnx(ExportPolicy(module, ActorCritic(module.n_features, DiscreteExposure((0.0, 1.0)))),
                       tmp_path / "m.onnx", {"lookback": 64})
    example = {"ohlcv": (np.random.default_rng(0).random((2, 64, 5)) + 1).astype(np.float32),
               "position": np.zeros((2, 1), np.float32)}
    client = MlflowClient(uri)
    experiment = client.create_experiment("promotion", artifact_location=(tmp_path / "artifacts").as_uri())
    for passed in (True, True, False, True):
        run_id = client.create_run(experiment).info.run_id
        version = registry.register_onnx(uri, run_id, "ppo_TEST_1d", path, example, tags={})
        registry.record_decision(uri, "ppo_TEST_1d", version,
                                 {"passed": passed, "reasons": ["test"], "numbers": {}}, "test version")
    return tmp_path / "mlflow.db"


@pytest.fixture()
def model_registry(registry_template, tmp_path):
    """A private copy of the template registry (aliases and tags are per test; artifacts are shared, read-only)."""
    import shutil

    shutil.copy(registry_template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_failed_version_can_never_become_champion(model_registry):
    with pytest.raises(registry.PromotionError, match="v3 did not pass its gate"):
        registry.promote(model_registry, "ppo_TEST_1d", "3")
    assert registry.alias_version(model_registry, "ppo_TEST_1d", registry.CHAMPION) is None


def test_promote_then_rollback_restores_the_previous_champion(model_registry):
    uri, name = model_registry, "ppo_TEST_1d"
    registry.promote(uri, name, "1")
    registry.promote(uri, name, "2")
    assert MlflowClient(uri).get_model_version(name, "2").tags["previous_champion"] == "1"
    result = registry.rollback(uri, name)
    assert result == {"model_name": name, "champion": "1", "previous": "2"}
    assert registry.alias_version(uri, name, registry.CHAMPION) == "1"
    assert MlflowClient(uri).get_model_version(name, "2").tags["rolled_back_to"] == "1"
    with pytest.raises(registry.PromotionError, match="did not pass"):
        registry.rollback(uri, name, to_version="3")
    assert registry.alias_version(uri, name, registry.CHAMPION) == "1"


def test_registration_is_idempotent_per_run(model_registry, tmp_path):
    client = MlflowClient(model_registry)
    version = client.get_model_version("ppo_TEST_1d", "2")
    example = {"ohlcv": (np.random.default_rng(0).random((2, 64, 5)) + 1).astype(np.float32),
               "position": np.zeros((2, 1), np.float32)}
    again = registry.register_onnx(model_registry, version.run_id, "ppo_TEST_1d", tmp_path / "m.onnx", example, {})
    assert again == "2"
    assert len(client.search_model_versions("name = 'ppo_TEST_1d'")) == 4


def _racer(uri: str, version: str, passed: bool, results) -> None:
    """One pipeline's critical section: read the champion, take a while to decide, then move it."""
    with registry_lock(uri, "ppo_TEST_1d"):
        seen = registry.alias_version(uri, "ppo_TEST_1d", registry.CHAMPION)
        time.sleep(0.3)
        if passed:
            registry.move_champion(uri, "ppo_TEST_1d", version, "race")
        results.append((version, seen))


def test_racing_promotions_are_serialized_and_never_pick_a_failed_version(model_registry):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.list()
        racers = [ctx.Process(target=_racer, args=(model_registry, v, p, results))
                  for v, p in (("1", True), ("2", True), ("3", False), ("4", True))]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(60)
        results = list(results)
    assert len(results) == 4
    # Serialized: each racer saw the champion its predecessor left (nobody saw a stale value).
    champion = None
    for version, seen in results:
        assert seen == champion
        if version != "3":
            champion = version
    final = registry.alias_version(model_registry, "ppo_TEST_1d", registry.CHAMPION)
    assert final == champion and final != "3"


def test_cli_rollback_and_serve(model_registry, tmp_path, gspc_bars):
    uri = model_registry
    registry.promote(uri, "ppo_TEST_1d", "1")
    registry.promote(uri, "ppo_TEST_1d", "4")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "ml", *args], capture_output=True, text=True, cwd=ROOT)

    refused = cli("registry", "promote", "--model", "ppo_TEST_1d", "--version", "3", "--tracking-uri", uri)
    assert refused.returncode == 1 and "did not pass its gate" in refused.stderr
    rolled = cli("registry", "rollback", "--model", "ppo_TEST_1d", "--tracking-uri", uri)
    assert rolled.returncode == 0, rolled.stderr
    assert json.loads(rolled.stdout)["champion"] == "1"

    bars = tmp_path / "bars.csv"
    gspc_bars.tail(100).rename(columns=str.capitalize).to_csv(bars, index=False)
    served = cli("serve", "--model", "models:/ppo_TEST_1d@champion", "--bars", str(bars), "--tracking-uri", uri)
    assert served.returncode == 0, served.stderr
    answer = json.loads(served.stdout)
    assert answer["target_exposure"] in (0.0, 1.0) and answer["lookback"] == 64

    short = tmp_path / "short.csv"
    gspc_bars.tail(10).rename(columns=str.capitalize).to_csv(short, index=False)
    rejected = cli("serve", "--model", "models:/ppo_TEST_1d@champion", "--bars", str(short), "--tracking-uri", uri)
    assert rejected.returncode == 2 and "needs the last 64" in rejected.stderr


def test_serving_refuses_a_stale_feed(model_registry, gspc_bars):
    from ml.data.schema import ohlcv_array
    from ml.serving import InputError, Policy

    policy = Policy.load("models:/ppo_TEST_1d/1", tracking_uri=model_registry)
    window = ohlcv_array(gspc_bars)[-64:].copy()
    window[-12:, :4] = window[-12, 3]  # a frozen feed repeats its last bar
    with pytest.raises(InputError, match="identical closes"):
        policy.decide(window[None], np.zeros((1, 1)))
    assert Policy(policy.path, max_stale_bars=None).decide(window[None], np.zeros((1, 1))).shape == (1, 1)
