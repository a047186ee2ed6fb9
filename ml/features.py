"""Features from a raw OHLCV window, as one torch module.

The same module runs in the environment rollout (over a whole series once),
in training and inside the exported ONNX graph, so training and serving
cannot drift apart. Every feature at bar t reads only the window ending at t.
"""

from __future__ import annotations

import torch
from torch import nn

FEATURE_SET_VERSION = "v1"
RETURN_HORIZONS = (1, 5, 20, 60)
FAST_WINDOW, SLOW_WINDOW, OSCILLATOR_WINDOW = 20, 60, 14
MIN_LOOKBACK = max(max(RETURN_HORIZONS), SLOW_WINDOW) + 1
_EPS = 1e-8


def _std(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    return ((x - mean) ** 2).mean(dim=-1).sqrt()


class FeatureModule(nn.Module):
    """ohlcv [B, L, 5] (raw, oldest first) -> features [B, n_features].

    Close-based features always; the bar range when the data has real
    open/high/low, and a volume z-score when it has volume.
    """

    def __init__(self, lookback: int = 64, use_range: bool = False, use_volume: bool = False):
        super().__init__()
        if lookback < MIN_LOOKBACK:
            raise ValueError(f"lookback {lookback} is shorter than the {MIN_LOOKBACK} bars the features need")
        self.lookback = lookback
        self.use_range = use_range
        self.use_volume = use_volume

    @property
    def names(self) -> list[str]:
        names = [f"log_return_{h}" for h in RETURN_HORIZONS]
        names += [f"realized_vol_{FAST_WINDOW}", "vol_regime", f"trend_{FAST_WINDOW}",
                  f"trend_{SLOW_WINDOW}", f"oscillator_{OSCILLATOR_WINDOW}"]
        if self.use_range:
            names += ["range_1", f"range_{FAST_WINDOW}"]
        if self.use_volume:
            names += [f"volume_z_{FAST_WINDOW}"]
        return names

    @property
    def n_features(self) -> int:
        return len(self.names)

    def forward(self, ohlcv: torch.Tensor) -> torch.Tensor:
        # Prices relative to the last close before any log: the ratios are near 1, so
        # float32 logs stay accurate and torch and onnxruntime agree to ~1e-7.
        relative = ohlcv[:, :, :4] / ohlcv[:, -1:, 3:4]
        log_close = torch.log(relative[:, :, 3])
        returns = log_close[:, 1:] - log_close[:, :-1]
        columns = [-log_close[:, -1 - h] for h in RETURN_HORIZONS]  # log(c[-1] / c[-1-h])
        fast_vol = _std(returns[:, -FAST_WINDOW:])
        slow_vol = _std(returns[:, -SLOW_WINDOW:])
        recent = returns[:, -OSCILLATOR_WINDOW:]
        gains = torch.clamp(recent, min=0.0).sum(dim=-1)
        columns += [
            fast_vol,
            torch.log((fast_vol + _EPS) / (slow_vol + _EPS)),
            -log_close[:, -FAST_WINDOW:].mean(dim=-1),
            -log_close[:, -SLOW_WINDOW:].mean(dim=-1),
            gains / (recent.abs().sum(dim=-1) + _EPS) - 0.5,
        ]
        if self.use_range:
            bar_range = torch.log(relative[:, :, 1] / relative[:, :, 2])
            columns += [bar_range[:, -1], bar_range[:, -FAST_WINDOW:].mean(dim=-1)]
        if self.use_volume:
            volume = ohlcv[:, -FAST_WINDOW:, 4]
            log_volume = torch.log((volume + 1.0) / (volume.mean(dim=-1, keepdim=True) + 1.0))
            columns.append((log_volume[:, -1] - log_volume.mean(dim=-1)) / (_std(log_volume) + 1e-3))
        return torch.stack(columns, dim=-1)


@torch.no_grad()
def series_features(module: FeatureModule, ohlcv: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Features for every bar of a [T, 5] series; rows before the first full window are NaN.

    Runs the very same ``forward`` on each window (gathered with ``unfold``), so
    row t equals ``module(ohlcv[t - L + 1 : t + 1][None])``.
    """
    length, lookback = ohlcv.shape[0], module.lookback
    out = torch.full((length, module.n_features), float("nan"), dtype=ohlcv.dtype, device=ohlcv.device)
    if length < lookback:
        return out
    windows = ohlcv.unfold(0, lookback, 1).transpose(1, 2)  # [T-L+1, L, 5]
    for begin in range(0, windows.shape[0], chunk):
        block = windows[begin:begin + chunk]
        out[lookback - 1 + begin: lookback - 1 + begin + block.shape[0]] = module(block)
    return out
