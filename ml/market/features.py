"""Features from a raw OHLCV window, as one torch module.

The same module runs in the environment rollout (over a whole series once),
in training and inside the exported ONNX graph, so training and serving
cannot drift apart. Every feature at bar t reads only the window ending at t.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_SET_VERSION = "v1"
RETURN_HORIZONS = (1, 5, 20, 60)
FAST_WINDOW, SLOW_WINDOW, OSCILLATOR_WINDOW = 20, 60, 14
HIGH, LOW, CLOSE, VOLUME = 1, 2, 3, 4  # columns of a bar (open is 0)
MIN_LOOKBACK = max(max(RETURN_HORIZONS), SLOW_WINDOW) + 1
# The features every module computes, first and in this order: what the rule strategies read.
BASE_FEATURES = ([f"log_return_{h}" for h in RETURN_HORIZONS]
                 + [f"realized_vol_{FAST_WINDOW}", "vol_regime", f"trend_{FAST_WINDOW}", f"trend_{SLOW_WINDOW}",
                    f"oscillator_{OSCILLATOR_WINDOW}"])
# The exposures of the rule strategies at the bar (``signals``), right after the base features.
SIGNALS = ("ma_crossover", "momentum", "mean_reversion")
# Mean reversion on the oscillator (gains / moves - 0.5, an RSI scaled to [-0.5, 0.5]): long below
# -0.2 (RSI 30, oversold), short above 0.2 (RSI 70, overbought), flat between.
OVERSOLD = 0.2
# Standardized features are clipped to this many standard deviations before the policy sees them.
NORM_CLIP = 5.0
# The floor of a feature's standard deviation when it normalizes (a constant feature stays finite).
MIN_FEATURE_STD = 1e-6
_EPS = 1e-8


def _window_weights(lookback: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Constant matrices that turn the log-price window into features with a few matmuls.

    With prices relative to the last close, log_close[-1] = 0, so
    - the log return over h bars is -log_close[-1-h], a trend is -mean(log_close[-n:]);
    - the one-bar returns of the last SLOW_WINDOW bars are differences of neighbours;
    - window means of returns (and of squared, positive and absolute returns) are averages.
    Few large ops instead of many small ones keep the exported graph fast in onnxruntime.
    """
    linear = torch.zeros(lookback, len(RETURN_HORIZONS) + 2)
    for j, h in enumerate(RETURN_HORIZONS):
        linear[lookback - 1 - h, j] = -1.0
    linear[lookback - FAST_WINDOW:, len(RETURN_HORIZONS)] = -1.0 / FAST_WINDOW
    linear[lookback - SLOW_WINDOW:, len(RETURN_HORIZONS) + 1] = -1.0 / SLOW_WINDOW
    differences = torch.zeros(lookback, SLOW_WINDOW)
    for i in range(SLOW_WINDOW):
        bar = lookback - SLOW_WINDOW + i
        differences[bar, i], differences[bar - 1, i] = 1.0, -1.0
    averages = torch.zeros(SLOW_WINDOW, 3)
    averages[SLOW_WINDOW - FAST_WINDOW:, 0] = 1.0 / FAST_WINDOW
    averages[:, 1] = 1.0 / SLOW_WINDOW
    averages[SLOW_WINDOW - OSCILLATOR_WINDOW:, 2] = 1.0  # sums for the oscillator
    return linear, differences, averages


def _picks(columns: list[int]) -> torch.Tensor:
    """[len(columns), 5] rows of 0/1 that pick bar fields: ``linear(picks, bars)`` is [k, n_bars]."""
    picks = torch.zeros(len(columns), 5)
    picks[torch.arange(len(columns)), torch.tensor(columns)] = 1.0
    return picks


