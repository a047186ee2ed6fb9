"""What the critic head predicts and how it learns: the expected return, or its distribution.

``MeanCritic`` is PPO's usual value head: one output, squared error. ``QuantileCritic``
predicts N quantiles of the return (quantile regression with the pinball loss, which has no scale
of its own: the quantiles come out right whether the returns spread over 0.1 or 10 units) and
turns them into the scalar value that bootstraps the advantages: their mean, or with
``cvar_weight`` w, ``(1 - w) * mean + w * CVaR_alpha`` (the mean of the lowest alpha share of the
quantiles). A risk-averse value makes the advantages, and so the policy, prefer states whose bad
outcomes are less bad. The critic's targets are the rollout's lambda-returns, which bootstrap on
that same value, so the risk adjustment applies at every step (a nested risk measure, as in an
iterated CVaR): with w > 0 the quantiles are those of the return to go when every later state is
judged the same way, not of the plain return. The algorithm sees only ``n_outputs``, ``value`` and
``loss``.
"""

from __future__ import annotations

import math

import torch

from ml.config import PPOConfig


class MeanCritic:
    """One output, the expected return; squared error, optionally clipped around the rollout's values."""

    n_outputs = 1

    def spec(self) -> dict | None:
        return None

    def value(self, output: torch.Tensor) -> torch.Tensor:
        return output[:, 0]

    def loss(self, output: torch.Tensor, returns: torch.Tensor, old_values: torch.Tensor,
             clip: float | None) -> torch.Tensor:
        new_value = output[:, 0]
        if clip is None:
            return 0.5 * ((new_value - returns) ** 2).mean()
        clipped = old_values + torch.clamp(new_value - old_values, -clip, clip)
        return 0.5 * torch.max((new_value - returns) ** 2, (clipped - returns) ** 2).mean()


class QuantileCritic:
    """``quantiles`` outputs: the return's quantiles at the midpoints (2i + 1) / 2N, fitted with the
    pinball loss against the rollout's returns. No value clipping (it is defined for a mean)."""

    def __init__(self, quantiles: int, cvar_alpha: float = 0.1, cvar_weight: float = 0.0):
        if quantiles < 2:
            raise ValueError(f"a quantile critic needs at least 2 quantiles, got {quantiles}")
        self.n_outputs = quantiles
        self.cvar_alpha, self.cvar_weight = cvar_alpha, cvar_weight
        self.taus = (torch.arange(quantiles, dtype=torch.float32) + 0.5) / quantiles
        # The lowest quantiles whose levels lie in the alpha tail (at least one).
        self.tail = max(1, math.floor(cvar_alpha * quantiles + 1e-9))

    def spec(self) -> dict:
        return {"kind": "quantile", "quantiles": self.n_outputs, "cvar_alpha": self.cvar_alpha,
                "cvar_weight": self.cvar_weight}

    def cvar(self, output: torch.Tensor) -> torch.Tensor:
        """Mean of the lowest ``tail`` predicted quantiles (sorted: the head does not force their order)."""
        return torch.sort(output, dim=-1).values[:, :self.tail].mean(dim=-1)

    def value(self, output: torch.Tensor) -> torch.Tensor:
        mean = output.mean(dim=-1)
        if self.cvar_weight == 0:
            return mean
        return (1 - self.cvar_weight) * mean + self.cvar_weight * self.cvar(output)

    def loss(self, output: torch.Tensor, returns: torch.Tensor, old_values: torch.Tensor,
             clip: float | None) -> torch.Tensor:
        error = returns.unsqueeze(-1) - output  # [B, N]: target minus each quantile
        taus = self.taus.to(output.device)
        # tau * error above the quantile, (1 - tau) * -error below: minimized at the tau-quantile.
        return torch.maximum(taus * error, (taus - 1) * error).mean()


def critic_spec(ppo: PPOConfig) -> dict | None:
    """The critic a config asks for, as the checkpoint records it (None: the mean critic)."""
    if ppo.critic_quantiles == 0:
        return None
    return QuantileCritic(ppo.critic_quantiles, ppo.cvar_alpha, ppo.cvar_weight).spec()


def build_critic(spec: dict | None) -> MeanCritic | QuantileCritic:
    if spec is None:
        return MeanCritic()
    if spec["kind"] != "quantile":
        raise ValueError(f"unknown critic {spec['kind']!r}")
    return QuantileCritic(spec["quantiles"], spec["cvar_alpha"], spec["cvar_weight"])
