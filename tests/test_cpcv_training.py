"""Training on combinatorial purged CV splits: episodes stay inside one train segment, normalization and
selection read no test bar, the paths are skfolio's, and a tiny pipeline run reports them under `cpcv`."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from skfolio.model_selection import CombinatorialPurgedCV

from ml.agent.policy import ActorCritic
from ml.agent.ppo import episode_sampler, train
from ml.config import ConfigError, SplitConfig, config_from_dict, load_config
from ml.env.action_space import make_action_space
from ml.env.trading_env import TradingEnv
from ml.evaluation.backtest import Backtest
from ml.evaluation.cpcv import chain
from ml.evaluation.metrics import bar_returns
from ml.evaluation.splits import cpcv_folds, cpcv_groups, cpcv_paths
from ml.evaluation.walkforward import backtest_policy, new_agent, train_fold
from ml.market.series import prepare_series
from ml.pipeline import REPORT_SCHEMA_VERSION, evaluate, load_data, start_tracking, train_folds, validate_data
from ml.pipeline.rundir import RunFolder, load_agent_at, read_config, read_cpcv_folds, read_market
from tests.conftest import synthetic_bars

CPU = torch.device("cpu")
SMALL_PPO = {"total_timesteps": 2048, "num_envs": 32, "num_steps": 32, "eval_every": 1, "progress": False}


# The start sampler --------------------------------------------------------------------------

def test_episode_starts_and_ends_stay_inside_one_segment_by_hand():
    # Segment (10, 14) offers starts 10..13 and ends them at 14; (30, 32) offers 30, 31 and ends at 32.
    draw = episode_sampler([(10, 14), (30, 32)], 6000, CPU, torch.Generator().manual_seed(0))
    starts, ends = draw()
    assert set(starts.tolist()) == {10, 11, 12, 13, 30, 31}
    assert (ends[starts <= 13] == 14).all() and (ends[starts >= 30] == 32).all()
    # Uniform over the six offered bars, so the longer segment is drawn twice as often.
    counts = np.bincount(starts.numpy(), minlength=32)[[10, 11, 12, 13, 30, 31]]
    assert np.all(np.abs(counts / 6000 - 1 / 6) < 0.02), counts


def test_one_segment_draws_as_before():
    starts, ends = episode_sampler([(5, 90)], 64, CPU, torch.Generator().manual_seed(3))()
    np.testing.assert_array_equal(starts, torch.randint(5, 90, (64,), generator=torch.Generator().manual_seed(3)))
    assert (ends == 90).all()
    with pytest.raises(ValueError, match="at least two bars"):
        episode_sampler([(5, 90), (95, 95)], 4, CPU, torch.Generator())


class SteppedBars(TradingEnv):
    """Records, for every step of every episode, the bar decided on, the bar filled on and the episode's end."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps_taken: list[np.ndarray] = []

    def step(self, target):
        decided, end = self.t.clone(), self.end.clone()
        result = super().step(target)
        self.steps_taken.append(np.stack([decided.numpy(), self.t.numpy(), end.numpy()], axis=1))
        return result


def test_training_never_steps_an_episode_across_a_gap():
    config = config_from_dict({"ppo": SMALL_PPO | {"total_timesteps": 4096}, "env": {"episode_bars": 40}})
    series = prepare_series(synthetic_bars(600), config.lookback, CPU)
    segments = ((70, 150), (230, 300), (420, 431))
    space = make_action_space(config.action, series.n_assets)
    env = SteppedBars(series, config.ppo.num_envs, space, config.costs, config.env)
    agent = ActorCritic(series.features.shape[1], space, config.ppo.hidden)
    agent.set_normalization(*series.feature_stats(segments))
    train(config.ppo, env, agent, segments, validate=lambda _agent: 0.0)
    steps = np.concatenate(env.steps_taken)
    segment_of = {bar: k for k, (first, last) in enumerate(segments) for bar in range(first, last + 1)}
    for decided, filled, end in steps:
        assert decided in segment_of and filled == decided + 1 and filled <= end
        assert segment_of.get(filled) == segment_of[decided] == segment_of[end]
        assert end == segments[segment_of[decided]][1]
    assert {segment_of[d] for d in steps[:, 0]} == {0, 1, 2}  # every segment is trained on


