"""Paper trading of a champion on every new curated bar, with the accounting of training.

On each bar t the exported model (``ml.serving.Policy``, as a downstream service runs it) decides
from the window of bars up to t, the book held at t's close and, with a risk overlay, the NAV,
session and the overlay's state; the target fills at bar t+1's open (the next close for a
close-only series) through ``ml.env.trading_env.settle``, the function every backtest fills
with, at the costs of the model's training config. So the ledger of a champion is the offline
backtest of the same model on the same bars.

A segment starts at the last bar the champion's training data held (its first decision fills
on the first bar it never saw), flat at NAV 1; a run trades every bar since the ledger's last one.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ml.config import MODEL_NAME_PATTERN, PipelineConfig, config_from_dict
from ml.data.sources import load_bars
from ml.env.action_space import ActionSpace, make_action_space
from ml.env.trading_env import BPS, settle
from ml.forward.ledger import BarRow, Ledger, Segment, iso
from ml.market.calendar import periods_per_year
from ml.market.series import MarketSeries, prepare_series
from ml.release import registry
from ml.release.tracking import store_client
from ml.serving import InputError, Policy

log = logging.getLogger(__name__)


class ForwardError(RuntimeError):
    """The forward test cannot go on for a model: the message names the model, bar and rule."""


@dataclass
class Champion:
    """The model behind ``models:/NAME@champion`` and what its training run recorded."""

    model_name: str
    version: str
    run_id: str
    tracking_uri: str
    policy: Policy
    config: PipelineConfig
    data_last: str  # the last bar of its training data (ISO 8601, UTC)
    report_dir: Path  # the training run's report/ artifacts: report.json, fold_*_test_equity.csv, ...

    @property
    def action_space(self) -> ActionSpace:
        return make_action_space(self.config.action, len(self.config.symbols))

    @property
    def periods_per_year(self) -> float:
        return periods_per_year(self.config.data.interval, self.config.data.calendar)


def check_model_name(model_name: str) -> str:
    if not isinstance(model_name, str) or not re.fullmatch(MODEL_NAME_PATTERN, model_name):
        raise ForwardError(f"model name {model_name!r}: letters, digits, '_', '.', '=' and '-' only, "
                           "starting with a letter or digit (e.g. ppo_GSPC_1d)")
    return model_name


def load_champion(tracking_uri: str, model_name: str, workdir: Path) -> Champion | None:
    """The current champion with its training run's report artifacts; None when there is none."""
    check_model_name(model_name)
    version = registry.alias_version(tracking_uri, model_name, registry.CHAMPION)
    if version is None:
        return None
    client = store_client(tracking_uri)
    run_id = client.get_model_version(model_name, version).run_id
    folder = Path(workdir) / f"{model_name}_v{version}"
    folder.mkdir(parents=True, exist_ok=True)
    report_dir = Path(client.download_artifacts(run_id, "report", str(folder)))
    config = config_from_dict(_read_json(report_dir / "config.json"))
    policy = Policy(registry.download_model(tracking_uri, model_name, version), prefer_gpu=False)
    return Champion(model_name, version, run_id, tracking_uri, policy, config,
                    iso(_read_json(report_dir / "data.json")["last"]), report_dir)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def lake_series(config: PipelineConfig, lake_root: str | None) -> MarketSeries:
    """The curated bars of the model's symbols, aligned and featurized as training did."""
    frames = {symbol: load_bars("lake", symbol=symbol, interval=config.data.interval, path=lake_root,
                                start=config.data.start)
              for symbol in config.symbols}
    return prepare_series(frames, config.lookback, torch.device("cpu"), config.return_window,
                          config.action.selects_strategies)


class PaperAccount:
    """Fills and marks one account with the training environment's accounting."""

    def __init__(self, champion: Champion, series: MarketSeries):
        costs = champion.config.costs
        self.impact, self.commission = costs.price_impact, costs.commission_bps * BPS
        self.borrow_per_bar = costs.borrow_bps_per_year * BPS / champion.periods_per_year
        ohlcv = series.ohlcv.double()
        self.close = ohlcv[:, :, 3]
        self.reference = torch.where(series.fill_at_open, ohlcv[:, :, 0], ohlcv[:, :, 3])
        self.space = champion.action_space

    def fill(self, previous: BarRow, t: int) -> dict:
        """The previous bar's executed target filled at bar t, the book marked at t's close."""
        as_row = lambda values: torch.tensor([values], dtype=torch.float64)  # noqa: E731
        target = as_row(previous.executed)
        cash, units, nav, cost, traded, _ = settle(
            as_row(previous.cash), as_row(previous.units), as_row(previous.nav), target,
            self.reference[t:t + 1], self.close[t:t + 1], self.impact, self.commission, self.borrow_per_bar)
        return {"cash": float(cash[0]), "units": units[0].tolist(), "nav": float(nav[0]), "cost": float(cost[0]),
                "traded": float(traded[0]), "fill_price": self.reference[t].tolist()}

    def weights(self, book: dict, t: int) -> torch.Tensor:
        """Share of NAV in each asset at bar t's close, as the environment computes the position."""
        units = torch.tensor([book["units"]], dtype=torch.float64)
        return units * self.close[t:t + 1] / torch.tensor([book["nav"]], dtype=torch.float64).unsqueeze(-1)


