"""The policy: feature normalization + actor-critic MLP, over any action space.

``ActorCritic`` works on precomputed features (fast, used in training);
``ExportPolicy`` wraps it with the feature module so that raw OHLCV windows go
in and the action space's outputs come out: that is the graph exported to ONNX.
What the actor's outputs mean (levels, a Gaussian exposure, portfolio weights)
is the action space's business (``ml.env.action_space``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ml import fastpath
from ml.agent.critic import build_critic, critic_spec
from ml.agent.encoders import build_encoder, encoder_spec
from ml.agent.regime import build_regime, regime_spec
from ml.config import PPOConfig
from ml.env.action_space import ActionSpace, action_space_from_dict
from ml.env.risk import RiskOverlay
from ml.market.features import MIN_FEATURE_STD, NORM_CLIP, FeatureModule


def layer_init(layer: nn.Linear, std: float = float(np.sqrt(2)), bias: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class ActorCritic(nn.Module):
    """Shared tanh backbone with an actor head (sized by the action space) and a critic head.

    The input is the normalized features and the current position (one exposure, or the
    weights of a portfolio). Gaussian action spaces add a state-independent learned log std.
    With an ``encoder`` (``ml.agent.encoders``) or a ``regime`` filter (``ml.agent.regime``), the
    last ``window`` features are the recent returns: the encoder's output (from the normalized
    returns) and the regime probabilities (from the raw ones) replace them before the backbone.
    ``critic`` (``ml.agent.critic``): the value head predicts the mean return (None) or its quantiles.
    """

    def __init__(self, n_features: int, action_space: ActionSpace, hidden: tuple[int, ...] = (64, 64),
                 encoder: dict | None = None, critic: dict | None = None, regime: dict | None = None):
        super().__init__()
        self.action_space = action_space
        self.hidden = tuple(hidden)
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        self.encoder = build_encoder(encoder)
        self.regime = build_regime(regime)
        self.value_head = build_critic(critic)
        layers: list[nn.Module] = []
        width = n_features + action_space.n_assets  # features + current position
        for reader in (self.encoder, self.regime):
            if reader is not None:
                width += reader.out_features
        width -= self.return_window
        for size in hidden:
            layers += [layer_init(nn.Linear(width, size)), nn.Tanh()]
            width = size
        self.backbone = nn.Sequential(*layers)
        self.actor = layer_init(nn.Linear(width, action_space.n_outputs), std=0.01)
        self.critic = layer_init(nn.Linear(width, self.value_head.n_outputs), std=1.0)
        self.log_std = nn.Parameter(torch.full((action_space.n_outputs,), -0.5)) if action_space.gaussian else None

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Statistics fitted on the training window only."""
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(torch.clamp(std, min=MIN_FEATURE_STD))

    @property
    def return_window(self) -> int:
        """How many trailing features are recent returns, read by the encoder or the regime filter (0: none)."""
        readers = [reader.window for reader in (self.encoder, self.regime) if reader is not None]
        return readers[0] if readers else 0

    def forward(self, features: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Actor outputs [B, K] (logits, or a Gaussian's mean) and value [B]."""
        actor, critic = self.heads(features, position)
        return actor, self.value_head.value(critic)

    def heads(self, features: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Actor outputs [B, K] and the critic head's raw outputs [B, value_head.n_outputs]."""
        normalized = torch.clamp((features - self.feature_mean) / self.feature_std, -NORM_CLIP, NORM_CLIP)
        window = self.return_window
        if window:
            parts = [normalized[:, :-window]]
            if self.encoder is not None:
                parts.append(self.encoder(normalized[:, -window:]))
            if self.regime is not None:  # the model was fitted on raw returns
                parts.append(self.regime(features[:, -window:]))
            normalized = torch.cat(parts, dim=-1)
        inputs = torch.cat([normalized, position.reshape(-1, self.action_space.n_assets)], dim=-1)
        actor_bias = self.action_space.mask_actor_bias(self.actor.bias)
        if self.encoder is None and fastpath.applies(inputs):
            # Both heads in one product: the backward to the backbone is then one matrix product
            # instead of two thin ones and a sum, which on CPU cost more than the product itself.
            layers = [(linear.weight, linear.bias) for linear in self.backbone[::2]]  # the (Linear, Tanh) pairs
            heads = fastpath.tanh_mlp(inputs, layers, (torch.cat([self.actor.weight, self.critic.weight]),
                                                       torch.cat([actor_bias, self.critic.bias])))
            n_actor = self.actor.out_features
            return heads[:, :n_actor], heads[:, n_actor:]
        hidden = self.backbone(inputs)
        return F.linear(hidden, self.actor.weight, actor_bias), self.critic(hidden)

    def log_prob_entropy(self, actor: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of ``action`` and the entropy, per sample, in closed form."""
        return self.action_space.log_prob_entropy(actor, self.log_std, action)

    def sample(self, actor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An action drawn from the policy's distribution and its log-probability."""
        action = self.action_space.sample(actor, self.log_std)
        return action, self.log_prob_entropy(actor, action)[0]

    def target(self, action: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Target [B, A] of a sampled action in the states with these (raw) features."""
        return self.action_space.to_target(action, features)

    def greedy(self, actor: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Deterministic target [B, A]: the most probable level or rule, the clamped mean, or the mean's weights."""
        return self.action_space.greedy(actor, features)

    @torch.no_grad()
    def decide(self, features: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        actor, _ = self(features, position)
        return self.greedy(actor, features)


class ExportPolicy(nn.Module):
    """Raw windows + current position -> the action space's outputs: the exported ONNX graph.

    One asset: ohlcv [B, L, 5] + position [B, 1] -> target_exposure [B, 1], then action_probs
    [B, K] (discrete) or action_std [B, 1] (continuous), then value [B, 1].
    A portfolio: ohlcv [B, L, A, 5] + weights [B, A] -> target_weights [B, A], value [B, 1];
    every asset's window goes through the same feature module, asset after asset as in training.
    With a risk overlay three inputs follow (nav [B, 1], session [B, 2], risk_state [B, S]) and
    two outputs (executed_target [B, A], next_risk_state [B, S]): the overlay of training, in the graph.
    """

    def __init__(self, feature_module: FeatureModule, actor_critic: ActorCritic, risk: RiskOverlay | None = None):
        super().__init__()
        self.features = feature_module
        self.actor_critic = actor_critic
        self.risk = risk

    @property
    def action_space(self) -> ActionSpace:
        return self.actor_critic.action_space

    def forward(self, ohlcv: torch.Tensor, position: torch.Tensor, nav: torch.Tensor | None = None,
                session: torch.Tensor | None = None, risk_state: torch.Tensor | None = None):
        features = self.features(self.action_space.asset_windows(ohlcv)).reshape(ohlcv.shape[0], -1)
        actor, value = self.actor_critic(features, position)
        outputs = self.action_space.export_outputs(actor, value, self.actor_critic.log_std, features)
        if self.risk is None:
            return outputs
        held = position.reshape(ohlcv.shape[0], -1)
        target = self.action_space.project(outputs[0].reshape(held.shape))
        close, fill_price, mean, covariance = self.risk.window_inputs(ohlcv)
        executed, next_state, _, _ = self.risk(target, held, nav.reshape(-1), close, fill_price, mean, covariance,
                                               session, risk_state)
        return *outputs, executed, next_state


class PanelExportPolicy(ExportPolicy):
    """A policy trained on a panel of symbols: ``normalization`` [B, 2, F] (the symbol's feature mean,
    then std, from its own training window) follows the position, so one graph trades any symbol.

    Its actor-critic normalizes with mean 0 and std 1, as in training, where every symbol's
    features arrived standardized by its own statistics. No risk overlay.
    """

    normalization_input = "normalization"

    def example_normalization(self, batch: int) -> torch.Tensor:
        n_features = self.actor_critic.feature_mean.numel()
        return torch.stack([torch.zeros(batch, n_features), torch.ones(batch, n_features)], dim=1)

    def forward(self, ohlcv: torch.Tensor, position: torch.Tensor, normalization: torch.Tensor):
        features = self.features(self.action_space.asset_windows(ohlcv)).reshape(ohlcv.shape[0], -1)
        standardized = (features - normalization[:, 0]) / normalization[:, 1].clamp(min=MIN_FEATURE_STD)
        actor, value = self.actor_critic(standardized, position)
        return self.action_space.export_outputs(actor, value, self.actor_critic.log_std, features)


def model_options(ppo: PPOConfig) -> dict:
    """The ``ActorCritic`` keyword arguments a config's model options ask for."""
    return {"hidden": ppo.hidden, "encoder": encoder_spec(ppo), "critic": critic_spec(ppo),
            "regime": regime_spec(ppo.regime_states, ppo.encoder_window)}


def policy_checkpoint(actor_critic: ActorCritic, feature_module: FeatureModule) -> dict:
    """What it takes to rebuild the policy: weights, sizes and the action space (tensors and plain types)."""
    return {
        "state_dict": {k: v.detach().cpu() for k, v in actor_critic.state_dict().items()},
        "n_features": actor_critic.feature_mean.numel(),
        "hidden": list(actor_critic.hidden),
        "action_space": actor_critic.action_space.to_dict(),
        "lookback": feature_module.lookback,
        "use_range": feature_module.use_range,
        "use_volume": feature_module.use_volume,
        "return_window": feature_module.return_window,
        "signals": feature_module.signals,
        "encoder": actor_critic.encoder.spec() if actor_critic.encoder is not None else None,
        "critic": actor_critic.value_head.spec(),
        "regime": actor_critic.regime.spec() if actor_critic.regime is not None else None,
    }


def load_policy(checkpoint: dict) -> ExportPolicy:
    features = FeatureModule(checkpoint["lookback"], checkpoint["use_range"], checkpoint["use_volume"],
                             checkpoint.get("return_window", 0), checkpoint.get("signals", False))
    actor_critic = ActorCritic(checkpoint["n_features"], action_space_from_dict(checkpoint["action_space"]),
                               tuple(checkpoint["hidden"]), checkpoint.get("encoder"), checkpoint.get("critic"),
                               checkpoint.get("regime"))
    actor_critic.load_state_dict(checkpoint["state_dict"])
    return ExportPolicy(features, actor_critic).eval()
