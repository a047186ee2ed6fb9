"""Serving holds every window to the data gate's bar rules, and the serve CLI answers bad bars and
models it cannot load with one line and exit 2."""

from __future__ import annotations

import datetime
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from ml.agent.policy import ActorCritic, ExportPolicy
from ml.data.schema import ohlcv_array
from ml.data.validation import ValidationConfig
from ml.env.action_space import DiscreteExposure
from ml.market.features import FeatureModule
from ml.release.export import export_onnx
from ml.serving import InputError, ModelLoadError, Policy, bars_to_window, portfolio_window
from ml.serving.bars import BarRules
from tests.conftest import ROOT

LOOKBACK = 64
SAMPLE = ROOT / "ml" / "sample"


def export(folder, use_range: bool) -> str:
    """A policy exported the way the pipeline exports it (its metadata says what the model reads)."""
    torch.manual_seed(0)
    features = FeatureModule(LOOKBACK, use_range=use_range, use_volume=use_range)
    agent = ActorCritic(features.n_features, DiscreteExposure((-1.0, 0.0, 1.0)))
    metadata = {"lookback": LOOKBACK, "close_only": str(not use_range).lower(), "features": ",".join(features.names)}
    return str(export_onnx(ExportPolicy(features, agent).eval(), folder / "model.onnx", metadata))


@pytest.fixture(scope="module")
def full_model(tmp_path_factory) -> str:
    return export(tmp_path_factory.mktemp("full"), use_range=True)


@pytest.fixture(scope="module")
def close_model(tmp_path_factory) -> str:
    return export(tmp_path_factory.mktemp("close"), use_range=False)


@pytest.fixture(scope="module")
def real(gspc_bars):
    """The last window of the bundled GSPC sample (full OHLCV) and its bar times (naive UTC)."""
    window = ohlcv_array(gspc_bars)[-LOOKBACK:].copy()
    times = gspc_bars["timestamp"].dt.tz_convert(None).to_numpy("datetime64[ns]")[-LOOKBACK:].copy()
    return window, times


def decide(model: str, window, times=None, **checks):
    return Policy(model, prefer_gpu=False, **checks).decide(window, np.zeros((1, 1), np.float32), times)


def test_a_real_window_is_accepted_with_its_timestamps(full_model, close_model, real):
    window, times = real
    for model in (full_model, close_model):
        assert decide(model, window, times).shape == (1, 1)
    # The window the CLI reads from the sample file is the same one, with the same bar times.
    read, read_times = bars_to_window(SAMPLE / "GSPC.csv", LOOKBACK, return_timestamps=True)
    np.testing.assert_allclose(read[0], window, rtol=1e-6)
    np.testing.assert_array_equal(read_times[0], times)


def bad(window, field, value, bar=-1):
    window = window.copy()
    window[bar, ("open", "high", "low", "close", "volume").index(field)] = value
    return window


@pytest.mark.parametrize("change, rule", [
    (lambda w: bad(w, "low", -w[-1, 2]), "'low strictly positive'"),
    (lambda w: bad(w, "open", -w[-1, 0]), "'open strictly positive'"),
    (lambda w: bad(w, "high", 0.0), "'high strictly positive'"),
    (lambda w: bad(w, "volume", -1.0), "'volume non-negative'"),
    # The sample's last bar closes above its open: the high falls below the close, the low above the open.
    (lambda w: bad(w, "high", w[-1, [0, 3]].max() * 0.999), "'high >= close'"),
    (lambda w: bad(w, "low", w[-1, [0, 3]].min() * 1.001), "'open >= low'"),
    (lambda w: bad(w, "close", w[-1, 3] * 100), "'high >= close'"),  # x100 close alone breaks the order first
])
def test_each_broken_bar_rule_is_refused_by_name(full_model, real, change, rule):
    window, _ = real
    with pytest.raises(InputError, match=rf"^ohlcv: window 0 bar 63 \(the last\): .* breaks rule {rule}"):
        decide(full_model, change(window))


def test_a_negative_low_would_have_moved_the_decision(full_model, real):
    """Why the OHLC rules matter: the model reads the bar range, so a bad low changes its output."""
    window, _ = real
    policy = Policy(full_model, prefer_gpu=False)
    run = lambda w: policy.session.run(["action_probs"], {"ohlcv": w[None], "position": np.zeros((1, 1), np.float32)})
    assert not np.allclose(run(window)[0], run(bad(window, "low", -window[-1, 2]))[0])


