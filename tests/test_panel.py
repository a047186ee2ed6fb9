"""One policy across many symbols: per-symbol statistics, held-out symbols, one export for all.

Real daily closes of three stocks from ../shared/data/market (2010 on), a tiny PPO budget:
these tests check what the panel reads and how it serves, not whether it makes money
(docs/panel.md records that, from a full run).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from ml.cli import main
from ml.config import ConfigError, config_from_dict
from ml.evaluation.splits import walk_forward_folds
from ml.market.panel import build_panel, symbol_normalization
from ml.data.sources import load_folder
from ml.pipeline.panel import (check_panel_config, export_panel, panel_backtests, summarize, train_panel)
from ml.serving import InputError, Policy

SYMBOLS = ["AAPL", "JNJ", "KO"]
HELD_OUT = "KO"
TINY = {"ppo": {"total_timesteps": 2048, "num_envs": 32, "num_steps": 16, "eval_every": 1, "progress": False,
                "device": "cpu"},
        "splits": {"n_folds": 1}, "gate": {"parity_windows": 32}}


@pytest.fixture(scope="module")
def frames(shared_market):
    return load_folder(shared_market, SYMBOLS, start="2010-01-01")


@pytest.fixture(scope="module")
def config():
    return config_from_dict(TINY)


@pytest.fixture(scope="module")
def panel(frames, config):
    return build_panel(frames, config.lookback, torch.device("cpu"))


@pytest.fixture(scope="module")
def fold(panel, config):
    return walk_forward_folds(panel.timestamps, config.lookback, config.splits)[-1]


@pytest.fixture(scope="module")
def trained(panel, fold, config):
    return train_panel(panel, fold, config, [s for s in SYMBOLS if s != HELD_OUT], seed=3)


def test_each_block_is_standardized_with_its_symbols_own_training_window(panel, fold):
    stacked = panel.stacked(fold.train)
    first, last = fold.train
    for symbol in SYMBOLS:
        raw = panel.series[symbol].features.numpy().astype("float64")
        mean, std = raw[first:last + 1].mean(axis=0), raw[first:last + 1].std(axis=0, ddof=1)
        a, b = panel.block(symbol, (0, panel.n_bars - 1))
        block = stacked.features[a:b + 1].numpy()
        np.testing.assert_allclose(block[first:], ((raw - mean) / std)[first:], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(block[first:last + 1].mean(axis=0), 0.0, atol=1e-4)
        np.testing.assert_allclose(block[first:last + 1].std(axis=0, ddof=1), 1.0, atol=1e-4)
        # The bars stack unchanged: the block is the symbol's own series.
        assert torch.equal(stacked.ohlcv[a:b + 1], panel.series[symbol].ohlcv)


def test_bars_after_the_training_window_never_change_the_statistics(frames, panel, fold, config):
    train_end = panel.timestamps.iloc[fold.train[1]]
    changed = dict(frames)
    later = changed["JNJ"]["timestamp"] > train_end
    changed["JNJ"] = changed["JNJ"].assign(close=np.where(later, changed["JNJ"]["close"] * 3.0,
                                                          changed["JNJ"]["close"]))
    other = build_panel(changed, config.lookback, torch.device("cpu"))
    assert torch.equal(other.normalization("JNJ", fold.train), panel.normalization("JNJ", fold.train))
    a, _ = panel.block("JNJ", (0, 0))
    rows = slice(a, a + fold.train[1] + 1)
    assert torch.equal(torch.nan_to_num(other.stacked(fold.train).features[rows]),
                       torch.nan_to_num(panel.stacked(fold.train).features[rows]))


def test_the_held_out_symbol_never_reaches_training(frames, panel, fold, config, trained):
    """Replace the held-out symbol's bars by anything: the panel trains to the same weights."""
    rng = np.random.default_rng(0)
    other_frames = dict(frames)
    noise = np.exp(np.cumsum(rng.normal(0, 0.05, len(frames[HELD_OUT]))))
    other_frames[HELD_OUT] = frames[HELD_OUT].assign(close=frames[HELD_OUT]["close"] * noise)
    other = build_panel(other_frames, config.lookback, torch.device("cpu"))
    again = train_panel(other, fold, config, [s for s in SYMBOLS if s != HELD_OUT], seed=3)
    assert again.best_update == trained.best_update
    # Selection never read it either: every checkpoint scored the same on the same validation returns.
    scores = [[row.get("validation_score") for row in result.history] for result in (trained, again)]
    assert scores[0] == scores[1] and any(score is not None for score in scores[0])
    assert again.validation_returns == trained.validation_returns
    for name, value in trained.agent.state_dict().items():
        assert torch.equal(value, again.agent.state_dict()[name]), name
    # And the seed matters: another seed trains another policy.
    third = train_panel(panel, fold, config, [s for s in SYMBOLS if s != HELD_OUT], seed=4)
    assert not torch.equal(third.agent.actor.weight, trained.agent.actor.weight)


