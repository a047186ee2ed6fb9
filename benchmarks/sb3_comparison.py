"""Our batched PPO against Stable-Baselines3 PPO on the Gymnasium wrapper, in one run.

    .venv/bin/python benchmarks/sb3_comparison.py [--sb3-steps 40960] [--ppo-steps 4194304] [--rounds 3]

Both learn on the bundled GSPC sample with the default costs, 5 exposure levels,
rollout length 64, 4 epochs x 4 minibatches, lr 3e-4, and 64x64 tanh MLPs:
ours is one shared backbone with actor and critic heads, SB3's ``MlpPolicy``
default is separate 64x64 networks for policy and value (SB3 2.x has no shared
layers option), so SB3 does about twice the MLP work per sample. SB3 runs on CPU
with ``DummyVecEnv`` (sequential, in-process) over ``TradingGymEnv``, which
steps one ``TradingEnv`` episode per instance. Ours runs ``train_fold`` with
4096 parallel episodes on CPU; validation runs once, after the last update,
and is inside the timing.

Training runs in alternating rounds, SB3 then ours, and the median ratio is the result:
on a shared VM one run of either can be off by tens of percent. The env-only rows step
random exposure levels without any learner.
Prints Markdown tables with machine, date and command.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shlex
import sys
import time

import numpy as np
import torch

from ml.config import ActionConfig, CostConfig, EnvConfig, PPOConfig, config_from_dict
from ml.data.sources import load_sample
from ml.env.action_space import make_action_space
from ml.env.gym_env import DEFAULT_LEVELS, TradingGymEnv
from ml.env.trading_env import TradingEnv
from ml.evaluation.splits import walk_forward_folds
from ml.evaluation.walkforward import train_fold
from ml.fastpath import keep_freed_memory
from ml.market.series import prepare_series

DATA = "sample:GSPC"
LOOKBACK = 64


def make_vec_env(n_envs: int, window: tuple[int, int], seed: int):
    from stable_baselines3.common.vec_env import DummyVecEnv

    # Episodes confined to the same training window our PPO learns on.
    vec = DummyVecEnv([lambda: TradingGymEnv(DATA, train_window=window) for _ in range(n_envs)])
    vec.seed(seed)
    return vec


def sb3_ppo(n_envs: int, timesteps: int, window: tuple[int, int]) -> tuple[float, float]:
    from stable_baselines3 import PPO

    cfg = PPOConfig()
    vec = make_vec_env(n_envs, window, seed=cfg.seed)
    n_steps = cfg.num_steps
    model = PPO(
        "MlpPolicy", vec, n_steps=n_steps, batch_size=n_steps * n_envs // cfg.num_minibatches,
        n_epochs=cfg.update_epochs, learning_rate=cfg.learning_rate, gamma=cfg.gamma,
        gae_lambda=cfg.gae_lambda, clip_range=cfg.clip_coef, ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef,
        max_grad_norm=cfg.max_grad_norm, target_kl=cfg.target_kl,
        policy_kwargs={"net_arch": list(cfg.hidden), "activation_fn": torch.nn.Tanh},
        device="cpu", seed=cfg.seed, verbose=0,
    )
    start = time.perf_counter()
    model.learn(total_timesteps=timesteps)
    elapsed = time.perf_counter() - start
    return model.num_timesteps, elapsed


def our_ppo(bars, series, n_envs: int, timesteps: int) -> tuple[float, float]:
    ppo = {"num_envs": n_envs, "num_steps": 64, "total_timesteps": timesteps,
           "eval_every": 10**9, "device": "cpu"}
    if "progress" in {f.name for f in dataclasses.fields(PPOConfig)}:
        ppo["progress"] = False
    config = config_from_dict({"ppo": ppo})
    fold = walk_forward_folds(bars["timestamp"], config.lookback, config.splits)[-1]
    start = time.perf_counter()
    result = train_fold(series, fold, config)
    elapsed = time.perf_counter() - start
    return result.history[-1]["global_step"], elapsed


def wrapper_env_rate(window: tuple[int, int], steps: int) -> float:
    """One wrapper instance through the plain Gymnasium API."""
    env = TradingGymEnv(DATA, train_window=window)
    rng = np.random.default_rng(0)
    actions = rng.integers(0, env.action_space.n, size=steps)
    env.reset(seed=0)
    start = time.perf_counter()
    for action in actions:
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - start)


def dummy_vec_env_rate(n_envs: int, window: tuple[int, int], steps: int) -> float:
    """What SB3 sees: DummyVecEnv of wrappers, autoreset included."""
    vec = make_vec_env(n_envs, window, seed=0)
    vec.reset()
    rng = np.random.default_rng(0)
    actions = rng.integers(0, len(DEFAULT_LEVELS), size=(steps // n_envs, n_envs))
    start = time.perf_counter()
    for batch in actions:
        vec.step(batch)
    return actions.size / (time.perf_counter() - start)


def batched_env_rate(series, n_envs: int, window: tuple[int, int], steps: int) -> float:
    """Our batched TradingEnv with the same random discrete levels and autoreset."""
    lo, hi = window
    env = TradingEnv(series, n_envs, make_action_space(ActionConfig()), CostConfig(), EnvConfig())
    generator = torch.Generator().manual_seed(0)
    ends = torch.full((n_envs,), hi)
    levels = torch.tensor(DEFAULT_LEVELS, dtype=torch.float64)
    env.reset(torch.randint(lo, hi, (n_envs,), generator=generator), ends)
    actions = torch.randint(0, len(levels), (steps, n_envs), generator=generator)

    def run(count: int) -> None:
        for k in range(count):
            result = env.step(levels[actions[k]])
            done = result.terminated | result.truncated
            if done.any():
                env.reset(torch.randint(lo, hi, (n_envs,), generator=generator), ends, mask=done)
            env.observe()

    run(10)  # warm-up
    start = time.perf_counter()
    run(steps)
    return n_envs * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sb3-envs", type=int, default=8)
    parser.add_argument("--sb3-steps", type=int, default=40_960)
    parser.add_argument("--ppo-envs", type=int, default=4096)
    parser.add_argument("--ppo-steps", type=int, default=4096 * 64 * 16)
    parser.add_argument("--env-steps", type=int, default=10_000, help="env-only steps for the wrapper")
    parser.add_argument("--rounds", type=int, default=3, help="alternating SB3 / ours training runs")
    args = parser.parse_args()

    load_before = os.getloadavg()
    bars = load_sample("GSPC")
    series = prepare_series(bars, LOOKBACK, torch.device("cpu"))
    config = config_from_dict({})
    window = walk_forward_folds(bars["timestamp"], config.lookback, config.splits)[-1].train

    # torch imports torch._dynamo on the first optimizer a process builds (about 1 s). SB3 pays that
    # in PPO(), before its clock starts; paying it here keeps it out of both clocks.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    # Our trainer raises glibc's allocator thresholds for the whole process when it starts;
    # setting them now gives SB3's first round the same allocator as every later one.
    keep_freed_memory()
    # Rounds alternate SB3 and ours, so a slower or faster spell of a shared VM hits both.
    rounds = []
    for _ in range(args.rounds):
        sb3_steps, sb3_seconds = sb3_ppo(args.sb3_envs, args.sb3_steps, window)
        our_steps, our_seconds = our_ppo(bars, series, args.ppo_envs, args.ppo_steps)
        rounds.append((sb3_steps, sb3_seconds, our_steps, our_seconds))
    wrapper_rate = wrapper_env_rate(window, args.env_steps)
    dummy_rate = dummy_vec_env_rate(args.sb3_envs, window, args.env_steps)
    batched_rate = batched_env_rate(series, args.ppo_envs, window, 500)

    import gymnasium
    import stable_baselines3

    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads, CPU only")
    print(f"date: {datetime.date.today().isoformat()}; python {platform.python_version()}, torch {torch.__version__}, "
          f"stable-baselines3 {stable_baselines3.__version__}, gymnasium {gymnasium.__version__}")
    # The machine may be shared: the load average tells whether the cores were busy elsewhere.
    print("1-min load average: {:.2f} at start, {:.2f} at end".format(load_before[0], os.getloadavg()[0]))
    print(f"data: bundled GSPC, last fold's train window bars {window[0]}..{window[1]}, default costs")
    print()
    print(f"SB3: {args.sb3_envs} parallel episodes, {rounds[0][0]:,} env steps per round; "
          f"ours: {args.ppo_envs} parallel episodes, {rounds[0][2]:,} env steps per round")
    print()
    print("| round | SB3 PPO wall s | SB3 PPO steps/s | ml.ppo wall s | ml.ppo steps/s | ratio (ours / SB3) |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for k, (sb3_steps, sb3_seconds, our_steps, our_seconds) in enumerate(rounds, start=1):
        sb3_rate, our_rate = sb3_steps / sb3_seconds, our_steps / our_seconds
        ratios.append(our_rate / sb3_rate)
        print(f"| {k} | {sb3_seconds:.1f} | {sb3_rate:,.0f} | {our_seconds:.1f} | {our_rate:,.0f} | {ratios[-1]:.0f}x |")
    sb3_median = float(np.median([r[0] / r[1] for r in rounds]))
    our_median = float(np.median([r[2] / r[3] for r in rounds]))
    print(f"| median | | {sb3_median:,.0f} | | {our_median:,.0f} | {float(np.median(ratios)):.0f}x |")
    print()
    print("| environment only (random levels) | parallel episodes | env steps/s |")
    print("|---|---|---|")
    print(f"| TradingGymEnv, plain Gymnasium loop | 1 | {wrapper_rate:,.0f} |")
    print(f"| DummyVecEnv of TradingGymEnv (what SB3 steps) | {args.sb3_envs} | {dummy_rate:,.0f} |")
    print(f"| batched TradingEnv | {args.ppo_envs} | {batched_rate:,.0f} |")
    print(f"| ratio (batched / DummyVecEnv) | | {batched_rate / dummy_rate:,.0f}x |")


if __name__ == "__main__":
    main()
