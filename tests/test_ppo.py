"""PPO learns what is learnable, is reproducible under a seed, and keeps validation-selected weights."""

from __future__ import annotations

import torch

from ml.config import config_from_dict
from ml.evaluation.splits import walk_forward_folds
from ml.market import prepare_series
from ml.walkforward import backtest_policy, train_fold
from tests.conftest import synthetic_bars


def _setup(drift: float, timesteps: int, seed: int = 1):
    bars = synthetic_bars(1400, drift=drift, vol=0.004, seed=seed)
    config = config_from_dict({
        "ppo": {"total_timesteps": timesteps, "num_envs": 64, "num_steps": 32, "eval_every": 2,
                "exposure_levels": [-1.0, 0.0, 1.0], "seed": seed, "learning_rate": 1e-3},
        "splits": {"n_folds": 1, "test_months": 6, "validation_months": 6, "min_train_bars": 300},
    })
    series = prepare_series(bars, config.lookback, torch.device("cpu"))
    fold = walk_forward_folds(bars["timestamp"], config.lookback, config.splits)[0]
    return config, series, fold


def test_ppo_learns_to_hold_a_steadily_rising_asset():
    config, series, fold = _setup(drift=0.003, timesteps=40_000)
    result = train_fold(series, fold, config)
    test = backtest_policy(result.agent, series, fold.test, config)
    exposure, share = test.dominant_decision()
    assert exposure == 1.0 and share > 0.9, test.decision
    assert test.nav[-1] > 1.2
    # Holding +1 everywhere is exactly a collapse to one exposure: the alarm must say so.
    assert result.collapse_alarm
    assert result.history[-1]["greedy_action_share/+1.00"] >= 0.98
    assert result.history[-1]["steps_per_second"] > 0
    for key in ("loss/policy", "loss/value", "loss/entropy", "approx_kl", "clipfrac", "explained_variance"):
        assert key in result.history[-1]


def test_ppo_learns_to_short_a_steadily_falling_asset():
    config, series, fold = _setup(drift=-0.003, timesteps=40_000)
    result = train_fold(series, fold, config)
    exposure, share = backtest_policy(result.agent, series, fold.test, config).dominant_decision()
    assert exposure == -1.0 and share > 0.9


def test_same_seed_same_policy():
    config, series, fold = _setup(drift=0.0005, timesteps=4096)
    first = train_fold(series, fold, config).agent.state_dict()
    second = train_fold(series, fold, config).agent.state_dict()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)


def test_kept_weights_are_the_best_validation_score():
    config, series, fold = _setup(drift=0.0005, timesteps=8192)
    result = train_fold(series, fold, config)
    scores = [h["validation_score"] for h in result.history if "validation_score" in h]
    assert result.best_score == max(scores)
    assert result.history[result.best_update - 1]["validation_score"] == result.best_score
    from ml.walkforward import selection_score

    rescored = selection_score(backtest_policy(result.agent, series, fold.validation, config), config)
    assert rescored == result.best_score


def test_training_resumes_from_its_last_checkpoint(tmp_path):
    """An interrupted run (an Airflow retry) continues after the last saved update."""
    config, series, fold = _setup(drift=0.0005, timesteps=6 * 64 * 32)
    config.ppo.checkpoint_every = 2
    checkpoint = tmp_path / "train_state.pt"
    calls = []

    def crash_during_update_5(metrics, step):
        calls.append(step)
        if len(calls) == 5:  # after update 4 was checkpointed, before update 5 is
            raise RuntimeError("worker lost")

    import pytest

    with pytest.raises(RuntimeError, match="worker lost"):
        train_fold(series, fold, config, crash_during_update_5, checkpoint_path=checkpoint)
    resumed = train_fold(series, fold, config, checkpoint_path=checkpoint)
    assert resumed.resumed_from_update == 4
    assert [h["update"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    assert resumed.history[-1]["global_step"] == 6 * 64 * 32
    for key in ("greedy_action_share/+1.00", "sampled_action_share/-1.00", "turnover_per_step", "flat_share",
                "collapse_alarm"):
        assert key in resumed.history[-1]

