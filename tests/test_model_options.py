"""The distributional critic (quantiles of the return, with an optional CVaR term) and the regime
features (filtered probabilities of a Markov-switching model fitted on the training bars).

Losses and statistics against numpy and statsmodels, hand-computed values, causality (later bars
change nothing), training through the pipeline, ONNX parity and serving with ``ml.serving``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from statsmodels.tsa.regime_switching.markov_regression import MarkovRegression

from ml.agent.critic import MeanCritic, QuantileCritic, build_critic, critic_spec
from ml.agent.policy import ActorCritic, load_policy, model_options, policy_checkpoint
from ml.agent.regime import SCALE, RegimeFilter, RegimeFitError, fit_regimes
from ml.config import ConfigError, config_from_dict
from ml.env.action_space import make_action_space
from ml.evaluation.splits import walk_forward_folds
from ml.evaluation.walkforward import new_agent, training_returns
from ml.market.features import series_features
from ml.market.series import prepare_series
from ml.pipeline import run_pipeline
from ml.pipeline.rundir import RunFolder, load_agent, read_json, training_fingerprint
from ml.serving import Policy
from tests.test_pipeline import TINY

OPTIONS = {"critic_quantiles": 16, "cvar_weight": 0.5, "regime_states": 2, "encoder_window": 24}


def with_options(**ppo) -> dict:
    return {**TINY, "ppo": {**TINY["ppo"], **ppo}}


def statsmodels_filter(returns: np.ndarray, model) -> np.ndarray:
    """statsmodels' filtered probabilities over ``returns`` with the fitted model's parameters."""
    # statsmodels' order: p[from->to] for every "to" but the last, each over every "from"; means; variances.
    transition = model.transition
    params = np.concatenate([transition[:, :-1].T.ravel(), model.mean, model.variance])
    reference = MarkovRegression(returns * SCALE, k_regimes=len(transition), trend="c", switching_variance=True)
    return reference.filter(params).filtered_marginal_probabilities


# The distributional critic ------------------------------------------------------------------------

def test_the_mean_critic_is_the_squared_error_with_and_without_clipping():
    critic = MeanCritic()
    output, returns, old = torch.tensor([[1.0], [3.0]]), torch.tensor([2.0, 0.0]), torch.tensor([0.5, 2.5])
    assert critic.loss(output, returns, old, None).item() == pytest.approx(0.5 * (1 + 9) / 2)
    # Clipped at 0.2 around the old values: 0.7 (error 1.3, larger than 1) and 2.7 (error 2.7, smaller than 3).
    assert critic.loss(output, returns, old, 0.2).item() == pytest.approx(0.5 * (1.3 ** 2 + 9) / 2)


def test_the_quantile_loss_on_a_hand_computed_example():
    critic = QuantileCritic(2)  # quantile levels 0.25 and 0.75
    output, returns = torch.tensor([[0.0, 3.0]]), torch.tensor([2.0])
    # The target is 2 above the 0.25 quantile (0.25 * 2) and 1 below the 0.75 one ((1 - 0.75) * 1).
    assert critic.loss(output, returns, None, None).item() == pytest.approx((0.25 * 2 + 0.25 * 1) / 2)


@pytest.mark.parametrize("spread", [10.0, 0.3])
def test_minimizing_the_quantile_loss_finds_the_quantiles_numpy_computes(spread):
    """At any scale: returns of a quiet policy spread over a fraction of a unit, a busy one over many."""
    torch.manual_seed(0)
    critic = QuantileCritic(8)
    samples = torch.randn(20000) * spread + 0.3 * spread
    quantiles = torch.zeros(8, requires_grad=True)
    optimizer = torch.optim.Adam([quantiles], lr=0.005 * spread)
    for _ in range(3000):
        batch = samples[torch.randint(0, len(samples), (1024,))]
        loss = critic.loss(quantiles.expand(len(batch), 8), batch, None, None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    expected = np.quantile(samples.numpy(), critic.taus.numpy())
    np.testing.assert_allclose(quantiles.detach().numpy(), expected, atol=0.08 * spread)


def test_the_value_mixes_the_mean_and_the_cvar_of_the_sorted_quantiles():
    output = torch.tensor([[4.0, -2.0, 1.0, 7.0, 0.0, 2.0, -5.0, 3.0, 5.0, 6.0]])
    assert QuantileCritic(10).value(output).item() == pytest.approx(2.1)
    # alpha 0.2 of 10 quantiles: the two lowest, -5 and -2.
    critic = QuantileCritic(10, cvar_alpha=0.2, cvar_weight=0.25)
    assert critic.cvar(output).item() == pytest.approx(-3.5)
    assert critic.value(output).item() == pytest.approx(0.75 * 2.1 + 0.25 * -3.5)
    assert QuantileCritic(10, cvar_alpha=0.01).tail == 1  # at least the lowest quantile


def test_the_quantile_head_has_one_output_per_quantile_and_the_cvar_value_is_lower():
    space = make_action_space(config_from_dict({}).action, 1)
    torch.manual_seed(0)
    neutral = ActorCritic(12, space, (16,), critic={"kind": "quantile", "quantiles": 32, "cvar_alpha": 0.1,
                                                    "cvar_weight": 0.0})
    averse = ActorCritic(12, space, (16,), critic={"kind": "quantile", "quantiles": 32, "cvar_alpha": 0.1,
                                                   "cvar_weight": 1.0})
    averse.load_state_dict(neutral.state_dict())
    features, position = torch.randn(50, 12), torch.zeros(50, 1)
    actor, critic = neutral.heads(features, position)
    assert actor.shape == (50, 5) and critic.shape == (50, 32)
    assert torch.equal(neutral(features, position)[1], critic.mean(dim=-1))
    assert (averse(features, position)[1] < neutral(features, position)[1]).all()
    assert torch.equal(averse(features, position)[0], actor)  # the actor is the same network


def test_critic_specs_round_trip_and_the_default_is_the_mean_critic():
    assert critic_spec(config_from_dict({}).ppo) is None
    assert isinstance(build_critic(None), MeanCritic)
    spec = critic_spec(config_from_dict({"ppo": {"critic_quantiles": 32, "cvar_weight": 0.3}}).ppo)
    assert build_critic(spec).spec() == spec == {"kind": "quantile", "quantiles": 32, "cvar_alpha": 0.1,
                                                 "cvar_weight": 0.3}


# Regime features -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gspc_returns(gspc_bars) -> np.ndarray:
    return np.diff(np.log(gspc_bars["close"].to_numpy(dtype=float)))


@pytest.fixture(scope="module")
def gspc_regimes(gspc_returns):
    return fit_regimes(gspc_returns[:2500], 2)


def test_the_filter_equals_statsmodels_filtered_probabilities(gspc_returns, gspc_regimes):
    regime = RegimeFilter(2, 60)
    regime.set_model(gspc_regimes)
    windows = np.stack([gspc_returns[start:start + 60] for start in range(2500, 3500, 97)])
    got = regime(torch.tensor(windows, dtype=torch.float32)).numpy()
    expected = np.stack([statsmodels_filter(window, gspc_regimes)[-1] for window in windows])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got.shape == (len(windows), 2)


def test_the_fitted_states_are_ordered_calm_first_with_their_stationary_distribution(gspc_returns, gspc_regimes):
    model = gspc_regimes
    assert model.variance[0] < model.variance[1]
    np.testing.assert_allclose(model.transition.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(model.initial @ model.transition, model.initial, atol=1e-10)
    # The turbulent state is likelier after a crash than in a quiet stretch.
    regime = RegimeFilter(2, 30)
    regime.set_model(model)
    quiet, crash = np.full(30, 0.001), np.r_[np.full(25, 0.001), [-0.05, 0.04, -0.06, 0.05, -0.04]]
    probabilities = regime(torch.tensor(np.stack([quiet, crash]), dtype=torch.float32))
    assert probabilities[0, 0] > 0.9 and probabilities[1, 1] > 0.9


def test_three_states_match_statsmodels_too(gspc_returns):
    model = fit_regimes(gspc_returns[:2000], 3)
    assert list(np.argsort(model.variance)) == [0, 1, 2]
    regime = RegimeFilter(3, 40)
    regime.set_model(model)
    window = gspc_returns[2100:2140]
    got = regime(torch.tensor(window[None], dtype=torch.float32))[0].numpy()
    np.testing.assert_allclose(got, statsmodels_filter(window, model)[-1], atol=1e-5)


@pytest.mark.parametrize("returns, message", [
    (np.zeros(30), "needs at least 100"),
    (np.zeros(500), "constant"),
])
def test_too_little_or_constant_training_data_is_refused(returns, message):
    with pytest.raises(RegimeFitError, match=message):
        fit_regimes(returns, 2)


def test_the_regime_model_is_fitted_on_the_training_bars_only(gspc_bars):
    config = config_from_dict(with_options(**OPTIONS))
    series = prepare_series(gspc_bars.iloc[:1500], config.lookback, torch.device("cpu"), config.return_window)
    fold = walk_forward_folds(series.timestamps, config.lookback, config.splits)[0]
    fitted = new_agent(series, config, fold).regime
    first, last = fold.train
    np.testing.assert_allclose(training_returns(series, fold),
                               np.diff(np.log(gspc_bars["close"].to_numpy()[first - 1:last + 1])), atol=1e-6)
    # Every bar after the training window replaced: the same model.
    moved = gspc_bars.iloc[:1500].copy()
    later, prices = moved.index[last + 1:], ["open", "high", "low", "close"]
    moved.loc[later, prices] = moved.loc[later, prices].to_numpy() * np.linspace(1, 3, len(later))[:, None]
    other = prepare_series(moved, config.lookback, torch.device("cpu"), config.return_window)
    refitted = new_agent(other, config, fold).regime
    for name in ("mean", "variance", "transition", "initial"):
        assert torch.equal(getattr(fitted, name), getattr(refitted, name))
    assert not torch.equal(fitted.mean, RegimeFilter(2, 24).mean)  # it was fitted at all


def test_the_regime_model_needs_the_return_window(gspc_bars):
    series = prepare_series(gspc_bars.iloc[:1500], 64, torch.device("cpu"))  # no return window
    config = config_from_dict(with_options(**OPTIONS))
    with pytest.raises(ValueError, match="return window"):
        training_returns(series, walk_forward_folds(series.timestamps, 64, config.splits)[0])


def test_perturbing_later_bars_changes_no_regime_probability_and_no_decision(gspc_bars, gspc_regimes):
    config = config_from_dict(with_options(**OPTIONS))
    series = prepare_series(gspc_bars.iloc[:400], config.lookback, torch.device("cpu"), config.return_window)
    torch.manual_seed(0)
    agent = ActorCritic(series.features.shape[1], make_action_space(config.action, 1), **model_options(config.ppo))
    agent.set_normalization(*series.feature_stats((63, 300)))
    agent.regime.set_model(gspc_regimes)
    t = 250
    bars = series.ohlcv[:, 0].clone()
    bars[t + 1:, :4] *= 1.7
    later = series_features(series.feature_module, bars)
    position = torch.zeros(t + 1 - 63, 1)
    seen = []
    agent.regime.register_forward_hook(lambda _module, _inputs, output: seen.append(output))
    assert torch.equal(agent.decide(later[63:t + 1], position), agent.decide(series.features[63:t + 1], position))
    assert torch.equal(seen[0], seen[1])


def test_the_regime_reads_raw_returns_and_replaces_them_with_probabilities():
    n_features, window = 9 + 24, 24
    space = make_action_space(config_from_dict({}).action, 1)
    agent = ActorCritic(n_features, space, (8,), regime={"states": 2, "window": window})
    assert agent.backbone[0].in_features == n_features - window + 2 + 1  # + probabilities + position
    agent.set_normalization(torch.full((n_features,), 0.5), torch.full((n_features,), 2.0))
    seen = []
    agent.regime.register_forward_hook(lambda _module, inputs, _output: seen.append(inputs[0]))
    features = torch.randn(5, n_features) * 0.01
    agent(features, torch.zeros(5, 1))
    assert torch.equal(seen[0], features[:, -window:])  # before normalization


def test_both_readers_share_the_window_beside_an_encoder():
    n_features = 9 + 16
    agent = ActorCritic(n_features, make_action_space(config_from_dict({}).action, 1), (8,),
                        encoder={"kind": "conv", "window": 16, "channels": 2}, regime={"states": 3, "window": 16})
    assert agent.backbone[0].in_features == 9 + agent.encoder.out_features + 3 + 1
    assert agent(torch.randn(4, n_features), torch.zeros(4, 1))[0].shape == (4, 5)


# Both options through the pipeline, the export and serving ------------------------------------------

def trained_run(tmp_path_factory, name: str, settings: dict):
    """The pipeline run of ``settings`` in a fresh folder, with its own tracking store."""
    out = tmp_path_factory.mktemp(name)
    run_pipeline(config_from_dict(settings | {"registry": {"tracking_uri": f"sqlite:///{out / 'mlflow.db'}"}}), out)
    return out


def exported_checkpoint(run_dir) -> dict:
    """The latest fold's checkpoint, once the export's parity is checked."""
    parity = read_json(run_dir / "parity.json")
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-5
    run = RunFolder(run_dir)
    return load_agent(run, read_json(run.folds)[-1]["index"])[1]


@pytest.fixture(scope="module")
def options_run(tmp_path_factory):
    return trained_run(tmp_path_factory, "options", with_options(**OPTIONS))


def test_the_options_train_export_with_parity_and_serve(options_run):
    checkpoint = exported_checkpoint(options_run)
    assert checkpoint["critic"] == {"kind": "quantile", "quantiles": 16, "cvar_alpha": 0.1, "cvar_weight": 0.5}
    assert checkpoint["regime"] == {"states": 2, "window": 24}
    policy = load_policy(checkpoint)
    assert policy.actor_critic.regime.variance[0] < policy.actor_critic.regime.variance[1]  # the fold's fit

    served = Policy(options_run / "model.onnx", prefer_gpu=False)
    windows = np.load(options_run / "parity_windows.npz")
    ohlcv, position = windows[windows.files[0]], windows[windows.files[1]]
    with torch.no_grad():
        expected = policy(torch.from_numpy(ohlcv), torch.from_numpy(position))
    np.testing.assert_allclose(served.decide(ohlcv, position), expected[0].numpy(), atol=1e-6)
    # The exported value is the risk-adjusted one the advantages were computed with.
    value = served.session.run(["value"], {"ohlcv": ohlcv, "position": position})[0]
    np.testing.assert_allclose(value, expected[-1].numpy(), atol=1e-4)


def test_a_checkpoint_without_the_option_keys_loads_as_before(gspc_bars):
    series = prepare_series(gspc_bars.iloc[:300], 64, torch.device("cpu"))
    agent = ActorCritic(series.features.shape[1], make_action_space(config_from_dict({}).action, 1), (16,))
    checkpoint = policy_checkpoint(agent, series.feature_module)
    assert checkpoint["critic"] is None and checkpoint["regime"] is None
    del checkpoint["critic"], checkpoint["regime"]
    policy = load_policy(checkpoint)
    assert isinstance(policy.actor_critic.value_head, MeanCritic) and policy.actor_critic.regime is None


def test_option_settings_shape_the_fingerprint_only_when_on():
    plain = training_fingerprint(config_from_dict({}))
    assert training_fingerprint(config_from_dict({"ppo": {"cvar_alpha": 0.2}})) == plain
    quantile = training_fingerprint(config_from_dict({"ppo": {"critic_quantiles": 32}}))
    assert quantile != plain
    assert training_fingerprint(config_from_dict({"ppo": {"critic_quantiles": 32, "cvar_weight": 0.5}})) != quantile
    regime = training_fingerprint(config_from_dict({"ppo": {"regime_states": 2}}))
    assert regime != plain
    # The regime filter reads encoder_window returns even beside the plain MLP.
    assert training_fingerprint(config_from_dict({"ppo": {"regime_states": 2, "encoder_window": 60}})) != regime


def test_config_refuses_what_the_options_cannot_do():
    with pytest.raises(ConfigError, match="ppo.cvar_weight"):
        config_from_dict({"ppo": {"cvar_weight": 0.5}})
    with pytest.raises(ConfigError, match="ppo.critic_quantiles"):
        config_from_dict({"ppo": {"critic_quantiles": 1}})
    with pytest.raises(ConfigError, match="ppo.regime_states"):
        config_from_dict({"ppo": {"regime_states": 5}})
    with pytest.raises(ConfigError, match="ppo.regime_states = 2"):
        config_from_dict({"ppo": {"regime_states": 2}, "action": {"mode": "portfolio"},
                          "data": {"symbols": ["GSPC", "KO"]}})
    assert config_from_dict({"ppo": {"regime_states": 2, "encoder_window": 40}}).return_window == 40
