"""Resumable training state: what a retried training task needs to end as the uninterrupted run.

The state holds tensors and plain Python values only (weights, optimizer, random-generator
states as byte tensors, open episodes, history), so it loads with ``torch.load(...,
weights_only=True)``: a file in the shared runs folder can never run code on a worker.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed numpy and torch, and switch deterministic algorithms on or off for this run."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS sums in a fixed order only with a fixed workspace; without this setting torch
        # refuses every CUDA matrix product in deterministic mode.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Only on a change: the call also imports and sets inductor's config, which a plain run never needs.
    if torch.are_deterministic_algorithms_enabled() != deterministic:
        torch.use_deterministic_algorithms(deterministic)


def sampling_rng_state(device: torch.device) -> torch.Tensor:
    """State of the global generator that action sampling draws from on ``device``."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_sampling_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def save_training_state(path: Path, state: dict) -> None:
    """Write then rename, so a crash mid-write never leaves a corrupt checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(path)


def load_training_state(path: Path) -> dict:
    """The saved state on the CPU: a retry may run on a worker of the other kind (GPU or CPU queue)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    logger.info("resuming training from %s (update %d, %d environment steps)", path, state["update"],
                state["global_step"])
    return state


def restore_random_streams(state: dict, device: torch.device, generator: torch.Generator) -> None:
    """The trainer's generator and the sampling generator as saved, when the device kind matches."""
    if state["device"] == device.type:
        generator.set_state(state["generator"])
        set_sampling_rng_state(device, state["sampling_rng"])
    else:  # CPU and CUDA generators have different states
        logger.warning("resuming a run checkpointed on %s on %s: random streams restart from the seed",
                       state["device"], device.type)
