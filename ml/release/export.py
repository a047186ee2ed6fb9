"""Export the policy (features + normalization + actor) to one ONNX file, and prove parity.

Contract (single asset): inputs ``ohlcv`` float32 [batch, lookback, 5] raw
bars oldest first and ``position`` float32 [batch, 1]; outputs
``target_exposure`` float32 [batch, 1], then ``action_probs`` [batch, levels]
(discrete policies; over the rules for rule selection) or ``action_std`` [batch, 1]
(continuous policies), then ``value`` [batch, 1].

Contract (portfolio of A assets): inputs ``ohlcv`` float32 [batch, lookback,
A, 5] and ``weights`` float32 [batch, A] (current weights, cash excluded);
outputs ``target_weights`` float32 [batch, A] (long-only, summing to at most
1, the rest in cash) and ``value`` [batch, 1].

With a risk overlay (``risk:`` in the config) the graph also takes ``nav``
[batch, 1], ``session`` [batch, 2] and ``risk_state`` [batch, S] and returns
``executed_target`` [batch, A] and ``next_risk_state`` [batch, S].

A panel model (one policy for many symbols) takes a third input, ``normalization`` float32
[batch, 2, F]: the symbol's feature mean and std from its own history; its metadata
``normalization`` holds them for every symbol of the panel.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from ml.agent.policy import ExportPolicy, PanelExportPolicy
from ml.serving import create_session

log = logging.getLogger(__name__)


RISK_INPUTS = ("nav", "session", "risk_state")
RISK_OUTPUTS = ("executed_target", "next_risk_state")


def input_names(policy: ExportPolicy) -> list[str]:
    names = list(policy.action_space.input_names) + (list(RISK_INPUTS) if policy.risk is not None else [])
    return names + ([PanelExportPolicy.normalization_input] if isinstance(policy, PanelExportPolicy) else [])


def output_names(policy: ExportPolicy) -> list[str]:
    return list(policy.action_space.output_names) + (list(RISK_OUTPUTS) if policy.risk is not None else [])


def export_onnx(policy: ExportPolicy, path: str | Path, metadata: dict[str, str]) -> Path:
    """Write the policy graph with a dynamic batch axis and ``metadata_props``."""
    path = Path(path)
    policy = policy.cpu().eval()
    names, outputs = input_names(policy), output_names(policy)
    example = policy.action_space.example_inputs(policy.features.lookback)
    if policy.risk is not None:
        example = example + policy.risk.example_inputs(example[0].shape[0])
    if isinstance(policy, PanelExportPolicy):
        example = example + (policy.example_normalization(example[0].shape[0]),)
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            policy, example, input_names=names, output_names=outputs,
            dynamic_shapes=tuple({0: batch} for _ in names),
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


def real_windows(policy: ExportPolicy, ohlcv: np.ndarray, first: int, last: int, count: int,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` windows of the policy's input shape ending on bars in [first, last] of ``ohlcv``
    [T, A, 5], with positions the action space draws (exposure levels, or random long-only weights)."""
    rng = np.random.default_rng(seed)
    lookback = policy.features.lookback
    ends = rng.integers(max(first, lookback - 1), last + 1, size=count)
    windows = np.stack([ohlcv[e - lookback + 1:e + 1] for e in ends]).astype("float32")
    example = policy.action_space.example_inputs(lookback)[0]
    return windows.reshape((count,) + tuple(example.shape[1:])), policy.action_space.example_positions(rng, count)


def check_parity(policy: ExportPolicy, onnx_path: str | Path, windows: np.ndarray,
                 positions: np.ndarray, tolerance: float = 1e-5,
                 normalization: np.ndarray | None = None) -> ParityResult:
    """Run onnxruntime and torch on the same real windows (and positions or weights); compare every output.

    A risk overlay gets plausible account states too (some in drawdown, some after a loss).
    A panel policy takes each window's symbol statistics (``normalization`` [B, 2, F])."""
    inputs = [torch.from_numpy(windows), torch.from_numpy(positions)]
    if policy.risk is not None:
        inputs += policy.risk.example_inputs(len(windows))
    if isinstance(policy, PanelExportPolicy):
        inputs.append(torch.from_numpy(np.asarray(normalization, dtype="float32")))
    session = create_session(onnx_path)
    got = session.run(output_names(policy), dict(zip(input_names(policy), (t.numpy() for t in inputs))))
    with torch.no_grad():
        want = [t.numpy() for t in policy.cpu().eval()(*inputs)]
    diff = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))
    log.info("ONNX parity %s: max |onnxruntime - torch| = %.2e on %d real windows (tolerance %.0e, %s)",
             "PASSED" if diff <= tolerance else "FAILED", diff, len(windows), tolerance, session.get_providers()[0])
    return ParityResult(passed=bool(diff <= tolerance), max_abs_diff=diff, windows=len(windows),
                        provider=session.get_providers()[0], tolerance=tolerance)
