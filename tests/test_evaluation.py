"""Metrics against hand-computed values, walk-forward splits, and selection that never reads test."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from ml.config import (ACTION_MODES, INTERVALS, SELECTION_METRICS, SOURCES, SYMBOL_RULE, ActionConfig, ConfigError,
                       CostConfig, PipelineConfig, SplitConfig, config_from_dict, is_symbol, load_config)
from ml.env.action_space import DiscreteExposure, make_action_space
from ml.evaluation import metrics
from ml.evaluation.backtest import run_backtest, target_series_policy
from ml.evaluation.splits import walk_forward_folds
from ml.market.series import prepare_series
from tests.conftest import ROOT, synthetic_bars


def test_hand_computed_metrics():
    nav = np.array([1.0, 1.1, 0.99, 1.089])
    returns = np.array([0.1, -0.1, 0.1])
    assert metrics.total_return(nav) == pytest.approx(0.089)
    std = returns.std(ddof=1)
    assert metrics.sharpe_ratio(nav, 252) == pytest.approx(returns.mean() / std * math.sqrt(252))
    assert metrics.annualized_volatility(nav, 252) == pytest.approx(std * math.sqrt(252))
    assert metrics.max_drawdown(nav) == pytest.approx(0.99 / 1.1 - 1)
    assert metrics.max_drawdown_duration(nav) == 2  # below the 1.1 peak at bars 2 and 3
    assert metrics.annualized_return(nav, 3) == pytest.approx(0.089)  # 3 bars = one year here
    downside = math.sqrt(0.01 / 3)
    assert metrics.sortino_ratio(nav, 252) == pytest.approx(returns.mean() / downside * math.sqrt(252))
    assert metrics.calmar_ratio(nav, 3) == pytest.approx(0.089 / (1 - 0.99 / 1.1))


def test_summary_counts_turnover_exposure_hit_rate_and_costs():
    nav = np.array([1.0, 1.02, 1.01, 1.03, 1.03])
    position = np.array([1.0, 1.0, 0.5, 0.0])
    summary = metrics.summarize(nav, position, traded=[1.0, 0.0, 0.5, 0.5], cost=[0.001, 0, 0.0005, 0.0005], ppy=4)
    assert summary["annual_turnover"] == pytest.approx(2.0)  # 2.0 traded over one year
    assert summary["average_exposure"] == pytest.approx(0.625)
    assert summary["hit_rate"] == pytest.approx(2 / 3)  # active bars: +2%, -0.98%, +1.98%
    assert summary["costs_paid"] == pytest.approx(0.002)
    gains = 0.02 + 0.02 / 1.01
    assert summary["profit_factor"] == pytest.approx(gains / (1 - 1.01 / 1.02))


def test_flat_equity_has_zero_sharpe_not_infinity():
    nav = np.ones(100)
    assert metrics.sharpe_ratio(nav, 252) == 0.0
    assert metrics.sortino_ratio(nav, 252) == 0.0
    assert metrics.max_drawdown(nav) == 0.0
    summary = metrics.summarize(nav, np.zeros(99), np.zeros(99), np.zeros(99), 252)
    assert summary["hit_rate"] == 0.0 and summary["profit_factor"] == 0.0


@pytest.mark.parametrize("bad", [[1.0, float("nan"), 1.1], [1.0], [1.0, -0.5]])
def test_bad_equity_curves_are_refused(bad):
    with pytest.raises(ValueError):
        metrics.sharpe_ratio(np.array(bad), 252)


def test_annualization_follows_interval_and_calendar():
    assert metrics.periods_per_year("1d") == 252
    assert metrics.periods_per_year("1d", "crypto") == 365
    assert metrics.periods_per_year("1h") == 252 * 7
    assert metrics.periods_per_year("1h", "crypto") == 365 * 24
    assert metrics.periods_per_year("5m") == 252 * 78
    with pytest.raises(ValueError):
        metrics.periods_per_year("7s")


def test_walk_forward_segments_never_overlap_and_keep_the_purge_gap(gspc_bars):
    lookback = 64
    folds = walk_forward_folds(gspc_bars["timestamp"], lookback, SplitConfig(n_folds=4, embargo_bars=5))
    assert len(folds) == 4
    for fold in folds:
        (tr0, tr1), (va0, va1), (te0, te1) = fold.train, fold.validation, fold.test
        assert tr0 >= lookback - 1
        assert tr0 < tr1 < va0 <= va1 < te0 <= te1
        # Every bar a validation (test) decision window reads lies after every bar training used.
        assert va0 - lookback + 1 > tr1 + 1
        assert te0 - lookback + 1 > va1 + 1
        assert va0 - tr1 >= lookback + 1 + 5 and te0 - va1 >= lookback + 1 + 5
        # Calendar terms: the test window spans about 12 months.
        span = gspc_bars["timestamp"].iloc[te1] - gspc_bars["timestamp"].iloc[te0]
        assert pd.Timedelta(days=350) <= span <= pd.Timedelta(days=366)
    # Folds walk forward: test windows are consecutive and end at the last bar.
    assert folds[-1].test[1] == len(gspc_bars) - 1
    for earlier, later in zip(folds, folds[1:]):
        assert later.test[0] == earlier.test[1] + 1


def test_rolling_train_window_and_too_little_data():
    timestamps = pd.Series(pd.bdate_range("2010-01-01", periods=2000, tz="UTC"))
    rolling = walk_forward_folds(timestamps, 64, SplitConfig(n_folds=2, train_months=24))
    for fold in rolling:
        span = timestamps.iloc[fold.train[1]] - timestamps.iloc[fold.train[0]]
        assert span <= pd.Timedelta(days=731)
    with pytest.raises(ValueError, match="not enough data"):
        walk_forward_folds(timestamps.iloc[:600], 64, SplitConfig(n_folds=3))
    with pytest.raises(ValueError, match="purge_bars"):
        walk_forward_folds(timestamps, 64, SplitConfig(purge_bars=10))


def test_baselines_are_causal():
    bars = synthetic_bars(500, drift=0.0, vol=0.01, seed=0)
    changed = bars.copy()
    changed.loc[300:, ["open", "high", "low", "close"]] *= 2.0
    space = DiscreteExposure((-1.0, 0.0, 1.0))
    base = space.baselines(prepare_series(bars, 64, torch.device("cpu")))
    after = space.baselines(prepare_series(changed, 64, torch.device("cpu")))
    for name in base:
        np.testing.assert_array_equal(base[name][:300], after[name][:300])


def test_buy_and_hold_backtest_tracks_the_asset_minus_entry_cost():
    bars = synthetic_bars(400)
    series = prepare_series(bars, 64, torch.device("cpu"))
    costs = CostConfig(commission_bps=5, half_spread_bps=0, slippage_bps=0)
    segment = (100, 399)
    bt = run_backtest(target_series_policy(np.ones((400, 1)), series.device), series, segment, costs,
                      make_action_space(ActionConfig()))
    opens, closes = bars["open"].to_numpy(), bars["close"].to_numpy()
    units = 1.0 / opens[101]
    expected = (1.0 - units * opens[101] * 5e-4) + units * (closes[399] - opens[101])
    # Full exposure is re-targeted every bar; with no drift (all cash invested) there is no further trading.
    assert bt.nav[-1] == pytest.approx(expected, rel=1e-3)
    assert bt.nav[0] == 1.0 and len(bt.nav) == 300
    assert (bt.decision == 1.0).all()


def test_checkpoint_selection_never_runs_on_test(monkeypatch):
    """Training and selection backtest only validation bars; test is not touched during training."""
    from ml.evaluation import walkforward

    bars = synthetic_bars(1400)
    config = config_from_dict({"ppo": {"total_timesteps": 4096, "num_envs": 32, "num_steps": 32, "eval_every": 1},
                               "splits": {"n_folds": 2, "test_months": 6, "validation_months": 6,
                                          "min_train_bars": 300}})
    series = prepare_series(bars, config.lookback, torch.device("cpu"))
    folds = walk_forward_folds(bars["timestamp"], config.lookback, config.splits)
    seen = []
    real = walkforward.run_backtest

    def spy(decide, series, segment, *args, **kwargs):
        seen.append(segment)
        return real(decide, series, segment, *args, **kwargs)

    monkeypatch.setattr(walkforward, "run_backtest", spy)
    for fold in folds:
        seen.clear()
        walkforward.train_fold(series, fold, config)
        assert seen and all(segment == fold.validation for segment in seen)


def test_config_refuses_unknown_fields():
    with pytest.raises(ValueError, match=r"ppo.learning_rat: unknown config field \(known in ppo: \[.*'learning_rate'"):
        config_from_dict({"ppo": {"learning_rat": 1e-3}})
    config = config_from_dict({"action": {"exposure_levels": [0.0, 1.0]}})
    assert config.action.exposure_levels == (0.0, 1.0)
    with pytest.raises(ValueError,
                       match=r"action.exposure_levels = \[0.0, 0.5, 0.0\]: each exposure level must appear once"):
        config_from_dict({"action": {"exposure_levels": [0.0, 0.5, 0.0]}})
    assert isinstance(config, PipelineConfig)


def test_documented_example_config_is_the_defaults():
    assert load_config(ROOT / "docs" / "example-config.yaml") == PipelineConfig()


def _known(section) -> str:
    import dataclasses

    return str(sorted(f.name for f in dataclasses.fields(section)))


@pytest.mark.parametrize("values, message", [
    ({"ppo": {"gamma": 7}}, "ppo.gamma = 7: must be in (0, 1]"),
    ({"ppo": {"gamma": 0}}, "ppo.gamma = 0: must be in (0, 1]"),
    ({"ppo": {"num_envs": 0}}, "ppo.num_envs = 0: must be >= 1"),
    ({"lookback": 1}, "lookback = 1: must be >= 2"),
    ({"seeds": []}, "seeds = []: must list at least one seed, each >= 0"),
    ({"splits": {"n_folds": 0}}, "splits.n_folds = 0: must be >= 1"),
    ({"costs": {"commission_bps": -1}}, "costs.commission_bps = -1: must be >= 0"),
    ({"action": {"mode": "foo"}}, f"action.mode = foo: must be one of {list(ACTION_MODES)}"),
    ({"data": {"source": "ftp"}}, f"data.source = ftp: must be one of {list(SOURCES)}"),
    ({"data": {"interval": "2h"}}, f"data.interval = 2h: must be one of {list(INTERVALS)}"),
    ({"selection_metric": "alpha"}, f"selection_metric = alpha: must be one of {list(SELECTION_METRICS)}"),
    ({"ppo": {"num_envs": "many"}}, "ppo.num_envs = 'many': must be a whole number"),
    ({"ppo": {"anneal_lr": "yes"}}, "ppo.anneal_lr = 'yes': must be true or false"),
    ({"ppo": {"action_mode": "continuous"}}, "ppo.action_mode: this setting is now action.mode"),
    ({"ppo": {"learning_rat": 1e-3}},
     "ppo.learning_rat: unknown config field (known in ppo: " + _known(PipelineConfig().ppo) + ")"),
    ({"learning_rate": 1e-3},
     "learning_rate: unknown config field (known in the top level: " + _known(PipelineConfig()) + ")"),
])
def test_every_invalid_value_is_refused_with_the_field_the_value_and_the_rule(values, message):
    with pytest.raises(ConfigError) as refused:
        config_from_dict(values)
    assert str(refused.value) == message
    assert isinstance(refused.value, ValueError)


def test_a_config_file_is_refused_with_the_same_message(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ppo:\n  gamma: 7\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value) == "ppo.gamma = 7: must be in (0, 1]"


REAL_TICKERS = ["GSPC", "^GSPC", "BRK-B", "BTC-USD", "EURUSD=X", "KO", "BF.B", "^VIX", "6758.T"]
NOT_TICKERS = ["../../../tmp/x/evil", "a/b", "a\\b", "..", "A..B", "", " GSPC", "GS PC", "GSPC\n", "-GSPC",
               ".hidden", "X" * 33, "/etc/passwd"]


@pytest.mark.parametrize("symbol", REAL_TICKERS)
def test_real_tickers_are_symbols(symbol):
    assert is_symbol(symbol)
    assert config_from_dict({"data": {"symbol": symbol}}).data.symbol == symbol


@pytest.mark.parametrize("symbol", NOT_TICKERS)
def test_a_symbol_that_is_no_ticker_is_refused_naming_the_field(symbol):
    assert not is_symbol(symbol)
    with pytest.raises(ConfigError) as refused:
        config_from_dict({"data": {"symbol": symbol}})
    assert str(refused.value) == f"data.symbol = {symbol}: {SYMBOL_RULE}"
    with pytest.raises(ConfigError, match=r"^data\.symbols = .*: each symbol must be a ticker"):
        config_from_dict({"data": {"symbols": ["GSPC", symbol]}, "action": {"mode": "portfolio"}})


SECRET = "s3cr3t-hash-Zq8"


@pytest.mark.parametrize("content", [
    f"root:$6${SECRET}:20228:0:99999:7:::\ndaemon:*:20228:0:99999:7:::\n",  # parses as a mapping of lines
    f"{SECRET} line one\n{SECRET} line two\n",  # a string
    f"- {SECRET}\n- two\n",  # a list
    f"ppo: [{SECRET}\n",  # broken YAML, whose error quotes the text
    f"data: {SECRET}\n",  # a section that is no mapping
    f"{{'{SECRET}': 1}}\n",
])
def test_a_config_file_that_is_not_a_config_is_refused_without_its_contents(tmp_path, content):
    import traceback

    path = tmp_path / "not-a-config.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert SECRET not in str(refused.value)
    assert SECRET not in "".join(traceback.format_exception(refused.value))  # nor in a chained exception
    assert "\n" not in str(refused.value)


def test_a_mistyped_key_is_still_named_and_a_non_mapping_section_by_its_type(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("ppo:\n  gama: 0.9\n")
    with pytest.raises(ConfigError, match=r"^ppo\.gama: unknown config field \(known in ppo: "):
        load_config(path)
    path.write_text("data: GSPC\n")
    with pytest.raises(ConfigError, match=r"^data: must be a mapping of fields, got a str$"):
        load_config(path)


def test_importing_the_config_imports_no_torch():
    """A config is loaded and refused before any heavy work: ml.config must stay light."""
    code = "import sys, ml.config; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_selection_metric_is_a_backtest_metric():
    from ml.evaluation.walkforward import selection_score

    bars = synthetic_bars(400)
    series = prepare_series(bars, 64, torch.device("cpu"))
    bt = run_backtest(target_series_policy(np.ones((400, 1)), series.device), series, (100, 399), CostConfig(),
                      make_action_space(ActionConfig()))
    computed = bt.metrics(metrics.periods_per_year("1d"))
    assert SELECTION_METRICS
    for name in SELECTION_METRICS:
        assert name in computed, name
        assert selection_score(bt, config_from_dict({"selection_metric": name})) == computed[name]


def test_backtests_spread_the_borrow_cost_over_the_bars_of_a_year_of_their_interval(gspc_bars):
    import numpy as np
    import torch

    from ml.config import ActionConfig, CostConfig
    from ml.env.action_space import make_action_space
    from ml.evaluation.backtest import run_backtest, target_series_policy
    from ml.market.series import prepare_series

    series = prepare_series(gspc_bars, 64, torch.device("cpu"))
    short = target_series_policy(np.full((len(gspc_bars), 1), -1.0), series.device)
    costs, space = CostConfig(0, 0, 0, borrow_bps_per_year=100.0), make_action_space(ActionConfig(mode="continuous"))
    daily = run_backtest(short, series, (100, 110), costs, space, periods_per_year=252.0)
    five_minutes = run_backtest(short, series, (100, 110), costs, space, periods_per_year=252.0 * 78)
    # The first bar's borrow on a short of NAV about 1: 100 bps a year spread over the year's bars.
    assert daily.cost[0] == pytest.approx(1e-2 / 252, rel=0.05)
    assert daily.cost[0] / five_minutes.cost[0] == pytest.approx(78, rel=1e-2)
