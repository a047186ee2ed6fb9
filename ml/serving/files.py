"""Windows from CSV/parquet bar files, for the ``serve`` CLI and services that read files.

Uses pandas, which a service only needs when it reads files this way. Errors name the file,
column and row, never a cell: the file may hold anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ml.serving.bars import FIELDS, InputError

# pandas is imported inside each function: `ml.serving` re-exports these helpers, and a service
# that passes arrays must not pay for (or need) pandas.


def _read_bars_file(path: Path):
    import pandas as pd

    try:
        frame = pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pd.read_csv(path)
    except (OSError, ValueError) as exc:  # the type only: a parser's message may quote the file
        raise InputError(f"{path}: cannot be read as bars ({type(exc).__name__})") from None
    columns = {str(c).strip().lower(): c for c in frame.columns}
    if "close" not in columns:
        raise InputError(f"{path}: no 'close' column")
    return frame, columns


def _date_column(columns: dict):
    return next((columns[c] for c in ("date", "datetime", "timestamp") if c in columns), None)


def _utc_times(values, path: Path, column) -> np.ndarray:
    """A date column as naive UTC datetime64[ns] (what ``Policy.validate`` compares)."""
    import pandas as pd

    times = pd.to_datetime(values, utc=True, errors="coerce", format="mixed")
    if times.isna().any():  # the row (as numbered in the file's data), never the cell
        row = values.index[int(np.flatnonzero(times.isna().to_numpy())[0])]
        raise InputError(f"{path}: column '{column}' row {row} is not a date")
    return times.dt.tz_convert(None).to_numpy(dtype="datetime64[ns]")


def bars_to_window(path: str | Path, lookback: int, *, return_timestamps: bool = False):
    """The last ``lookback`` bars of a CSV/parquet file as a [1, lookback, 5] window.

    Accepts yfinance-style (Open, High, Low, Close, Volume) or lower-case columns; a
    close-only file is filled the way the model was trained (close in O/H/L, volume 0).
    With ``return_timestamps``: ``(window, timestamps [1, lookback])``, the timestamps from
    the file's Date/Datetime/timestamp column (None without one), for ``Policy.decide``.
    """
    path = Path(path)
    frame, columns = _read_bars_file(path)
    if len(frame) < lookback:
        raise InputError(f"{path}: {len(frame)} bars, the model needs the last {lookback}")
    tail = frame.tail(lookback)
    window = _window(tail, columns, path)
    if not return_timestamps:
        return window
    date = _date_column(columns)
    return window, (None if date is None else _utc_times(tail[date], path, date)[None])


def portfolio_window(paths: list[str | Path], lookback: int, *, return_timestamps: bool = False):
    """The last ``lookback`` bars every file has (matched on their date column) as [1, lookback, A, 5].

    The files are the assets in the model's order (its ``symbols`` metadata). With
    ``return_timestamps``: ``(window, timestamps [1, lookback])``, the common bars' times.
    """
    frames = []
    for path in map(Path, paths):
        frame, columns = _read_bars_file(path)
        date = _date_column(columns)
        if date is None:
            raise InputError(f"{path}: no Date/Datetime/timestamp column to align the assets on")
        frame = frame.set_index(_utc_times(frame[date], path, date))
        if not frame.index.is_unique:  # alignment would hide a repeat; the gate's rule refuses it
            raise InputError(f"{path}: timestamp {frame.index[frame.index.duplicated()][0]} repeats: "
                             "breaks rule 'timestamps unique'")
        frames.append((path, frame, columns))
    common = frames[0][1].index
    for _, frame, _ in frames[1:]:
        common = common.intersection(frame.index)
    if len(common) < lookback:
        raise InputError(f"{[str(p) for p, _, _ in frames]}: {len(common)} common bars, the model needs "
                         f"the last {lookback}")
    last = common.sort_values()[-lookback:]
    window = np.stack([_window(frame.loc[last], columns, path)[0] for path, frame, columns in frames], axis=1)[None]
    return (window, last.to_numpy(dtype="datetime64[ns]")[None]) if return_timestamps else window


def _window(tail, columns: dict, path: Path) -> np.ndarray:
    import pandas as pd

    def numbers(name: str) -> np.ndarray:
        values = pd.to_numeric(tail[columns[name]], errors="coerce")
        bad = values.isna().to_numpy() & tail[columns[name]].notna().to_numpy()
        if bad.any():  # the row, never the cell: the file may hold anything
            raise InputError(f"{path}: column '{name}' row {tail.index[int(np.flatnonzero(bad)[0])]} "
                             "is not numeric")
        return values.to_numpy(dtype=np.float64)

    close = numbers("close")
    fields = []
    for name in FIELDS:
        values = numbers(name) if name in columns else None
        if values is not None and not np.isnan(values).any():
            fields.append(values)
        else:
            fields.append(np.zeros_like(close) if name == "volume" else close)
    return np.stack(fields, axis=1)[None].astype(np.float32)

