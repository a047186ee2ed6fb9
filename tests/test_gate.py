"""The gate cannot crown noise: a budget floor, a learned-something rule on validation, and a champion
comparison that needs the challenger's edge to hold at a stated confidence. The paired bootstrap
bound is checked against arch's stationary bootstrap."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from arch.bootstrap import StationaryBootstrap
from mlflow.tracking import MlflowClient

from ml.config import ActionConfig, GateConfig, config_from_dict
from ml.evaluation.metrics import sharpe_ratio
from ml.evaluation.statistics import _nav, sharpe_difference_bound
from ml.pipeline import run_pipeline
from ml.release import registry
from ml.release.gate import evaluate_gate

PPY = 252.0
PARITY = {"passed": True, "max_abs_diff": 1e-7, "tolerance": 1e-5, "windows": 8}
COLLAPSE_SHARE = ActionConfig().collapse_share


def paired_returns(n: int = 600, edge: float = 0.0004, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A market both curves trade, and a challenger that adds a small edge and its own noise."""
    rng = np.random.default_rng(seed)
    market = rng.normal(0.0003, 0.01, n)
    return market + edge + rng.normal(0.0, 0.002, n), market


def test_sharpe_difference_point_is_the_difference_of_the_sharpes():
    challenger, champion = paired_returns()
    point, low = sharpe_difference_bound(_nav(challenger), _nav(champion), PPY, 0.9, n_resamples=500)
    assert point == pytest.approx(sharpe_ratio(_nav(challenger), PPY) - sharpe_ratio(_nav(champion), PPY), abs=1e-12)
    assert low < point


def test_sharpe_difference_bound_matches_arch_stationary_bootstrap():
    challenger, champion = paired_returns()
    block = round(len(challenger) ** (1 / 3))
    _, ours = sharpe_difference_bound(_nav(challenger), _nav(champion), PPY, 0.9, block_length=block,
                                      n_resamples=4000, seed=1)

    def difference(a, b):
        return sharpe_ratio(_nav(a), PPY) - sharpe_ratio(_nav(b), PPY)

    bootstrap = StationaryBootstrap(block, challenger, champion, seed=7)
    reference = bootstrap.conf_int(difference, reps=4000, method="percentile", size=0.9, tail="lower")[0, 0]
    # Two independent sets of 4000 resamples: their 10% quantiles agree to Monte Carlo error.
    assert ours == pytest.approx(reference, abs=0.08)


def test_pairing_makes_the_bound_tight_for_a_small_steady_edge():
    challenger, champion = paired_returns(edge=0.0003)
    point, low = sharpe_difference_bound(_nav(challenger), _nav(champion), PPY, 0.9)
    assert 0 < low < point
    # Unpaired (the champion resampled on its own blocks), the shared market would swamp the edge.
    rng = np.random.default_rng(0)
    shuffled = champion[rng.permutation(champion.size)]
    _, unpaired_low = sharpe_difference_bound(_nav(challenger), _nav(shuffled), PPY, 0.9)
    assert unpaired_low < low


def test_identical_curves_have_no_difference():
    challenger, _ = paired_returns()
    point, low = sharpe_difference_bound(_nav(challenger), _nav(challenger), PPY, 0.9, n_resamples=300)
    assert point == 0.0 and low == 0.0


def fold(index: int, validation_sharpe: float, random_sharpe: float, timesteps: int = 200_000,
         allowance: float = 0.0) -> dict:
    return {"index": index, "training": {"timesteps": timesteps},
            "policy": {"validation": {"sharpe": validation_sharpe}, "selection_allowance": allowance,
                       "test": {"total_return": 0.05, "sharpe": 1.0, "max_drawdown": -0.1},
                       "collapse": {"alarm": False}},
            "validation_baselines": {"cash": {"sharpe": 0.0}, "random": {"sharpe": random_sharpe}}}


# Run-level statistics of a policy that clears every rule, for tests that change one thing at a time.
ROBUST = {"active_return": {"benchmark": "buy_and_hold", "bars": 3000, "annualized_mean": 0.04, "psr": 0.97},
          "pbo": {"value": 0.2, "folds": 3, "trials": 60, "per_fold": [0.2, 0.1, 0.3]},
          "cost_sensitivity": {"multiples": ["0x", "1x", "2x", "5x"], "mean_test_sharpe": {
              "policy": {"0x": 1.2, "1x": 1.1, "2x": 1.0, "5x": 0.6},
              "buy_and_hold": {"0x": 0.7, "1x": 0.7, "2x": 0.69, "5x": 0.68},
              "cash": {"0x": 0.0, "1x": 0.0, "2x": 0.0, "5x": 0.0}}}}


