"""What every action space provides, and the bases the one-asset spaces share.

``ActionSpace`` is the interface (the concrete spaces and what differs between them:
``ml.env.action_space``). ``ExposureSpace`` holds one asset between -1 and 1 of NAV, with the
diagnostics, collapse rule and baselines every one-asset space shares; ``CategoricalExposure``
adds the softmax choice that exposure levels and rule selection both make. The Gaussian helper
serves continuous exposure and portfolio weights.
"""

from __future__ import annotations

import abc
import math

import numpy as np
import pandas as pd
import torch
from torch import nn

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
# A softmax head that ignores its input still jitters in the third decimal, so two weight vectors
# count as the same allocation when every asset is within this distance (collapse and hold checks).
SAME_ALLOCATION_TOLERANCE = 0.025


def hundredths(exposure: torch.Tensor) -> torch.Tensor:
    """Exposures to 0.01: the resolution at which two decisions count as the same."""
    return torch.round(exposure * 100)


def level_shares(exposure: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Share of exposures nearest to each level (exact counts for discrete levels; an exposure
    exactly halfway between two levels counts for the lower one)."""
    # Nearest level by bucketing at the midpoints between sorted levels: one pass over the
    # exposures instead of a [N, K] table of distances.
    ascending, order = levels.sort(stable=True)
    nearest = order[torch.bucketize(exposure.reshape(-1), (ascending[1:] + ascending[:-1]) / 2)]
    return torch.bincount(nearest, minlength=levels.numel()).float() / max(nearest.numel(), 1)


def gaussian_log_prob_entropy(mean: torch.Tensor, log_std: torch.Tensor, action: torch.Tensor):
    """Log-probability and entropy of a diagonal Gaussian, in closed form."""
    log_std = log_std.expand_as(mean)
    z = (action - mean) * torch.exp(-log_std)
    log_prob = (-0.5 * z * z - log_std - _HALF_LOG_2PI).sum(dim=-1)
    entropy = (0.5 + _HALF_LOG_2PI + log_std).sum(dim=-1)
    return log_prob, entropy


class ActionSpace(nn.Module, abc.ABC):
    """The interface every action space implements (see the module docstring)."""

    mode: str
    n_assets: int  # width of the position the policy sees and the target it sets
    n_outputs: int  # width of the actor head
    gaussian: bool  # the policy learns a log std for its actions
    action_dtype: torch.dtype
    action_shape: tuple[int, ...]  # of one sampled action
    input_names: tuple[str, str]
    output_names: tuple[str, ...]
    benchmark: str  # the passive baseline a policy is judged against
    # Baselines that know nothing: a policy that cannot beat them on validation learned nothing.
    null_baselines = ("cash", "random")

    def mask_actor_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias

    @abc.abstractmethod
    def project(self, target: torch.Tensor) -> torch.Tensor:
        """The account's limits on a target [N, A], applied by the environment before the fill."""

    @abc.abstractmethod
    def to_dict(self) -> dict:
        """What ``action_space_from_dict`` rebuilds the space from (policy checkpoints)."""


class ExposureSpace(ActionSpace):
    """One asset held between -1 and 1 of NAV; ``levels`` also name the diagnostics' buckets."""

    n_assets = 1
    input_names = ("ohlcv", "position")
    benchmark = "buy_and_hold"

    def __init__(self, levels: tuple[float, ...], min_exposure: float = -1.0, max_exposure: float = 1.0):
        super().__init__()
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32))
        self.register_buffer("exposure_range", torch.tensor([min_exposure, max_exposure]))

    @property
    def range(self) -> tuple[float, float]:
        return float(self.exposure_range[0]), float(self.exposure_range[1])

    def project(self, target: torch.Tensor) -> torch.Tensor:
        # The account's limit; narrower ranges are the policy's (mask or clamp), and the
        # baselines trade the whole range.
        return target.clamp(-1.0, 1.0)

    def allowed_levels(self) -> np.ndarray:
        """The levels inside the exposure range: what a random policy under the same limits picks from."""
        levels = self.levels.double().cpu().numpy()
        low, high = self.range
        return levels[(levels >= low - 1e-9) & (levels <= high + 1e-9)]

    def clamp(self, exposure: torch.Tensor) -> torch.Tensor:
        return exposure.clamp(self.exposure_range[0], self.exposure_range[1])

    def to_dict(self) -> dict:
        low, high = self.range
        return {"mode": self.mode, "levels": self.levels.tolist(), "min_exposure": low, "max_exposure": high}

    def example_inputs(self, lookback: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(2, lookback, 5) + 1.0, torch.zeros(2, 1)

    def example_positions(self, rng: np.random.Generator, count: int) -> np.ndarray:
        return rng.choice(self.levels.numpy().astype("float32"), size=(count, 1))

    def asset_windows(self, ohlcv: torch.Tensor) -> torch.Tensor:
        """Raw windows [B, L, 5] as the per-asset windows the feature module reads."""
        return ohlcv

    def semantics(self) -> str:
        low, high = self.range
        return ("target_exposure: fraction of NAV held in the asset after the next bar's open, "
                f"in [{low}, {high}]; " + self._semantics_detail())

    @abc.abstractmethod
    def _semantics_detail(self) -> str:
        """The part of ``action_semantics`` that says how the exposure is chosen."""

    # Collapse and diagnostics: decisions are exposures [N, 1].
    def dominant(self, decisions: torch.Tensor) -> tuple[float, float]:
        """The most frequent decision (to 0.01) and its share; a share near 1 means the policy ignores its input."""
        rounded = hundredths(decisions.reshape(-1))
        lowest = rounded.min()
        if rounded.max() - lowest <= 10_000:  # exposures in a bounded range: count instead of sorting
            counts = torch.bincount((rounded - lowest).long())
            best = int(counts.argmax())
            return float(best + lowest) / 100, (counts[best] / decisions.numel()).item()
        # NaN (a diverged policy) or a huge range
        values, counts = torch.unique(rounded, return_counts=True)
        best = int(counts.argmax())
        return float(values[best]) / 100, (counts[best] / decisions.numel()).item()

    def collapse_report(self, decisions: torch.Tensor, collapse_share: float) -> dict:
        value, share = self.dominant(decisions)
        return {"alarm": share >= collapse_share, "dominant_exposure": value, "dominant_share": share}

    def same_decision(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (hundredths(a) == hundredths(b)).all(dim=-1)

    def decision_summary(self, decisions: np.ndarray, symbols: list[str]) -> dict:
        """Share of test decisions at each exposure (to 0.1)."""
        values, counts = np.unique(np.round(decisions[:, 0], 1), return_counts=True)
        return {"test_exposure_histogram": {f"{v:+.2f}": float(c / counts.sum()) for v, c in zip(values, counts)}}

    def action_metrics(self, sampled: torch.Tensor, greedy: torch.Tensor) -> dict[str, float]:
        """Shares of sampled and deterministic decisions nearest each level, and the share of flat ones."""
        levels = self.levels
        counts, greedy_counts = level_shares(sampled, levels), level_shares(greedy, levels)
        flat = (levels == 0).nonzero()
        return {
            "flat_share": counts[flat[0, 0]].item() if len(flat) else 0.0,
            **{f"sampled_action_share/{levels[i].item():+.2f}": counts[i].item() for i in range(len(levels))},
            **{f"greedy_action_share/{levels[i].item():+.2f}": greedy_counts[i].item() for i in range(len(levels))},
        }

    def baselines(self, series, seed: int = 0) -> dict[str, np.ndarray]:
        """Causal target series [T, 1] of the single-asset baselines, one row per bar (decided on it)."""
        close = pd.Series(series.close[:, 0].double().cpu().numpy())
        fast, slow = close.rolling(20).mean(), close.rolling(60).mean()
        momentum = np.log(close / close.shift(60))
        rng = np.random.default_rng(seed)
        exposures = {
            "buy_and_hold": np.ones(len(close)),
            "cash": np.zeros(len(close)),
            "ma_crossover": (fast > slow).astype("float64").to_numpy(),
            "momentum": np.sign(momentum.fillna(0.0)).to_numpy(),
            "random": rng.choice(self.allowed_levels(), size=len(close)),
        }
        return {name: values[:, None] for name, values in exposures.items()}


class CategoricalExposure(ExposureSpace):
    """One asset and a choice among ``n_outputs`` options (exposure levels, or rules): a softmax over
    the actor's logits, sampled with the Gumbel-max trick."""

    gaussian = False
    action_dtype = torch.long
    action_shape = ()
    output_names = ("target_exposure", "action_probs", "value")

    def log_prob_entropy(self, actor: torch.Tensor, log_std, action: torch.Tensor):
        # Over [K, B]: torch's CPU softmax then vectorizes along the batch instead of along the
        # options, about 3x faster forward and backward.
        log_p = torch.log_softmax(actor.t(), dim=0)
        # Masked options have probability exactly 0 and contribute 0 (not NaN) to the entropy.
        entropy = -(log_p.exp() * log_p).sum(dim=0)
        return log_p.gather(0, action.unsqueeze(0)).squeeze(0), entropy

    def sample(self, actor: torch.Tensor, log_std) -> torch.Tensor:
        # Gumbel-max: the argmax of logits plus Gumbel noise is a draw from their softmax. A
        # masked option (-1e9) can never win, and nothing here is nondeterministic on CUDA.
        gumbel = torch.rand_like(actor).log_().neg_().log_().neg_()
        return (actor + gumbel).max(dim=-1).indices  # argmax's first maximum; 3x faster over 5 options
