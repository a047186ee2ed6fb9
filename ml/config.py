"""The pipeline's configuration: typed dataclasses, loadable from JSON/YAML, checked on load.

This is the bottom layer: it imports nothing from ``ml`` (and no torch), so a
config can be loaded and refused cheaply before any work starts. Every field
has a default, so a config file (or an Airflow conf) names only what it
changes. Unknown keys, wrong types, out-of-range values and unknown choices
are refused with the dotted field, the value and the rule:
``ppo.gamma = 7: must be in (0, 1]``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

# yfinance's spellings; the data sources, the annualization and the DAG Params read this list.
INTERVALS = ("1m", "2m", "5m", "15m", "30m", "60m", "90m", "1h", "1d", "5d", "1wk", "1mo", "3mo")
INTRADAY = INTERVALS[:8]
SOURCES = ("sample", "file", "yfinance", "lake")
CALENDARS = ("equity", "crypto")
ACTION_MODES = ("discrete", "continuous", "portfolio", "strategies")
# The rule strategies a "strategies" policy chooses among (their exposures: ml.market.features).
STRATEGIES = ("buy_and_hold", "cash", "ma_crossover", "momentum", "mean_reversion")
DEVICES = ("auto", "cpu", "cuda")
ENCODERS = ("mlp", "conv", "attention")
# Validation metrics that can pick the checkpoint and the seed (keys of a backtest's metrics).
SELECTION_METRICS = ("sharpe", "sortino", "calmar", "total_return", "annualized_return")
# A symbol names files (samples, lake partitions) and models, so it is a ticker as yfinance spells
# them (GSPC, ^GSPC, BRK-B, BTC-USD, EURUSD=X) and never a path: no '/', '\\', '..', spaces or
# empty. The one pattern for the DAG Params (JSON Schema), the CLI, the config and the data sources.
SYMBOL_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9^][A-Za-z0-9._=^-]{0,31}$"
SYMBOL_RULE = "must be a ticker: 1 to 32 letters, digits or ^ . _ = - (no '..', no path)"
# A registered model name that may also name a folder: no separators, no leading dot.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.=-]{0,199}$"


class ConfigError(ValueError):
    pass


def first_line(error: BaseException) -> str:
    """An error's first line (at most 300 characters): enough to act on, never a traceback or a file's text."""
    text = str(error).strip()
    return (text.splitlines() or [type(error).__name__])[0][:300]


def is_symbol(value: Any) -> bool:
    """True for a ticker that :data:`SYMBOL_PATTERN` accepts (the whole string, no trailing newline)."""
    return isinstance(value, str) and re.fullmatch(SYMBOL_PATTERN, value) is not None


def _setting(default: Any, check: Callable[[Any], bool] | None = None, rule: str = "",
             choices: tuple | None = None) -> Any:
    """A field with a default and the rule its value must follow (checked when a config is loaded)."""
    if choices is not None:
        check, rule = (lambda value: value in choices), f"must be one of {list(choices)}"
    return field(default=default, metadata={"check": check, "rule": rule})


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda value: value is None or value >= low), f"must be >= {low:g}"


def _between(low: float, high: float, low_open: bool = False) -> tuple[Callable[[Any], bool], str]:
    opening = "(" if low_open else "["
    return ((lambda value: (low < value if low_open else low <= value) and value <= high),
            f"must be in {opening}{low:g}, {high:g}]")


@dataclass(frozen=True)
class DataConfig:
    source: str = _setting("sample", choices=SOURCES)
    symbol: str = _setting("GSPC", is_symbol, SYMBOL_RULE)
    # Two or more: portfolio mode over these (with action.mode: portfolio).
    symbols: tuple[str, ...] = _setting((), lambda v: all(map(is_symbol, v)), f"each symbol {SYMBOL_RULE}")
    # The symbols a scheduled run retrains, one model each (the DAG maps one training per symbol).
    universe: tuple[str, ...] = _setting((), lambda v: all(map(is_symbol, v)) and len(set(v)) == len(v),
                                         f"each symbol once, each {SYMBOL_RULE}")
    interval: str = _setting("1d", choices=INTERVALS)
    path: str | None = None  # the file for source=file; the lake root for source=lake
    start: str | None = None
    end: str | None = None
    auto_adjust: bool = True  # yfinance: adjusted prices (recorded with the data)
    calendar: str = _setting("equity", choices=CALENDARS)  # for annualization


@dataclass(frozen=True)
class CostConfig:
    commission_bps: float = _setting(1.0, *_at_least(0))  # fee on traded notional
    half_spread_bps: float = _setting(1.0, *_at_least(0))  # half the bid/ask spread, paid on every trade
    slippage_bps: float = _setting(1.0, *_at_least(0))  # adverse price impact, paid on every trade
    borrow_bps_per_year: float = _setting(0.0, *_at_least(0))  # charged per bar on short notional

    @property
    def price_impact(self) -> float:
        """Fraction by which the fill price is worse than the reference price."""
        return (self.half_spread_bps + self.slippage_bps) * 1e-4


@dataclass(frozen=True)
class EnvConfig:
    episode_bars: int = _setting(256, *_at_least(1))  # truncation limit during training
    ruin_fraction: float = _setting(0.5, *_between(0, 1))  # terminate when NAV falls below this share of the start
    periods_per_year: float = _setting(252.0, lambda v: v > 0, "must be > 0")  # for the borrow cost per bar
    compile: bool = False  # fuse the accounting with torch.compile (pays a one-off compile, ~30 s on CPU)
    # Reward shaping, added to the log-NAV reward and reported term by term (0 = off):
    drawdown_penalty: float = _setting(0.0, *_at_least(0))  # x fall of NAV below the episode's peak
    volatility_penalty: float = _setting(0.0, *_at_least(0))  # x squared log return of the step
    turnover_penalty: float = _setting(0.0, *_at_least(0))  # x traded notional over NAV


@dataclass(frozen=True)
class ActionConfig:
    """What the policy decides: one of the exposure levels, any exposure in a range, or portfolio weights."""

    mode: str = _setting("discrete", choices=ACTION_MODES)
    exposure_levels: tuple[float, ...] = _setting(
        (-1.0, -0.5, 0.0, 0.5, 1.0), lambda v: len(v) > 0 and all(-1 <= x <= 1 for x in v),
        "must be non-empty, each level in [-1, 1]")
    min_exposure: float = _setting(-1.0, *_between(-1, 1))  # 0.0 = long-only (levels below are masked)
    max_exposure: float = _setting(1.0, *_between(-1, 1))
    # A deterministic policy whose decisions are (nearly) all the same this often has collapsed:
    # the training alarm, the evaluation's collapse check and the gate's no-collapse rule read it.
    collapse_share: float = _setting(0.98, *_between(0, 1, low_open=True))
    # "strategies": at each bar the policy picks one of these rules, whose exposure (clamped into
    # [min_exposure, max_exposure]) becomes the target.
    strategies: tuple[str, ...] = _setting(
        STRATEGIES, lambda v: len(v) >= 2 and len(set(v)) == len(v) and set(v) <= set(STRATEGIES),
        f"must list two or more distinct rules of {list(STRATEGIES)}")

    @property
    def one_asset(self) -> bool:
        """The policy trades one asset (exposure levels, continuous exposure or a rule), not portfolio weights."""
        return self.mode != "portfolio"

    @property
    def selects_strategies(self) -> bool:
        """The policy picks a rule strategy at each bar: the features carry the rules' exposures."""
        return self.mode == "strategies"