# Layout, normalization and selection ------------------------------------------------------

SPLITS = SplitConfig(method="cpcv", n_groups=5, n_test_groups=2, embargo_bars=3, min_train_bars=100)


def test_layout_keeps_validation_and_train_apart_from_every_test_bar():
    lookback, n_bars = 64, 1500
    folds = cpcv_folds(n_bars, lookback, SPLITS)
    groups = cpcv_groups(n_bars, lookback, SPLITS)
    assert len(folds) == math.comb(5, 2) and groups[0][0] == lookback - 1 and groups[-1][1] == n_bars - 1
    purge, gap = lookback + 1, lookback + 1 + SPLITS.embargo_bars
    for fold in folds:
        untested = [g for g in range(5) if g not in fold.test_groups]
        assert fold.validation_group == max(untested)
        first, last = groups[fold.validation_group]
        assert first <= fold.validation[0] < fold.validation[1] <= last
        test_bars = np.concatenate([np.arange(a, b + 1) for a, b in fold.test])
        train_bars = np.concatenate([np.arange(a, b + 1) for a, b in fold.train])
        validation_bars = np.arange(fold.validation[0], fold.validation[1] + 1)
        for bars in (train_bars, validation_bars):  # a purge before each test bar, purge + embargo after
            distance = bars[:, None] - test_bars[None, :]
            assert not (np.abs(distance) == 0).any()
            assert (distance[distance < 0] < -purge).all() and (distance[distance > 0] > gap - 1).all()
        assert np.abs(train_bars[:, None] - validation_bars[None, :]).min() > gap
        # Each test segment runs from its group's first bar to the next group's first bar.
        for group, (a, b) in zip(fold.test_groups, fold.test):
            assert a == groups[group][0] and b == (groups[group + 1][0] if group < 4 else n_bars - 1)


def test_normalization_reads_train_bars_only():
    config = config_from_dict({"splits": {"method": "cpcv", "n_groups": 5, "n_test_groups": 2,
                                          "min_train_bars": 100}})
    bars = synthetic_bars(1500)
    fold = cpcv_folds(len(bars), config.lookback, config.splits)[4]  # test groups (1, 2): train on both sides
    assert fold.test_groups == (1, 2) and len(fold.train) == 2
    agent = new_agent(prepare_series(bars, config.lookback, CPU), config, fold)
    tested = np.zeros(len(bars), dtype=bool)
    for first, last in fold.test:
        tested[first:last + 1] = True
    changed = bars.copy()
    prices = ["open", "high", "low", "close"]
    changed.loc[tested, prices] *= np.exp(np.cumsum(np.random.default_rng(1).normal(0, 0.05, tested.sum())))[:, None]
    same = new_agent(prepare_series(changed, config.lookback, CPU), config, fold)
    torch.testing.assert_close(same.feature_mean, agent.feature_mean, rtol=0, atol=0)
    torch.testing.assert_close(same.feature_std, agent.feature_std, rtol=0, atol=0)
    # Changing one train bar does move them: the statistics do read the train bars.
    nudged = bars.copy()
    nudged.loc[fold.train[1][0] + 10, prices] *= 1.2
    moved = new_agent(prepare_series(nudged, config.lookback, CPU), config, fold)
    assert not torch.equal(moved.feature_mean, agent.feature_mean)


