"""What a policy's decisions look like during training: how they spread, how often they keep
the previous target, and whether they collapsed to one. Logged per update.

What counts as "the same decision" and "collapsed" is the action space's rule.
"""

from __future__ import annotations

import torch

from ml.env.action_space import ActionSpace


def dominant_share(action_space: ActionSpace, decisions: torch.Tensor) -> float:
    """Share of the most common decision (near 1: the policy ignores its input)."""
    return action_space.dominant(decisions)[1]


def hold_share(action_space: ActionSpace, targets: torch.Tensor, dones: torch.Tensor) -> float:
    """Share of decisions that keep the episode's previous target.

    ``targets`` is step-major, [steps, envs, A]; ``dones[t]`` marks the first decision of a
    new episode, which has no previous target to keep.
    """
    kept = action_space.same_decision(targets[1:], targets[:-1])
    continuing = dones[1:] == 0
    return ((kept & continuing).sum() / continuing.sum().clamp(min=1)).item()
