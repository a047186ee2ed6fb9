"""The pipeline's configuration: typed dataclasses, loadable from JSON/YAML.

Every field has a default, so a config file (or an Airflow conf) names only
what it changes. Unknown keys are refused by name.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ml.env import CostConfig, EnvConfig
from ml.evaluation.splits import SplitConfig
from ml.ppo import PPOConfig


@dataclass
class DataConfig:
    source: str = "sample"  # sample | file | yfinance | lake
    symbol: str = "GSPC"
    symbols: tuple[str, ...] = ()  # two or more: portfolio mode over these (with ppo.action_mode: portfolio)
    interval: str = "1d"
    path: str | None = None  # the file for source=file; the lake root for source=lake
    start: str | None = None
    end: str | None = None
    auto_adjust: bool = True  # yfinance: adjusted prices (recorded with the data)
    calendar: str = "equity"  # equity | crypto, for annualization


@dataclass
class GateConfig:
    """The promotion policy: every enabled rule must pass for a version to become `champion`."""

    parity_tolerance: float = 1e-5  # max |onnxruntime - torch| on real windows
    parity_windows: int = 256
    require_no_collapse: bool = True  # refuse a policy that picks one exposure on >= 98% of test bars
    require_beats_cash: bool = True  # mean test total return after costs must exceed cash ...
    cash_margin: float = 0.0  # ... by this much
    compare_with_champion: bool = True  # when a champion exists, beat it on bars neither trained on ...
    champion_margin: float = 0.0  # ... by this much Sharpe


@dataclass
class RegistryConfig:
    model_name: str | None = None  # default: ppo_<symbol>_<interval> (ppo_<sym1>_<sym2>_... for a portfolio)
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else a SQLite store in the output dir
    artifact_root: str | None = None  # default: next to a SQLite store
    experiment: str = "ppo_training"
    promote: bool = True  # set `champion` when the gate passes


@dataclass
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    lookback: int = 64
    selection_metric: str = "sharpe"  # validation metric that picks the checkpoint (and the seed)
    seeds: tuple[int, ...] = (1,)  # PPO seeds trained per fold; validation picks one, test shows the spread
    costs: CostConfig = field(default_factory=CostConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    splits: SplitConfig = field(default_factory=SplitConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)

    @property
    def portfolio(self) -> bool:
        return bool(self.data.symbols)

    @property
    def model_name(self) -> str:
        symbols = "_".join(self.data.symbols) if self.portfolio else self.data.symbol
        return self.registry.model_name or f"ppo_{symbols}_{self.data.interval}".replace("^", "")

    def check(self) -> "PipelineConfig":
        """Refuse combinations that cannot run, naming the fields."""
        symbols, mode = self.data.symbols, self.ppo.action_mode
        levels = self.ppo.exposure_levels
        if len(set(levels)) != len(levels):
            raise ConfigError(f"ppo.exposure_levels {list(levels)}: each exposure level must appear once")
        if symbols and len(set(symbols)) < 2:
            raise ConfigError(f"data.symbols {list(symbols)}: portfolio mode needs at least two distinct symbols")
        if symbols and mode != "portfolio":
            raise ConfigError(f"data.symbols lists a portfolio {list(symbols)}: set ppo.action_mode: portfolio "
                              f"(got '{mode}')")
        if mode == "portfolio" and not symbols:
            raise ConfigError("ppo.action_mode 'portfolio' needs data.symbols (two or more)")
        if symbols and self.data.source == "file":
            raise ConfigError("data.symbols: portfolio mode reads sample, lake or yfinance data, "
                              "not a single file (data.source: file)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"config '{where}' must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown} in '{where}' (known: {sorted(known)})")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        path = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, path)
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def merge(base: dict, override: dict) -> dict:
    """Nested dict update: override wins, sections merge."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(values: dict | None) -> PipelineConfig:
    return _build(PipelineConfig, values or {}, "").check()


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> PipelineConfig:
    values: dict = {}
    if path:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read config ({exc})") from exc
    return config_from_dict(merge(values, overrides or {}))
