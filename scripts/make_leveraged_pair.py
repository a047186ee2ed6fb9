"""Build a SYNTHETIC leveraged ETF pair from the bundled S&P 500 sample: GSPC3L (+3x) and GSPC3S (-3x).

These are not real fund prices. Each is a daily-rebalanced fund that returns k times the index's
daily return (k = +3 or -3), less a 0.95% yearly expense ratio charged every trading day:

    close_t = close_{t-1} * (1 + k * r_t - fee),   r_t = index close_t / index close_{t-1} - 1

Open, high and low come from the index's intraday moves relative to its previous close, levered
the same way (the fee is charged on them too, so the bar stays ordered); for the -3x leg the
index's high becomes the fund's low and its low the fund's high. The first bar is levered from
the index's open, where both funds start. Volume is the index's, as a stand-in. No tracking
error, financing spread or intraday rebalancing beyond that: the pair shows volatility decay and
the overlay's sizing, not what a real TQQQ/SQQQ would have returned.

    .venv/bin/python scripts/make_leveraged_pair.py            # writes ml/sample/GSPC3L.csv, GSPC3S.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "ml" / "sample"
EXPENSE_RATIO = 0.0095  # a year, as the large 3x equity funds charge
TRADING_DAYS = 252


def leveraged_bars(index: pd.DataFrame, k: float, expense_ratio: float = EXPENSE_RATIO) -> pd.DataFrame:
    """The daily bars of a fund returning k x the index's daily return, less the daily fee."""
    fee = expense_ratio / TRADING_DAYS
    close = index["Close"].to_numpy(dtype="float64")
    # The reference each day's moves are measured from: yesterday's close (the first day: its own open).
    previous = np.concatenate([index["Open"].to_numpy(dtype="float64")[:1], close[:-1]])

    def levered(price: np.ndarray) -> np.ndarray:
        return 1.0 + k * (price / previous - 1.0) - fee

    growth = levered(close)
    if (growth <= 0).any():
        raise ValueError(f"a {k:+g}x fund would be wiped out on {index['Date'][growth <= 0].iloc[0]}")
    fund_close = previous[0] * np.cumprod(growth)
    fund_previous = np.concatenate([previous[:1], fund_close[:-1]])
    high, low = index["High"].to_numpy(dtype="float64"), index["Low"].to_numpy(dtype="float64")
    if k < 0:  # short exposure: the index's best price of the day is the fund's worst
        high, low = low, high
    bars = pd.DataFrame({
        "Date": index["Date"],
        "Open": fund_previous * levered(index["Open"].to_numpy(dtype="float64")),
        "High": fund_previous * levered(high),
        "Low": fund_previous * levered(low),
        "Close": fund_close,
    })
    bars["Adj Close"] = bars["Close"]  # no distributions modelled
    bars["Volume"] = index["Volume"]
    if (bars[["Open", "High", "Low", "Close"]] <= 0).any(axis=None):
        raise ValueError(f"the {k:+g}x fund has a non-positive price")
    return bars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, default=SAMPLE_DIR / "GSPC.csv", help="Date,Open,High,Low,Close,... bars")
    parser.add_argument("--out-dir", type=Path, default=SAMPLE_DIR)
    args = parser.parse_args()

    index = pd.read_csv(args.index)
    for name, k in (("GSPC3L", 3.0), ("GSPC3S", -3.0)):
        bars = leveraged_bars(index, k)
        path = args.out_dir / f"{name}.csv"
        # Ten significant digits: the -3x fund decays to small prices, and rounding must not make
        # consecutive closes equal (the data gate refuses stale runs).
        bars.to_csv(path, index=False, float_format="%.10g")
        print(f"{path}: {len(bars)} bars, close {bars['Close'].iloc[0]:.4g} -> {bars['Close'].iloc[-1]:.4g}")


if __name__ == "__main__":
    main()
