"""The policy: feature normalization + actor-critic MLP over discrete exposure levels.

``ActorCritic`` works on precomputed features (fast, used in training);
``TradingPolicy`` wraps it with the feature module so that a raw OHLCV
window goes in and a target exposure comes out: that is the graph exported
to ONNX.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ml.features import FeatureModule

NORM_CLIP = 5.0


def layer_init(layer: nn.Linear, std: float = float(np.sqrt(2)), bias: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class ActorCritic(nn.Module):
    """Shared tanh backbone with an actor head (logits over levels) and a critic head."""

    def __init__(self, n_features: int, exposure_levels: tuple[float, ...], hidden: tuple[int, ...] = (64, 64)):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        self.register_buffer("levels", torch.tensor(exposure_levels, dtype=torch.float32))
        layers: list[nn.Module] = []
        width = n_features + 1  # features + current position
        for size in hidden:
            layers += [layer_init(nn.Linear(width, size)), nn.Tanh()]
            width = size
        self.backbone = nn.Sequential(*layers)
        self.actor = layer_init(nn.Linear(width, len(exposure_levels)), std=0.01)
        self.critic = layer_init(nn.Linear(width, 1), std=1.0)

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Statistics fitted on the training window only."""
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(torch.clamp(std, min=1e-6))

    def forward(self, features: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normalized = torch.clamp((features - self.feature_mean) / self.feature_std, -NORM_CLIP, NORM_CLIP)
        hidden = self.backbone(torch.cat([normalized, position.reshape(-1, 1)], dim=-1))
        return self.actor(hidden), self.critic(hidden).squeeze(-1)

    @torch.no_grad()
    def decide(self, features: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Deterministic target exposure (most probable level)."""
        logits, _ = self(features, position)
        return self.levels[logits.argmax(dim=-1)]


class TradingPolicy(nn.Module):
    """ohlcv [B, L, 5] + position [B, 1] -> target_exposure [B, 1], action_probs [B, K], value [B, 1]."""

    def __init__(self, feature_module: FeatureModule, actor_critic: ActorCritic):
        super().__init__()
        self.features = feature_module
        self.actor_critic = actor_critic

    def forward(self, ohlcv: torch.Tensor, position: torch.Tensor):
        logits, value = self.actor_critic(self.features(ohlcv), position)
        probs = torch.softmax(logits, dim=-1)
        levels = self.actor_critic.levels
        # One-hot of the argmax times the levels: exports to plain ONNX ops.
        chosen = torch.nn.functional.one_hot(logits.argmax(dim=-1), levels.shape[0]).to(levels.dtype)
        target = (chosen * levels).sum(dim=-1, keepdim=True)
        return target, probs, value.unsqueeze(-1)


def policy_checkpoint(actor_critic: ActorCritic, feature_module: FeatureModule,
                      hidden: tuple[int, ...]) -> dict:
    return {
        "state_dict": {k: v.detach().cpu() for k, v in actor_critic.state_dict().items()},
        "n_features": feature_module.n_features,
        "levels": actor_critic.levels.tolist(),
        "hidden": list(hidden),
        "lookback": feature_module.lookback,
        "use_range": feature_module.use_range,
        "use_volume": feature_module.use_volume,
    }


def load_policy(checkpoint: dict) -> TradingPolicy:
    features = FeatureModule(checkpoint["lookback"], checkpoint["use_range"], checkpoint["use_volume"])
    actor_critic = ActorCritic(checkpoint["n_features"], tuple(checkpoint["levels"]), tuple(checkpoint["hidden"]))
    actor_critic.load_state_dict(checkpoint["state_dict"])
    return TradingPolicy(features, actor_critic).eval()