@dataclass(frozen=True)
class PPOConfig:
    total_timesteps: int = _setting(500_000, *_at_least(1))
    num_envs: int = _setting(512, *_at_least(1))
    num_steps: int = _setting(64, *_at_least(1))  # rollout length per update
    learning_rate: float = _setting(3e-4, lambda v: v > 0, "must be > 0")
    anneal_lr: bool = True
    gamma: float = _setting(0.99, *_between(0, 1, low_open=True))
    gae_lambda: float = _setting(0.95, *_between(0, 1))
    num_minibatches: int = _setting(4, *_at_least(1))
    update_epochs: int = _setting(4, *_at_least(1))
    norm_adv: bool = True
    clip_coef: float = _setting(0.2, lambda v: v > 0, "must be > 0")
    clip_vloss: bool = True
    ent_coef: float = _setting(0.01, *_at_least(0))  # entropy bonus at the start ...
    ent_coef_final: float = _setting(0.002, *_at_least(0))  # ... annealed linearly to this
    vf_coef: float = _setting(0.5, *_at_least(0))
    max_grad_norm: float = _setting(0.5, lambda v: v > 0, "must be > 0")
    target_kl: float | None = _setting(0.05, lambda v: v is None or v > 0, "must be > 0 or null")
    reward_scale: float = _setting(100.0, lambda v: v > 0, "must be > 0")  # log returns are ~1e-2; for the value loss
    hidden: tuple[int, ...] = _setting((64, 64), lambda v: len(v) > 0 and all(x >= 1 for x in v),
                                       "must be non-empty, each width >= 1")
    # "conv" / "attention": the features add the last encoder_window one-bar log returns, which a 1-D
    # convolution / a one-layer transformer reads as a sequence before the MLP; "mlp": the summary
    # features alone.
    encoder: str = _setting("mlp", choices=ENCODERS)
    # The window of one-bar returns the encoder and the regime filter read: at most the 60 the features hold.
    encoder_window: int = _setting(32, *_between(16, 60))
    encoder_channels: int = _setting(8, *_at_least(1))
    # 0: the critic predicts the mean return. N >= 2: N quantiles of it (quantile regression), and the
    # value that bootstraps the advantages is (1 - cvar_weight) * mean + cvar_weight * CVaR at cvar_alpha.
    critic_quantiles: int = _setting(0, lambda v: v == 0 or 2 <= v <= 256, "must be 0 (mean critic) or 2..256")
    cvar_alpha: float = _setting(0.1, *_between(0, 1, low_open=True))
    cvar_weight: float = _setting(0.0, *_between(0, 1))
    # K >= 2: the policy also sees the filtered probabilities of a K-state Markov-switching model of
    # returns fitted on each fold's training bars (ml.agent.regime); 0: no regime features.
    regime_states: int = _setting(0, lambda v: v == 0 or 2 <= v <= 4, "must be 0 (off) or 2..4")
    eval_every: int = _setting(4, *_at_least(1))  # updates between validation scores
    checkpoint_every: int = _setting(5, *_at_least(1))  # updates between resumable checkpoints
    progress: bool = True
    seed: int = _setting(1, *_at_least(0))
    device: str = _setting("auto", choices=DEVICES)
    # Intra-op CPU threads for this training (None = the task's share of the cores the process may
    # use: those cores divided by the training tasks its worker may run at once).
    threads: int | None = _setting(None, *_at_least(1))
    deterministic: bool = False

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return max(1, self.total_timesteps // self.batch_size)


@dataclass(frozen=True)
class SplitConfig:
    n_folds: int | None = _setting(None, *_at_least(1))  # None = every fold that fits, back to the start
    test_months: int = _setting(12, *_at_least(1))
    validation_months: int = _setting(12, *_at_least(1))
    train_months: int | None = _setting(None, *_at_least(1))  # None = expanding window from the first usable bar
    purge_bars: int | None = _setting(None, *_at_least(0))  # None = lookback + 1 (window + one-bar fill horizon)
    embargo_bars: int = _setting(5, *_at_least(0))
    min_train_bars: int = _setting(500, *_at_least(1))
    # walkforward: the folds above. cpcv: the same folds (they give the exported model and feed the
    # gate), plus one policy per combinatorial purged CV split, reported under the report's `cpcv`.
    method: str = _setting("walkforward", choices=("walkforward", "cpcv"))
    n_groups: int = _setting(6, *_at_least(3))  # cpcv: consecutive groups of bars ...
    n_test_groups: int = _setting(2, *_at_least(1))  # ... of which every choice of this many is tested

    def __post_init__(self):
        # Besides the test groups, each split holds one group out for validation and trains on the rest.
        if self.n_test_groups > self.n_groups - 2:
            raise ConfigError(f"splits.n_test_groups = {self.n_test_groups}: must be at most splits.n_groups - 2 "
                              f"({self.n_groups - 2}), leaving a validation group and a train group")


@dataclass(frozen=True)
class GateConfig:
    """The promotion policy: every enabled rule must pass for a version to become `champion`."""

    parity_tolerance: float = _setting(1e-5, lambda v: v > 0, "must be > 0")  # max |onnxruntime - torch|
    parity_windows: int = _setting(256, *_at_least(1))
    require_no_collapse: bool = True  # refuse a policy whose test decisions collapsed (action.collapse_share)
    require_beats_cash: bool = True  # mean test total return after costs must exceed cash ...
    cash_margin: float = 0.0  # ... by this much
    compare_with_champion: bool = True  # when a champion exists, beat it on bars neither trained on ...
    champion_margin: float = 0.0  # ... by this much Sharpe ...
    # ... at this one-sided confidence (paired block bootstrap of the Sharpe difference)
    champion_confidence: float = _setting(0.9, *_between(0.5, 0.999))
    # A run that trained fewer environment steps than this in any fold is never promoted.
    min_timesteps: int = _setting(100_000, *_at_least(0))
    require_learned: bool = True  # on validation, beat the random policy and cash in most folds
    # Beat the benchmark (buy-and-hold, equal weight for a portfolio) after costs over every test bar:
    # the probabilistic Sharpe ratio of the active return must reach this (None = off).
    benchmark_psr: float | None = _setting(0.95, *_between(0.5, 0.999))
    max_pbo: float | None = _setting(0.5, *_between(0, 1))  # probability of backtest overfitting below this
    # The edge over the benchmark and cash survives the same decisions at this multiple of the costs.
    cost_multiple: float | None = _setting(2.0, choices=(1.0, 2.0, 5.0))


def _is_timezone(name: Any) -> bool:
    import zoneinfo
    try:
        zoneinfo.ZoneInfo(name)
        return True
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False


@dataclass(frozen=True)
class RiskConfig:
    """Limits between the policy's target and the fill, applied on every bar from what is known then.

    The same overlay runs in training, in every backtest and baseline replay and inside the
    exported model. A rule set to null (or 0 / false) is off; with every rule off nothing runs.
    """

    # Volatility targeting: a full target (gross 1) is scaled so that its trailing realized volatility
    # (annualized) is this; a target of 0.5 runs at half of it.
    target_volatility: float | None = _setting(None, *_between(0, 5, low_open=True))
    volatility_window: int = _setting(20, *_at_least(2))  # bars of log returns behind the volatility and Kelly estimates
    max_leverage: float = _setting(1.0, *_between(0, 10, low_open=True))  # gross exposure cap after the scaling
    # Drawdown breaker: once NAV is this far below its peak, gross exposure is capped at
    # drawdown_exposure for drawdown_cooldown_bars decisions; then it re-arms, the peak reset to that NAV.
    max_drawdown: float | None = _setting(None, *_between(0, 1, low_open=True))
    drawdown_exposure: float = _setting(0.0, *_between(0, 10))
    drawdown_cooldown_bars: int = _setting(20, *_at_least(1))
    # Loss limit per session (a trading day): flat for the rest of the session once the session's
    # loss reaches this, and for session_loss_cooldown sessions more.
    session_loss_limit: float | None = _setting(None, *_between(0, 1, low_open=True))
    session_loss_cooldown: int = _setting(0, *_at_least(0))
    # Stop-loss per asset: close it when its price moved this far against the position from the
    # fill that opened it; stay out of it for stop_cooldown_bars decisions.
    stop_loss: float | None = _setting(None, *_between(0, 1, low_open=True))
    stop_cooldown_bars: int = _setting(5, *_at_least(1))
    # Kelly cap: no asset's exposure above this fraction of its trailing Kelly leverage (mean / variance).
    kelly_fraction: float | None = _setting(None, *_between(0, 1, low_open=True))
    # Intraday session rules: hold nothing through the session's last bar; only reduce positions
    # in its last N bars. Sessions end at session_close in session_timezone.
    flat_at_session_close: bool = False
    no_new_positions_bars: int = _setting(0, *_at_least(0))
    session_timezone: str = _setting("America/New_York", _is_timezone, "must be an IANA time zone (e.g. America/New_York)")
    session_close: str = _setting("16:00", lambda v: re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", v) is not None,
                                  "must be a time HH:MM")

    @property
    def enabled(self) -> bool:
        return any((self.target_volatility, self.max_leverage != 1.0, self.max_drawdown, self.session_loss_limit,
                    self.stop_loss, self.kelly_fraction, self.flat_at_session_close, self.no_new_positions_bars))


@dataclass(frozen=True)
class RegistryConfig:
    model_name: str | None = None  # default: ppo_<symbol>_<interval> (ppo_<sym1>_<sym2>_... for a portfolio)
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else a SQLite store in the output dir
    artifact_root: str | None = None  # default: next to a SQLite store
    experiment: str = "ppo_training"
    promote: bool = True  # set `champion` when the gate passes


@dataclass(frozen=True)
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    lookback: int = _setting(64, *_at_least(2))
    selection_metric: str = _setting("sharpe", choices=SELECTION_METRICS)  # picks the checkpoint (and the seed)
    seeds: tuple[int, ...] = _setting((1,), lambda v: len(v) > 0 and all(s >= 0 for s in v),
                                      "must list at least one seed, each >= 0")
    costs: CostConfig = field(default_factory=CostConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    action: ActionConfig = field(default_factory=ActionConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    splits: SplitConfig = field(default_factory=SplitConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    risk: RiskConfig = field(default_factory=RiskConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)

    @property
    def symbols(self) -> tuple[str, ...]:
        """The assets traded, in the order of the asset axis: one for a single-asset run."""
        return self.data.symbols or (self.data.symbol,)

    @property
    def return_window(self) -> int:
        """One-bar log returns the features append for a temporal encoder or the regime filter (0: neither)."""
        return self.ppo.encoder_window if self.ppo.encoder != "mlp" or self.ppo.regime_states else 0

    @property
    def model_name(self) -> str:
        return self.registry.model_name or f"ppo_{'_'.join(self.symbols)}_{self.data.interval}".replace("^", "")

    def check(self) -> "PipelineConfig":
        """Refuse combinations that cannot run, naming the fields."""
        symbols, action = self.data.symbols, self.action
        if len(set(action.exposure_levels)) != len(action.exposure_levels):
            raise ConfigError(f"action.exposure_levels = {list(action.exposure_levels)}: "
                              "each exposure level must appear once")
        if action.min_exposure > action.max_exposure:
            raise ConfigError(f"action.min_exposure = {action.min_exposure}: must be <= action.max_exposure "
                              f"({action.max_exposure})")
        if action.mode == "discrete" and not any(action.min_exposure - 1e-9 <= level <= action.max_exposure + 1e-9
                                                 for level in action.exposure_levels):
            raise ConfigError(f"action.exposure_levels = {list(action.exposure_levels)}: no level inside "
                              f"[{action.min_exposure}, {action.max_exposure}] (action.min_exposure/max_exposure)")
        if symbols and len(set(symbols)) < 2:
            raise ConfigError(f"data.symbols = {list(symbols)}: portfolio mode needs at least two distinct symbols")
        if symbols and action.mode != "portfolio":
            raise ConfigError(f"data.symbols lists a portfolio {list(symbols)}: set action.mode: portfolio "
                              f"(got '{action.mode}')")
        if action.mode == "portfolio" and not symbols:
            raise ConfigError("action.mode = portfolio: needs data.symbols (two or more)")
        if action.mode == "portfolio" and self.ppo.encoder != "mlp":
            raise ConfigError(f"ppo.encoder = {self.ppo.encoder}: temporal encoders read one asset's returns; "
                              "portfolio mode takes ppo.encoder: mlp")
        if action.mode == "portfolio" and self.ppo.regime_states:
            raise ConfigError(f"ppo.regime_states = {self.ppo.regime_states}: the regime model reads one asset's "
                              "returns; portfolio mode takes ppo.regime_states: 0")
        if self.ppo.cvar_weight and not self.ppo.critic_quantiles:
            raise ConfigError(f"ppo.cvar_weight = {self.ppo.cvar_weight}: CVaR needs the return's distribution; "
                              "set ppo.critic_quantiles (e.g. 32)")
        risk = self.risk
        if (risk.target_volatility or risk.kelly_fraction) and risk.volatility_window >= self.lookback:
            raise ConfigError(f"risk.volatility_window = {risk.volatility_window}: must be below lookback "
                              f"({self.lookback}), the window the exported model receives")
        if (risk.flat_at_session_close or risk.no_new_positions_bars) and self.data.interval not in INTRADAY:
            raise ConfigError(f"risk.flat_at_session_close / risk.no_new_positions_bars: session rules need "
                              f"intraday bars (data.interval = {self.data.interval})")
        if self.data.universe and (symbols or (self.registry.model_name and len(self.data.universe) > 1)):
            raise ConfigError("data.universe: one model per symbol; it cannot be combined with "
                              + ("data.symbols (a portfolio is one model)" if symbols else
                                 f"registry.model_name = {self.registry.model_name} (one name for many models)"))
        if symbols and self.data.source == "file":
            raise ConfigError("data.symbols: portfolio mode reads sample, lake or yfinance data, "
                              "not a single file (data.source: file)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Settings that moved section; a file that still uses the old place is told the new one.
MOVED = {"ppo.action_mode": "action.mode", "ppo.exposure_levels": "action.exposure_levels",
         "ppo.min_exposure": "action.min_exposure", "ppo.max_exposure": "action.max_exposure",
         "ppo.collapse_share": "action.collapse_share"}


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """``value`` as the field's type, or a ConfigError naming the field, the value and the type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} = {value!r}: must be a list")
        return tuple(_coerce(item, args[0], f"{path}[{i}]") for i, item in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} = {value!r}: must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} = {value!r}: must be a whole number")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{path} = {value!r}: must be a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} = {value!r}: must be a string")
        return value
    raise TypeError(f"{path}: no loader for type {hint}")


# What an unknown key must look like to be named in the error: a mistyped field name. Anything
# else (a whole line of some other file parsed as a key) is refused without being echoed.
_KEY_SHOWN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")


def _build(cls, values: Any, where: str):
    if not isinstance(values, dict):  # the type only: the value may be any file's content
        raise ConfigError(f"{where or 'config'}: must be a mapping of fields, got a {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    known = f"known in {where or 'the top level'}: {sorted(fields)}"
    for name in values:
        path = f"{where}.{name}" if where else str(name)
        if path in MOVED:
            raise ConfigError(f"{path}: this setting is now {MOVED[path]}")
        if name not in fields:
            if not (isinstance(name, str) and _KEY_SHOWN.fullmatch(name)):
                raise ConfigError(f"{where or 'the top level'}: a key that is not a config field name ({known})")
            raise ConfigError(f"{path}: unknown config field ({known})")
    kwargs = {}
    for name, value in values.items():
        hint, path = hints[name], f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, path)
            continue
        given, value = value, _coerce(value, hint, path)
        check, rule = fields[name].metadata.get("check"), fields[name].metadata.get("rule")
        if check is not None and value is not None and not check(value):
            raise ConfigError(f"{path} = {given}: {rule}")
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
    """Defaults, then the file, then ``overrides``; checked before anything runs.

    Errors name the file, fields and rules, never the file's text: an unknown key is named only
    when it looks like a field name, and a file that is not a mapping is refused by its type.
    """
    return config_from_dict(merge(read_config_file(path), overrides or {}))


def read_config_file(path: str | Path | None) -> dict:
    """The settings a config file names (nothing for no file), unchecked: merge, then ``config_from_dict``."""
    values: dict = {}
    if path:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config ({exc.strerror or type(exc).__name__})") from exc
        except yaml.YAMLError as exc:
            # The line number only, and no chained exception: YAML errors quote the text around
            # the problem, and a traceback would print it.
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML/JSON{where}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: must hold a mapping of config sections, got a {type(values).__name__}")
    return values

