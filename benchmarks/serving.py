"""Serving latency and throughput of the exported policy: onnxruntime vs torch eager.

    .venv/bin/python benchmarks/serving.py [--calls 20000] [--batches 256 4096 65536] [--threads 1 2]

The policy has the trained shape (13 features with range and volume, 64x64 MLP, 5 levels)
and random weights: latency does not depend on the weights. Inputs are real windows from
the bundled GSPC sample. Single decisions use one intra-op thread; every single call is
timed on its own and reported as percentiles. Batched throughput is the batch size over
the median call time. Prints a Markdown table (for docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ml.data.schema import ohlcv_array
from ml.data.sources import load_sample
from ml.agent.policy import ActorCritic, ExportPolicy
from ml.config import ActionConfig
from ml.env.action_space import make_action_space
from ml.market.features import FeatureModule
from ml.release.export import export_onnx
from ml.serving import Policy

LOOKBACK = 64
LEVELS = (-1.0, -0.5, 0.0, 0.5, 1.0)
P99_TARGET_US = 200.0
THROUGHPUT_TARGET = 1_000_000


def build_policy(ohlcv: np.ndarray) -> ExportPolicy:
    torch.manual_seed(0)
    features = FeatureModule(LOOKBACK, use_range=True, use_volume=True)
    agent = ActorCritic(features.n_features, make_action_space(ActionConfig(exposure_levels=LEVELS)))
    # Normalization from real windows so the MLP sees inputs on the trained scale.
    with torch.no_grad():
        sample = features(torch.from_numpy(real_windows(ohlcv, 2048, seed=1)[0]))
    agent.set_normalization(sample.mean(0), sample.std(0))
    return ExportPolicy(features, agent).eval()


def real_windows(ohlcv: np.ndarray, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` contiguous [L, 5] windows ending on random bars, and positions on the levels."""
    rng = np.random.default_rng(seed)
    ends = rng.integers(LOOKBACK - 1, len(ohlcv), size=count)
    windows = ohlcv[ends[:, None] + np.arange(-LOOKBACK + 1, 1)]
    positions = rng.choice(np.asarray(LEVELS, np.float32), size=(count, 1))
    return np.ascontiguousarray(windows, dtype=np.float32), positions


def onnx_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def per_call_us(call, count: int, warmup: int) -> np.ndarray:
    """Each call timed on its own; ``call(i)`` gets the call index."""
    for i in range(warmup):
        call(i)
    times = np.empty(count)
    clock = time.perf_counter_ns
    for i in range(count):
        start = clock()
        call(i)
        times[i] = clock() - start
    return times / 1000.0


