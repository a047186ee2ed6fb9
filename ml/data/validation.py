"""The data quality gate: Great Expectations suites over normalized bars.

Rules that need more than one row (jumps, gaps, stale prices, future bars)
are computed here as derived columns, and GX judges those columns, so every
rule is an expectation with a name, a threshold and example rows. The suites
are defined in code, written once into the committed GX file context under
``great_expectations/`` (``python -m ml data build-suites``) and only read at
run time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ml.data.schema import BAR_COLUMNS

# great_expectations is imported inside the functions that use it: it takes seconds to import,
# and the lake, the CLI and serving read this module's rules and results without running GX.

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

GX_ROOT = Path(os.environ.get("ML_GX_ROOT", Path(__file__).resolve().parents[2] / "great_expectations"))
SUITE_OHLCV, SUITE_CLOSE_ONLY = "bars_ohlcv", "bars_close_only"
DAILY_INTERVALS = ("1d", "5d", "1wk", "1mo", "3mo")
CALENDARS = ("equity", "crypto")


@dataclass(frozen=True)
class ValidationConfig:
    """Thresholds of the gate. How gaps are counted depends on the interval family:

    * daily and longer: missing sessions, in business days (``equity``) or
      calendar days (``crypto``: trades every day; FX daily bars also fit,
      a weekend being two missing days); at most ``max_gap_sessions``.
    * intraday ``crypto``: one continuous series; at most ``max_gap_bars``
      missing bars anywhere.
    * intraday ``equity``: counted within a session (one UTC date, which holds
      a whole session for the US, European and most Asian exchanges): at most
      ``max_gap_bars`` missing bars. Between sessions, up to
      ``max_gap_sessions`` missing business days pass (holidays are not in the
      business-day calendar); a longer hole counts as all the bars it lacks.

    ``max_gap_bars`` None: a hole must be shorter than an hour (0 missing
    1h bars, 11 missing 5m bars, 59 missing 1m bars).
    """

    max_abs_log_return: float = 1.0  # one-bar |log return| above this is an abnormal jump (x100 glitch: 4.6)
    max_gap_sessions: int = 5  # missing sessions (daily bars; whole sessions of intraday equity bars)
    max_stale_bars: int = 10  # longest run of identical closes
    calendar: str = "equity"  # equity: sessions on business days; crypto: continuous
    max_gap_bars: int | None = None  # missing intraday bars; None: less than an hour's worth

    def __post_init__(self):
        if self.calendar not in CALENDARS:
            raise ValueError(f"unknown calendar '{self.calendar}' (expected one of {CALENDARS})")

    def gap_limit(self, interval: str) -> int:
        """The most missing units the gap rule allows for bars of this interval."""
        if interval in DAILY_INTERVALS:
            return self.max_gap_sessions
        if self.max_gap_bars is not None:
            return self.max_gap_bars
        return max(int(3600 // interval_seconds(interval)) - 1, 0)


def interval_seconds(interval: str) -> float:
    """Length of an intraday bar: '5m' -> 300, '1h' -> 3600 (yfinance spellings)."""
    return pd.Timedelta(interval.replace("m", "min") if interval.endswith("m") else interval).total_seconds()


class DataValidationError(ValueError):
    """Raised when a batch fails the gate; ``result`` holds every failed rule."""

    def __init__(self, result: "ValidationResult"):
        super().__init__(result.describe())
        self.result = result


@dataclass
class RuleResult:
    rule: str
    success: bool
    unexpected_count: int = 0
    examples: list[dict] = field(default_factory=list)


@dataclass
class ValidationResult:
    origin: str
    suite: str
    rows: int
    rules: list[RuleResult]

    @property
    def success(self) -> bool:
        return all(r.success for r in self.rules)

    @property
    def failed(self) -> list[RuleResult]:
        return [r for r in self.rules if not r.success]

    def describe(self) -> str:
        if self.success:
            return f"{self.origin}: {self.rows} bars passed {len(self.rules)} rules of suite '{self.suite}'"
        lines = [f"{self.origin}: {len(self.failed)} of {len(self.rules)} rules of suite '{self.suite}' failed"]
        for rule in self.failed:
            lines.append(f"  - {rule.rule}: {rule.unexpected_count} bad row(s); e.g. {rule.examples[:3]}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"origin": self.origin, "suite": self.suite, "rows": self.rows, "success": self.success,
                "rules": [r.__dict__ for r in self.rules]}


def _rules(close_only: bool) -> list[tuple[str, object]]:
    import great_expectations.expectations as gxe

    rules: list[tuple[str, object]] = [
        ("columns match the bar schema", gxe.ExpectTableColumnsToMatchSet(column_set=list(BAR_COLUMNS) + [
            "abs_log_return", "future_seconds", "gap_sessions", "stale_run"], exact_match=True)),
        ("symbol is a string", gxe.ExpectColumnValuesToBeOfType(column="symbol", type_="str")),
        *[(f"{field} is float64", gxe.ExpectColumnValuesToBeOfType(column=field, type_="float64"))
          for field in ("open", "high", "low", "close", "volume")],
        ("timestamp not null", gxe.ExpectColumnValuesToNotBeNull(column="timestamp")),
        ("timestamps unique", gxe.ExpectColumnValuesToBeUnique(column="timestamp")),
        ("timestamps increasing", gxe.ExpectColumnValuesToBeIncreasing(column="timestamp", strictly=True)),
        ("no timestamps in the future", gxe.ExpectColumnValuesToBeBetween(column="future_seconds", max_value=0)),
        ("close not null", gxe.ExpectColumnValuesToNotBeNull(column="close")),
        ("close strictly positive", gxe.ExpectColumnValuesToBeBetween(column="close", min_value=0, strict_min=True)),
        ("no abnormal one-bar jump", gxe.ExpectColumnValuesToBeBetween(
            column="abs_log_return", max_value={"$PARAMETER": "max_abs_log_return"})),
        ("no gap longer than allowed", gxe.ExpectColumnValuesToBeBetween(
            column="gap_sessions", max_value={"$PARAMETER": "max_gap_sessions"})),
        ("no stale run of identical prices", gxe.ExpectColumnValuesToBeBetween(
            column="stale_run", max_value={"$PARAMETER": "max_stale_bars"})),
        ("volume non-negative", gxe.ExpectColumnValuesToBeBetween(column="volume", min_value=0)),
    ]
    if not close_only:
        for price in ("open", "high", "low"):
            rules.append((f"{price} not null", gxe.ExpectColumnValuesToNotBeNull(column=price)))
            rules.append((f"{price} strictly positive", gxe.ExpectColumnValuesToBeBetween(
                column=price, min_value=0, strict_min=True)))
        for a, b in (("high", "open"), ("high", "close"), ("open", "low"), ("close", "low")):
            rules.append((f"{a} >= {b}", gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A=a, column_B=b, or_equal=True)))
    for name, expectation in rules:
        expectation.meta = {"rule": name}
    return rules


def suite_definitions() -> dict:
    import great_expectations as gx

    suites = {}
    for name, close_only in ((SUITE_OHLCV, False), (SUITE_CLOSE_ONLY, True)):
        suite = gx.ExpectationSuite(name=name)
        for _rule, expectation in _rules(close_only):
            suite.add_expectation(expectation)
        suites[name] = suite
    return suites


def build_suites(root: Path = GX_ROOT) -> list[Path]:
    """Write the suites into the GX file context (run once; the result is committed)."""
    import great_expectations as gx

    context = gx.get_context(mode="file", project_root_dir=str(root))
    written = []
    for name, suite in suite_definitions().items():
        try:
            context.suites.delete(name)
        except Exception:  # absent on first build
            pass
        context.suites.add(suite)
        written.append(root / "gx" / "expectations" / f"{name}.json")
    return written


def load_suite(name: str, root: Path = GX_ROOT):
    """Read a committed suite without touching the file context (safe from parallel tasks)."""
    import great_expectations as gx

    path = root / "gx" / "expectations" / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: expectation suite missing; run `python -m ml data build-suites`")
    data = json.loads(path.read_text())
    return gx.ExpectationSuite(name=data["name"], expectations=data["expectations"], meta=data.get("meta"))


def rule_columns(bars: pd.DataFrame, config: ValidationConfig) -> pd.DataFrame:
    """The bars plus the derived columns the multi-row rules are judged on."""
    frame = bars.copy()
    close = frame["close"].astype("float64")
    with np.errstate(divide="ignore", invalid="ignore"):
        log_return = np.log(close / close.shift(1)).abs()
    frame["abs_log_return"] = log_return.replace([np.inf], np.nan).fillna(0.0)
    now = pd.Timestamp.now(tz="UTC")
    frame["future_seconds"] = (frame["timestamp"] - now).dt.total_seconds()
    frame["gap_sessions"] = _gap_sessions(frame["timestamp"], str(frame["interval"].iloc[0]), config)
    same = close.diff().eq(0)
    run_id = (~same).cumsum()
    frame["stale_run"] = same.groupby(run_id).cumsum() + 1
    return frame


def _gap_sessions(timestamps: pd.Series, interval: str, config: ValidationConfig) -> np.ndarray:
    """Sessions (daily) or bars (intraday) missing before each timestamp; 0 when none.

    See ValidationConfig for how each interval family and calendar counts.
    """
    gaps = np.zeros(len(timestamps))
    if len(timestamps) < 2:
        return gaps
    values = timestamps.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy()
    days = values.astype("datetime64[D]")
    if interval in DAILY_INTERVALS:
        step = {"1d": 1, "5d": 5, "1wk": 5, "1mo": 21, "3mo": 63}[interval]
        if config.calendar == "equity":
            missing = np.busday_count(days[:-1], days[1:]) - step
        else:
            missing = (days[1:] - days[:-1]).astype("int64") - step
        # Weekly/monthly bars land on varying weekdays: allow one step of slack.
        gaps[1:] = np.maximum(missing, 0) / step if step > 1 else np.maximum(missing, 0)
        return gaps
    seconds = interval_seconds(interval)
    elapsed = (values[1:] - values[:-1]).astype("timedelta64[s]").astype("int64")
    missing = np.maximum(np.round(elapsed / seconds) - 1, 0)
    if config.calendar == "equity":
        # Overnight and weekend pauses are not gaps; whole missing sessions are, beyond the
        # holiday allowance, and then count as every bar a session would have had.
        new_session = days[1:] != days[:-1]
        missing_days = np.maximum(np.busday_count(days[:-1], days[1:]) - 1, 0)
        _, bars_per_day = np.unique(days, return_counts=True)
        per_session = float(np.median(bars_per_day))
        long_hole = missing_days > config.max_gap_sessions
        missing = np.where(new_session, np.where(long_hole, missing_days * per_session, 0), missing)
    gaps[1:] = missing
    return gaps


def validate_bars(bars: pd.DataFrame, origin: str, config: ValidationConfig = ValidationConfig(),
                  root: Path = GX_ROOT) -> ValidationResult:
    """Run the suite that fits the data (OHLCV or close-only) and collect failed rules."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    suite_name = SUITE_OHLCV if bars[["open", "high", "low"]].notna().any(axis=None) else SUITE_CLOSE_ONLY
    suite = load_suite(suite_name, root)
    frame = rule_columns(bars, config)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (context.data_sources.add_pandas("bars").add_dataframe_asset("bars")
             .add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": frame}))
    outcome = batch.validate(suite, result_format="COMPLETE", expectation_parameters={
        "max_abs_log_return": config.max_abs_log_return,
        # One suite for every interval: the limit is resolved here for this interval family.
        "max_gap_sessions": config.gap_limit(str(bars["interval"].iloc[0])),
        "max_stale_bars": config.max_stale_bars,
    })
    rules = []
    for result in outcome.results:
        rule = result.expectation_config.meta.get("rule", result.expectation_config.type)
        indexes = (result.result or {}).get("unexpected_index_list") or []
        examples = []
        for index in list(indexes)[:5]:
            row = frame.loc[index] if not isinstance(index, dict) else frame.loc[next(iter(index.values()))]
            examples.append({"row": int(row.name), "timestamp": str(row["timestamp"]),
                             **{k: _plain(row[k]) for k in _example_columns(rule)}})
        if result.exception_info and result.exception_info.get("raised_exception"):
            examples.append({"error": result.exception_info.get("exception_message")})
        rules.append(RuleResult(rule=rule, success=bool(result.success),
                                unexpected_count=int((result.result or {}).get("unexpected_count") or 0),
                                examples=examples))
    return ValidationResult(origin=origin, suite=suite_name, rows=len(bars), rules=rules)


def _example_columns(rule: str) -> list[str]:
    named = [c for c in ("open", "high", "low", "close", "volume") if c in rule]
    derived = {"jump": "abs_log_return", "gap": "gap_sessions", "stale": "stale_run", "future": "future_seconds"}
    named += [column for word, column in derived.items() if word in rule]
    return named or ["close"]


def _plain(value):
    if isinstance(value, (np.floating, float)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    return str(value)


def require_valid(bars: pd.DataFrame, origin: str, config: ValidationConfig = ValidationConfig()) -> ValidationResult:
    result = validate_bars(bars, origin, config)
    if not result.success:
        raise DataValidationError(result)
    return result
