"""Rule selection: at each bar the policy picks which rule strategy sets the exposure.

The rules are the baselines a policy is usually judged against: buy-and-hold, cash, a 20/60-bar
moving-average crossover, 60-bar momentum and 14-bar RSI mean reversion. Their exposures at the
bar are computed by the feature module from the observation window (``FeatureModule(signals=True)``,
the ``signal_*`` features), so the policy sees what each rule would do, and the target (the chosen
rule's exposure, clamped into the exposure range) is computed in the exported graph too.
The action is an index into ``strategies``: a categorical distribution over them.
"""

from __future__ import annotations

import numpy as np
import torch
from gymnasium import spaces

from ml.config import STRATEGIES
from ml.env.action_base import CategoricalExposure
from ml.market.features import BASE_FEATURES, SIGNALS

# Where the signal features sit: right after the base features, which every feature module computes first.
SIGNAL_COLUMNS = slice(len(BASE_FEATURES), len(BASE_FEATURES) + len(SIGNALS))
# The exposures a rule can take: the buckets of the exposure diagnostics.
RULE_EXPOSURES = (-1.0, 0.0, 1.0)


class StrategySelection(CategoricalExposure):
    mode = "strategies"

    def __init__(self, strategies: tuple[str, ...], min_exposure: float = -1.0, max_exposure: float = 1.0):
        super().__init__(RULE_EXPOSURES, min_exposure, max_exposure)
        unknown = [name for name in strategies if name not in STRATEGIES]
        if unknown or len(strategies) < 2:
            raise ValueError(f"strategies {list(strategies)}: need two or more of {list(STRATEGIES)}")
        self.strategies = tuple(strategies)
        self.n_outputs = len(strategies)
        self.register_buffer("rule_index", torch.tensor([STRATEGIES.index(name) for name in strategies]))

    def exposures(self, features: torch.Tensor) -> torch.Tensor:
        """[B, n_outputs]: each selectable rule's exposure at the bar, clamped into the range."""
        signals = features[:, SIGNAL_COLUMNS]
        hold, cash = torch.ones_like(signals[:, :1]), torch.zeros_like(signals[:, :1])
        every_rule = torch.cat([hold, cash, signals], dim=-1)  # the order of STRATEGIES
        return self.clamp(torch.index_select(every_rule, 1, self.rule_index))

    def to_target(self, action: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.exposures(features).gather(1, action.reshape(-1, 1))

    def greedy(self, actor: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.to_target(actor.argmax(dim=-1), features)

    def export_outputs(self, actor: torch.Tensor, value: torch.Tensor, log_std, features: torch.Tensor):
        return self.greedy(actor, features), torch.softmax(actor, dim=-1), value.unsqueeze(-1)

    def to_dict(self) -> dict:
        return super().to_dict() | {"strategies": list(self.strategies)}

    def _semantics_detail(self) -> str:
        return (f"the exposure of the rule chosen among {list(self.strategies)} (action_probs over them, "
                "in that order)")

    def baselines(self, series, seed: int = 0) -> dict[str, np.ndarray]:
        """Each selectable rule alone (the same exposures the policy picks from, clamped into the range),
        buy-and-hold and cash, and a random pick among the rules at every bar."""
        # Rows before the first full window are NaN and never traded; on the space's own device.
        features = torch.nan_to_num(series.features).to(self.rule_index.device)
        exposures = self.exposures(features).double().cpu().numpy()
        bars = len(exposures)
        out = {"buy_and_hold": np.ones(bars), "cash": np.zeros(bars)}
        out |= {name: exposures[:, i] for i, name in enumerate(self.strategies)}
        picks = np.random.default_rng(seed).integers(0, len(self.strategies), size=bars)
        out["random"] = exposures[np.arange(bars), picks]
        return {name: values[:, None] for name, values in out.items()}

    def gym_space(self) -> spaces.Space:
        return spaces.Discrete(self.n_outputs)

    def gym_action_mask(self) -> np.ndarray:
        raise ValueError("rule selection is not offered through the Gymnasium environment")

    def gym_target(self, action, space: spaces.Space) -> torch.Tensor:
        raise ValueError("rule selection is not offered through the Gymnasium environment")