def decide(folds: list[dict], comparison: dict | None = None, run: dict | None = None, **gate) -> dict:
    report = {"folds": folds, **ROBUST, **(run or {})}
    return evaluate_gate(report, PARITY, GateConfig(**gate), COLLAPSE_SHARE, comparison).as_dict()


def test_a_sound_robust_run_passes_every_default_rule():
    decision = decide([fold(0, 1.0, 0.2), fold(1, 0.9, 0.1)])
    assert decision["passed"], decision["reasons"]
    assert set(decision["checks"]) == {"onnx_parity", "finite_test_metrics", "training_budget", "learned_something",
                                       "beats_benchmark", "low_pbo", "survives_costs", "no_collapse", "beats_cash"}


def test_the_edge_over_the_benchmark_must_be_probable_after_costs():
    weak = decide([fold(0, 1.0, 0.2)], run={"active_return": ROBUST["active_return"] | {"psr": 0.81}})
    assert not weak["checks"]["beats_benchmark"]
    assert "probabilistic Sharpe of the active return 81.0% over 3000 test bars (need 95%" in " ".join(weak["reasons"])
    assert "beats_benchmark" not in decide([fold(0, 1.0, 0.2)], run={"active_return": {}}, benchmark_psr=None)["checks"]


def test_an_overfit_selection_is_refused():
    overfit = decide([fold(0, 1.0, 0.2)], run={"pbo": ROBUST["pbo"] | {"value": 0.55}})
    assert not overfit["checks"]["low_pbo"] and "overfitting 55% over 60 validation trials" in " ".join(overfit["reasons"])
    assert not decide([fold(0, 1.0, 0.2)], run={"pbo": None})["checks"]["low_pbo"]  # unmeasured is not low


def test_the_edge_must_survive_doubled_costs():
    costly = {"cost_sensitivity": {"mean_test_sharpe": {
        "policy": {"1x": 0.8, "2x": 0.6}, "buy_and_hold": {"1x": 0.7, "2x": 0.69}, "cash": {"1x": 0.0, "2x": 0.0}}}}
    decision = decide([fold(0, 1.0, 0.2)], run=costly)
    assert not decision["checks"]["survives_costs"]
    assert "edge at 2x costs: mean test Sharpe 0.60 vs buy and hold 0.69" in " ".join(decision["reasons"])
    assert decide([fold(0, 1.0, 0.2)], run=costly, cost_multiple=1.0)["checks"]["survives_costs"]


def test_a_run_below_the_budget_floor_is_never_promoted():
    short = decide([fold(0, 2.0, -1.0, timesteps=1024), fold(1, 2.0, -1.0)])
    assert not short["passed"] and not short["checks"]["training_budget"]
    assert "1,024 environment steps in the shortest fold (floor 100,000)" in " ".join(short["reasons"])
    assert decide([fold(0, 2.0, -1.0), fold(1, 2.0, -1.0)])["checks"]["training_budget"]
    off = decide([fold(0, 2.0, -1.0, timesteps=1024)], min_timesteps=0)
    assert "training_budget" not in off["checks"] and any(r.startswith("OFF training-budget") for r in off["reasons"])


def test_a_policy_that_does_not_beat_random_and_cash_on_validation_learned_nothing():
    # Folds 0 and 2 beat both nulls; fold 1 loses to random; fold 3 has a negative Sharpe (loses to cash).
    passed = decide([fold(0, 1.0, 0.5), fold(1, 0.4, 0.5), fold(2, 0.8, -0.2)])
    assert passed["checks"]["learned_something"] and passed["numbers"]["validation_folds_beating_nulls"] == 2
    failed = decide([fold(0, 1.0, 0.5), fold(1, -0.1, -0.5)])  # one of two is not a majority
    assert not failed["checks"]["learned_something"] and not failed["passed"]
    assert "above cash and random in 1 of 2 folds" in " ".join(failed["reasons"])


def test_the_luck_of_picking_the_best_checkpoint_is_taken_off_the_validation_sharpe():
    # 0.9 beats random (0.2) and cash, but the best of many checkpoints scores 0.8 by luck alone.
    lucky = decide([fold(0, 0.9, 0.2, allowance=0.8), fold(1, 0.9, 0.2, allowance=0.8)])
    assert not lucky["checks"]["learned_something"]
    assert "less 0.80 for picking the best checkpoint" in " ".join(lucky["reasons"])
    assert decide([fold(0, 0.9, 0.2, allowance=0.3)])["checks"]["learned_something"]


