"""The forward-test ledger: every paper-traded bar of every champion, in a real database.

Two tables (SQLAlchemy Core, so the same code runs on SQLite embedded and Postgres in the stack):

- ``forward_segments``: one row each time a model's champion starts trading; a champion change
  starts a new segment, flat, at NAV 1.
- ``forward_bars``: one row per segment and bar: the fill of the previous bar's decision at this
  bar, the book marked at this bar's close, and the decision made on it. The key is
  (segment, bar), and a run writes its bars in one transaction, so a rerun never counts a bar twice.

The book (cash, units) and the risk overlay's state are stored exactly (JSON floats round-trip),
so the next run continues where the last one stopped.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa

metadata = sa.MetaData()

segments = sa.Table(
    "forward_segments", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(200), nullable=False, index=True),
    sa.Column("version", sa.String(32), nullable=False),
    sa.Column("symbols", sa.String(2000), nullable=False),
    sa.Column("interval", sa.String(8), nullable=False),
    sa.Column("start_bar", sa.String(32), nullable=False),  # the first decision bar (ISO 8601, UTC)
    sa.Column("training_run_id", sa.String(64), nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
)

bars = sa.Table(
    "forward_bars", metadata,
    sa.Column("segment_id", sa.Integer, sa.ForeignKey("forward_segments.id"), primary_key=True),
    sa.Column("bar_time", sa.String(32), primary_key=True),  # ISO 8601, UTC: sorts as time does
    sa.Column("version", sa.String(32), nullable=False),
    sa.Column("close", sa.JSON, nullable=False),  # [A] this bar's closes
    sa.Column("fill_price", sa.JSON),  # [A] where the previous decision filled (null on the first bar)
    sa.Column("cost", sa.Float, nullable=False),  # money paid at this bar's fill
    sa.Column("traded", sa.Float, nullable=False),  # traded notional over NAV at this bar's fill
    sa.Column("nav", sa.Float, nullable=False),  # at this bar's close
    sa.Column("cash", sa.Float, nullable=False),
    sa.Column("units", sa.JSON, nullable=False),  # [A]
    sa.Column("weights", sa.JSON, nullable=False),  # [A] share of NAV held at this bar's close
    sa.Column("decision", sa.JSON, nullable=False),  # [A] the policy's target decided on this bar
    sa.Column("executed", sa.JSON, nullable=False),  # [A] the target sent to the next fill (after the overlay)
    sa.Column("risk_state", sa.JSON),  # the overlay's state after this decision (models with one)
)


@dataclass(frozen=True)
class Segment:
    id: int
    model_name: str
    version: str
    symbols: str
    interval: str
    start_bar: str
    training_run_id: str
    created_at: str


@dataclass(frozen=True)
class BarRow:
    bar_time: str
    version: str
    close: list[float]
    fill_price: list[float] | None
    cost: float
    traded: float
    nav: float
    cash: float
    units: list[float]
    weights: list[float]
    decision: list[float]
    executed: list[float]
    risk_state: list[float] | None = None


def default_url() -> str:
    """``$ML_FORWARD_DB`` (a SQLAlchemy URL), else SQLite beside the run folders."""
    if os.environ.get("ML_FORWARD_DB"):
        return os.environ["ML_FORWARD_DB"]
    runs = Path(os.environ.get("ML_RUNS_DIR", "runs"))
    return f"sqlite:///{(runs / 'forward_test.db').resolve()}"


def iso(timestamp) -> str:
    """A bar's time as the ledger writes it: ISO 8601 in UTC, to the second."""
    import pandas as pd

    return pd.Timestamp(timestamp).tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%SZ")


class Ledger:
    """The two tables in one database; ``url`` a SQLAlchemy URL (see ``default_url``)."""

    def __init__(self, url: str | None = None):
        self.url = url or default_url()
        if self.url.startswith("sqlite:///"):
            Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine = sa.create_engine(self.url)
        metadata.create_all(self.engine)

    def current_segment(self, model_name: str) -> Segment | None:
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(segments).where(segments.c.model_name == model_name)
                                     .order_by(segments.c.id.desc()).limit(1)).mappings().first()
        return Segment(**row) if row else None

    def segments(self, model_name: str) -> list[Segment]:
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(segments).where(segments.c.model_name == model_name)
                                      .order_by(segments.c.id)).mappings().all()
        return [Segment(**row) for row in rows]

    def start_segment(self, model_name: str, version: str, symbols: str, interval: str, start_bar: str,
                      training_run_id: str) -> Segment:
        values = {"model_name": model_name, "version": version, "symbols": symbols, "interval": interval,
                  "start_bar": start_bar, "training_run_id": training_run_id,
                  "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        with self.engine.begin() as connection:
            new_id = connection.execute(segments.insert().values(**values)).inserted_primary_key[0]
        return Segment(id=int(new_id), **values)

    def rows(self, segment_id: int) -> list[BarRow]:
        names = [f.name for f in fields(BarRow)]
        with self.engine.connect() as connection:
            result = connection.execute(sa.select(*(bars.c[name] for name in names))
                                        .where(bars.c.segment_id == segment_id).order_by(bars.c.bar_time))
            return [BarRow(**row) for row in result.mappings()]

    def last_row(self, segment_id: int) -> BarRow | None:
        names = [f.name for f in fields(BarRow)]
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(*(bars.c[name] for name in names))
                                     .where(bars.c.segment_id == segment_id)
                                     .order_by(bars.c.bar_time.desc()).limit(1)).mappings().first()
        return BarRow(**row) if row else None

    def append(self, segment_id: int, new_rows: list[BarRow]) -> int:
        """Write the bars of one run together; a bar already there makes the whole run fail and
        write nothing (two runs raced over the same bars), so nothing is counted twice."""
        if new_rows:
            with self.engine.begin() as connection:
                connection.execute(bars.insert(), [{"segment_id": segment_id, **asdict(row)} for row in new_rows])
        return len(new_rows)

    def dispose(self) -> None:
        self.engine.dispose()
