"""What an action means: everything that differs between discrete levels, a continuous exposure,
portfolio weights and rule selection lives in the action spaces, so the environment, the policy,
PPO, the backtest and the export never ask which kind they run. Their interface and the one-asset
base are in ``ml.env.action_base``; this module has the spaces and builds the one a config asks for.

An action space turns the actor's outputs (and the bar's raw features, which only rule selection
reads) into a target (the fraction of NAV to hold in each asset after the next fill, [N, A]),
samples actions and scores their log-probability, picks the deterministic action, keeps the
account's limits in the environment, writes the ONNX outputs and the ``action_semantics``
metadata, gives the Gymnasium space, the baselines a policy must beat, and the rule that says
the decisions collapsed to one.

- ``DiscreteExposure``: one asset; the actor gives logits over exposure levels, levels outside
  [min_exposure, max_exposure] are masked (long-only = min 0).
- ``ContinuousExposure``: one asset; a Gaussian over the target exposure (state-independent
  learned std), clamped into the range.
- ``PortfolioWeights``: A assets plus cash; a Gaussian over one score per asset plus one for
  cash, and the target weights are the softmax of the sample without the cash entry
  (long-only, summing to at most 1).
- ``StrategySelection`` (``ml.env.strategy_space``): one asset; the actor gives logits over rule
  strategies, and the chosen rule's exposure at the bar is the target.

The level mask and the range are buffers, so the exported graph obeys them too.
"""

from __future__ import annotations

import numpy as np
import torch
from gymnasium import spaces

from ml.config import ActionConfig
from ml.env.action_base import (SAME_ALLOCATION_TOLERANCE, ActionSpace, CategoricalExposure, ExposureSpace,
                                gaussian_log_prob_entropy, hundredths, level_shares)
from ml.env.strategy_space import StrategySelection

# The interface and its helpers live in ml.env.action_base; importers reach them here too.
__all__ = ["SAME_ALLOCATION_TOLERANCE", "ActionSpace", "CategoricalExposure", "ContinuousExposure",
           "DiscreteExposure", "ExposureSpace", "PortfolioWeights", "StrategySelection", "action_space_from_dict",
           "hundredths", "level_shares", "make_action_space"]


