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
from torch.distributions import Categorical, Independent, Normal

from ml.dense import tanh_mlp
from ml.features import FeatureModule

NORM_CLIP = 5.0
_HALF_LOG_2PI = 0.5 * float(np.log(2 * np.pi))


def layer_init(layer: nn.Linear, std: float = float(np.sqrt(2)), bias: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class ActorCritic(nn.Module):
    """Shared tanh backbone with an actor head and a critic head.

    ``discrete``: the actor gives logits over ``exposure_levels``; levels outside
    [``min_exposure``, ``max_exposure``] are masked (e.g. long-only = min 0).
    ``continuous``: the actor gives the mean of a Gaussian over the target exposure
    (state-independent learned std); the exposure is the sample clamped to the range.
    ``portfolio``: the actor gives the mean of a Gaussian over one score per asset plus
    one for cash; the target weights are the softmax of the sample without the cash
    entry (long-only, summing to at most 1). The position input is the current weights.
    The mask and the range live in the module, so the exported graph obeys them too.
    """

    def __init__(self, n_features: int, exposure_levels: tuple[float, ...], hidden: tuple[int, ...] = (64, 64),
                 mode: str = "discrete", min_exposure: float = -1.0, max_exposure: float = 1.0,
                 n_assets: int = 1):
        super().__init__()
        if mode not in ("discrete", "continuous", "portfolio"):
            raise ValueError(f"unknown action mode '{mode}' (expected discrete, continuous or portfolio)")
        if mode == "portfolio" and n_assets < 2:
            raise ValueError(f"portfolio mode needs at least two assets, got {n_assets}")
        self.mode = mode
        self.n_assets = n_assets if mode == "portfolio" else 1
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        levels = torch.tensor(exposure_levels, dtype=torch.float32)
        self.register_buffer("levels", levels)
        allowed = (levels >= min_exposure - 1e-9) & (levels <= max_exposure + 1e-9)
        if mode == "discrete" and not allowed.any():
            raise ValueError(f"no exposure level inside [{min_exposure}, {max_exposure}]")
        self.register_buffer("allowed", allowed)
        self.register_buffer("exposure_range", torch.tensor([min_exposure, max_exposure]))
        layers: list[nn.Module] = []
        width = n_features + self.n_assets  # features + current position (weights)
        for size in hidden:
            layers += [layer_init(nn.Linear(width, size)), nn.Tanh()]
            width = size
        self.backbone = nn.Sequential(*layers)
        actions = {"discrete": len(exposure_levels), "continuous": 1, "portfolio": n_assets + 1}[mode]
        self.actor = layer_init(nn.Linear(width, actions), std=0.01)
        self.critic = layer_init(nn.Linear(width, 1), std=1.0)
        self.log_std = nn.Parameter(torch.full((actions,), -0.5)) if mode != "discrete" else None

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Statistics fitted on the training window only."""
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(torch.clamp(std, min=1e-6))

    def forward(self, features: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked logits [B, K] or Gaussian mean [B, 1] or [B, A + 1]), value [B]."""
        normalized = torch.clamp((features - self.feature_mean) / self.feature_std, -NORM_CLIP, NORM_CLIP)
        inputs = torch.cat([normalized, position.reshape(-1, self.n_assets)], dim=-1)
        actor_bias = self.actor.bias
        if self.mode == "discrete":
            # Masked levels get -1e9 through the bias: the logits of allowed levels are the same bit
            # for bit, and the exported graph needs no Where over [B, K].
            actor_bias = actor_bias + torch.where(self.allowed, 0.0, -1e9)
        # Both heads in one product: the backward to the backbone is then one matrix product
        # instead of two thin ones and a sum, which on CPU cost more than the product itself.
        layers = [(linear.weight, linear.bias) for linear in self.backbone[::2]]  # the (Linear, Tanh) pairs
        heads = tanh_mlp(inputs, layers, (torch.cat([self.actor.weight, self.critic.weight]),
                                          torch.cat([actor_bias, self.critic.bias])))
        return heads[:, :-1], heads[:, -1]

    def distribution(self, actor: torch.Tensor):
        if self.mode == "discrete":
            return Categorical(logits=actor)
        return Independent(Normal(actor, self.log_std.exp().expand_as(actor)), 1)

    def log_prob_entropy(self, actor: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of ``action`` and the entropy, per sample: ``distribution``'s values in
        closed form, without building distribution objects on every minibatch of the update."""
        if self.mode == "discrete":
            # Over [K, B]: torch's CPU softmax then vectorizes along the batch instead of along the
            # five levels, about 3x faster forward and backward.
            log_p = torch.log_softmax(actor.t(), dim=0)
            # Masked levels have probability exactly 0 and contribute 0 (not NaN) to the entropy.
            entropy = -(log_p.exp() * log_p).sum(dim=0)
            return log_p.gather(0, action.unsqueeze(0)).squeeze(0), entropy
        log_std = self.log_std.expand_as(actor)
        z = (action - actor) * torch.exp(-log_std)
        log_prob = (-0.5 * z * z - log_std - _HALF_LOG_2PI).sum(dim=-1)
        entropy = (0.5 + _HALF_LOG_2PI + log_std).sum(dim=-1)
        return log_prob, entropy

    def sample(self, actor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An action drawn from ``distribution`` and its log-probability, without building it:
        ``Categorical.sample`` alone took longer than the forward pass in the rollout."""
        if self.mode == "discrete":
            # Gumbel-max: the argmax of logits plus Gumbel noise is a draw from their softmax. A
            # masked level (-1e9) can never win, and nothing here is nondeterministic on CUDA.
            gumbel = torch.rand_like(actor).log_().neg_().log_().neg_()
            action = (actor + gumbel).max(dim=-1).indices  # argmax's first maximum; 3x faster over 5 levels
        else:
            action = actor + self.log_std.exp() * torch.randn_like(actor)
        return action, self.log_prob_entropy(actor, action)[0]

    def exposure(self, action: torch.Tensor) -> torch.Tensor:
        """Target exposure [B] (weights [B, A] in portfolio mode) of a sampled action."""
        if self.mode == "discrete":
            return torch.take(self.levels, action)
        if self.mode == "portfolio":
            return torch.softmax(action, dim=-1)[..., :-1]
        return action.squeeze(-1).clamp(self.exposure_range[0], self.exposure_range[1])

    def greedy(self, actor: torch.Tensor) -> torch.Tensor:
        """Deterministic target: most probable level, the clamped mean, or the mean's weights."""
        if self.mode == "discrete":
            return torch.take(self.levels, actor.max(dim=-1).indices)
        if self.mode == "portfolio":
            return torch.softmax(actor, dim=-1)[..., :-1]
        return actor.squeeze(-1).clamp(self.exposure_range[0], self.exposure_range[1])

    @torch.no_grad()
    def decide(self, features: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        actor, _ = self(features, position)
        return self.greedy(actor)


class TradingPolicy(nn.Module):
    """ohlcv [B, L, 5] + position [B, 1] -> target_exposure [B, 1], action_probs [B, K] (discrete)
    or action_std [B, 1] (continuous), value [B, 1]."""

    def __init__(self, feature_module: FeatureModule, actor_critic: ActorCritic):
        super().__init__()
        self.features = feature_module
        self.actor_critic = actor_critic

    def forward(self, ohlcv: torch.Tensor, position: torch.Tensor):
        ac = self.actor_critic
        actor, value = ac(self.features(ohlcv), position)
        if ac.mode == "continuous":
            target = actor.clamp(ac.exposure_range[0], ac.exposure_range[1])
            return target, ac.log_std.exp().expand_as(actor), value.unsqueeze(-1)
        # index_select exports to one Gather; the one-hot product it replaces cost five nodes.
        target = torch.index_select(ac.levels, 0, actor.argmax(dim=-1)).unsqueeze(-1)
        return target, torch.softmax(actor, dim=-1), value.unsqueeze(-1)


class PortfolioPolicy(nn.Module):
    """ohlcv [B, L, A, 5] + weights [B, A] -> target_weights [B, A], value [B, 1].

    Every asset's window goes through the same feature module; the features are
    laid out asset after asset, as in training.
    """

    def __init__(self, feature_module: FeatureModule, actor_critic: ActorCritic):
        super().__init__()
        self.features = feature_module
        self.actor_critic = actor_critic

    def forward(self, ohlcv: torch.Tensor, weights: torch.Tensor):
        batch, lookback, assets, fields = ohlcv.shape
        per_asset = ohlcv.permute(0, 2, 1, 3).reshape(batch * assets, lookback, fields)
        features = self.features(per_asset).reshape(batch, -1)
        actor, value = self.actor_critic(features, weights)
        return self.actor_critic.greedy(actor), value.unsqueeze(-1)


def policy_checkpoint(actor_critic: ActorCritic, feature_module: FeatureModule,
                      hidden: tuple[int, ...]) -> dict:
    return {
        "state_dict": {k: v.detach().cpu() for k, v in actor_critic.state_dict().items()},
        "n_features": actor_critic.feature_mean.numel(),
        "levels": actor_critic.levels.tolist(),
        "hidden": list(hidden),
        "mode": actor_critic.mode,
        "exposure_range": actor_critic.exposure_range.tolist(),
        "n_assets": actor_critic.n_assets,
        "lookback": feature_module.lookback,
        "use_range": feature_module.use_range,
        "use_volume": feature_module.use_volume,
    }


def load_policy(checkpoint: dict) -> TradingPolicy | PortfolioPolicy:
    features = FeatureModule(checkpoint["lookback"], checkpoint["use_range"], checkpoint["use_volume"])
    low, high = checkpoint.get("exposure_range", (-1.0, 1.0))
    mode = checkpoint.get("mode", "discrete")
    actor_critic = ActorCritic(checkpoint["n_features"], tuple(checkpoint["levels"]), tuple(checkpoint["hidden"]),
                               mode, low, high, checkpoint.get("n_assets", 1))
    actor_critic.load_state_dict(checkpoint["state_dict"])
    wrapper = PortfolioPolicy if mode == "portfolio" else TradingPolicy
    return wrapper(features, actor_critic).eval()