def start_bar(stamps: list[str], data_last: str) -> int:
    """The segment's first decision bar: the last bar of the champion's training data."""
    before = [i for i, stamp in enumerate(stamps) if stamp <= data_last]
    if not before:
        raise ForwardError(f"the curated bars start at {stamps[0]}, after the champion's data ended ({data_last})")
    return before[-1]


def trade(champion: Champion, series: MarketSeries, ledger: Ledger) -> dict:
    """Decide, fill and record every bar since the ledger's last one; returns what was done."""
    stamps = [iso(t) for t in series.timestamps]
    segment = ledger.current_segment(champion.model_name)
    started = segment is None or segment.version != champion.version
    if started:
        if segment is not None:
            log.info("%s: champion moved from v%s to v%s: a new ledger segment starts", champion.model_name,
                     segment.version, champion.version)
        segment = ledger.start_segment(champion.model_name, champion.version, ",".join(series.symbols),
                                       champion.config.data.interval, stamps[start_bar(stamps, champion.data_last)],
                                       champion.run_id)
    previous = ledger.last_row(segment.id)
    first = _position_of(stamps, previous.bar_time if previous else segment.start_bar, segment) + (previous is not None)
    account = PaperAccount(champion, series)
    rows = []
    for t in range(first, len(stamps)):
        book = (account.fill(previous, t) if previous is not None
                else {"cash": 1.0, "units": [0.0] * series.n_assets, "nav": 1.0, "cost": 0.0, "traded": 0.0,
                      "fill_price": None})
        previous = decide(champion, series, account, book, t, stamps[t], previous)
        rows.append(previous)
    ledger.append(segment.id, rows)
    last = rows[-1] if rows else ledger.last_row(segment.id)
    log.info("%s v%s: %d new bar(s) traded in segment %d (since %s); NAV %.4f at %s", champion.model_name,
             champion.version, len(rows), segment.id, segment.start_bar, last.nav, last.bar_time)
    return {"model_name": champion.model_name, "version": champion.version, "segment": segment.id,
            "segment_started": started, "start_bar": segment.start_bar, "new_bars": len(rows),
            "last_bar": last.bar_time, "nav": last.nav}


def decide(champion: Champion, series: MarketSeries, account: PaperAccount, book: dict, t: int, stamp: str,
           previous: BarRow | None) -> BarRow:
    """The model's decision on bar t from the window up to t and the book at t's close."""
    policy = champion.policy
    lookback = policy.lookback
    if t + 1 < lookback:
        raise ForwardError(f"{champion.model_name}: bar {stamp} has only {t + 1} bars behind it, the model "
                           f"reads {lookback}")
    window = series.ohlcv[t + 1 - lookback:t + 1].numpy()
    if series.n_assets == 1:
        window = window[:, 0, :]
    weights = account.weights(book, t)
    held = weights.float().numpy()
    try:
        if policy.risk is not None:
            times = series.timestamps.iloc[t + 1 - lookback:t + 1].dt.tz_convert("UTC").dt.tz_localize(None)
            state = None if previous is None or previous.risk_state is None else np.array([previous.risk_state])
            made = policy.decide_with_risk(window, held, [book["nav"]], times.to_numpy("datetime64[ns]"), state)
            decision, executed, risk_state = made.policy_target[0], made.target[0], made.state[0].tolist()
        else:
            decision = policy.decide(window, held)[0]
            # The account's limits, as the environment applies them before a fill (an overlay
            # applies them itself, and may lever past them).
            executed = account.space.project(torch.tensor(decision, dtype=torch.float64)).numpy()
            risk_state = None
    except InputError as error:  # the bars broke a serving rule: name the model and the bar
        raise ForwardError(f"{champion.model_name}: bar {stamp}: {error}") from None
    return BarRow(bar_time=stamp, version=champion.version, close=account.close[t].tolist(),
                  fill_price=book["fill_price"], cost=book["cost"], traded=book["traded"], nav=book["nav"],
                  cash=book["cash"], units=book["units"], weights=weights[0].tolist(),
                  decision=np.asarray(decision, dtype=np.float64).tolist(),
                  executed=np.asarray(executed, dtype=np.float64).tolist(), risk_state=risk_state)


def _position_of(stamps: list[str], stamp: str, segment: Segment) -> int:
    try:
        return stamps.index(stamp)
    except ValueError:
        raise ForwardError(f"{segment.model_name}: bar {stamp} of ledger segment {segment.id} is no longer in "
                           "the curated data (revised history): start a new segment by re-promoting") from None