def test_training_backtest_and_serving_agree_on_a_symbol_the_panel_never_saw(tmp_path, frames, panel, fold,
                                                                             config, trained):
    backtests = panel_backtests(trained.agent, panel, fold, config)
    export = export_panel(trained.agent, panel, fold, config, HELD_OUT, tmp_path / "panel.onnx")
    assert export["parity_passed"] and set(export["parity"]) == set(SYMBOLS)
    assert max(p["max_abs_diff"] for p in export["parity"].values()) <= 1e-5

    policy = Policy(tmp_path / "panel.onnx", prefer_gpu=False)
    assert policy.per_symbol and policy.metadata["held_out"] == HELD_OUT
    # The statistics a user fits on the held-out symbol's own history up to the training end
    # are the ones the panel used for it.
    until = panel.timestamps.iloc[fold.train[1]]
    fitted = symbol_normalization(frames[HELD_OUT], config.lookback, until).numpy()
    np.testing.assert_allclose(fitted, policy.normalization(HELD_OUT), rtol=1e-5, atol=1e-6)

    # Serving replays the backtest: each test bar's window and the held position give its decision.
    backtest, first = backtests[HELD_OUT], fold.test[0]
    ohlcv = panel.series[HELD_OUT].ohlcv.numpy()
    n = len(backtest.decision)
    windows = np.stack([ohlcv[first + i - config.lookback + 1:first + i + 1, 0] for i in range(n)])
    served = policy.decide(windows, backtest.weights[:n].astype("float32"), normalization=fitted)
    np.testing.assert_allclose(served[:, 0], backtest.decision[:, 0], atol=1e-5)

    with pytest.raises(InputError, match="normalization: this panel model needs"):
        policy.decide(windows[:1], np.zeros((1, 1)))
    with pytest.raises(InputError, match="normalization: must be finite"):
        policy.decide(windows[:1], np.zeros((1, 1)), normalization=np.zeros((2, 3)))
    with pytest.raises(InputError, match="symbol 'MSFT'"):
        policy.normalization("MSFT")


def test_the_summary_counts_wins_on_the_same_fold_and_seed():
    rows = [{"fold": 0, "seed": None, "symbol": s, "model": "buy_and_hold", "sharpe": hold}
            for s, hold in (("A", 1.0), ("B", 0.0))]
    for seed, panel_a, single_a, panel_b, single_b in ((1, 2.0, 0.5, -1.0, 0.5), (2, 0.0, 1.5, 1.0, -0.5)):
        rows += [{"fold": 0, "seed": seed, "symbol": "A", "model": "panel", "sharpe": panel_a},
                 {"fold": 0, "seed": seed, "symbol": "A", "model": "per_symbol", "sharpe": single_a},
                 {"fold": 0, "seed": seed, "symbol": "B", "model": "panel", "sharpe": panel_b},
                 {"fold": 0, "seed": seed, "symbol": "B", "model": "per_symbol", "sharpe": single_b}]
    summary = summarize(rows, held_out="B")
    a = summary["per_symbol"]["A"]
    assert a["sharpe"] == {"panel": 1.0, "per_symbol": 1.0, "buy_and_hold": 1.0}
    assert a["beats"] == {"panel>per_symbol": "1/2", "panel>buy_and_hold": "1/2", "per_symbol>buy_and_hold": "1/2"}
    assert summary["per_symbol"]["B"]["held_out"] and summary["per_symbol"]["B"]["beats"]["panel>buy_and_hold"] == "1/2"
    # Pooled over the trained symbols only (A): panel 2.0 and 0.0 by seed, per-symbol 0.5 and 1.5.
    spread = summary["seed_spread"]["panel"]
    assert spread["per_seed_mean"] == {1: 2.0, 2: 0.0}
    assert spread["std_within_cell"] == pytest.approx(np.std([2.0, 0.0], ddof=1))
    assert "buy_and_hold" not in summary["seed_spread"]
    assert summary["beats"]["panel>per_symbol"] == "1/2"
    difference = summary["paired_difference"]["panel-per_symbol"]
    # One fold: no interval, since the fold is the unit that varies independently.
    assert (difference["mean"], difference["pairs"], difference["folds"]) == (0.0, 2, 1)
    assert "ci_low" not in difference