class DiscreteExposure(CategoricalExposure):
    mode = "discrete"

    def __init__(self, levels: tuple[float, ...], min_exposure: float = -1.0, max_exposure: float = 1.0):
        super().__init__(levels, min_exposure, max_exposure)
        allowed = (self.levels >= min_exposure - 1e-9) & (self.levels <= max_exposure + 1e-9)
        if not allowed.any():
            raise ValueError(f"no exposure level inside [{min_exposure}, {max_exposure}]")
        self.register_buffer("allowed", allowed)
        self.n_outputs = len(levels)

    def mask_actor_bias(self, bias: torch.Tensor) -> torch.Tensor:
        # Masked levels get -1e9 through the bias: the logits of allowed levels are the same bit
        # for bit, and the exported graph needs no Where over [B, K].
        return bias + torch.where(self.allowed, 0.0, -1e9)

    def to_target(self, action: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.take(self.levels, action).unsqueeze(-1)

    def greedy(self, actor: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.take(self.levels, actor.max(dim=-1).indices).unsqueeze(-1)

    def export_outputs(self, actor: torch.Tensor, value: torch.Tensor, log_std, features: torch.Tensor):
        # index_select exports to one Gather; the one-hot product it replaces cost five nodes.
        target = torch.index_select(self.levels, 0, actor.argmax(dim=-1)).unsqueeze(-1)
        return target, torch.softmax(actor, dim=-1), value.unsqueeze(-1)

    def gym_space(self) -> spaces.Space:
        return spaces.Discrete(len(self.levels))

    def _semantics_detail(self) -> str:
        return f"levels {self.levels.tolist()}"

    def gym_action_mask(self) -> np.ndarray:
        """Levels inside the exposure range (the ``MaskablePPO`` convention)."""
        return self.allowed.numpy().copy()

    def gym_target(self, action, space: spaces.Space) -> torch.Tensor:
        """The target of a Gymnasium action: its level, clamped into the range (flat for a short level
        when long-only), so the range holds even for learners that ignore the mask."""
        index = int(action)
        if not 0 <= index < len(self.levels):
            raise ValueError(f"action {action} is outside {space}")
        return self.clamp(self.levels[index].double()).reshape(1)


class ContinuousExposure(ExposureSpace):
    mode = "continuous"
    gaussian = True
    action_dtype = torch.float32
    action_shape = (1,)
    n_outputs = 1
    output_names = ("target_exposure", "action_std", "value")

    def log_prob_entropy(self, actor: torch.Tensor, log_std: torch.Tensor, action: torch.Tensor):
        return gaussian_log_prob_entropy(actor, log_std, action)

    def sample(self, actor: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
        return actor + log_std.exp() * torch.randn_like(actor)

    def to_target(self, action: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.clamp(action)

    def greedy(self, actor: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.clamp(actor)

    def export_outputs(self, actor: torch.Tensor, value: torch.Tensor, log_std: torch.Tensor,
                       features: torch.Tensor):
        return self.clamp(actor), log_std.exp().expand_as(actor), value.unsqueeze(-1)

    def gym_space(self) -> spaces.Space:
        # Always [-1, 1], clamped into the range when executed: learners expect a symmetric Box
        # (Stable-Baselines3's checker warns otherwise).
        return spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)

    def _semantics_detail(self) -> str:
        return "continuous"

    def gym_action_mask(self) -> np.ndarray:
        raise ValueError("continuous actions have no mask: they are clamped into [min_exposure, max_exposure]")

    def gym_target(self, action, space: spaces.Space) -> torch.Tensor:
        exposure = np.asarray(action, dtype=np.float64).reshape(-1)
        if exposure.shape != (1,) or not np.isfinite(exposure[0]):
            raise ValueError(f"action {action!r} is not one finite target exposure")
        return self.clamp(torch.tensor(exposure, dtype=torch.float64))


class PortfolioWeights(ActionSpace):
    mode = "portfolio"
    gaussian = True
    action_dtype = torch.float32
    input_names = ("ohlcv", "weights")
    output_names = ("target_weights", "value")
    benchmark = "equal_weight"

    def __init__(self, n_assets: int):
        super().__init__()
        if n_assets < 2:
            raise ValueError(f"portfolio mode needs at least two assets, got {n_assets}")
        self.n_assets = n_assets
        self.n_outputs = n_assets + 1  # one score per asset plus cash
        self.action_shape = (n_assets + 1,)

    def project(self, target: torch.Tensor) -> torch.Tensor:
        """Long-only weights summing to at most 1: negatives to 0, an excess scaled down pro rata."""
        target = target.clamp(min=0.0)
        return target / target.sum(dim=-1, keepdim=True).clamp(min=1.0)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "n_assets": self.n_assets}

    def log_prob_entropy(self, actor: torch.Tensor, log_std: torch.Tensor, action: torch.Tensor):
        return gaussian_log_prob_entropy(actor, log_std, action)

    def sample(self, actor: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
        return actor + log_std.exp() * torch.randn_like(actor)

    def to_target(self, action: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(action, dim=-1)[..., :-1]

    def greedy(self, actor: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(actor, dim=-1)[..., :-1]

    def export_outputs(self, actor: torch.Tensor, value: torch.Tensor, log_std: torch.Tensor,
                       features: torch.Tensor):
        return self.greedy(actor, features), value.unsqueeze(-1)

    def example_inputs(self, lookback: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(2, lookback, self.n_assets, 5) + 1.0, torch.zeros(2, self.n_assets)

    def example_positions(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """Random long-only weights (a cash share is drawn too)."""
        return rng.dirichlet(np.ones(self.n_assets + 1), size=count)[:, :self.n_assets].astype("float32")

    def asset_windows(self, ohlcv: torch.Tensor) -> torch.Tensor:
        """Raw windows [B, L, A, 5] as [B * A, L, 5], asset after asset as in training."""
        batch, lookback, assets, fields = ohlcv.shape
        return ohlcv.permute(0, 2, 1, 3).reshape(batch * assets, lookback, fields)

    def gym_space(self) -> spaces.Space:
        return spaces.Box(-np.inf, np.inf, shape=(self.n_outputs,), dtype=np.float32)

    def semantics(self) -> str:
        return ("target_weights: fraction of NAV held in each asset (order of `symbols`) after the next bar's "
                "open, long-only, summing to at most 1; the rest is cash")

    def dominant(self, decisions: torch.Tensor) -> tuple[list[float], float]:
        """The median allocation and the share of decisions within the tolerance of it, asset by asset."""
        weights = decisions.reshape(decisions.shape[0], -1)
        # The lower median; median's index output has no deterministic CUDA kernel, so
        # deterministic mode refuses it there.
        median = weights.kthvalue((weights.shape[0] + 1) // 2, dim=0).values
        near = (weights - median).abs().amax(dim=1) <= SAME_ALLOCATION_TOLERANCE
        return median.double().round(decimals=4).tolist(), near.float().mean().item()

    def collapse_report(self, decisions: torch.Tensor, collapse_share: float) -> dict:
        weights, share = self.dominant(decisions)
        return {"alarm": share >= collapse_share, "dominant_weights": weights, "dominant_share": share}

    def same_decision(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs().amax(dim=-1) <= SAME_ALLOCATION_TOLERANCE

    def decision_summary(self, decisions: np.ndarray, symbols: list[str]) -> dict:
        """Mean weight of each asset and of cash over the test decisions."""
        mean = decisions.mean(axis=0)
        return {"test_mean_weights": {s: float(w) for s, w in zip(symbols, mean)} | {"cash": float(1.0 - mean.sum())}}

    def action_metrics(self, sampled: torch.Tensor, greedy: torch.Tensor) -> dict[str, float]:
        """Mean weight of each asset and of cash, sampled and deterministic, and the share of all-cash decisions."""
        metrics = {"flat_share": (sampled.sum(dim=-1) < 0.01).float().mean().item()}
        for kind, weights in (("sampled", sampled), ("greedy", greedy)):
            mean = weights.mean(dim=0)
            metrics.update({f"{kind}_weight/asset{i}": mean[i].item() for i in range(mean.numel())})
            metrics[f"{kind}_weight/cash"] = 1.0 - mean.sum().item()
        return metrics

    def baselines(self, series, seed: int = 0) -> dict[str, np.ndarray]:
        """Cash, equal weight (rebalanced to 1/A every bar), random weights (a uniform draw over
        the assets and cash on every bar), and each asset bought and held alone."""
        bars, assets = series.ohlcv.shape[0], self.n_assets
        rng = np.random.default_rng(seed)
        out = {"cash": np.zeros((bars, assets)), "equal_weight": np.full((bars, assets), 1.0 / assets),
               "random": rng.dirichlet(np.ones(assets + 1), size=bars)[:, :assets]}
        for i, symbol in enumerate(series.symbols):
            hold = np.zeros((bars, assets))
            hold[:, i] = 1.0
            out[f"hold_{symbol}".replace("^", "")] = hold
        return out


_SPACES = {"discrete": DiscreteExposure, "continuous": ContinuousExposure}


def make_action_space(config: ActionConfig, n_assets: int = 1) -> ActionSpace:
    """The action space a config asks for, over ``n_assets`` assets."""
    if config.mode == PortfolioWeights.mode:
        return PortfolioWeights(n_assets)
    if n_assets != 1:
        raise ValueError(f"action mode '{config.mode}' trades one asset, got {n_assets}")
    if config.selects_strategies:
        return StrategySelection(tuple(config.strategies), config.min_exposure, config.max_exposure)
    return _SPACES[config.mode](tuple(config.exposure_levels), config.min_exposure, config.max_exposure)


def action_space_from_dict(values: dict) -> ActionSpace:
    """The inverse of ``ActionSpace.to_dict`` (policy checkpoints)."""
    if values["mode"] == PortfolioWeights.mode:
        return PortfolioWeights(values["n_assets"])
    if "strategies" in values:
        return StrategySelection(tuple(values["strategies"]), values["min_exposure"], values["max_exposure"])
    return _SPACES[values["mode"]](tuple(values["levels"]), values["min_exposure"], values["max_exposure"])