def test_training_and_selection_read_no_test_bar():
    config = config_from_dict({"ppo": SMALL_PPO | {"total_timesteps": 4096, "seed": 2},
                               "splits": {"method": "cpcv", "n_groups": 5, "n_test_groups": 2,
                                          "min_train_bars": 100}})
    bars = synthetic_bars(1200, seed=4)
    fold = cpcv_folds(len(bars), config.lookback, config.splits)[5]  # test groups (1, 3), validation group 4
    assert fold.test_groups == (1, 3) and fold.validation_group == 4
    test_bars = np.zeros(len(bars), dtype=bool)
    for first, last in fold.test:
        test_bars[first:last + 1] = True
    wild = bars.copy()
    wild.loc[test_bars, ["open", "high", "low", "close"]] *= np.random.default_rng(0).uniform(0.5, 2.0,
                                                                                            (test_bars.sum(), 1))
    results = [train_fold(prepare_series(frame, config.lookback, CPU), fold, config) for frame in (bars, wild)]
    assert results[0].best_update == results[1].best_update
    assert [h.get("validation_score") for h in results[0].history] == [h.get("validation_score")
                                                                       for h in results[1].history]
    for name, value in results[0].agent.state_dict().items():
        assert torch.equal(value, results[1].agent.state_dict()[name]), name
    # ... while the test backtest does read them.
    tests = [backtest_policy(results[0].agent, prepare_series(frame, config.lookback, CPU), fold.test[0], config)
             for frame in (bars, wild)]
    assert not np.allclose(tests[0].nav, tests[1].nav)


# Paths -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_groups, n_test_groups", [(4, 2), (5, 2), (6, 2), (6, 3), (7, 2), (8, 4)])
def test_paths_are_skfolios(n_groups, n_test_groups):
    reference = CombinatorialPurgedCV(n_folds=n_groups, n_test_folds=n_test_groups)
    paths = cpcv_paths(n_groups, n_test_groups)
    assert paths.shape == (n_groups, reference.n_test_paths)
    np.testing.assert_array_equal(paths, reference.recombined_paths)
    # Seen from the splits: skfolio's path id of each split's j-th test group points back at the split.
    for split, (groups, path_ids) in enumerate(zip(reference.test_set_index, reference.get_path_ids())):
        for group, path in zip(groups, path_ids):
            assert paths[group, path] == split
    # Every path takes each group exactly once, from a split that tests it.
    for path in paths.T:
        for group, split in enumerate(path):
            assert group in reference.test_set_index[split]


def _backtest(nav: list[float], exposure: float) -> Backtest:
    n = len(nav)
    return Backtest(["X"], pd.Series(pd.bdate_range("2020-01-01", periods=n)), np.array(nav),
                    np.full((n, 1), exposure), np.zeros((n - 1, 1)), np.full(n - 1, 0.1), np.full(n - 1, 0.01))


def test_chained_backtests_compound_as_one_account():
    joined = chain([_backtest([1.0, 1.1, 1.21], 1.0), _backtest([1.0, 0.5, 0.6], 0.5)])
    np.testing.assert_allclose(joined["nav"], [1.0, 1.1, 1.21, 0.605, 0.726])
    np.testing.assert_allclose(bar_returns(joined["nav"]), [0.1, 0.1, -0.5, 0.2])
    np.testing.assert_allclose(joined["cost"], [0.01, 0.01, 0.0121, 0.0121])  # money scales with the NAV
    np.testing.assert_allclose(joined["position"], [1.0, 1.0, 0.5, 0.5])


# Config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("splits, message", [
    ({"method": "kfold"}, "splits.method = kfold: must be one of ['walkforward', 'cpcv']"),
    ({"n_groups": 2}, "splits.n_groups = 2: must be >= 3"),
    ({"n_groups": 5, "n_test_groups": 4}, "splits.n_test_groups = 4: must be at most splits.n_groups - 2 (3)"),
])
def test_bad_split_settings_are_refused_in_one_line(tmp_path, splits, message):
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"splits": splits}))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_walk_forward_stays_the_default():
    assert config_from_dict({}).splits.method == "walkforward"