def test_selection_allowance_is_the_expected_best_of_the_trials_by_luck():
    from ml.evaluation.statistics import expected_max_sharpe
    from ml.evaluation.walkforward import selection_allowance

    trials = [0.1, -0.4, 0.7, 0.2, -0.1, 0.5]
    per_bar = np.asarray(trials) / np.sqrt(PPY)
    want = expected_max_sharpe(len(trials), float(np.var(per_bar, ddof=1))) * np.sqrt(PPY)
    assert selection_allowance(trials, PPY) == pytest.approx(want, rel=1e-12) and want > 0
    assert selection_allowance([0.4], PPY) == 0.0 and selection_allowance(None, PPY) == 0.0


def test_a_switched_off_champion_comparison_is_reported_off():
    off = decide([fold(0, 1.0, 0.2)], compare_with_champion=False)
    assert "OFF champion comparison (disabled in the gate config)" in off["reasons"]


def test_the_challenger_must_beat_the_champion_at_the_stated_confidence():
    comparison = {"challenger_sharpe": 1.3, "champion_sharpe": 1.0, "difference_low": -0.2, "confidence": 0.9,
                  "champion_version": "3", "start": "2018-01-02", "end": "2018-12-31", "bars": 250}
    noisy = decide([fold(0, 2.0, -1.0)], comparison)
    assert not noisy["checks"]["beats_champion"]  # ahead on the point estimate, not beyond doubt
    assert "above -0.20 with 90% confidence" in " ".join(noisy["reasons"])
    clear = decide([fold(0, 2.0, -1.0)], comparison | {"difference_low": 0.05})
    assert clear["checks"]["beats_champion"] and clear["passed"]


RELAXED = {"require_no_collapse": False, "require_beats_cash": False, "require_learned": False,
           "benchmark_psr": None, "max_pbo": None, "cost_multiple": None, "parity_windows": 64}


def two_runs(tmp_path: Path, data: dict) -> tuple[dict, dict]:
    """A trained run, then a one-update run triggered with the smallest budget, into one store."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = {"data": data, "splits": {"n_folds": 1}, "registry": {"tracking_uri": store}}
    trained = config_from_dict(common | {
        "ppo": {"total_timesteps": 131_072, "num_envs": 256, "num_steps": 64, "eval_every": 2, "progress": False},
        "gate": RELAXED})
    first = run_pipeline(trained, tmp_path / "trained")
    smallest = config_from_dict(common | {
        "ppo": {"total_timesteps": 1024, "num_envs": 16, "num_steps": 64, "progress": False},
        "gate": RELAXED})  # even with the profitability rules off, as the demo's gate has them
    second = run_pipeline(smallest, tmp_path / "smallest")
    return first, second


@pytest.mark.slow
@pytest.mark.parametrize("data", [{"source": "sample", "symbol": "GSPC"}, "AAPL"], ids=["sample-GSPC", "AAPL"])
def test_a_one_update_run_never_replaces_a_trained_champion(tmp_path, shared_market, data):
    if isinstance(data, str):
        data = {"source": "file", "path": str(shared_market / f"{data}.csv"), "symbol": data}
    first, second = two_runs(tmp_path, data)
    assert first["champion"] and first["gate"]["checks"]["training_budget"]
    assert not second["champion"] and not second["gate"]["passed"]
    assert not second["gate"]["checks"]["training_budget"]
    assert second["champion_version"] == first["version"]
    client = MlflowClient(first["tracking_uri"])
    assert registry.alias_version(first["tracking_uri"], first["model_name"], registry.CHAMPION) == first["version"]
    tags = client.get_model_version(first["model_name"], second["version"]).tags
    assert tags["gate.passed"] == "false" and "floor 100,000" in tags["gate.reasons"]
    assert math.isfinite(first["gate"]["numbers"]["trained_timesteps"])


def test_a_retried_registration_keeps_the_decision_that_promoted_the_version(tmp_path):
    from ml.pipeline import register

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = config_from_dict({"splits": {"n_folds": 1}, "registry": {"tracking_uri": store}, "gate": RELAXED,
                               "ppo": {"total_timesteps": 131_072, "num_envs": 256, "num_steps": 64,
                                       "eval_every": 2, "progress": False}})
    first = run_pipeline(config, tmp_path / "run")
    assert first["champion"]
    reasons = MlflowClient(store).get_model_version(first["model_name"], first["version"]).tags["gate.reasons"]
    # The attempt died after the alias moved, before it wrote what it did: the retry registers again.
    (tmp_path / "run" / "registration.json").unlink()
    again = register(tmp_path / "run")
    assert again["version"] == first["version"] and again["champion"]
    assert again["gate"] == first["gate"] and again["previous_champion"] == first["previous_champion"]
    assert MlflowClient(store).get_model_version(first["model_name"], first["version"]).tags["gate.reasons"] == reasons
