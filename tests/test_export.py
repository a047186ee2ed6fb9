"""The ONNX contract: names, shapes, dynamic batch, metadata, parity with torch; serving input checks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from ml.agent.policy import ActorCritic, ExportPolicy, load_policy, policy_checkpoint
from ml.env.action_space import DiscreteExposure
from ml.market.features import FeatureModule
from ml.market.series import prepare_series
from ml.release.export import check_parity, export_onnx, real_windows
from ml.serving import InputError, Policy

LOOKBACK = 64
LEVELS = (-1.0, -0.5, 0.0, 0.5, 1.0)
# The single-asset contract of a discrete policy, as served.
INPUT_NAMES = ["ohlcv", "position"]
OUTPUT_NAMES = ["target_exposure", "action_probs", "value"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, gspc_bars):
    torch.manual_seed(0)
    series = prepare_series(gspc_bars, LOOKBACK, torch.device("cpu"))
    agent = ActorCritic(series.features.shape[1], DiscreteExposure(LEVELS))
    mean, std = series.feature_stats((LOOKBACK, 3000))
    agent.set_normalization(mean, std)
    policy = ExportPolicy(series.feature_module, agent).eval()
    path = export_onnx(policy, tmp_path_factory.mktemp("onnx") / "model.onnx",
                       {"lookback": LOOKBACK, "interval": "1d", "dataset_hash": "abc"})
    ohlcv = series.ohlcv.numpy()  # [T, 1, 5]
    return policy, path, ohlcv


def test_graph_has_the_contract_inputs_and_outputs(exported):
    _, path, _ = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    inputs = {i.name: i for i in model.graph.input}
    outputs = {o.name: o for o in model.graph.output}
    assert list(inputs) == INPUT_NAMES and list(outputs) == OUTPUT_NAMES
    dims = [d.dim_value or d.dim_param for d in inputs["ohlcv"].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [LOOKBACK, 5]
    assert inputs["ohlcv"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    props = {p.key: p.value for p in model.metadata_props}
    assert props["lookback"] == str(LOOKBACK) and props["dataset_hash"] == "abc"


def test_onnxruntime_matches_torch_on_real_windows(exported):
    policy, path, ohlcv = exported
    windows, positions = real_windows(policy, ohlcv, 3100, len(ohlcv) - 1, 512)
    parity = check_parity(policy, path, windows, positions, tolerance=1e-5)
    assert parity.passed, parity
    assert parity.provider == "CPUExecutionProvider"


def test_a_listed_but_unusable_gpu_falls_back_to_cpu_with_a_warning(exported, monkeypatch, caplog):
    """onnxruntime-gpu lists CUDA everywhere; with a driver but no usable CUDA libraries the
    session must still run, on CPU, and say so."""
    import ml.serving as serving

    policy, path, ohlcv = exported
    monkeypatch.setattr(serving, "cuda_driver_present", lambda: True)
    with caplog.at_level("WARNING", logger="ml.serving"):
        session = serving.create_session(path)
    if session.get_providers()[0] == "CUDAExecutionProvider":  # a machine with a working GPU
        assert not caplog.records
    else:
        assert session.get_providers() == ["CPUExecutionProvider"]
        assert "CUDA execution provider unavailable" in caplog.text
    windows, positions = real_windows(policy, ohlcv, 3100, len(ohlcv) - 1, 64)
    assert check_parity(policy, path, windows, positions).passed


@pytest.mark.parametrize("batch", [1, 7, 300])
def test_dynamic_batch(exported, batch):
    policy, path, ohlcv = exported
    windows, positions = real_windows(policy, ohlcv, 100, 4000, batch, seed=batch)
    served = Policy(path).decide(windows, positions)
    assert served.shape == (batch, 1) and served.dtype == np.float32
    assert set(np.unique(served)).issubset(set(LEVELS))
    with torch.no_grad():
        want = policy(torch.from_numpy(windows), torch.from_numpy(positions))[0].numpy()
    np.testing.assert_array_equal(served, want)


def test_checkpoint_round_trip_gives_the_same_policy(exported):
    policy, _, ohlcv = exported
    checkpoint = policy_checkpoint(policy.actor_critic, policy.features)
    restored = load_policy(checkpoint)
    windows, positions = real_windows(policy, ohlcv, 100, 4000, 32)
    with torch.no_grad():
        a = policy(torch.from_numpy(windows), torch.from_numpy(positions))
        b = restored(torch.from_numpy(windows), torch.from_numpy(positions))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_serving_rejects_bad_inputs_by_name(exported):
    _, path, ohlcv = exported
    policy = Policy(path)
    window = ohlcv[100:100 + LOOKBACK, 0][None].copy()
    position = np.zeros((1, 1), dtype=np.float32)
    with pytest.raises(InputError, match=r"ohlcv: shape \(1, 10, 5\)"):
        policy.decide(window[:, :10], position)
    nan_window = window.copy()
    nan_window[0, 5, 3] = np.nan
    with pytest.raises(InputError, match="window 0 contains NaN"):
        policy.decide(nan_window, position)
    # A held share past 1 after a fill (costs, prices) is what the environment feeds the policy too.
    policy.decide(window, np.array([[1.0004]], dtype=np.float32))
    with pytest.raises(InputError, match=r"position: must be finite and within \[-10, 10\]"):
        policy.decide(window, np.array([[12.0]], dtype=np.float32))
    with pytest.raises(InputError, match="strictly positive"):
        policy.decide(np.abs(window) * -1, position)
    # A single [L, 5] window and a flat position vector are accepted as a batch of one.
    assert policy.decide(window[0], np.zeros(1)).shape == (1, 1)


def test_serving_inference_path_needs_no_torch(exported, tmp_path):
    import subprocess
    import sys

    _, path, ohlcv = exported
    np.save(tmp_path / "w.npy", ohlcv[200:200 + LOOKBACK, 0][None])
    code = (
        "import sys, numpy as np\n"
        "sys.modules['torch'] = None  # any import of torch now fails\n"
        "sys.modules['airflow'] = None\n"
        "from ml.serving import Policy\n"
        f"p = Policy(r'{path}')\n"
        f"print(p.decide(np.load(r'{tmp_path / 'w.npy'}'), np.zeros((1, 1), np.float32))[0, 0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) in LEVELS


def test_feature_module_exports_alone_for_close_only(tmp_path):
    """A close-only model's graph ignores open/high/low/volume columns."""
    module = FeatureModule(LOOKBACK)
    agent = ActorCritic(module.n_features, DiscreteExposure((0.0, 1.0)))
    # The pipeline's metadata says the model reads the close alone: its other columns are not checked.
    path = export_onnx(ExportPolicy(module, agent), tmp_path / "m.onnx",
                       {"lookback": LOOKBACK, "close_only": "true", "features": ",".join(module.names)})
    policy = Policy(path)
    window = (np.random.default_rng(0).random((2, LOOKBACK, 5)) + 1).astype(np.float32)
    scrambled = window.copy()
    scrambled[:, :, [0, 1, 2, 4]] = 7.0
    positions = np.zeros((2, 1), np.float32)
    np.testing.assert_array_equal(policy.decide(window, positions), policy.decide(scrambled, positions))