# A tiny pipeline run ----------------------------------------------------------------------

TINY = {
    "data": {"source": "sample", "symbol": "GSPC", "start": "2014-01-01"},
    "ppo": SMALL_PPO | {"total_timesteps": 4096, "num_envs": 64},
    "splits": {"n_folds": 1, "test_months": 6, "validation_months": 6, "min_train_bars": 150,
               "method": "cpcv", "n_groups": 4, "n_test_groups": 2},
}


@pytest.fixture(scope="module")
def cpcv_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpcv_run")
    config = config_from_dict(TINY | {"registry": {"tracking_uri": f"sqlite:///{out / 'mlflow.db'}"}})
    load_data(out, config)
    validate_data(out)
    start_tracking(out)
    train_folds(out)
    evaluate(out)
    return out, json.loads((out / "report.json").read_text())


def test_pipeline_reports_one_path_per_skfolio_path(cpcv_run):
    out, report = cpcv_run
    reference = CombinatorialPurgedCV(n_folds=4, n_test_folds=2)
    section = report["cpcv"]
    assert report["schema_version"] == REPORT_SCHEMA_VERSION == "2.3"
    assert len(report["folds"]) == 1  # the walk-forward fold still gives the exported model
    assert section["n_splits"] == len(section["splits"]) == reference.n_splits == 6
    assert section["n_paths"] == len(section["paths"]) == reference.n_test_paths == 3
    assert [p["splits"] for p in section["paths"]] == reference.recombined_paths.T.tolist()
    assert [s["test_groups"] for s in section["splits"]] == reference.test_set_index.tolist()
    for split in section["splits"]:
        assert split["training"]["cpcv_split"] == split["index"]
        assert len(split["training"]["seeds"]) == 1 and split["pbo"]["n_trials"] == 2  # 2 checkpoints x 1 seed
    sharpes = section["path_sharpe"]["policy"]["values"]
    assert sharpes == [p["policy"]["sharpe"] for p in section["paths"]] and all(map(np.isfinite, sharpes))
    assert section["path_sharpe"]["buy_and_hold"]["std"] == 0.0  # the benchmark learns nothing: one path
    assert section["pbo"]["splits"] == 6 and 0.0 <= section["pbo"]["value"] <= 1.0
    curves = pd.read_csv(out / section["path_curves"])
    groups = section["groups"]
    assert len(curves) == groups[-1]["last_bar"] - groups[0]["first_bar"] + 1  # the whole history, once
    for path in section["paths"]:
        nav = curves[f"path_{path['index']}"].to_numpy()
        assert path["policy"]["total_return"] == pytest.approx(nav[-1] - 1.0)
    assert curves["buy_and_hold"].iloc[-1] - 1.0 == pytest.approx(section["paths"][0]["benchmark"]["total_return"])
    html = (out / "report.html").read_text()
    assert "Combinatorial purged cross-validation" in html


def test_each_path_is_its_splits_test_backtests_back_to_back(cpcv_run):
    out, report = cpcv_run
    run = RunFolder(out)
    config = read_config(run)
    series = read_market(run, config, CPU)
    splits = {s.index: s for s in read_cpcv_folds(run)}
    curves = pd.read_csv(out / report["cpcv"]["path_curves"])
    path = report["cpcv"]["paths"][1]
    offset = report["cpcv"]["groups"][0]["first_bar"]
    returns = bar_returns(curves["path_1"].to_numpy())
    for group, split in enumerate(path["splits"]):
        segment = splits[split].test[splits[split].test_groups.index(group)]
        agent, _ = load_agent_at(run.cpcv_split(split))
        expected = bar_returns(backtest_policy(agent.eval(), series, segment, config).nav)
        np.testing.assert_allclose(returns[segment[0] - offset:segment[1] - offset], expected, rtol=1e-9, atol=1e-12)
