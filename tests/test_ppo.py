"""PPO learns what is learnable, is reproducible under a seed, and keeps validation-selected weights."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Independent, Normal

from ml.agent.policy import ActorCritic
from ml.config import config_from_dict
from ml.env.action_space import ContinuousExposure, DiscreteExposure, PortfolioWeights
from ml.evaluation.metrics import sharpe_ratio
from ml.evaluation.splits import walk_forward_folds
from ml.evaluation.walkforward import backtest_policy, train_fold
from ml.market.calendar import periods_per_year
from ml.market.series import prepare_series
from tests.conftest import synthetic_bars


def _setup(drift: float, timesteps: int, seed: int = 1):
    bars = synthetic_bars(1400, drift=drift, vol=0.004, seed=seed)
    config = config_from_dict({
        "ppo": {"total_timesteps": timesteps, "num_envs": 64, "num_steps": 32, "eval_every": 2,
                "seed": seed, "learning_rate": 1e-3},
        "action": {"exposure_levels": [-1.0, 0.0, 1.0]},
        "splits": {"n_folds": 1, "test_months": 6, "validation_months": 6, "min_train_bars": 300},
    })
    series = prepare_series(bars, config.lookback, torch.device("cpu"))
    fold = walk_forward_folds(bars["timestamp"], config.lookback, config.splits)[0]
    return config, series, fold


def with_ppo(config, **changes):
    return replace(config, ppo=replace(config.ppo, **changes))


def with_action(config, **changes):
    return replace(config, action=replace(config.action, **changes))


def dominant_decision(agent: ActorCritic, backtest) -> tuple[float, float]:
    """The most frequent test decision (to 0.01) and its share of all decisions."""
    return agent.action_space.dominant(torch.from_numpy(backtest.decision))


def reference_distribution(agent: ActorCritic, actor: torch.Tensor):
    """The sampling distribution the closed forms stand for, built with torch.distributions."""
    if not agent.action_space.gaussian:
        return Categorical(logits=actor)
    return Independent(Normal(actor, agent.log_std.exp().expand_as(actor)), 1)


def test_ppo_learns_to_hold_a_steadily_rising_asset():
    config, series, fold = _setup(drift=0.003, timesteps=40_000)
    result = train_fold(series, fold, config)
    test = backtest_policy(result.agent, series, fold.test, config)
    exposure, share = dominant_decision(result.agent, test)
    assert exposure == 1.0 and share > 0.9, test.decision
    assert test.nav[-1] > 1.2
    assert result.history[-1]["greedy_action_share/+1.00"] > 0.5
    assert result.history[-1]["steps_per_second"] > 0
    for key in ("loss/policy", "loss/value", "loss/entropy", "approx_kl", "clipfrac", "explained_variance"):
        assert key in result.history[-1]


def test_ppo_learns_to_short_a_steadily_falling_asset():
    config, series, fold = _setup(drift=-0.003, timesteps=40_000)
    result = train_fold(series, fold, config)
    exposure, share = dominant_decision(result.agent, backtest_policy(result.agent, series, fold.test, config))
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
    from ml.evaluation.walkforward import selection_score

    rescored = selection_score(backtest_policy(result.agent, series, fold.validation, config), config)
    assert rescored == result.best_score


def test_training_resumes_from_its_last_checkpoint(tmp_path, caplog):
    """An interrupted run (an Airflow retry) continues after the last saved update, and ends
    exactly where the uninterrupted run ends: same open episodes, same random draws."""
    config, series, fold = _setup(drift=0.0005, timesteps=6 * 64 * 32)
    config = with_ppo(config, checkpoint_every=2)
    checkpoint = tmp_path / "train_state.pt"
    calls = []

    def crash_during_update_5(metrics, step):
        calls.append(step)
        if len(calls) == 5:  # after update 4 was checkpointed, before update 5 is
            raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        train_fold(series, fold, config, crash_during_update_5, checkpoint_path=checkpoint)
    with caplog.at_level("INFO", logger="ml.agent.checkpoint"):
        resumed = train_fold(series, fold, config, checkpoint_path=checkpoint)
    assert resumed.resumed_from_update == 4
    # The task log says where the retry picked up.
    assert f"resuming training from {checkpoint} (update 4, {4 * 64 * 32} environment steps)" in caplog.text
    assert [h["update"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    assert resumed.history[-1]["global_step"] == 6 * 64 * 32
    for key in ("greedy_action_share/+1.00", "sampled_action_share/-1.00", "turnover_per_step", "flat_share",
                "collapse_alarm"):
        assert key in resumed.history[-1]

    uninterrupted = train_fold(series, fold, config)
    for name, weights in uninterrupted.agent.state_dict().items():
        assert torch.equal(weights, resumed.agent.state_dict()[name]), name

    def without_rates(history):
        return [{k: v for k, v in h.items() if k != "steps_per_second"} for h in history]

    assert without_rates(resumed.history) == without_rates(uninterrupted.history)

    # Every scored checkpoint is a trial: the resumed run ends with all of them, the ones scored
    # before the interruption included, each the validation backtest behind its score.
    scores = [h["validation_score"] for h in resumed.history if "validation_score" in h]
    assert len(scores) == 3 and resumed.validation_returns == uninterrupted.validation_returns
    ppy = periods_per_year(config.data.interval, config.data.calendar)
    for returns, score in zip(resumed.validation_returns, scores, strict=True):
        assert len(returns) == fold.validation[1] - fold.validation[0]
        assert sharpe_ratio(np.concatenate(([1.0], np.cumprod(1.0 + np.asarray(returns)))), ppy) \
            == pytest.approx(score, rel=1e-9)


def test_checkpoint_from_a_gpu_worker_resumes_on_a_cpu_worker(tmp_path, caplog):
    """A retry may land on the other queue's worker: its generators cannot take the saved
    states, so the run goes on from the saved weights and episodes with fresh random streams."""
    config, series, fold = _setup(drift=0.0005, timesteps=4 * 64 * 32)
    config = with_ppo(config, checkpoint_every=2)
    checkpoint = tmp_path / "train_state.pt"

    def crash_during_update_3(metrics, step):
        if step == 3 * 64 * 32:
            raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        train_fold(series, fold, config, crash_during_update_3, checkpoint_path=checkpoint)
    saved = torch.load(checkpoint, weights_only=True)
    philox = torch.zeros(16, dtype=torch.uint8)  # the size of a CUDA generator's state
    saved.update(device="cuda", generator=philox, sampling_rng=philox)
    torch.save(saved, checkpoint)
    with caplog.at_level("WARNING", logger="ml.agent.checkpoint"):
        resumed = train_fold(series, fold, config, checkpoint_path=checkpoint)
    assert "checkpointed on cuda on cpu" in caplog.text
    assert resumed.resumed_from_update == 2 and [h["update"] for h in resumed.history] == [1, 2, 3, 4]
    assert all(torch.isfinite(w).all() for w in resumed.agent.state_dict().values())


def test_training_checkpoint_loads_as_plain_tensors_and_values(tmp_path):
    """The resumable state lives in the shared runs folder: loading it must never run code."""
    config, series, fold = _setup(drift=0.0005, timesteps=2 * 64 * 32)
    checkpoint = tmp_path / "train_state.pt"
    train_fold(series, fold, with_ppo(config, checkpoint_every=2), checkpoint_path=checkpoint)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["update"] == 2 and state["global_step"] == 2 * 64 * 32
    for key in ("agent", "optimizer", "generator", "sampling_rng", "episodes", "best_state", "history"):
        assert key in state
    assert state["validation_returns"].dtype == torch.float64
    assert state["validation_returns"].shape == (1, fold.validation[1] - fold.validation[0])


def test_continuous_policy_learns_the_trend_and_exports_with_parity(tmp_path):
    import numpy as np

    from ml.agent.policy import ExportPolicy
    from ml.release.export import check_parity, export_onnx, real_windows

    config, series, fold = _setup(drift=0.003, timesteps=40_000)
    config = with_action(config, mode="continuous")
    result = train_fold(series, fold, config)
    test = backtest_policy(result.agent, series, fold.test, config)
    assert np.mean(test.decision) > 0.8 and test.nav[-1] > 1.2
    assert ((test.decision >= -1.0) & (test.decision <= 1.0)).all()
    policy = ExportPolicy(series.feature_module, result.agent.cpu()).eval()
    path = export_onnx(policy, tmp_path / "continuous.onnx", {"lookback": config.lookback})
    # Positions drawn from the action space's levels, -1, 0 and 1.
    windows, positions = real_windows(policy, series.ohlcv.numpy(), fold.test[0], fold.test[1], 64)
    assert check_parity(policy, path, windows, positions).passed


def test_long_only_mask_holds_in_training_evaluation_and_onnx(tmp_path):
    import numpy as np

    from ml.agent.policy import ExportPolicy
    from ml.release.export import export_onnx, real_windows
    from ml.serving import Policy

    config, series, fold = _setup(drift=-0.003, timesteps=8192)  # shorting would pay: the mask must forbid it
    config = with_action(config, min_exposure=0.0)
    result = train_fold(series, fold, config)
    assert all(h["sampled_action_share/-1.00"] == 0.0 for h in result.history)
    test = backtest_policy(result.agent, series, fold.test, config)
    assert (test.decision >= 0.0).all()
    policy = ExportPolicy(series.feature_module, result.agent.cpu()).eval()
    path = export_onnx(policy, tmp_path / "long_only.onnx", {"lookback": config.lookback})
    windows, _ = real_windows(policy, series.ohlcv.numpy(), fold.train[0], fold.test[1], 512)
    # Positions a long-only account can hold.
    positions = np.random.default_rng(0).choice(np.float32([0.0, 1.0]), size=(len(windows), 1))
    served = Policy(path, max_stale_bars=None)
    assert (served.decide(windows, positions) >= 0.0).all()
    probs = served.session.run(["action_probs"], {"ohlcv": windows, "position": positions})[0]
    np.testing.assert_array_equal(probs[:, 0], 0.0)  # the -1 level has no probability at all


def test_collapse_alarm_fires_for_a_policy_that_ignores_its_input():
    from ml.agent.ppo import train
    from ml.env.action_space import make_action_space
    from ml.env.trading_env import TradingEnv

    config, series, fold = _setup(drift=0.0005, timesteps=2 * 64 * 32)
    ppo = replace(config.ppo, learning_rate=1e-12)  # keep the initial weights

    def run(bias, weight_scale=1.0):
        agent = ActorCritic(series.features.shape[1], make_action_space(config.action, series.n_assets), ppo.hidden)
        agent.set_normalization(*series.feature_stats(fold.train))
        with torch.no_grad():
            agent.actor.bias.copy_(torch.tensor(bias))
            agent.actor.weight.mul_(weight_scale)
        env = TradingEnv(series, ppo.num_envs, agent.action_space)
        return train(ppo, env, agent, fold.train, validate=lambda a: 0.0,
                     collapse_share=config.action.collapse_share)

    collapsed = run([0.0, 0.0, 20.0])  # +0 logit everywhere except a huge one for exposure +1
    assert collapsed.collapse_alarm and collapsed.history[-1]["collapse_alarm"] == 1.0
    assert collapsed.history[-1]["greedy_action_share/+1.00"] == 1.0
    varied = run([0.0, 0.0, 0.0], weight_scale=300.0)  # logits that clearly depend on the state
    assert not varied.collapse_alarm


def test_action_diagnostics_equal_their_definitions():
    from ml.agent.diagnostics import dominant_share
    from ml.env.action_space import level_shares

    torch.manual_seed(0)
    levels = torch.tensor([0.5, -1.0, 0.0, 1.0, -0.5])  # not sorted: shares follow this order
    exposure = torch.rand(10_000) * 2.4 - 1.2  # continuous exposures, some beyond the outer levels
    nearest = (exposure.reshape(-1, 1) - levels).abs().argmin(dim=1)  # the definition: nearest level
    want = torch.bincount(nearest, minlength=5).float() / exposure.numel()
    torch.testing.assert_close(level_shares(exposure, levels), want)
    discrete = levels[torch.tensor([1, 1, 1, 0, 4, 3, 1, 2])]
    torch.testing.assert_close(level_shares(discrete, levels), torch.tensor([1, 4, 1, 1, 1]) / 8.0)

    # Most frequent exposure to 0.01, here -0.3 three times in six, next to negative values.
    exposures = DiscreteExposure(tuple(levels.tolist()))
    decisions = torch.tensor([-0.3, -0.301, 0.25, -1.0, -0.299, 0.7])
    assert dominant_share(exposures, decisions) == 0.5
    assert dominant_share(exposures, torch.full((7,), -1.0)) == 1.0
    # A diverged policy's NaN or huge exposures still give a share instead of an error.
    assert dominant_share(exposures, torch.tensor([float("nan"), 0.5, 0.5, 0.2])) == 0.5
    assert dominant_share(exposures, torch.tensor([1e15, -1e15, 1e15, 1e15])) == 0.75
    # Allocations near the median one, the lower median for an even count as torch.median's:
    # with it 3 of 6 rows are near; the upper median gives 2 of 6, the midpoint none.
    portfolio = PortfolioWeights(2)
    allocations = torch.tensor([[0.0], [0.6], [0.0], [0.5], [0.0], [0.5]]).repeat(1, 2)
    assert dominant_share(portfolio, allocations) == 0.5
    spread = (allocations - allocations.median(dim=0).values).abs().amax(dim=1)
    assert dominant_share(portfolio, allocations) == (spread <= 0.025).float().mean().item()


def test_hold_share_counts_kept_targets_inside_episodes_only():
    from ml.agent.diagnostics import hold_share

    exposure = torch.tensor([[1.0, 0.0], [1.0, 0.5], [0.0, 0.5], [0.0, 0.504]])  # [steps, episodes]
    dones = torch.tensor([[0, 0], [0, 0], [1, 0], [0, 0]])  # episode 0 restarts at step 2
    # Episode 0 keeps its target at steps 1 and 3 (step 2 starts anew); episode 1 at steps 2 and 3
    # (0.504 is 0.50 to the hundredth): 4 of 5 decisions that have a previous one.
    space = DiscreteExposure((-1.0, -0.5, 0.0, 0.5, 1.0))
    assert hold_share(space, exposure.unsqueeze(-1), dones) == pytest.approx(0.8)
    weights = torch.tensor([[[0.5, 0.5]], [[0.51, 0.49]], [[0.9, 0.1]]])  # [steps, 1 episode, 2 assets]
    assert hold_share(PortfolioWeights(2), weights, torch.zeros(3, 1)) == pytest.approx(0.5)


def test_generalized_advantages_by_hand():
    from ml.agent.ppo import generalized_advantages

    rewards = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 1.0]])  # [steps, episodes]
    values = torch.tensor([[0.5, 0.0], [1.0, 0.0], [2.0, 0.0]])
    dones = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])  # episode 0 restarts at step 2
    next_value, next_done = torch.tensor([4.0, 0.0]), torch.tensor([0.0, 1.0])
    # gamma = lambda = 0.5. Episode 0: step 2 bootstraps from 4 (3 + 0.5 * 4 - 2 = 3); step 1 ends
    # its episode (2 - 1 = 1); step 0: delta 1 + 0.5 * 1 - 0.5 = 1, plus 0.25 * 1 from step 1.
    # Episode 1 ends after step 2 (delta 1) and propagates 0.25 per step back.
    want = torch.tensor([[1.25, 0.0625], [1.0, 0.25], [3.0, 1.0]])
    torch.testing.assert_close(generalized_advantages(rewards, values, dones, next_value, next_done, 0.5, 0.5), want)


def test_learning_rate_and_entropy_schedules_and_the_kl_stop():
    config, series, fold = _setup(drift=0.0005, timesteps=4 * 64 * 32)
    config = with_ppo(config, target_kl=None)
    history = train_fold(series, fold, config).history
    cfg = config.ppo
    for h in history:
        progress = (h["update"] - 1) / cfg.num_updates
        assert h["learning_rate"] == pytest.approx((1 - progress) * cfg.learning_rate)
        assert h["ent_coef"] == pytest.approx(cfg.ent_coef + progress * (cfg.ent_coef_final - cfg.ent_coef))
        assert h["epochs"] == cfg.update_epochs
        assert 0.0 <= h["hold_share"] <= 1.0
    # Any move of the weights exceeds a KL target this small: each update stops after one epoch.
    config = with_ppo(config, target_kl=1e-12)
    assert [h["epochs"] for h in train_fold(series, fold, config).history] == [1] * 4


def test_layers_start_orthogonal_with_the_usual_gains():
    agent = ActorCritic(12, DiscreteExposure((-1.0, 0.0, 1.0)), (64, 64))
    gains = {"backbone.0": 2 ** 0.5, "backbone.2": 2 ** 0.5, "actor": 0.01, "critic": 1.0}
    for name, gain in gains.items():
        layer = agent.get_submodule(name)
        w = layer.weight.detach()
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w  # the smaller side is orthonormal
        torch.testing.assert_close(gram, gain ** 2 * torch.eye(gram.shape[0]), atol=1e-5, rtol=0)
        assert not layer.bias.any()


def test_auto_device_is_cuda_only_when_the_worker_has_one(monkeypatch):
    from ml.agent.ppo import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="ppo.device is 'cuda' but this worker has no CUDA device"):
        resolve_device("cuda")


def test_deterministic_mode_follows_each_runs_config(monkeypatch):
    """On for a deterministic run (with the fixed cuBLAS workspace CUDA products need for it),
    off again for the next run that does not ask for it, and the same seed gives the same weights."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    config, series, fold = _setup(drift=0.0005, timesteps=2048)
    deterministic = replace(config, ppo=replace(config.ppo, deterministic=True))
    try:
        first = train_fold(series, fold, deterministic).agent.state_dict()
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        second = train_fold(series, fold, deterministic).agent.state_dict()
        for key in first:
            torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)
        train_fold(series, fold, config)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_truncated_episodes_get_the_discounted_value_of_their_last_state():
    """Bootstrapped once after the rollout: each value lands on its own (step, episode)."""
    from ml.agent.ppo import bootstrap_truncated

    torch.manual_seed(0)
    agent = ActorCritic(3, DiscreteExposure((-1.0, 0.0, 1.0)), (8,))
    rewards = torch.randn(4, 5)  # [steps, episodes]
    before = rewards.clone()
    states = torch.randn(3, 3), torch.rand(3, 1)  # last states of three truncated episodes
    # Step 1: episodes 0 and 3 truncated; step 3: episode 2.
    truncated = [(torch.tensor([1 * 5 + 0, 1 * 5 + 3]), states[0][:2], states[1][:2]),
                 (torch.tensor([3 * 5 + 2]), states[0][2:], states[1][2:])]
    bootstrap_truncated(rewards, truncated, agent, gamma=0.9)
    with torch.no_grad():
        value = [agent(states[0][k:k + 1], states[1][k:k + 1])[1].item() for k in range(3)]
    want = before.clone()
    want[1, 0] += 0.9 * value[0]
    want[1, 3] += 0.9 * value[1]
    want[3, 2] += 0.9 * value[2]
    torch.testing.assert_close(rewards, want)
    bootstrap_truncated(rewards, [], agent, gamma=0.9)  # nothing truncated: nothing changes
    torch.testing.assert_close(rewards, want)


