"""Market regimes as features: filtered probabilities of a Markov-switching model of returns.

A K-state Gaussian hidden Markov model of the one-bar log return (each state its own mean and
variance, a transition matrix between them) is fitted on a fold's training bars only, with
statsmodels' ``MarkovRegression``. The policy then sees, at each bar, the filtered probabilities
P(state | the window's returns up to this bar): the Hamilton filter over the last W returns of
the observation window, started from the chain's stationary distribution. It reads nothing but
the window, so the rollout, the backtest and the ONNX graph compute the same numbers, and no
later bar can change them. States are ordered by variance: state 0 is the calmest.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ml.data.schema import DataError

# Returns are fitted and filtered in percent: the likelihood is better conditioned than on 1e-2 values.
SCALE = 100.0
MIN_VARIANCE = 1e-6  # percent squared: a floor that keeps a degenerate state's density finite
# A floor on each predicted state probability: a transition that float32 rounds to 0 cannot leave
# every state impossible (0 / 0).
MIN_PROBABILITY = 1e-30


class RegimeFitError(DataError):
    """The training bars do not support the regime model (too few, constant, or the fit failed)."""


@dataclass(frozen=True)
class RegimeModel:
    mean: np.ndarray  # [K] return per bar, percent
    variance: np.ndarray  # [K] percent squared, ascending
    transition: np.ndarray  # [K, K] P(next state = column | state = row)
    initial: np.ndarray  # [K] the chain's stationary distribution


def stationary_distribution(transition: np.ndarray) -> np.ndarray:
    """pi with pi @ transition = pi and sum(pi) = 1."""
    states = transition.shape[0]
    system = np.vstack([transition.T - np.eye(states), np.ones(states)])
    target = np.zeros(states + 1)
    target[-1] = 1.0
    return np.linalg.lstsq(system, target, rcond=None)[0]


def fit_regimes(returns: np.ndarray, states: int) -> RegimeModel:
    """Maximum-likelihood fit (statsmodels: EM, then BFGS) on one-bar log returns."""
    returns = np.asarray(returns, dtype=np.float64)
    returns = returns[np.isfinite(returns)]
    if len(returns) < 50 * states:
        raise RegimeFitError(f"{len(returns)} training returns: a {states}-state regime model needs "
                             f"at least {50 * states}")
    if np.std(returns) == 0:
        raise RegimeFitError("the training returns are constant: no regimes to fit")
    # Imported here: statsmodels takes a second to import, and only runs that ask for regimes need it.
    from statsmodels.tsa.regime_switching.markov_regression import MarkovRegression
    model = MarkovRegression(returns * SCALE, k_regimes=states, trend="c", switching_variance=True)
    with warnings.catch_warnings():  # convergence chatter; the result is checked below
        warnings.simplefilter("ignore")
        params = model.fit(disp=False).params
    names = model.param_names
    mean = np.array([params[names.index(f"const[{k}]")] for k in range(states)])
    variance = np.array([params[names.index(f"sigma2[{k}]")] for k in range(states)])
    transition = model.regime_transition_matrix(params)[:, :, 0].T  # statsmodels: [to, from]
    if not (np.isfinite(mean).all() and np.isfinite(variance).all() and np.isfinite(transition).all()):
        raise RegimeFitError(f"the {states}-state regime model did not converge on the training returns")
    order = np.argsort(variance)
    transition = transition[np.ix_(order, order)]
    return RegimeModel(mean=mean[order], variance=np.maximum(variance[order], MIN_VARIANCE),
                       transition=transition, initial=stationary_distribution(transition))


class RegimeFilter(nn.Module):
    """[B, W] raw one-bar log returns, oldest first -> [B, K] filtered state probabilities at the last bar.

    The model's numbers are buffers: they travel in the checkpoint and into the ONNX graph. Until
    ``set_model`` they describe K identical states (every probability 1/K).
    """

    def __init__(self, states: int, window: int):
        super().__init__()
        if states < 2:
            raise ValueError(f"a regime model needs at least 2 states, got {states}")
        self.states, self.window, self.out_features = states, window, states
        self.register_buffer("mean", torch.zeros(states))
        self.register_buffer("variance", torch.ones(states))
        self.register_buffer("transition", torch.full((states, states), 1.0 / states))
        self.register_buffer("initial", torch.full((states,), 1.0 / states))

    def spec(self) -> dict:
        return {"states": self.states, "window": self.window}

    def set_model(self, model: RegimeModel) -> None:
        for name in ("mean", "variance", "transition", "initial"):
            getattr(self, name).copy_(torch.as_tensor(getattr(model, name), dtype=torch.float32))

    def forward(self, returns: torch.Tensor) -> torch.Tensor:
        x = returns.unsqueeze(-1) * SCALE  # [B, W, 1]
        log_density = -0.5 * ((x - self.mean) ** 2 / self.variance + torch.log(self.variance))  # [B, W, K]
        # Each bar's densities relative to its most likely state: the filter normalizes every step,
        # so the common factor cancels, and no density underflows to zero for all states at once.
        density = torch.exp(log_density - log_density.max(dim=-1, keepdim=True).values)
        predicted = self.initial.clamp_min(MIN_PROBABILITY).expand(returns.shape[0], self.states)
        for t in range(returns.shape[1]):
            joint = predicted * density[:, t]  # the likeliest state's density is 1: the sum stays above 0
            filtered = joint / joint.sum(dim=-1, keepdim=True)
            predicted = (filtered @ self.transition).clamp_min(MIN_PROBABILITY)
        return filtered


def regime_spec(states: int, window: int) -> dict | None:
    """The regime filter a config asks for, as the checkpoint records it (None: no regime features)."""
    return {"states": states, "window": window} if states else None


def build_regime(spec: dict | None) -> RegimeFilter | None:
    return None if spec is None else RegimeFilter(spec["states"], spec["window"])
