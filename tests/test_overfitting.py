"""Probability of backtest overfitting (CSCV) by hand and by its properties; the SPA test's direction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ml.evaluation.metrics import sharpe_ratio
from ml.evaluation.overfitting import probability_of_backtest_overfitting, sharpe, spa_test


def column_mean(returns: np.ndarray) -> np.ndarray:
    return returns.mean(axis=0)


def test_pbo_by_hand_four_blocks_three_trials():
    """Four one-bar blocks, trials A, B, C, scored by their mean (same order as the sum):

        bar   A   B   C
         0    2  -2  -3
         1    2  -2   2
         2   -1   0   3
         3    3   0  -2

    in-sample blocks | in-sample sums A,B,C -> best | out-of-sample sums A,B,C | rank of best | w   | logit
    0,1              |  4 -4 -1  -> A               |  2  0  1  (blocks 2,3)  | 3 of 3       | 3/4 | ln 3
    0,2              |  1 -2  0  -> A               |  5 -2  0  (blocks 1,3)  | 3            | 3/4 | ln 3
    0,3              |  5 -2 -5  -> A               |  1 -2  5  (blocks 1,2)  | 2            | 2/4 | 0
    1,2              |  1 -2  5  -> C               |  5 -2 -5  (blocks 0,3)  | 1            | 1/4 | -ln 3
    1,3              |  5 -2  0  -> A               |  1 -2  0  (blocks 0,2)  | 3            | 3/4 | ln 3
    2,3              |  2  0  1  -> A               |  4 -4 -1  (blocks 0,1)  | 3            | 3/4 | ln 3

    w = rank / (trials + 1); two of six logits are <= 0, so PBO = 1/3.
    """
    matrix = 0.01 * np.array([[2, -2, -3], [2, -2, 2], [-1, 0, 3], [3, 0, -2]], dtype=float)
    result = probability_of_backtest_overfitting(matrix, n_blocks=4, metric=column_mean)
    ln3 = math.log(3.0)
    assert result["logits"] == pytest.approx([ln3, ln3, 0.0, -ln3, ln3, ln3], abs=1e-12)
    assert result["pbo"] == pytest.approx(1 / 3)
    assert (result["n_trials"], result["n_blocks"], result["n_combinations"], result["bars_per_block"]) == (3, 4, 6, 1)


def test_pbo_leaves_out_the_oldest_bars_that_do_not_fill_a_block():
    rng = np.random.default_rng(0)
    matrix = rng.normal(0.0, 0.01, size=(80, 5))
    with_extra = np.vstack([rng.normal(5.0, 1.0, size=(3, 5)), matrix])  # 83 bars: 3 left over
    assert probability_of_backtest_overfitting(with_extra) == probability_of_backtest_overfitting(matrix)


def test_pbo_defaults_to_the_per_bar_sharpe():
    rng = np.random.default_rng(1)
    returns = rng.normal(0.001, 0.01, size=(64, 4))
    nav = np.concatenate(([1.0], np.cumprod(1.0 + returns[:, 2])))
    assert sharpe(returns)[2] == pytest.approx(sharpe_ratio(nav, 1.0))
    assert sharpe(np.zeros((10, 2))).tolist() == [0.0, 0.0]
    # Ranking by Sharpe and by mean differ on this matrix: the default must be the Sharpe's answer.
    volatile = np.column_stack([rng.normal(0.002, 0.05, 64), rng.normal(0.001, 0.002, 64), rng.normal(0, 0.01, 64)])
    by_default = probability_of_backtest_overfitting(volatile)
    assert by_default == probability_of_backtest_overfitting(volatile, metric=sharpe)
    assert by_default["logits"] != probability_of_backtest_overfitting(volatile, metric=column_mean)["logits"]


def test_pure_noise_trials_give_pbo_near_one_half():
    """One matrix's PBO spreads widely (its 70 splits share the same bars); the mean over many
    noise matrices is 1/2, with a standard error of about 0.017 over 200."""
    pbos = [probability_of_backtest_overfitting(np.random.default_rng(seed).normal(0.0, 0.01, size=(200, 10)))["pbo"]
            for seed in range(200)]
    assert abs(np.mean(pbos) - 0.5) < 0.05, np.mean(pbos)


def test_one_trial_with_a_real_edge_gives_pbo_near_zero():
    for seed in range(5):
        matrix = np.random.default_rng(seed).normal(0.0, 0.01, size=(800, 20))
        matrix[:, 7] += 0.004  # per-bar Sharpe 0.4 against none for the others
        result = probability_of_backtest_overfitting(matrix)
        assert result["pbo"] <= 0.05, (seed, result["pbo"])
        assert result["n_combinations"] == 70 and len(result["logits"]) == 70


def test_trials_whose_halves_mirror_each_other_are_always_overfit():
    """Each trial's returns sum to zero, so its out-of-sample mean is minus its in-sample mean:
    the in-sample best is the out-of-sample worst in every split."""
    matrix = np.random.default_rng(3).normal(0.0, 0.01, size=(160, 6))
    matrix -= matrix.mean(axis=0)
    result = probability_of_backtest_overfitting(matrix, metric=column_mean)
    assert result["pbo"] == 1.0
    assert result["logits"] == pytest.approx([math.log(1 / 6)] * 70)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_blocks": 5}, "n_blocks must be an even whole number"),
    ({"n_blocks": 18}, "n_blocks must be at most 16"),
    ({"returns_matrix": np.zeros((40, 1))}, "at least 2 trials"),
    ({"returns_matrix": np.zeros(40)}, "two-dimensional"),
    ({"returns_matrix": np.full((40, 3), np.nan)}, "NaN"),
    ({"returns_matrix": np.zeros((7, 3))}, "fewer than 2 bars per half"),
])
def test_pbo_refuses_unusable_input_in_one_line(kwargs, message):
    arguments = {"returns_matrix": np.zeros((40, 3)), **kwargs}
    with pytest.raises(ValueError, match=message):
        probability_of_backtest_overfitting(**arguments)


def test_spa_a_policy_far_ahead_of_every_baseline_is_not_rejected():
    rng = np.random.default_rng(0)
    market = rng.normal(0.0, 0.01, 750)
    baselines = {"buy_and_hold": market, "cash": np.zeros(750), "random": market * rng.choice([-1.0, 1.0], 750)}
    policy = 0.5 * market + 0.003 + rng.normal(0.0, 0.002, 750)
    result = spa_test(policy, baselines, seed=1)
    # The consistent p-value of a policy far ahead sits around 0.5 to 0.9 (see spa_test); White's is 1.
    assert result["p_value"] > 0.4 and result["p_value_upper"] > 0.99, result
    assert result["benchmark"] == "policy" and result["models"] == ["buy_and_hold", "cash", "random"]
    assert result["p_value_lower"] <= result["p_value"] <= result["p_value_upper"]
    assert spa_test(policy, baselines, seed=1) == result  # the seed fixes the bootstrap


def test_spa_a_baseline_that_dominates_the_policy_is_found():
    rng = np.random.default_rng(1)
    market = rng.normal(0.0, 0.01, 750)
    policy = market + rng.normal(0.0, 0.002, 750)
    baselines = {"cash": np.zeros(750), "better": policy + 0.002 + rng.normal(0.0, 0.001, 750)}
    result = spa_test(policy, baselines, seed=1)
    assert result["p_value"] < 0.05, result
    assert result["p_value_lower"] <= result["p_value"] <= result["p_value_upper"]


def test_spa_refuses_series_of_other_lengths_naming_the_baseline():
    with pytest.raises(ValueError, match="baseline 'cash' has shape"):
        spa_test(np.zeros(100), {"cash": np.zeros(99)})
    with pytest.raises(ValueError, match="at least one baseline"):
        spa_test(np.zeros(100), {})