def test_a_x100_bar_is_an_abnormal_jump(full_model, close_model, real):
    window, _ = real
    glitch = window.copy()
    glitch[-1, :4] *= 100  # a whole bar on the wrong scale keeps its OHLC order
    for model in (full_model, close_model):
        with pytest.raises(InputError, match=r"bar 63 \(the last\): close .* \(\|log return\| 4.61 > 1\) "
                                             r"breaks rule 'no abnormal one-bar jump'"):
            decide(model, glitch)
    assert decide(full_model, glitch, max_abs_log_return=None).shape == (1, 1)
    # The serving threshold and stale limit are the gate's defaults.
    assert BarRules().max_abs_log_return == ValidationConfig().max_abs_log_return
    assert BarRules().max_stale_bars == ValidationConfig().max_stale_bars


def test_a_close_only_model_is_not_held_to_open_high_low(close_model, real):
    window, _ = real
    scrambled = window.copy()
    scrambled[:, [0, 1, 2]] = 7.0  # ignored by the model, out of order for the gate
    assert decide(close_model, scrambled).shape == (1, 1)
    with pytest.raises(InputError, match="'volume non-negative'"):
        decide(close_model, bad(window, "volume", -5.0))
    with pytest.raises(InputError, match="'close strictly positive'"):
        decide(close_model, bad(window, "close", -1.0))


def test_the_failing_window_and_asset_are_named():
    batch = np.tile(ohlcv_array(pd.read_csv(SAMPLE / "GSPC.csv").rename(columns=str.lower))[-LOOKBACK:, None, :],
                    (3, 1, 2, 1))  # [3, L, 2 assets, 5]
    rules = BarRules(symbols=("GSPC", "KO"))
    rules.check_windows(batch)
    batch[2, 10, 1, 2] = batch[2, 10, 1, [0, 3]].max() * 1.001  # low above open in window 2, asset KO, bar 10
    with pytest.raises(InputError, match=r"^ohlcv: window 2 asset KO bar 10: open .* < low .* "
                                         r"breaks rule 'open >= low'$"):
        rules.check_windows(batch)


def test_swapped_or_repeated_bars_are_refused_by_their_timestamps(full_model, real):
    window, times = real
    swapped, swapped_times = window[[*range(62), 63, 62]], times[[*range(62), 63, 62]]
    with pytest.raises(InputError, match=r"^timestamps: window 0 bar 63 at 2018-12-28T00:00:00Z is before bar 62 "
                                         r"at 2018-12-31T00:00:00Z: breaks rule 'timestamps increasing'$"):
        decide(full_model, swapped, swapped_times)
    repeated, repeated_times = window.copy(), times.copy()
    repeated[-1], repeated_times[-1] = repeated[-2], repeated_times[-2]
    with pytest.raises(InputError, match=r"bar 63 at .* repeats bar 62 .* breaks rule 'timestamps unique'"):
        decide(full_model, repeated, repeated_times)
    with pytest.raises(InputError, match=r"timestamps: shape \(1, 10\) must be \[1, 64\]"):
        decide(full_model, window, times[None, :10])


def test_freshness_and_the_future(full_model, real):
    window, times = real
    with pytest.raises(InputError, match=r"^timestamps: window 0 last bar at 2018-12-31T00:00:00Z is .* days old, "
                                         r"more than max_age 3 days: breaks rule 'last bar within max_age'$"):
        decide(full_model, window, times, max_age=datetime.timedelta(days=3))
    assert decide(full_model, window, times).shape == (1, 1)  # no max_age: any age
    now = np.datetime64("now", "ns")
    recent = times - times[-1] + now - np.timedelta64(2, "h")
    assert decide(full_model, window, recent, max_age=np.timedelta64(1, "D")).shape == (1, 1)
    with pytest.raises(InputError, match="breaks rule 'no timestamps in the future'"):
        decide(full_model, window, recent + np.timedelta64(1, "D"))


def test_a_batch_keeps_its_speed_path_and_its_verdicts(full_model, gspc_bars):
    """Valid batches take the whole-array checks; one bad window in a batch is found and named."""
    ohlcv = ohlcv_array(gspc_bars)
    ends = np.random.default_rng(0).integers(LOOKBACK, len(ohlcv), 256)
    windows = np.ascontiguousarray(ohlcv[ends[:, None] + np.arange(-LOOKBACK + 1, 1)])
    policy = Policy(full_model, prefer_gpu=False)
    assert policy.decide(windows, np.zeros((256, 1), np.float32)).shape == (256, 1)
    windows[200, 30, 1] = windows[200, 30, 3] * 0.5
    with pytest.raises(InputError, match=r"^ohlcv: window 200 bar 30: high .* breaks rule 'high >= "):
        policy.decide(windows, np.zeros((256, 1), np.float32))


