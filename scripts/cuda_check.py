"""The CUDA paths against the CPU ones, on the bundled sample.

    python3 scripts/cuda_check.py [--device cuda]

The same bars, actions and weights must give the same features, the same books and the same
policy outputs on the device as on the CPU; training on the device must give finite metrics,
the same weights twice in deterministic mode, in single-asset and portfolio mode, resume from a
checkpoint (to the uninterrupted run's weights, and on a CPU worker too), and give a policy that
exports to ONNX with parity. One PASS or FAIL line per check;
exit status 1 if any fails.

CI has no GPU: ``scripts/device_check.sh`` runs this on a GPU machine together with the CUDA
benchmarks. ``--device cpu`` runs it on a machine without one, every comparison then CPU against
CPU; the test suite does that, so the script keeps fitting the code it calls.
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import sys
import tempfile
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from ml.agent.policy import ActorCritic, load_policy, policy_checkpoint
from ml.config import ActionConfig, CostConfig, EnvConfig, config_from_dict
from ml.data.sources import load_sample
from ml.env.action_space import make_action_space
from ml.env.trading_env import TradingEnv
from ml.evaluation.splits import walk_forward_folds
from ml.evaluation.walkforward import evaluate_fold, train_fold
from ml.market.series import prepare_series
from ml.release.export import check_parity, export_onnx, real_windows

LOOKBACK = 64
CPU = torch.device("cpu")
COSTS = CostConfig(commission_bps=2, half_spread_bps=1, slippage_bps=3, borrow_bps_per_year=40)
failures: list[str] = []


def check(name: str, passed: bool, detail: str = "") -> None:
    print(f"{'PASS' if passed else 'FAIL'}  {name}" + (f": {detail}" if detail else ""), flush=True)
    if not passed:
        failures.append(name)


def largest_gap(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference, NaN where exactly one side is NaN."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.equal(got.isnan(), want.isnan()):
        return math.nan
    both = ~want.isnan()
    return float((got[both] - want[both]).abs().max()) if both.any() else 0.0


def close(name: str, got: torch.Tensor, want: torch.Tensor, tolerance: float) -> None:
    gap = largest_gap(got, want)
    check(name, gap <= tolerance, f"max |device - cpu| = {gap:.3g} (tolerance {tolerance:g})")


def books(make_env, n: int, steps: int, action_shape: tuple[int, ...], device: torch.device) -> dict:
    """Step ``n`` episodes with the same random targets and restarts on ``device``."""
    generator = torch.Generator().manual_seed(7)
    env = make_env(device)
    last = env.features.shape[0] - 2
    starts = torch.randint(LOOKBACK, last - 300, (n,), generator=generator)
    ends = torch.full((n,), last)
    targets = torch.rand((steps, n) + action_shape, generator=generator)
    targets = targets / action_shape[0] if action_shape else targets * 2 - 1
    env.reset(starts.to(device), ends.to(device))
    record = {key: [] for key in ("nav", "reward", "cost", "position", "features", "done")}
    for k in range(steps):
        result = env.step(targets[k].to(device))
        done = result.terminated | result.truncated
        for key in ("nav", "reward", "cost", "position", "features"):
            record[key].append(getattr(result, key))
        record["done"].append(done)
        env.reset(starts.to(device), ends.to(device), mask=done)
    return {key: torch.stack(values).cpu() for key, values in record.items()}


def compare_books(label: str, got: dict, want: dict) -> None:
    check(f"{label}: same restarts", torch.equal(got["done"], want["done"]))
    close(f"{label}: NAV", got["nav"], want["nav"], 1e-9)
    close(f"{label}: costs", got["cost"], want["cost"], 1e-12)
    close(f"{label}: reward", got["reward"], want["reward"], 1e-6)
    close(f"{label}: position", got["position"], want["position"], 1e-6)
    close(f"{label}: observed features", got["features"], want["features"], 1e-4)


def check_environments(device: torch.device, bars: dict) -> None:
    series = {dev: prepare_series(bars["GSPC"], LOOKBACK, dev) for dev in (device, CPU)}
    # Float32 sums of up to 252 bars, in another order on another device.
    close("features of GSPC", series[device].features, series[CPU].features, 1e-4)
    config = EnvConfig(episode_bars=64)

    def single(dev, compiled=False):
        return TradingEnv(series[dev], 512, make_action_space(ActionConfig()).to(dev), COSTS,
                          replace(config, compile=compiled))

    want = books(single, 512, 300, (), CPU)
    compare_books("single-asset env", books(single, 512, 300, (), device), want)
    compare_books("compiled single-asset env", books(lambda dev: single(dev, True), 512, 300, (), device), want)

    portfolio = {dev: prepare_series({s: bars[s] for s in ("GSPC", "KO")}, LOOKBACK, dev) for dev in (device, CPU)}
    close("features of GSPC + KO", portfolio[device].features, portfolio[CPU].features, 1e-4)

    def multi(dev):
        return TradingEnv(portfolio[dev], 512, make_action_space(ActionConfig(mode="portfolio"), 2).to(dev),
                          COSTS, config)

    compare_books("portfolio env", books(multi, 512, 300, (2,), device), books(multi, 512, 300, (2,), CPU))


def check_policies(device: torch.device) -> None:
    torch.manual_seed(3)
    features, generator = torch.randn(4096, 14) * 2, torch.Generator().manual_seed(4)
    for mode, n_assets in (("discrete", 1), ("continuous", 1), ("portfolio", 2)):
        agent = ActorCritic(14, make_action_space(ActionConfig(mode=mode), n_assets), (64, 64))
        agent.set_normalization(features.mean(dim=0), features.std(dim=0))
        position = torch.rand((4096, n_assets), generator=generator)
        with torch.no_grad():
            want = agent(features, position)
            got = copy.deepcopy(agent).to(device)(features.to(device), position.to(device))
        close(f"{mode} policy: actor output", got[0], want[0], 1e-5)
        close(f"{mode} policy: value", got[1], want[1], 1e-5)


def finite_history(history: list[dict]) -> bool:
    keys = ("loss/policy", "loss/value", "loss/entropy", "approx_kl", "explained_variance", "mean_reward")
    return all(math.isfinite(row[key]) for row in history for key in keys)


def same_weights(first: ActorCritic, second: ActorCritic) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def check_training(device: torch.device, bars: dict) -> None:
    ppo = {"num_envs": 256, "num_steps": 32, "total_timesteps": 256 * 32 * 6, "eval_every": 3,
           "device": device.type, "progress": False, "deterministic": True}
    config = config_from_dict({"ppo": ppo})
    series = prepare_series(bars["GSPC"], config.lookback, device)
    fold = walk_forward_folds(series.timestamps, config.lookback, config.splits)[0]
    for mode in ("discrete", "continuous"):
        mode_config = replace(config, action=replace(config.action, mode=mode))
        first, second = train_fold(series, fold, mode_config), train_fold(series, fold, mode_config)
        check(f"{mode} training on {device.type}: finite metrics", finite_history(first.history))
        check(f"{mode} training on {device.type}: deterministic mode repeats the weights",
              same_weights(first.agent, second.agent))
        if mode == "discrete":
            report, _, _ = evaluate_fold(first.agent, series, fold, config)
            check("discrete policy on the test window: finite Sharpe",
                  math.isfinite(report["policy"]["test"]["sharpe"]))
            check_export(first.agent, series, config)
            check_resume(series, fold, mode_config, first, prepare_series(bars["GSPC"], config.lookback, CPU))

    portfolio_config = config_from_dict({"ppo": ppo, "action": {"mode": "portfolio"},
                                         "data": {"symbols": ["GSPC", "KO"]}})
    portfolio = prepare_series({s: bars[s] for s in ("GSPC", "KO")}, config.lookback, device)
    fold = walk_forward_folds(portfolio.timestamps, config.lookback, config.splits)[0]
    first, second = (train_fold(portfolio, fold, portfolio_config) for _ in range(2))
    check(f"portfolio training on {device.type}: finite metrics", finite_history(first.history))
    check(f"portfolio training on {device.type}: deterministic mode repeats the weights",
          same_weights(first.agent, second.agent))


def check_resume(series, fold, config, uninterrupted, cpu_series) -> None:
    """A run interrupted after its update-4 checkpoint (an Airflow retry) resumes on the device and
    ends with the uninterrupted run's weights; the same checkpoint also resumes on a CPU worker."""
    config = replace(config, ppo=replace(config.ppo, checkpoint_every=2))
    updates = []

    def lose_the_worker_in_update_5(metrics: dict, step: int) -> None:
        updates.append(step)
        if len(updates) == 5:
            raise InterruptedError("worker lost")

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "train_state.pt"
        try:
            train_fold(series, fold, config, lose_the_worker_in_update_5, checkpoint_path=checkpoint)
        except InterruptedError:
            pass
        on_cpu = Path(folder) / "cpu_worker.pt"
        shutil.copyfile(checkpoint, on_cpu)
        resumed = train_fold(series, fold, config, checkpoint_path=checkpoint)
        cpu_config = replace(config, ppo=replace(config.ppo, device="cpu"))
        resumed_on_cpu = train_fold(cpu_series, fold, cpu_config, checkpoint_path=on_cpu)
    check("training resumes from its checkpoint on the device",
          resumed.resumed_from_update == 4 and [h["update"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
          and finite_history(resumed.history), f"resumed after update {resumed.resumed_from_update}")
    check("the resumed run ends with the uninterrupted run's weights", same_weights(resumed.agent, uninterrupted.agent))
    check(f"a {series.device.type} checkpoint resumes on a CPU worker",
          resumed_on_cpu.resumed_from_update == 4 and finite_history(resumed_on_cpu.history))


def check_export(agent: ActorCritic, series, config) -> None:
    """A policy trained on the device exports with parity (export and onnxruntime run on CPU)."""
    policy = load_policy(policy_checkpoint(agent, series.feature_module))
    ohlcv = series.ohlcv.cpu().numpy()
    windows, positions = real_windows(policy, ohlcv, config.lookback, len(ohlcv) - 1, 256, seed=1)
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(policy, Path(folder) / "policy.onnx", {"lookback": config.lookback})
        parity = check_parity(policy, path, windows, positions)
    check("policy trained on the device: ONNX parity", parity.passed,
          f"max |ort - torch| = {parity.max_abs_diff:.3g} on {parity.windows} windows ({parity.provider})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    device = torch.device(parser.parse_args().device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run on a GPU machine, or with --device cpu to check the script")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {device} ({name}), torch {torch.__version__}", flush=True)
    bars = {symbol: load_sample(symbol) for symbol in ("GSPC", "KO")}
    for section, args in ((check_environments, (device, bars)), (check_policies, (device,)),
                          (check_training, (device, bars))):
        try:
            section(*args)
        except Exception:  # one broken path must not hide what the other sections find
            traceback.print_exc()
            check(f"{section.__name__} ran to the end", False)
    print(f"\n{len(failures)} failed" + (": " + ", ".join(failures) if failures else ""))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