def test_the_paired_interval_resamples_folds_not_seeds():
    rows = []
    for fold, edge in enumerate([0.5, 1.0, 1.5, -0.5]):
        rows.append({"fold": fold, "seed": None, "symbol": "A", "model": "buy_and_hold", "sharpe": 0.2})
        for seed in (1, 2, 3):  # seeds repeat a fold's result: they add pairs, not evidence
            rows += [{"fold": fold, "seed": seed, "symbol": "A", "model": "panel", "sharpe": edge},
                     {"fold": fold, "seed": seed, "symbol": "A", "model": "per_symbol", "sharpe": 0.0}]
    difference = summarize(rows, held_out="B")["paired_difference"]["panel-per_symbol"]
    assert (difference["pairs"], difference["folds"]) == (12, 4)
    assert difference["mean"] == pytest.approx(0.625)
    assert -0.5 <= difference["ci_low"] < 0.625 < difference["ci_high"] <= 1.5
    folds_only = summarize([r for r in rows if r["seed"] in (None, 1)], held_out="B")["paired_difference"]["panel-per_symbol"]
    assert (folds_only["ci_low"], folds_only["ci_high"]) == (difference["ci_low"], difference["ci_high"])


def test_a_panel_refuses_what_it_cannot_trade():
    with pytest.raises(ConfigError, match="portfolio"):
        check_panel_config(config_from_dict({"action": {"mode": "portfolio"},
                                             "data": {"symbols": ["GSPC", "KO"]}}))
    with pytest.raises(ConfigError, match="risk overlay"):
        check_panel_config(config_from_dict({"risk": {"target_volatility": 0.1}}))
    with pytest.raises(ConfigError, match="ppo.regime_states = 2"):
        check_panel_config(config_from_dict({"ppo": {"regime_states": 2}}))
    check_panel_config(config_from_dict({"ppo": {"critic_quantiles": 32, "cvar_weight": 0.5}}))  # accepted


def test_the_cli_trains_judges_and_exports_a_panel(tmp_path, shared_market, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "panel"
    code = main(["panel", "--data", str(shared_market), "--symbols", *SYMBOLS, "--hold-out", HELD_OUT,
                 "--seeds", "1", "2", "--start", "2012-01-01", "--config", str(config), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "KO *" in printed and "ONNX parity passed" in printed
    result = json.loads((out / "panel.json").read_text())
    frame = pd.DataFrame(result["rows"])
    # One fold: buy-and-hold once per symbol, panel and per-symbol once per symbol and seed.
    assert frame.groupby("model").size().to_dict() == {"buy_and_hold": 3, "panel": 6, "per_symbol": 6}
    assert result["panel_timesteps"] == 2 * result["per_symbol_timesteps"]
    assert Policy(out / "panel.onnx", prefer_gpu=False).metadata["panel_symbols"] == "AAPL,JNJ"


@pytest.mark.parametrize("args, message", [
    (["--symbols", "AAPL", "KO", "--hold-out", "JNJ"], "--hold-out JNJ must be one of --symbols"),
    (["--symbols", "AAPL", "NOPE", "--hold-out", "AAPL"], "NOPE.csv"),
    (["--symbols", "AAPL", "KO", "--hold-out", "KO", "--start", "2022-11-01"], "share only"),
    (["--symbols", "AAPL", "KO", "--hold-out", "KO", "--start", "2022-06-01"], "not enough data for any fold"),
])
def test_bad_panel_input_gets_one_line(tmp_path, shared_market, capsys, args, message):
    code = main(["panel", "--data", str(shared_market), *args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_symbol_that_is_a_path_is_refused_before_any_file_is_named(tmp_path, shared_market, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["panel", "--data", str(shared_market), "--symbols", "AAPL", "../../etc/passwd", "--hold-out", "AAPL",
              "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and "passwd" in capsys.readouterr().err