def test_file_helpers_check_what_they_read(tmp_path, gspc_bars):
    frame = pd.read_csv(SAMPLE / "GSPC.csv")
    secret = "s3cr3t-Zq8"
    cell = frame.tail(LOOKBACK).astype({"Close": object})
    cell.iloc[5, cell.columns.get_loc("Close")] = secret
    cell.to_csv(tmp_path / "cell.csv", index=False)
    with pytest.raises(InputError, match=r"cell.csv: column 'close' row \d+ is not numeric$") as refused:
        bars_to_window(tmp_path / "cell.csv", LOOKBACK)
    assert secret not in str(refused.value)
    twice = pd.concat([frame.tail(LOOKBACK), frame.tail(1)])
    twice.to_csv(tmp_path / "twice.csv", index=False)
    with pytest.raises(InputError, match=r"twice.csv: timestamp 2018-12-31 00:00:00 repeats: "
                                         r"breaks rule 'timestamps unique'"):
        portfolio_window([tmp_path / "twice.csv", SAMPLE / "KO.csv"], LOOKBACK)
    window, times = portfolio_window([SAMPLE / "GSPC.csv", SAMPLE / "KO.csv"], LOOKBACK, return_timestamps=True)
    assert window.shape == (1, LOOKBACK, 2, 5) and times.shape == (1, LOOKBACK) and (np.diff(times[0]) > 0).all()


# The serve CLI ----------------------------------------------------------------------------------

def serve(*args):
    return subprocess.run([sys.executable, "-m", "ml", "serve", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def one_rejection(proc, *words):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("REJECTED "), proc.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_cli_serves_a_real_file_and_rejects_broken_bars_with_one_line(full_model, tmp_path):
    served = serve("--model", full_model, "--bars", SAMPLE / "GSPC.csv")
    assert served.returncode == 0, served.stderr
    frame = pd.read_csv(SAMPLE / "GSPC.csv")
    broken = frame.copy()
    broken.loc[broken.index[-1], "Low"] = -broken["Low"].iloc[-1]
    broken.to_csv(tmp_path / "low.csv", index=False)
    swapped = frame.iloc[[*range(len(frame) - 2), len(frame) - 1, len(frame) - 2]]
    swapped.to_csv(tmp_path / "swapped.csv", index=False)
    one_rejection(serve("--model", full_model, "--bars", tmp_path / "low.csv"), "window 0 bar 63",
                  "'low strictly positive'")
    one_rejection(serve("--model", full_model, "--bars", tmp_path / "swapped.csv"), "'timestamps increasing'")
    one_rejection(serve("--model", full_model, "--bars", SAMPLE / "GSPC.csv", "--max-age", "3d"),
                  "'last bar within max_age'")


def test_cli_rejects_a_model_it_cannot_load_with_one_line(tmp_path):
    from mlflow.tracking import MlflowClient

    corrupt = tmp_path / "model.onnx"
    corrupt.write_text("not a model\n")
    one_rejection(serve("--model", corrupt, "--bars", SAMPLE / "GSPC.csv"), str(corrupt), "not a loadable ONNX model")
    one_rejection(serve("--model", tmp_path / "missing.onnx", "--bars", SAMPLE / "GSPC.csv"), "no ONNX model there")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri, registry_uri=uri).create_registered_model("known")  # a real store, one model, no versions
    for model, words in (("models:/unknown@champion", ("models:/unknown@champion", "not found")),
                         ("models:/known/7", ("models:/known/7", "not found")),
                         ("models:/known@champion", ("models:/known@champion", "alias champion not found"))):
        one_rejection(serve("--model", model, "--bars", SAMPLE / "GSPC.csv", "--tracking-uri", uri), *words)
    with pytest.raises(ModelLoadError, match="models:/unknown@champion: Registered Model with name=unknown not found"):
        Policy.load("models:/unknown@champion", tracking_uri=uri)


def test_a_registry_model_needs_a_named_existing_store_and_never_creates_one(tmp_path):
    """A service in its own folder: no stray mlflow.db, one line saying what to set."""
    env = {key: value for key, value in __import__("os").environ.items() if key != "MLFLOW_TRACKING_URI"}
    bars = str(ROOT / "ml" / "sample" / "KO.csv")
    serve = [sys.executable, "-m", "ml", "serve", "--model", "models:/ppo_KO_1d@champion", "--bars", bars]
    unnamed = subprocess.run(serve, cwd=tmp_path, env=env, capture_output=True, text=True)
    missing = subprocess.run([*serve, "--tracking-uri", "sqlite:///elsewhere.db"], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
    assert unnamed.returncode != 0 and missing.returncode != 0
    assert "no MLflow store named: pass tracking_uri (--tracking-uri) or set MLFLOW_TRACKING_URI" in unnamed.stderr
    assert "no MLflow store at elsewhere.db" in missing.stderr
    assert "Traceback" not in unnamed.stdout + unnamed.stderr + missing.stdout + missing.stderr
    assert list(tmp_path.iterdir()) == []  # nothing created where the service runs
    with pytest.raises(ModelLoadError, match="no MLflow store at"):
        Policy.load("models:/ppo_KO_1d@champion", tracking_uri=f"sqlite:///{tmp_path / 'none.db'}")
