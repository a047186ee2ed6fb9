"""Temporal encoders: read the window of recent one-bar returns as a sequence, not as loose inputs.

The features end with the last W normalized one-bar log returns, oldest first
(``FeatureModule(return_window=W)``). An encoder turns them into a few learned
features that replace them in the MLP's input; the summary features pass through.
Two kinds: a 1-D convolution and a one-layer transformer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ml.config import PPOConfig

KERNEL = 5


class ConvEncoder(nn.Module):
    """[B, W] returns -> [B, out_features]: two 1-D convolutions (the second with stride 2), tanh after each.

    The output keeps its time axis (flattened), so the MLP still knows which part of the window
    a pattern came from.
    """

    def __init__(self, window: int, channels: int):
        super().__init__()
        self.window, self.channels = window, channels
        self.layers = nn.Sequential(nn.Conv1d(1, channels, KERNEL), nn.Tanh(),
                                    nn.Conv1d(channels, channels, KERNEL, stride=2), nn.Tanh())
        self.out_features = channels * ((window - 2 * (KERNEL - 1) - 1) // 2 + 1)

    def spec(self) -> dict:
        return {"kind": "conv", "window": self.window, "channels": self.channels}

    def forward(self, returns: torch.Tensor) -> torch.Tensor:
        return self.layers(returns.unsqueeze(1)).flatten(1)


class AttentionEncoder(nn.Module):
    """[B, W] returns -> [B, 2 * channels]: a one-layer, one-head transformer over the window.

    Each return is embedded with a learned position, attends to every bar of the window (all of
    them are in the past), and the last bar's state and the mean state are the output.
    """

    def __init__(self, window: int, channels: int):
        super().__init__()
        self.window, self.channels = window, channels
        self.embed = nn.Linear(1, channels)
        self.position = nn.Parameter(torch.randn(window, channels) * 0.1)
        self.attend = nn.Linear(channels, 3 * channels)  # query, key, value in one product
        self.mix = nn.Sequential(nn.Linear(channels, channels), nn.Tanh())
        self.out_features = 2 * channels

    def spec(self) -> dict:
        return {"kind": "attention", "window": self.window, "channels": self.channels}

    def forward(self, returns: torch.Tensor) -> torch.Tensor:
        state = self.embed(returns.unsqueeze(-1)) + self.position  # [B, W, C]
        query, key, value = self.attend(state).chunk(3, dim=-1)
        weights = torch.softmax(query @ key.transpose(1, 2) / math.sqrt(self.channels), dim=-1)
        state = self.mix(state + weights @ value)
        return torch.cat([state[:, -1], state.mean(dim=1)], dim=-1)


ENCODERS = {"conv": ConvEncoder, "attention": AttentionEncoder}


def encoder_spec(ppo: PPOConfig) -> dict | None:
    """The encoder a config asks for, as the checkpoint records it (None: the plain MLP)."""
    if ppo.encoder == "mlp":
        return None
    return {"kind": ppo.encoder, "window": ppo.encoder_window, "channels": ppo.encoder_channels}


def build_encoder(spec: dict | None) -> nn.Module | None:
    if spec is None:
        return None
    if spec["kind"] not in ENCODERS:
        raise ValueError(f"unknown encoder {spec['kind']!r}")
    return ENCODERS[spec["kind"]](spec["window"], spec["channels"])