def median_call_s(call, min_seconds: float = 1.0, min_calls: int = 5) -> float:
    call()  # warm-up (allocations, thread pool)
    times = []
    begin = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - begin < min_seconds:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 4096, 65536])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    command = " ".join([".venv/bin/python", "benchmarks/serving.py", *map(shlex.quote, sys.argv[1:])])
    load_start = os.getloadavg()[0]

    ohlcv = ohlcv_array(load_sample("GSPC"))
    model = build_policy(ohlcv)
    folder = tempfile.TemporaryDirectory()  # removed at exit; sessions hold the model in memory
    path = export_onnx(model, Path(folder.name) / "model.onnx", {"lookback": LOOKBACK})
    rows = []

    # Single decisions: a different real window on every call, like a stream of bars.
    pool, pool_positions = real_windows(ohlcv, 4096)
    singles = [(pool[i:i + 1], pool_positions[i:i + 1]) for i in range(len(pool))]
    warmup = min(2000, args.calls)
    session = onnx_session(path, 1)
    policy = Policy(path, prefer_gpu=False, intra_op_threads=1)
    assert policy.session.get_providers() == ["CPUExecutionProvider"]
    torch.set_num_threads(1)

    def raw(i):
        window, position = singles[i % len(singles)]
        return session.run(["target_exposure"], {"ohlcv": window, "position": position})

    def decide(i):
        return policy.decide(*singles[i % len(singles)])

    def validate(i):
        return policy.validate(*singles[i % len(singles)])

    def eager(i):
        window, position = singles[i % len(singles)]
        with torch.inference_mode():
            return model(torch.from_numpy(window), torch.from_numpy(position))[0]

    # Interleaved in rounds so that load from other work on a shared machine hits every path alike.
    paths = [("onnxruntime session.run", raw), ("Policy.decide", decide),
             ("Policy.validate only", validate), ("torch eager", eager)]
    rounds = 10
    single = {name: [] for name, _ in paths}
    for round_ in range(rounds):
        for name, call in paths:
            single[name].append(per_call_us(call, args.calls // rounds, warmup if round_ == 0 else 0))
    single = {name: np.concatenate(times) for name, times in single.items()}
    torch_p50, torch_p99 = np.percentile(single["torch eager"], [50, 99])
    for name, times in single.items():
        p50, p99, p999 = np.percentile(times, [50, 99, 99.9])
        if name == "Policy.validate only":  # part of Policy.decide, shown for where the time goes
            rows.append(f"| single | {name} | 1 | 1 | {p50:.1f} | {p99:.1f} | {p999:.1f} | – | – | – |")
            continue
        target = "–" if name == "torch eager" else ("yes" if p99 <= P99_TARGET_US else "**no**")
        rows.append(f"| single | {name} | 1 | 1 | {p50:.1f} | {p99:.1f} | {p999:.1f} | "
                    f"{1e6 / p50:,.0f} | {torch_p50 / p50:.2f}x / {torch_p99 / p99:.2f}x | {target} |")

    # Batched decisions.
    big_windows, big_positions = real_windows(ohlcv, max(args.batches), seed=2)
    for threads in args.threads:
        session = onnx_session(path, threads)
        policy = Policy(path, prefer_gpu=False, intra_op_threads=threads)
        torch.set_num_threads(threads)
        for batch in args.batches:
            windows, positions = big_windows[:batch], big_positions[:batch]
            feeds = {"ohlcv": windows, "position": positions}
            tensors = torch.from_numpy(windows), torch.from_numpy(positions)

            def torch_batch():
                with torch.inference_mode():
                    model(*tensors)

            seconds = {
                "onnxruntime session.run": median_call_s(lambda: session.run(["target_exposure"], feeds)),
                "Policy.decide": median_call_s(lambda: policy.decide(windows, positions)),
                "torch eager": median_call_s(torch_batch),
            }
            for name, s in seconds.items():
                rate = batch / s
                target = "–" if name == "torch eager" else ("yes" if rate >= THROUGHPUT_TARGET else "**no**")
                rows.append(f"| batch | {name} | {threads} | {batch} | {s * 1e6:,.0f} | – | – | "
                            f"{rate:,.0f} | {seconds['torch eager'] / s:.2f}x | {target} |")

    load_end = os.getloadavg()[0]
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"machine: {platform.node()}, {cpu}, {os.cpu_count()} logical CPUs, {platform.system()} "
          f"{platform.release()}")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"command: `{command}`")
    print(f"versions: onnxruntime {ort.__version__} (CPUExecutionProvider), torch {torch.__version__}, "
          f"numpy {np.__version__}, Python {platform.python_version()}")
    print(f"load average (1 min): {load_start:.2f} at start, {load_end:.2f} at end")
    print(f"single: {args.calls} timed calls per path (interleaved in {rounds} rounds) after {warmup} warm-up "
          "calls, one real window each; batch: median of >= 5 calls and >= 1 s per row")
    print(f"targets: p99 <= {P99_TARGET_US:.0f} us per single decision; >= {THROUGHPUT_TARGET:,} decisions/s "
          "batched")
    print()
    print("| mode | path | intra-op threads | batch | p50 us per call | p99 us | p99.9 us | decisions/s | "
          "speed-up vs torch eager (p50 / p99) | meets target |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