def test_closed_form_log_prob_and_entropy_equal_the_distributions():
    """The update uses closed forms; they must be the sampling distributions' own values."""
    levels = (-1.0, 0.0, 1.0)
    for space in (DiscreteExposure(levels, min_exposure=0.0), ContinuousExposure(levels), PortfolioWeights(3)):
        torch.manual_seed(0)
        agent = ActorCritic(6, space, (16,))
        n_assets = agent.action_space.n_assets
        actor, _ = agent(torch.randn(200, 6), torch.rand(200, n_assets) / n_assets)
        dist = reference_distribution(agent, actor)
        action = dist.sample()
        log_prob, entropy = agent.log_prob_entropy(actor, action)
        torch.testing.assert_close(log_prob, dist.log_prob(action), rtol=0, atol=1e-5)
        torch.testing.assert_close(entropy, dist.entropy(), rtol=0, atol=1e-5)
        assert torch.isfinite(entropy).all()


def test_sampled_actions_follow_the_distribution():
    """``sample`` draws in closed form; its frequencies and moments must be the distribution's."""
    torch.manual_seed(0)
    # Long-only with a cap: the first two levels and the last one are masked.
    agent = ActorCritic(4, DiscreteExposure((-1.0, -0.5, 0.0, 0.5, 1.0), min_exposure=0.0, max_exposure=0.5), (8,))
    allowed = agent.action_space.allowed
    logits = torch.tensor([[2.0, 1.0, 0.3, -1.0, 0.8]]).expand(200_000, 5)
    logits = logits + torch.where(allowed, 0.0, -1e9)  # what forward gives
    action, log_prob = agent.sample(logits)
    expected = torch.softmax(logits[0], dim=-1)
    frequency = torch.bincount(action, minlength=5).float() / len(action)
    assert frequency[[0, 1, 4]].sum() == 0  # masked levels are never drawn
    torch.testing.assert_close(frequency, expected, rtol=0, atol=5e-3)
    torch.testing.assert_close(log_prob, reference_distribution(agent, logits).log_prob(action), rtol=0, atol=1e-6)

    agent = ActorCritic(4, PortfolioWeights(2), (8,))
    mean = torch.tensor([[0.5, -0.2, 0.1]]).expand(200_000, 3)
    action, log_prob = agent.sample(mean)
    torch.testing.assert_close(action.mean(dim=0), mean[0], rtol=0, atol=5e-3)
    torch.testing.assert_close(action.std(dim=0), agent.log_std.exp().detach(), rtol=0, atol=5e-3)
    torch.testing.assert_close(log_prob, reference_distribution(agent, mean).log_prob(action), rtol=0, atol=1e-5)


def test_masked_levels_lose_even_against_the_most_extreme_noise(monkeypatch):
    """The largest uniform draw on every masked level, the smallest nonzero one on every allowed
    level: the masked levels must still lose."""
    agent = ActorCritic(4, DiscreteExposure((-1.0, -0.5, 0.0, 0.5, 1.0), min_exposure=0.0, max_exposure=0.5), (8,))
    allowed = agent.action_space.allowed
    logits = torch.zeros(3, 5) + torch.where(allowed, 0.0, -1e9)
    extreme = torch.where(allowed, 2.0 ** -24, 1.0 - 2.0 ** -24).expand(3, 5)
    monkeypatch.setattr(torch, "rand_like", lambda like: extreme.clone())
    action, log_prob = agent.sample(logits)
    assert allowed[action].all()
    assert torch.isfinite(log_prob).all() and (log_prob > -10).all()
