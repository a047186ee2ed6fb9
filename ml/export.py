"""Export the policy (features + normalization + actor) to one ONNX file, and prove parity.

Contract (single asset): inputs ``ohlcv`` float32 [batch, lookback, 5] raw
bars oldest first and ``position`` float32 [batch, 1]; outputs
``target_exposure`` float32 [batch, 1], then ``action_probs`` [batch, levels]
(discrete policies) or ``action_std`` [batch, 1] (continuous policies), then
``value`` [batch, 1].

Contract (portfolio of A assets): inputs ``ohlcv`` float32 [batch, lookback,
A, 5] and ``weights`` float32 [batch, A] (current weights, cash excluded);
outputs ``target_weights`` float32 [batch, A] (long-only, summing to at most
1, the rest in cash) and ``value`` [batch, 1].
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from ml.policy import PortfolioPolicy, TradingPolicy

INPUT_NAMES = ["ohlcv", "position"]
OUTPUT_NAMES = ["target_exposure", "action_probs", "value"]
CONTINUOUS_OUTPUT_NAMES = ["target_exposure", "action_std", "value"]
PORTFOLIO_INPUT_NAMES = ["ohlcv", "weights"]
PORTFOLIO_OUTPUT_NAMES = ["target_weights", "value"]


def input_names(policy: TradingPolicy | PortfolioPolicy) -> list[str]:
    return PORTFOLIO_INPUT_NAMES if isinstance(policy, PortfolioPolicy) else INPUT_NAMES


def output_names(policy: TradingPolicy | PortfolioPolicy) -> list[str]:
    if isinstance(policy, PortfolioPolicy):
        return PORTFOLIO_OUTPUT_NAMES
    return CONTINUOUS_OUTPUT_NAMES if policy.actor_critic.mode == "continuous" else OUTPUT_NAMES


def example_inputs(policy: TradingPolicy | PortfolioPolicy) -> tuple[torch.Tensor, torch.Tensor]:
    lookback, assets = policy.features.lookback, policy.actor_critic.n_assets
    if isinstance(policy, PortfolioPolicy):
        return torch.rand(2, lookback, assets, 5) + 1.0, torch.zeros(2, assets)
    return torch.rand(2, lookback, 5) + 1.0, torch.zeros(2, 1)


def export_onnx(policy: TradingPolicy | PortfolioPolicy, path: str | Path, metadata: dict[str, str]) -> Path:
    """Write the policy graph with a dynamic batch axis and ``metadata_props``."""
    path = Path(path)
    policy = policy.cpu().eval()
    names = input_names(policy)
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            policy, example_inputs(policy), input_names=names, output_names=output_names(policy),
            dynamic_shapes={names[0]: {0: batch}, names[1]: {0: batch}},
            dynamo=True, external_data=False, verbose=False,
        )
    model = program.model_proto
    onnx.helper.set_model_props(model, {k: str(v) for k, v in metadata.items()})
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


@dataclass
class ParityResult:
    passed: bool
    max_abs_diff: float
    windows: int
    provider: str
    tolerance: float

    def as_dict(self) -> dict:
        return {"passed": self.passed, "max_abs_diff": self.max_abs_diff, "windows": self.windows,
                "provider": self.provider, "tolerance": self.tolerance}


def real_windows(ohlcv: np.ndarray, lookback: int, first: int, last: int, count: int,
                 levels: list[float], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` windows ending on bars in [first, last], with positions drawn from the levels.

    For a portfolio series ([T, A, 5]) the windows are [count, L, A, 5] and the positions
    random long-only weights [count, A] (a cash share is drawn too).
    """
    rng = np.random.default_rng(seed)
    ends = rng.integers(max(first, lookback - 1), last + 1, size=count)
    windows = np.stack([ohlcv[e - lookback + 1:e + 1] for e in ends]).astype("float32")
    if ohlcv.ndim == 3:
        assets = ohlcv.shape[1]
        return windows, rng.dirichlet(np.ones(assets + 1), size=count)[:, :assets].astype("float32")
    positions = rng.choice(np.asarray(levels, dtype="float32"), size=(count, 1))
    return windows, positions


def check_parity(policy: TradingPolicy | PortfolioPolicy, onnx_path: str | Path, windows: np.ndarray,
                 positions: np.ndarray, tolerance: float = 1e-5) -> ParityResult:
    """Run onnxruntime and torch on the same real windows (and positions or weights); compare every output."""
    from ml.serving import create_session

    session = create_session(onnx_path)
    got = session.run(output_names(policy), dict(zip(input_names(policy), (windows, positions))))
    with torch.no_grad():
        want = [t.numpy() for t in policy.cpu().eval()(torch.from_numpy(windows), torch.from_numpy(positions))]
    diff = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))
    return ParityResult(passed=bool(diff <= tolerance), max_abs_diff=diff, windows=len(windows),
                        provider=session.get_providers()[0], tolerance=tolerance)
