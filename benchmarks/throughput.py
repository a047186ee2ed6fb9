"""Environment-only and full PPO training throughput against the number of parallel episodes.

    .venv/bin/python benchmarks/throughput.py [--device cpu|cuda] [--envs 256 1024 4096] [--threads 1 2]
                                              [--portfolio] [--profile 16384] [--risk-config FILE]

Runs on the bundled GSPC sample with the default costs and a 64x64 MLP.
``--portfolio`` adds the same two rates in portfolio mode (GSPC + KO + cash).
``--profile N`` then says where the time of a training run with N parallel episodes goes:
the torch profiler's op table, the share of the wall time the GPU was busy, and one
validation backtest timed on the device and on the CPU.
``--risk-config FILE`` runs the environment and training through the risk overlay of that
config's ``risk:`` section. ``--threads N`` sets torch's threads for the environment and
``ppo.threads`` for training.
Prints Markdown tables (for docs/benchmarks.md) with machine and date.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import time
from dataclasses import replace

import torch

from ml.config import ActionConfig, CostConfig, EnvConfig, config_from_dict, load_config
from ml.data.sources import load_sample
from ml.env.action_space import make_action_space
from ml.env.risk import RiskOverlay
from ml.env.trading_env import TradingEnv
from ml.evaluation.splits import walk_forward_folds
from ml.evaluation.walkforward import backtest_policy, new_agent, train_fold
from ml.market.series import prepare_series


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def env_steps_per_second(series, n_envs: int, steps: int, compiled: bool = False, risk: dict | None = None) -> float:
    device = series.device
    space = make_action_space(ActionConfig(mode="portfolio" if series.n_assets > 1 else "continuous"),
                              series.n_assets)
    overlay = RiskOverlay(load_config(None, {"risk": risk}).risk, series.n_assets, 252.0, "1d") if risk else None
    env = TradingEnv(series, n_envs, space, CostConfig(), EnvConfig(episode_bars=256, compile=compiled), overlay,
                     record_risk=False)
    lo, hi = 100, series.ohlcv.shape[0] - 1
    generator = torch.Generator(device=device).manual_seed(0)
    ends = torch.full((n_envs,), hi, device=device)
    env.reset(torch.randint(lo, hi, (n_envs,), device=device, generator=generator), ends)
    # Single asset: exposures in [-1, 1]; portfolio: random weights summing to at most 1.
    assets = series.n_assets
    actions = torch.rand((steps, n_envs, assets), device=device, generator=generator)
    actions = actions * 2 - 1 if assets == 1 else actions / assets

    def run(count: int) -> None:
        for k in range(count):
            result = env.step(actions[k])
            done = result.terminated | result.truncated
            env.reset(torch.randint(lo, hi, (n_envs,), device=device, generator=generator), ends, mask=done)
            env.observe()

    run(10)  # warm-up
    sync(device)
    start = time.perf_counter()
    run(steps)
    sync(device)
    return n_envs * steps / (time.perf_counter() - start)


def ppo_steps_per_second(series, n_envs: int, timesteps: int, device: str, threads: int | None = None,
                         risk: dict | None = None) -> float:
    """PPO training steps/s; ``threads`` sets ppo.threads (None: the trainer's own budget), ``risk``
    the risk overlay's settings (None: no overlay)."""
    portfolio = series.n_assets > 1
    config = config_from_dict({
        "ppo": {"num_envs": n_envs, "num_steps": 64, "total_timesteps": timesteps, "eval_every": 10**9,
                "device": device, "threads": threads},
        **({"risk": risk} if risk else {}),
        **({"data": {"symbols": list(series.symbols)}, "action": {"mode": "portfolio"}} if portfolio else {})})
    fold = walk_forward_folds(series.timestamps, config.lookback, config.splits)[-1]
    result = train_fold(series, fold, config)
    return result.steps_per_second


def profile_training(series, n_envs: int, updates: int, device: torch.device) -> None:
    """Op table of one training run, how busy the GPU was, and what one validation backtest costs."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    ppo_steps_per_second(series, n_envs, n_envs * 64, device.type)  # kernel creation and caches out of the profile
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        start = time.perf_counter()
        rate = ppo_steps_per_second(series, n_envs, n_envs * 64 * updates, device.type)
        sync(device)
        wall = time.perf_counter() - start
    ops = prof.key_averages()
    print(f"\nProfile: {updates} updates at {n_envs} parallel episodes, {rate:,.0f} steps/s under the profiler, "
          f"{wall:.2f} s wall\n")
    print(ops.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=25))
    if cuda:
        # Kernels and copies only: an op's device time is its kernels', so counting both would count twice.
        busy = sum(event.self_device_time_total for event in prof.events()
                   if event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)) / 1e6
        print(f"GPU busy {busy:.2f} s of {wall:.2f} s wall ({100 * busy / wall:.0f}%); the rest is kernel launches, "
              "host syncs and Python")

    config = config_from_dict({"ppo": {"device": device.type}})
    fold = walk_forward_folds(series.timestamps, config.lookback, config.splits)[-1]
    agent = new_agent(series, config, fold)
    places = [(device.type, series)]
    if cuda:  # the same single-episode loop on the CPU, for comparison
        places.append(("cpu", replace(series, ohlcv=series.ohlcv.cpu(), features=series.features.cpu(),
                                      fill_at_open=series.fill_at_open.cpu())))
    for label, where in places:
        agent.to(where.device)
        backtest_policy(agent, where, fold.validation, config)  # warm-up
        sync(where.device)
        start = time.perf_counter()
        backtest_policy(agent, where, fold.validation, config)
        sync(where.device)
        bars = fold.validation[1] - fold.validation[0]
        print(f"one validation backtest ({bars} bars, one episode) on {label}: {time.perf_counter() - start:.3f} s")


def print_table(series, args, compiled: bool) -> None:
    """One row per thread count and episode count; ``compiled`` adds the compiled-env column."""
    device = series.device
    env_column = "env steps/s (eager) | env steps/s (compiled)" if compiled else "env steps/s"
    print(f"| device | threads | parallel episodes | {env_column} | PPO train steps/s |")
    print("|---|---|---|---|---|" + ("---|" if compiled else ""))
    risk = args.risk
    for threads in args.threads:
        torch.set_num_threads(threads)
        for n_envs in args.envs:
            rates = [env_steps_per_second(series, n_envs, args.env_steps, risk=risk)]
            if compiled:
                rates.append(env_steps_per_second(series, n_envs, args.env_steps, compiled=True, risk=risk))
            rates.append(ppo_steps_per_second(series, n_envs, n_envs * 64 * args.ppo_updates, args.device, threads,
                                              risk))
            print(f"| {device.type} | {threads} | {n_envs} | " + " | ".join(f"{r:,.0f}" for r in rates) + " |",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--envs", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--env-steps", type=int, default=500)
    parser.add_argument("--ppo-updates", type=int, default=6)
    parser.add_argument("--portfolio", action="store_true", help="also measure portfolio mode")
    parser.add_argument("--profile", type=int, metavar="N", help="profile a training run with N parallel episodes")
    parser.add_argument("--profile-updates", type=int, default=3)
    parser.add_argument("--risk-config", help="a config whose risk: section the environment and training run under")
    args = parser.parse_args()
    args.risk = (dataclasses.asdict(load_config(args.risk_config).risk) if args.risk_config else None)

    device = torch.device(args.device)
    bars = load_sample("GSPC")
    series = prepare_series(bars, 64, device)
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads available, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    print(f"date: {datetime.date.today().isoformat()}, torch {torch.__version__}, "
          f"1-min load average at start: {os.getloadavg()[0]:.2f}")
    print()
    print_table(series, args, compiled=True)
    if args.portfolio:
        portfolio = prepare_series({s: load_sample(s) for s in ("GSPC", "KO")}, 64, device)
        print("\nPortfolio mode, GSPC + KO + cash (one step = one decision over both assets):\n")
        print_table(portfolio, args, compiled=False)
    if args.profile:
        profile_training(series, args.profile, args.profile_updates, device)
    print(f"\n1-min load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
