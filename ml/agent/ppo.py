"""Proximal Policy Optimization, one readable loop in the order of the algorithm.

Rollout of N batched episodes -> GAE -> clipped-surrogate updates over
minibatches -> (every few updates) score the deterministic policy on the
validation window and keep the best weights. Nothing here reads test data.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ml.agent.checkpoint import (load_training_state, restore_random_streams, sampling_rng_state,
                                 save_training_state, seed_everything)
from ml.agent.diagnostics import dominant_share, hold_share
from ml.agent.policy import ActorCritic
from ml.agent.threads import torch_threads, training_threads
from ml.config import PPOConfig
from ml.env.trading_env import TradingEnv
from ml.fastpath import keep_freed_memory

logger = logging.getLogger(__name__)
# Training bars: one segment (first, last), or several with gaps between them.
Segments = tuple[int, int] | Sequence[tuple[int, int]]


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when this worker has a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"ppo.device is '{name}' but this worker has no CUDA device; use 'auto' or 'cpu'")
    return device


@dataclass
class TrainResult:
    agent: ActorCritic  # weights selected on validation
    best_update: int
    best_score: float
    history: list[dict] = field(default_factory=list)
    steps_per_second: float = 0.0
    resumed_from_update: int = 0
    collapse_alarm: bool = False  # the kept deterministic policy picks one exposure (almost) always
    # Per-bar validation returns of every scored checkpoint (a trial of the selection), in the order
    # they were scored; empty when ``validate`` returns only a score.
    validation_returns: list[list[float]] = field(default_factory=list)


def generalized_advantages(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor,
                           next_value: torch.Tensor, next_done: torch.Tensor, gamma: float,
                           gae_lambda: float) -> torch.Tensor:
    """GAE over a step-major rollout ([steps, envs]).

    ``dones[t]`` is 1 when the state of step t starts a new episode, so no value flows back
    across it; ``next_value`` / ``next_done`` describe the state after the last step.
    """
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(next_value)
    num_steps = rewards.shape[0]
    for t in reversed(range(num_steps)):
        next_nonterminal = 1.0 - (next_done if t == num_steps - 1 else dones[t + 1])
        next_values = next_value if t == num_steps - 1 else values[t + 1]
        delta = rewards[t] + gamma * next_values * next_nonterminal - values[t]
        last_gae = delta + gamma * gae_lambda * next_nonterminal * last_gae
        advantages[t] = last_gae
    return advantages


def bootstrap_truncated(rewards: torch.Tensor, truncated_states: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                        agent: ActorCritic, gamma: float) -> None:
    """Add gamma * V(last state) to the reward of each truncated episode's last step.

    Truncation is not an end of the task, so the return goes on past it. ``rewards`` is
    [steps, envs]; each state is (row of the step-major flattened rewards, features, position).
    The weights do not change during a rollout, so one batched forward after it gives the
    values that a small forward at every step would.
    """
    if not truncated_states:
        return
    rows, features, position = (torch.cat(parts) for parts in zip(*truncated_states))
    with torch.no_grad():
        _, final_value = agent(features, position)
    rewards.view(-1).index_add_(0, rows, gamma * final_value)


def episode_sampler(segments: Sequence[tuple[int, int]], n: int, device: torch.device,
                    generator: torch.Generator) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """Draws ``n`` episodes as (start bars, end bars) inside the training segments.

    Each segment ``(first, last)`` offers the start bars first .. last - 1, and an episode that
    starts there ends (terminates) at that segment's ``last``: it never steps across the gap to
    another segment, so it never trades on purged, embargoed or held-out bars. Starts are uniform
    over every offered bar, so a longer segment is drawn more often. One segment draws exactly as
    ``torch.randint(first, last)``.
    """
    firsts = torch.tensor([first for first, _ in segments], dtype=torch.long, device=device)
    lasts = torch.tensor([last for _, last in segments], dtype=torch.long, device=device)
    offered = lasts - firsts
    if (offered < 1).any():
        raise ValueError(f"every training segment needs at least two bars, got {list(segments)}")
    if len(segments) == 1:
        ends = lasts.expand(n).clone()
        return lambda: (torch.randint(segments[0][0], segments[0][1], (n,), device=device, generator=generator),
                        ends)
    bounds = offered.cumsum(0)  # the draws below bounds[k] and above bounds[k - 1] start in segment k

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(0, int(bounds[-1]), (n,), device=device, generator=generator)
        which = torch.searchsorted(bounds, pick, right=True)
        return firsts[which] + pick - (bounds[which] - offered[which]), lasts[which]
    return draw


def train(cfg: PPOConfig, env: TradingEnv, agent: ActorCritic, segment: Segments,
          validate: Callable[[ActorCritic], float | tuple[float, Sequence[float]]],
          log: Callable[[dict, int], None] | None = None,
          checkpoint_path: Path | None = None, collapse_share: float = 0.98) -> TrainResult:
    """Train on bars [segment[0], segment[1]] with random episode starts inside it, or on several
    such segments (the purged train groups of a CPCV split), no episode crossing from one to the next.

    With ``checkpoint_path``, state is saved every ``cfg.checkpoint_every`` updates and a
    later call with the same path resumes after the last saved update: same weights, optimizer,
    random streams and open episodes, so it ends as the uninterrupted run would have.
    ``collapse_share``: the alarm fires when this share of deterministic decisions is the same one.
    ``validate`` scores the deterministic policy (higher is better); it may also return the
    per-bar returns behind the score, as ``(score, returns)``: they are kept, one row per scored
    checkpoint, in ``TrainResult.validation_returns`` (and in the checkpoint, so a resumed run
    ends with every trial).
    On the CPU it trains on its thread budget (``ml.agent.threads``): ``cfg.threads``, or its
    share of the cores among the trainings its worker may run at once; the caller's torch thread
    count is restored afterwards.
    """
    if env.device.type != "cpu":
        return _train(cfg, env, agent, segment, validate, log, checkpoint_path, collapse_share)
    threads, reason = training_threads(cfg.threads)
    logger.info("training with %d CPU thread%s: %s", threads, "s" * (threads != 1), reason)
    with torch_threads(threads):
        return _train(cfg, env, agent, segment, validate, log, checkpoint_path, collapse_share)


def _train(cfg: PPOConfig, env: TradingEnv, agent: ActorCritic, segment: Segments,
           validate: Callable[[ActorCritic], float | tuple[float, Sequence[float]]],
           log: Callable[[dict, int], None] | None, checkpoint_path: Path | None,
           collapse_share: float) -> TrainResult:
    """:func:`train`'s loop, on the threads it was given."""
    device = env.device
    if device.type == "cpu":
        keep_freed_memory()
    seed_everything(cfg.seed, cfg.deterministic)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    segments = [tuple(segment)] if np.ndim(segment) == 1 else [tuple(s) for s in segment]
    agent = agent.to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=cfg.learning_rate, eps=1e-5)

    draw_episodes = episode_sampler(segments, cfg.num_envs, device, generator)
    n_feat = env.features.shape[1]
    obs_features = torch.zeros((cfg.num_steps, cfg.num_envs, n_feat), device=device)
    obs_position = torch.zeros((cfg.num_steps, cfg.num_envs) + env.position_shape, device=device)
    space = agent.action_space
    actions = torch.zeros((cfg.num_steps, cfg.num_envs) + space.action_shape, dtype=space.action_dtype,
                          device=device)
    logprobs = torch.zeros((cfg.num_steps, cfg.num_envs), device=device)
    rewards = torch.zeros((cfg.num_steps, cfg.num_envs), device=device)
    dones = torch.zeros((cfg.num_steps, cfg.num_envs), device=device)
    values = torch.zeros((cfg.num_steps, cfg.num_envs), device=device)
    greedy = torch.zeros((cfg.num_steps, cfg.num_envs) + env.position_shape, device=device)  # for diagnostics

    env.reset(*draw_episodes())
    next_features, next_position = env.observe()
    next_done = torch.zeros(cfg.num_envs, device=device)
    best_state, best_score, best_update = copy.deepcopy(agent.state_dict()), -np.inf, 0
    history: list[dict] = []
    trial_returns: list[list[float]] = []
    start_time, global_step, first_update = time.perf_counter(), 0, 1
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        saved = load_training_state(checkpoint_path)
        agent.load_state_dict(saved["agent"])
        optimizer.load_state_dict(saved["optimizer"])
        restore_random_streams(saved, device, generator)
        env.load_episode_state(saved["episodes"])
        next_features, next_position = env.observe()
        next_done = saved["next_done"].to(device)
        best_state, best_score, best_update = saved["best_state"], saved["best_score"], saved["best_update"]
        history, global_step, first_update = saved["history"], saved["global_step"], saved["update"] + 1
        trial_returns = saved_trial_returns(saved)
    resumed_from, steps_at_start = first_update - 1, global_step
    bar = tqdm(total=cfg.num_updates, initial=first_update - 1, desc="ppo updates", unit="update",
                    # only on a terminal: a task log would record every redraw (at ERROR, as stderr)
                    disable=not cfg.progress or not sys.stderr.isatty(), mininterval=5.0, file=sys.stderr)

    for update in range(first_update, cfg.num_updates + 1):
        progress = (update - 1) / cfg.num_updates
        if cfg.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - progress) * cfg.learning_rate
        ent_coef = cfg.ent_coef + progress * (cfg.ent_coef_final - cfg.ent_coef)

        # 1. Rollout: step all episodes together, restarting finished ones.
        traded = torch.zeros((), device=device)
        shaping_sums: dict[str, torch.Tensor] = {}
        # Last states of truncated episodes, as (row of the step-major buffers, features, position).
        truncated_states: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for step in range(cfg.num_steps):
            global_step += cfg.num_envs
            obs_features[step], obs_position[step], dones[step] = next_features, next_position, next_done
            with torch.no_grad():
                actor, value = agent(next_features, next_position)
                action, logprob = agent.sample(actor)
            values[step], actions[step], logprobs[step] = value, action, logprob
            greedy[step] = agent.greedy(actor, next_features)
            result = env.step(agent.target(action, next_features))
            rewards[step] = result.reward * cfg.reward_scale
            truncated = result.truncated.nonzero().squeeze(1)
            if truncated.numel():
                truncated_states.append((step * cfg.num_envs + truncated, result.features.index_select(0, truncated),
                                         result.position.index_select(0, truncated)))
            traded += result.traded.mean()
            for name, term in result.shaping.items():
                shaping_sums[name] = shaping_sums.get(name, 0.0) + term.mean()
            done = result.terminated | result.truncated
            next_done = done.float()
            if done.any():
                env.reset(*draw_episodes(), mask=done)
                next_features, next_position = env.observe()
            else:
                next_features, next_position = result.features, result.position

        bootstrap_truncated(rewards, truncated_states, agent, cfg.gamma)

        # 2. Generalized advantage estimation.
        with torch.no_grad():
            _, next_value = agent(next_features, next_position)
            advantages = generalized_advantages(rewards, values, dones, next_value, next_done,
                                                cfg.gamma, cfg.gae_lambda)
            returns = advantages + values

        # 3. Optimize the clipped surrogate over shuffled minibatches.
        b_actions = actions.reshape((-1,) + actions.shape[2:])
        b_returns, b_values = returns.reshape(-1), values.reshape(-1)
        # What a minibatch reads of a sample, side by side in one row: gathering a shuffled
        # minibatch is bound by random reads, so one gather of rows beats one gather per buffer.
        n_position = obs_position[0, 0].numel()
        b_samples = torch.cat([obs_features.reshape(-1, n_feat), obs_position.reshape(-1, n_position),
                               torch.stack([logprobs, advantages, returns, values], dim=-1).reshape(-1, 4)], dim=1)
        minibatch_size = cfg.batch_size // cfg.num_minibatches
        clipfracs, approx_kl = [], torch.zeros((), device=device)
        for epoch in range(1, cfg.update_epochs + 1):
            order = torch.randperm(cfg.batch_size, device=device, generator=generator)
            for begin in range(0, cfg.batch_size, minibatch_size):
                idx = order[begin:begin + minibatch_size]
                # index_select copies whole rows; [idx] gathers element by element, several times slower.
                mb_features, mb_position, mb_numbers = b_samples.index_select(0, idx).split(
                    [n_feat, n_position, 4], dim=1)
                mb_logprobs, mb_adv, mb_returns, mb_values = mb_numbers.unbind(dim=1)
                mb_actions = b_actions.index_select(0, idx)
                actor, critic = agent.heads(mb_features, mb_position)
                new_logprob, entropy = agent.log_prob_entropy(actor, mb_actions)
                entropy = entropy.mean()
                log_ratio = new_logprob - mb_logprobs
                ratio = log_ratio.exp()
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - log_ratio).mean()
                    clipfracs.append(((ratio - 1.0).abs() > cfg.clip_coef).float().mean().item())
                if cfg.norm_adv:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                pg_loss = torch.max(
                    -mb_adv * ratio,
                    -mb_adv * torch.clamp(ratio, 1 - cfg.clip_coef, 1 + cfg.clip_coef),
                ).mean()
                # Squared error for a mean critic (clipped around the rollout's values with clip_vloss),
                # the quantile loss for a distributional one.
                v_loss = agent.value_head.loss(critic, mb_returns, mb_values, cfg.clip_coef if cfg.clip_vloss else None)
                loss = pg_loss - ent_coef * entropy + cfg.vf_coef * v_loss
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
                optimizer.step()
            if cfg.target_kl is not None and approx_kl > cfg.target_kl:
                break

        # 4. Diagnostics, and checkpoint selection on validation only.
        variance = b_returns.var()
        explained_var = (1 - (b_returns - b_values).var() / variance).item() if variance > 0 else float("nan")
        # Decisions of the policy that collected this rollout, on the states it visited.
        with torch.no_grad():
            sampled_target = agent.target(b_actions, obs_features.reshape(-1, n_feat))
        greedy_target = greedy.reshape((-1,) + env.position_shape)
        greedy_share = dominant_share(space, greedy_target)
        collapsed = greedy_share >= collapse_share
        metrics = {
            "loss/policy": pg_loss.item(), "loss/value": v_loss.item(), "loss/entropy": entropy.item(),
            "approx_kl": approx_kl.item(), "clipfrac": float(np.mean(clipfracs)),
            "explained_variance": explained_var, "learning_rate": optimizer.param_groups[0]["lr"],
            "ent_coef": ent_coef, "epochs": epoch, "mean_reward": rewards.mean().item() / cfg.reward_scale,
            "steps_per_second": (global_step - steps_at_start) / (time.perf_counter() - start_time),
            "turnover_per_step": traded.item() / cfg.num_steps,
            "hold_share": hold_share(space, sampled_target.reshape(greedy.shape), dones),
            **{f"shaping/{name}": float(total) / cfg.num_steps for name, total in shaping_sums.items()},
            "collapse_alarm": float(collapsed),
            **space.action_metrics(sampled_target, greedy_target),
        }
        if update % cfg.eval_every == 0 or update == cfg.num_updates:
            agent.eval()
            outcome = validate(agent)
            agent.train()
            if isinstance(outcome, tuple):
                outcome, returns = outcome
                trial_returns.append([float(r) for r in returns])
            metrics["validation_score"] = score = float(outcome)
            if score > best_score:
                best_state, best_score, best_update = copy.deepcopy(agent.state_dict()), score, update
        history.append({"update": update, "global_step": global_step, **metrics})
        if log is not None:
            log(metrics, global_step)
        if collapsed:
            logger.warning("collapse alarm at update %d: deterministic policy makes one decision on %.0f%% of states",
                           update, 100 * greedy_share)
        bar.update(1)
        bar.set_postfix(sps=f"{metrics['steps_per_second']:,.0f}", val=f"{best_score:.2f}", refresh=False)
        if checkpoint_path is not None and (update % cfg.checkpoint_every == 0 or update == cfg.num_updates):
            save_training_state(Path(checkpoint_path), {
                "agent": agent.state_dict(), "optimizer": optimizer.state_dict(), "device": device.type,
                "generator": generator.get_state(), "sampling_rng": sampling_rng_state(device),
                "episodes": env.episode_state(), "next_done": next_done,
                "best_state": best_state, "best_score": float(best_score), "best_update": best_update,
                "history": history, "global_step": global_step, "update": update,
                # One tensor rather than nested lists: a long intraday validation window is
                # thousands of bars per trial.
                "validation_returns": torch.tensor(trial_returns, dtype=torch.float64)})
    bar.close()

    agent.load_state_dict(best_state)
    elapsed = time.perf_counter() - start_time
    with torch.no_grad():  # the alarm concerns the weights we keep, on the states of the last rollout
        kept_share = dominant_share(space, agent.decide(obs_features.reshape(-1, n_feat),
                                                        obs_position.reshape((-1,) + env.position_shape)))
    return TrainResult(agent=agent.eval(), best_update=best_update, best_score=float(best_score),
                       history=history, steps_per_second=(global_step - steps_at_start) / max(elapsed, 1e-9),
                       resumed_from_update=resumed_from, collapse_alarm=kept_share >= collapse_share,
                       validation_returns=trial_returns)


def saved_trial_returns(saved: dict) -> list[list[float]]:
    """The trials' validation returns recorded before the checkpoint."""
    if "validation_returns" not in saved:
        logger.warning("the training checkpoint holds no validation returns: trials before update %d are not kept",
                       saved["update"] + 1)
        return []
    return saved["validation_returns"].tolist()
