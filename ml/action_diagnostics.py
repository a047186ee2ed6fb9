"""What a policy's decisions look like during training: how they spread over exposures,
how often they stay flat or keep the previous target, and whether they collapsed to one.

Logged per update; the collapse alarm reads ``dominant_share``.
"""

from __future__ import annotations

import torch

from ml.policy import ActorCritic
from ml.portfolio import SAME_ALLOCATION_TOLERANCE


def hundredths(exposure: torch.Tensor) -> torch.Tensor:
    """Exposures to 0.01: the resolution at which two decisions count as the same."""
    return torch.round(exposure * 100)


def level_shares(exposure: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Share of exposures nearest to each level (exact counts in discrete mode; an exposure
    exactly halfway between two levels counts for the lower one)."""
    # Nearest level by bucketing at the midpoints between sorted levels: one pass over the
    # exposures instead of a [N, K] table of distances.
    ascending, order = levels.sort(stable=True)
    nearest = order[torch.bucketize(exposure.reshape(-1), (ascending[1:] + ascending[:-1]) / 2)]
    return torch.bincount(nearest, minlength=levels.numel()).float() / max(nearest.numel(), 1)


def dominant_share(exposure: torch.Tensor, portfolio: bool = False) -> float:
    """Share of the most frequent exposure (to 0.01), or of allocations near the median one.

    Near 1 means the policy ignores its input.
    """
    if portfolio:
        weights = exposure.reshape(exposure.shape[0], -1)
        # The lower median, as torch.median gives it; median's index output has no deterministic
        # CUDA kernel, so deterministic mode refuses it there.
        median = weights.kthvalue((weights.shape[0] + 1) // 2, dim=0).values
        spread = (weights - median).abs().amax(dim=1)
        return (spread <= SAME_ALLOCATION_TOLERANCE).float().mean().item()
    rounded = hundredths(exposure.reshape(-1))
    lowest = rounded.min()
    if rounded.max() - lowest <= 10_000:  # exposures in a bounded range: count instead of sorting
        counts = torch.bincount((rounded - lowest).long())
    else:  # NaN (a diverged policy) or a huge range
        _, counts = torch.unique(rounded, return_counts=True)
    return (counts.max() / exposure.numel()).item()


def hold_share(exposure: torch.Tensor, dones: torch.Tensor, portfolio: bool = False) -> float:
    """Share of decisions that keep the episode's previous target (to 0.01, or within the
    allocation tolerance in portfolio mode).

    ``exposure`` is step-major, [steps, envs] or [steps, envs, A]; ``dones[t]`` marks the first
    decision of a new episode, which has no previous target to keep.
    """
    if portfolio:
        kept = (exposure[1:] - exposure[:-1]).abs().amax(dim=-1) <= SAME_ALLOCATION_TOLERANCE
    else:
        rounded = hundredths(exposure)
        kept = rounded[1:] == rounded[:-1]
    continuing = dones[1:] == 0
    return ((kept & continuing).sum() / continuing.sum().clamp(min=1)).item()


def action_metrics(agent: ActorCritic, sampled: torch.Tensor, greedy: torch.Tensor) -> dict[str, float]:
    """How the sampled and the deterministic actions spread, and the share of all-flat sampled decisions."""
    if agent.mode == "portfolio":  # mean weight of each asset and of cash
        metrics = {"flat_share": (sampled.sum(dim=-1) < 0.01).float().mean().item()}
        for kind, weights in (("sampled", sampled), ("greedy", greedy)):
            mean = weights.mean(dim=0)
            metrics.update({f"{kind}_weight/asset{i}": mean[i].item() for i in range(mean.numel())})
            metrics[f"{kind}_weight/cash"] = 1.0 - mean.sum().item()
        return metrics
    levels = agent.levels
    counts, greedy_counts = level_shares(sampled, levels), level_shares(greedy, levels)
    flat = (levels == 0).nonzero()
    return {
        "flat_share": counts[flat[0, 0]].item() if len(flat) else 0.0,
        **{f"sampled_action_share/{levels[i].item():+.2f}": counts[i].item() for i in range(len(levels))},
        **{f"greedy_action_share/{levels[i].item():+.2f}": greedy_counts[i].item() for i in range(len(levels))},
    }
