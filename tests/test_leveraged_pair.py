"""The shipped synthetic 3x pair is what its script says: k times the index's daily return less
the fee, reproducible from the bundled index, and clean enough for the data gate."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest

from ml.data.sources import load_sample
from ml.data.validation import require_valid
from tests.conftest import ROOT


def make_pair():
    spec = importlib.util.spec_from_file_location("make_leveraged_pair", ROOT / "scripts" / "make_leveraged_pair.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, k", [("GSPC3L", 3.0), ("GSPC3S", -3.0)])
def test_each_leg_returns_k_times_the_index_less_the_fee(name, k):
    index = pd.read_csv(ROOT / "ml" / "sample" / "GSPC.csv")
    shipped = pd.read_csv(ROOT / "ml" / "sample" / f"{name}.csv")
    assert (shipped["Date"] == index["Date"]).all()
    index_return = index["Close"].pct_change().to_numpy()[1:]
    leg_return = shipped["Close"].pct_change().to_numpy()[1:]
    np.testing.assert_allclose(leg_return, k * index_return - 0.0095 / 252, rtol=0, atol=1e-8)
    # The script rebuilds the shipped file from the index.
    rebuilt = make_pair().leveraged_bars(index, k)
    np.testing.assert_allclose(rebuilt[["Open", "High", "Low", "Close"]].to_numpy(),
                               shipped[["Open", "High", "Low", "Close"]].to_numpy(), rtol=1e-9)
    require_valid(load_sample(name), f"sample {name}")
