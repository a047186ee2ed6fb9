"""The declared hyperparameter search space: which config fields a study varies, and over what.

A space file (YAML or JSON) maps dotted config fields to one distribution each::

    ppo.learning_rate: {log_uniform: [1.0e-5, 1.0e-3]}
    ppo.ent_coef: {uniform: [0.0, 0.05]}
    ppo.update_epochs: {int: [2, 8]}
    ppo.hidden: {choice: [[64, 64], [128, 128]]}

Each parameter turns an Optuna trial into config overrides (a nested dict) that are merged
over the base config and checked by ``ml.config`` like any config file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ml.config import ConfigError, PipelineConfig, config_from_dict, merge
from ml.market.features import MIN_LOOKBACK

KINDS = ("log_uniform", "uniform", "int", "choice")


@dataclass(frozen=True)
class Param:
    """One searched config field: ``low``..``high`` for the ranges, ``choices`` for ``choice``."""

    field: str
    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    # Another field of the space, searched before this one: this one is searched only in trials where
    # that field's value is truthy (the CVaR weight only with a quantile critic), and set to its falsy
    # choice (0) in the others.
    needs: str | None = None

    @property
    def off(self) -> Any:
        """The value of a ``needs`` parameter in trials where what it needs is off: its falsy choice."""
        return next((value for value in self.values() if not value), None)

    def suggest(self, trial) -> Any:
        """The trial's value of this field (Optuna records it under the field's dotted name)."""
        if self.kind == "log_uniform":
            return trial.suggest_float(self.field, self.low, self.high, log=True)
        if self.kind == "uniform":
            return trial.suggest_float(self.field, self.low, self.high)
        if self.kind == "int":
            return trial.suggest_int(self.field, int(self.low), int(self.high))
        # Optuna's categories are scalars; lists (layer widths) travel as their JSON text.
        return json.loads(trial.suggest_categorical(self.field, [json.dumps(c) for c in self.choices]))

    def override(self, value: Any) -> dict:
        """``{"ppo": {"learning_rate": value}}`` for ``ppo.learning_rate``."""
        nested: Any = value
        for part in reversed(self.field.split(".")):
            nested = {part: nested}
        return nested

    def values(self) -> list:
        """The values that bound this parameter: a space is checked with each of them."""
        if self.kind == "choice":
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.kind == "int" else [self.low, self.high]


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]

    def overrides(self, trial) -> dict:
        """The config overrides one trial samples (nested, ready for ``ml.config.merge``)."""
        out: dict = {}
        sampled: dict = {}
        for param in self.params:
            if param.needs is not None and not sampled.get(param.needs):
                out = merge(out, param.override(param.off))
                continue
            sampled[param.field] = param.suggest(trial)
            out = merge(out, param.override(sampled[param.field]))
        return out

    def check(self, base: PipelineConfig, origin: str = "search space") -> "SearchSpace":
        """Refuse a space some of whose values no config accepts, naming the origin and the field."""
        earlier: dict[str, Param] = {}
        dependents = {param.needs: param for param in self.params if param.needs is not None}
        for param in self.params:
            setting = base.to_dict()
            if param.needs is not None:
                if param.needs not in earlier:
                    raise ConfigError(f"{origin}: {param.field}: needs {param.needs}, which the space does "
                                      "not search before it")
                needed = earlier[param.needs]
                enabling = [value for value in needed.values() if value]
                if not enabling or param.kind != "choice" or param.off is None:
                    raise ConfigError(f"{origin}: {param.field}: needs {param.needs} to have a value that turns it "
                                      "on, and a choice that is off (0) for the trials where it is not")
                setting = merge(setting, needed.override(enabling[0]))
            earlier[param.field] = param
            for value in param.values():
                # The config accepts any lookback >= 2; the features need more bars than that.
                if param.field == "lookback" and isinstance(value, (int, float)) and value < MIN_LOOKBACK:
                    raise ConfigError(f"{origin}: lookback = {value}: must be >= {MIN_LOOKBACK}, the bars "
                                      "the features need")
                trial = merge(setting, param.override(value))
                if not value and param.field in dependents:  # what needs this field is then off too
                    dependent = dependents[param.field]
                    trial = merge(trial, dependent.override(dependent.off))
                try:
                    config_from_dict(trial)
                except ConfigError as exc:
                    raise ConfigError(f"{origin}: {param.field}: {exc}") from None
        return self


# The default search; ``default_space`` leaves out what a portfolio config cannot take.
DEFAULT_SPACE = SearchSpace((
    Param("ppo.learning_rate", "log_uniform", 1e-5, 1e-3),
    Param("ppo.ent_coef", "uniform", 0.0, 0.05),
    Param("ppo.hidden", "choice", choices=((64, 64), (128, 128), (64, 64, 64))),
    Param("ppo.encoder", "choice", choices=("mlp", "conv", "attention")),
    Param("ppo.critic_quantiles", "choice", choices=(0, 32)),
    Param("ppo.cvar_weight", "choice", choices=(0.0, 0.5), needs="ppo.critic_quantiles"),
    Param("ppo.regime_states", "choice", choices=(0, 2)),
    Param("lookback", "choice", choices=(64, 96, 128)),
    Param("env.turnover_penalty", "uniform", 0.0, 1e-3),
    Param("env.drawdown_penalty", "uniform", 0.0, 0.05),
    Param("action.mode", "choice", choices=("discrete", "continuous", "strategies")),
    Param("risk.target_volatility", "choice", choices=(None, 0.10, 0.15, 0.20)),
))
SINGLE_ASSET_ONLY = ("ppo.encoder", "ppo.regime_states", "action.mode")


def default_space(base: PipelineConfig) -> SearchSpace:
    """The default search for this config, checked: a portfolio keeps its weights and the plain MLP."""
    params = DEFAULT_SPACE.params
    if not base.action.one_asset:
        params = tuple(p for p in params if p.field not in SINGLE_ASSET_ONLY)
    return SearchSpace(params).check(base)


def _is_field(path: str) -> bool:
    """True when the dotted path names a settable (non-section) field of PipelineConfig."""
    cls: Any = PipelineConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return False
        cls = fields[part].default_factory if fields[part].default_factory is not dataclasses.MISSING else None
        if i < len(parts) - 1 and cls is None:
            return False
    return cls is None or not dataclasses.is_dataclass(cls)


def _number(value: Any, where: str) -> float:
    # YAML reads 1e-5 (no dot) as text: accept any number spelled as text too.
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ConfigError(f"{where} = {value!r}: must be a finite number")
    return number


def _param(name: Any, spec: Any, origin: str) -> Param:
    if not isinstance(name, str) or not _is_field(name):
        shown = name if isinstance(name, str) and len(name) < 80 else "a key"
        raise ConfigError(f"{origin}: {shown}: not a config field (a dotted name such as ppo.learning_rate)")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"{origin}: {name}: must be one of {{{', '.join(k + ': ...' for k in KINDS)}}}")
    kind, bounds = next(iter(spec.items()))
    where = f"{origin}: {name}.{kind}"
    if kind == "choice":
        if not isinstance(bounds, list) or not bounds:
            raise ConfigError(f"{where}: must be a non-empty list of values")
        return Param(name, kind, choices=tuple(tuple(c) if isinstance(c, list) else c for c in bounds))
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise ConfigError(f"{where}: must be a list [low, high]")
    low, high = (_number(b, where) for b in bounds)
    if not low < high or (kind == "log_uniform" and low <= 0):
        raise ConfigError(f"{where} = {bounds}: needs low < high" + (" and low > 0" if kind == "log_uniform" else ""))
    return Param(name, kind, low, high)


def load_space(path: str | Path, base: PipelineConfig | None = None) -> SearchSpace:
    """A space from a YAML/JSON file, checked against ``base`` (defaults when None)."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read search space ({exc.strerror or type(exc).__name__})") from None
    except yaml.YAMLError:
        raise ConfigError(f"{path}: not valid YAML/JSON") from None
    if not isinstance(values, dict) or not values:
        raise ConfigError(f"{path}: must map dotted config fields to distributions")
    space = SearchSpace(tuple(_param(name, spec, str(path)) for name, spec in values.items()))
    return space.check(base or config_from_dict({}), str(path))
