"""Rule selection (``action.mode: strategies``): at each bar the policy picks which rule strategy sets
the exposure.

The rules' exposures against pandas, hand-computed targets, causality, each rule alone equals a
policy that always picks it, training through the pipeline with ONNX parity and serving, and the
comparison against each rule and the best one in hindsight.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from ml.agent.policy import ActorCritic, load_policy
from ml.cli import main
from ml.config import STRATEGIES, ConfigError, config_from_dict
from ml.env.action_space import action_space_from_dict, make_action_space
from ml.env.strategy_space import SIGNAL_COLUMNS, StrategySelection
from ml.evaluation.backtest import run_baselines
from ml.evaluation.comparison import BEST_RULE
from ml.evaluation.walkforward import backtest_policy
from ml.market.features import BASE_FEATURES, SIGNALS, FeatureModule, series_features
from ml.market.series import prepare_series
from ml.pipeline.rundir import training_fingerprint
from ml.serving import Policy
from tests.test_model_options import exported_checkpoint, trained_run
from tests.test_pipeline import TINY

SELECTION = {**TINY, "action": {"mode": "strategies"}}


def pandas_rules(close: pd.Series) -> pd.DataFrame:
    """The three rules written out with pandas, as a reader of the docstring would."""
    log_return = np.log(close).diff()
    gains = log_return.clip(lower=0).rolling(14).sum()
    moves = log_return.abs().rolling(14).sum()
    oscillator = gains / (moves + 1e-8) - 0.5
    return pd.DataFrame({
        "ma_crossover": (close.rolling(20).mean() > close.rolling(60).mean()).astype(float),
        "momentum": np.sign(np.log(close / close.shift(60))),
        "mean_reversion": (oscillator < -0.2).astype(float) - (oscillator > 0.2).astype(float),
    })


def test_the_signal_features_are_the_rules_computed_with_pandas(gspc_bars):
    bars = gspc_bars.iloc[:1500]
    module = FeatureModule(64, use_range=True, use_volume=True, signals=True).double()
    features = series_features(module, torch.tensor(bars[["open", "high", "low", "close", "volume"]].to_numpy()))
    assert module.names[:len(BASE_FEATURES) + 3] == BASE_FEATURES + [f"signal_{s}" for s in SIGNALS]
    expected = pandas_rules(bars["close"].reset_index(drop=True)).iloc[63:].to_numpy()
    got = features[63:, SIGNAL_COLUMNS].numpy()
    np.testing.assert_array_equal(got, expected)
    assert {-1.0, 0.0, 1.0} <= set(np.unique(got[:, 2])) and set(np.unique(got[:, 0])) == {0.0, 1.0}
    # The other features are as without the signals.
    plain = series_features(FeatureModule(64, use_range=True, use_volume=True).double(),
                            torch.tensor(bars[["open", "high", "low", "close", "volume"]].to_numpy()))
    keep = [i for i in range(features.shape[1]) if i not in range(SIGNAL_COLUMNS.start, SIGNAL_COLUMNS.stop)]
    assert torch.equal(features[63:, keep], plain[63:])


def test_the_target_is_the_chosen_rules_exposure_clamped_into_the_range():
    features = torch.zeros(3, len(BASE_FEATURES) + 3)
    features[:, SIGNAL_COLUMNS] = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0], [1.0, 1.0, 1.0]])
    space = StrategySelection(STRATEGIES)
    # buy_and_hold, cash, ma_crossover, momentum, mean_reversion
    assert space.to_target(torch.tensor([0, 3, 4]), features).flatten().tolist() == [1.0, 1.0, 1.0]
    assert space.to_target(torch.tensor([1, 2, 3]), features).flatten().tolist() == [0.0, 0.0, 1.0]
    assert space.to_target(torch.tensor([3, 4, 2]), features).flatten().tolist() == [-1.0, -1.0, 1.0]
    long_only = StrategySelection(("cash", "momentum", "mean_reversion"), min_exposure=0.0)
    assert long_only.to_target(torch.tensor([1, 2, 1]), features).flatten().tolist() == [0.0, 0.0, 1.0]
    # greedy picks the most probable rule
    logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]])
    assert long_only.greedy(logits, features).flatten().tolist() == [0.0, 0.0, 0.0]
    assert action_space_from_dict(long_only.to_dict()).to_dict() == long_only.to_dict()


def test_perturbing_later_bars_changes_no_signal_and_no_decision(gspc_bars):
    config = config_from_dict(SELECTION)
    series = prepare_series(gspc_bars.iloc[:400], config.lookback, torch.device("cpu"), signals=True)
    torch.manual_seed(0)
    agent = ActorCritic(series.features.shape[1], make_action_space(config.action, 1), (16,))
    agent.set_normalization(*series.feature_stats((63, 300)))
    t = 250
    bars = series.ohlcv[:, 0].clone()
    bars[t + 1:, :4] *= torch.linspace(0.5, 2.0, bars.shape[0] - t - 1)[:, None].double()
    later = series_features(series.feature_module, bars)
    assert torch.equal(later[63:t + 1], series.features[63:t + 1])
    position = torch.zeros(t + 1 - 63, 1)
    assert torch.equal(agent.decide(later[63:t + 1], position), agent.decide(series.features[63:t + 1], position))


@pytest.mark.parametrize("rule", ["cash", "ma_crossover", "momentum", "mean_reversion"])
def test_each_rule_alone_is_a_policy_that_always_picks_it(gspc_bars, rule):
    config = config_from_dict(SELECTION)
    series = prepare_series(gspc_bars.iloc[:1200], config.lookback, torch.device("cpu"), signals=True)
    space = make_action_space(config.action, 1)
    agent = ActorCritic(series.features.shape[1], space, (8,))
    with torch.no_grad():
        agent.actor.weight.zero_()
        agent.actor.bias.copy_(torch.nn.functional.one_hot(torch.tensor(STRATEGIES.index(rule)), 5) * 10.0)
    segment = (800, 1100)
    policy = backtest_policy(agent, series, segment, config)
    alone = run_baselines(series, segment, config.costs, space, names=(rule,))[rule]
    np.testing.assert_allclose(policy.nav, alone.nav, rtol=1e-12)
    assert policy.nav[-1] != 1.0 or rule == "cash"  # it traded


@pytest.fixture(scope="module")
def selection_run(tmp_path_factory):
    return trained_run(tmp_path_factory, "strategies", SELECTION)


def test_a_selection_policy_trains_exports_with_parity_and_serves(selection_run):
    checkpoint = exported_checkpoint(selection_run)
    assert checkpoint["signals"] and checkpoint["action_space"]["strategies"] == list(STRATEGIES)
    policy = load_policy(checkpoint)
    served = Policy(selection_run / "model.onnx", prefer_gpu=False)
    assert "rule chosen among" in served.metadata["action_semantics"]
    windows = np.load(selection_run / "parity_windows.npz")
    ohlcv, position = windows[windows.files[0]], windows[windows.files[1]]
    with torch.no_grad():
        expected = policy(torch.from_numpy(ohlcv), torch.from_numpy(position))
    decided = served.decide(ohlcv, position)
    np.testing.assert_allclose(decided, expected[0].numpy(), atol=1e-6)
    assert set(np.unique(decided)) <= {-1.0, 0.0, 1.0}
    assert expected[1].shape == (len(ohlcv), 5)  # one probability per rule
    # The report judges the policy against every rule it picks from.
    baselines = pd.read_csv(selection_run / "fold_0_test_baselines.csv").columns
    assert {"buy_and_hold", "cash", "ma_crossover", "momentum", "mean_reversion", "random"} <= set(baselines)


def test_compare_reports_each_rule_and_the_best_in_hindsight(tmp_path, capsys):
    base, variant = tmp_path / "base.json", tmp_path / "rules.yaml"
    base.write_text(json.dumps({"ppo": TINY["ppo"] | {"progress": False}, "splits": {"n_folds": 1}}))
    variant.write_text("action:\n  mode: strategies\n")
    code = main(["compare", "--data", "ml/sample", "--symbols", "GSPC", "--start", "2012-01-01", "--name", "mlp",
                 "--variant", f"rules={variant}", "--config", str(base), "--seeds", "1", "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    rows = {row["model"]: row for row in result["rows"]}
    assert set(rows) == {"mlp", "rules", "buy_and_hold", "cash", "ma_crossover", "momentum", "mean_reversion", BEST_RULE}
    rules = [rows[name]["sharpe"] for name in STRATEGIES]
    assert rows[BEST_RULE]["sharpe"] == max(rules) and rows[BEST_RULE]["rule"] in STRATEGIES
    assert rows["cash"]["sharpe"] == 0.0 and rows["cash"]["seed"] is None
    assert f"rules>{BEST_RULE}" in result["summary"]["beats"]
    assert result["judged"][-1] == BEST_RULE and BEST_RULE in printed


def test_config_and_fingerprint_of_rule_selection():
    with pytest.raises(ConfigError, match="action.strategies"):
        config_from_dict({"action": {"mode": "strategies", "strategies": ["momentum"]}})
    with pytest.raises(ConfigError, match="action.strategies"):
        config_from_dict({"action": {"mode": "strategies", "strategies": ["momentum", "astrology"]}})
    assert not config_from_dict({}).action.selects_strategies
    plain = training_fingerprint(config_from_dict({}))
    assert training_fingerprint(config_from_dict({"action": {"strategies": ["cash", "momentum"]}})) == plain
    rules = training_fingerprint(config_from_dict({"action": {"mode": "strategies"}}))
    assert rules != plain
    assert training_fingerprint(config_from_dict({"action": {"mode": "strategies",
                                                             "strategies": ["cash", "momentum"]}})) != rules