class FeatureModule(nn.Module):
    """ohlcv [B, L, 5] (raw, oldest first) -> features [B, n_features].

    Close-based features always; with ``signals``, the rule strategies' exposures at the bar (MA
    crossover: 1 when the 20-bar mean close is above the 60-bar one, else 0; momentum: the sign of
    the 60-bar return; mean reversion: 1 oversold, -1 overbought, else 0); the bar range when the
    data has real open/high/low, and a volume z-score when it has volume. With ``return_window``
    W, the last W one-bar log returns follow, oldest first, for a temporal encoder.
    """

    def __init__(self, lookback: int = 64, use_range: bool = False, use_volume: bool = False,
                 return_window: int = 0, signals: bool = False):
        super().__init__()
        if lookback < MIN_LOOKBACK:
            raise ValueError(f"lookback {lookback} is shorter than the {MIN_LOOKBACK} bars the features need")
        if not 0 <= return_window <= SLOW_WINDOW:
            raise ValueError(f"return_window {return_window}: must be in [0, {SLOW_WINDOW}]")
        self.lookback = lookback
        self.use_range = use_range
        self.use_volume = use_volume
        self.return_window = return_window
        self.signals = signals
        linear, differences, averages = _window_weights(lookback)
        # Constants derived from lookback: not part of the state dict.
        self.register_buffer("linear", linear, persistent=False)
        self.register_buffer("differences", differences, persistent=False)
        self.register_buffer("averages", averages, persistent=False)
        tail = torch.zeros(FAST_WINDOW, 2)
        tail[-1, 0], tail[:, 1] = 1.0, 1.0 / FAST_WINDOW  # last value, mean over the fast window
        self.register_buffer("tail", tail, persistent=False)
        self.register_buffer("pick_close", _picks([CLOSE]), persistent=False)
        self.register_buffer("pick_recent", _picks([HIGH, LOW, VOLUME]), persistent=False)

    @property
    def names(self) -> list[str]:
        names = list(BASE_FEATURES)
        if self.signals:
            names += [f"signal_{name}" for name in SIGNALS]
        if self.use_range:
            names += ["range_1", f"range_{FAST_WINDOW}"]
        if self.use_volume:
            names += [f"volume_z_{FAST_WINDOW}"]
        names += [f"return_lag_{lag}" for lag in range(self.return_window - 1, -1, -1)]
        return names

    @property
    def n_features(self) -> int:
        return len(self.names)

    def forward(self, ohlcv: torch.Tensor) -> torch.Tensor:
        # Fields as products with 0/1 rows, F.linear(picks, bars) = picks @ bars.T: it exports to one
        # Gemm(transB) that writes each field of every bar contiguously, [k, B * L]. The values are
        # exact for finite bars (x * 1 + 0 * y); a NaN or inf in any field of a bar spreads to all.
        # onnxruntime copies a strided one-wide Slice (x[:, :, 3:4]) element by element: about 2 ms
        # for the close at batch 4096, several times this Gemm.
        close = F.linear(self.pick_close, ohlcv.reshape(-1, 5)).reshape(-1, self.lookback)
        # Prices relative to the last close before any log: the ratios are near 1, so
        # float32 logs stay accurate and torch and onnxruntime agree to ~1e-7.
        log_close = torch.log(close / close[:, -1:])
        linear = log_close @ self.linear  # [B, 6]: log returns over each horizon, trend 20 and 60
        returns = log_close @ self.differences  # [B, SLOW_WINDOW] one-bar log returns
        means = returns @ self.averages[:, :2]  # fast and slow window means
        variances = (returns * returns) @ self.averages[:, :2] - means * means
        vols = torch.sqrt(torch.clamp(variances, min=0.0))  # population std, fast and slow
        fast_vol, slow_vol = vols[:, 0:1], vols[:, 1:2]
        gains = torch.clamp(returns, min=0.0) @ self.averages[:, 2:3]
        moves = returns.abs() @ self.averages[:, 2:3]
        columns = [
            linear[:, :len(RETURN_HORIZONS)],
            fast_vol,
            torch.log((fast_vol + _EPS) / (slow_vol + _EPS)),
            linear[:, len(RETURN_HORIZONS):],
            gains / (moves + _EPS) - 0.5,
        ]
        if self.signals:
            momentum = RETURN_HORIZONS.index(SLOW_WINDOW)
            columns.append(self._signals(close, linear[:, momentum:momentum + 1], columns[-1]))
        if self.use_range or self.use_volume:
            # High, low and volume of the last FAST_WINDOW bars: a contiguous block, then one Gemm.
            recent = F.linear(self.pick_recent, ohlcv[:, -FAST_WINDOW:].reshape(-1, 5)).reshape(3, -1, FAST_WINDOW)
            high, low, volume = recent[0], recent[1], recent[2]
        if self.use_range:
            bar_range = torch.log(high / low)
            columns.append(bar_range @ self.tail)  # last bar's range, mean range
        if self.use_volume:
            log_volume = torch.log((volume + 1.0) / (volume.mean(dim=-1, keepdim=True) + 1.0))
            stats = log_volume @ self.tail  # last, mean
            mean = stats[:, 1:2]
            # mean * mean, not mean ** 2: a Pow node costs more than a Mul in onnxruntime.
            spread = torch.sqrt(torch.clamp((log_volume * log_volume) @ self.tail[:, 1:2] - mean * mean, min=0.0))
            columns.append((stats[:, 0:1] - mean) / (spread + 1e-3))
        if self.return_window:
            columns.append(returns[:, SLOW_WINDOW - self.return_window:])
        return torch.cat(columns, dim=-1)

    def _signals(self, close: torch.Tensor, return_60: torch.Tensor, oscillator: torch.Tensor) -> torch.Tensor:
        """[B, 3] rule exposures: MA crossover, momentum, mean reversion (see the class docstring)."""
        relative = close[:, -SLOW_WINDOW:] / close[:, -1:]  # a common scale leaves the comparison as it is
        fast, slow = relative[:, -FAST_WINDOW:].mean(dim=-1, keepdim=True), relative.mean(dim=-1, keepdim=True)
        crossover = (fast > slow).to(close.dtype)
        momentum = torch.sign(return_60)
        reversion = (oscillator < -OVERSOLD).to(close.dtype) - (oscillator > OVERSOLD).to(close.dtype)
        return torch.cat([crossover, momentum, reversion], dim=-1)


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
