"""The temporal encoder options: the recent returns as a sequence, read by a 1-D convolution or a
one-layer transformer.

Shapes, hand-computed returns, causality (perturbing later bars changes nothing at a bar),
training through the pipeline, ONNX parity and serving with ``ml.serving``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ml.agent.encoders import build_encoder, encoder_spec
from ml.agent.policy import ActorCritic, ExportPolicy, load_policy, policy_checkpoint
from ml.cli import main
from ml.config import ConfigError, config_from_dict
from ml.env.action_space import make_action_space
from ml.market.features import FeatureModule, series_features
from ml.market.series import prepare_series
from ml.pipeline import run_pipeline
from ml.pipeline.rundir import RunFolder, load_agent, read_json, training_fingerprint
from ml.serving import Policy
from tests.test_pipeline import TINY

KINDS = ["conv", "attention"]


def with_encoder(kind: str) -> dict:
    return {**TINY, "ppo": {**TINY["ppo"], "encoder": kind, "encoder_window": 24, "encoder_channels": 4}}


@pytest.fixture(scope="module", params=KINDS)
def encoder_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    config = config_from_dict(with_encoder(request.param) | {"registry": {"tracking_uri": f"sqlite:///{out / 'mlflow.db'}"}})
    run_pipeline(config, out)
    return request.param, out


@pytest.mark.parametrize("kind", ["conv", "attention"])
@pytest.mark.parametrize("window", [16, 24, 32, 60])
def test_the_encoder_output_has_the_width_it_declares(kind, window):
    encoder = build_encoder({"kind": kind, "window": window, "channels": 3})
    assert encoder(torch.randn(7, window)).shape == (7, encoder.out_features)
    assert build_encoder(encoder.spec()).spec() == encoder.spec()


def test_the_window_holds_the_last_one_bar_log_returns_oldest_first(gspc_bars):
    window = 24
    module = FeatureModule(64, use_range=True, use_volume=True, return_window=window).double()
    bars = torch.tensor(gspc_bars[["open", "high", "low", "close", "volume"]].to_numpy()[:200], dtype=torch.float64)
    features = module(bars[-64:][None])[0].numpy()
    close = bars[-64:, 3].numpy()
    np.testing.assert_allclose(features[-window:], np.diff(np.log(close))[-window:], atol=1e-12)
    assert module.names[-window:] == [f"return_lag_{lag}" for lag in range(window - 1, -1, -1)]
    # The summary features are the same as without the window.
    plain = FeatureModule(64, use_range=True, use_volume=True).double()(bars[-64:][None])[0].numpy()
    np.testing.assert_array_equal(features[:-window], plain)


@pytest.mark.parametrize("kind", KINDS)
def test_perturbing_later_bars_changes_neither_features_nor_decisions(gspc_bars, kind):
    config = config_from_dict(with_encoder(kind))
    series = prepare_series(gspc_bars.iloc[:400], config.lookback, torch.device("cpu"), config.return_window)
    torch.manual_seed(0)
    agent = ActorCritic(series.features.shape[1], make_action_space(config.action, 1), (16,),
                        encoder_spec(config.ppo))
    agent.set_normalization(*series.feature_stats((63, 300)))
    t = 250
    bars = series.ohlcv[:, 0].clone()
    bars[t + 1:, :4] *= 1.7  # every later bar moves
    later = series_features(series.feature_module, bars)
    assert torch.equal(later[63:t + 1], series.features[63:t + 1])  # rows before 63 have no full window (NaN)
    assert not torch.equal(later[t + 1:t + 20], series.features[t + 1:t + 20])
    position = torch.zeros(t + 1 - 63, 1)
    assert torch.equal(agent.decide(later[63:t + 1], position), agent.decide(series.features[63:t + 1], position))


def test_an_encoder_policy_trains_exports_with_parity_and_serves(encoder_run):
    kind, run_dir = encoder_run
    parity = read_json(run_dir / "parity.json")
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-5
    run = RunFolder(run_dir)
    latest = read_json(run.folds)[-1]
    _, checkpoint = load_agent(run, latest["index"])
    assert checkpoint["encoder"] == {"kind": kind, "window": 24, "channels": 4}
    policy = load_policy(checkpoint)
    assert policy.actor_critic.encoder is not None and policy.features.return_window == 24

    served = Policy(run_dir / "model.onnx", prefer_gpu=False)
    assert served.metadata["features"].endswith("return_lag_1,return_lag_0")
    windows = np.load(run_dir / "parity_windows.npz")
    ohlcv, position = windows[windows.files[0]], windows[windows.files[1]]
    with torch.no_grad():
        expected = policy(torch.from_numpy(ohlcv), torch.from_numpy(position))[0].numpy()
    np.testing.assert_allclose(served.decide(ohlcv, position), expected, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_the_encoder_reads_the_last_window_columns_and_the_mlp_the_rest(kind):
    window, n_features = 16, 16 + 9
    agent = ActorCritic(n_features, make_action_space(config_from_dict({}).action, 1), (8,),
                        {"kind": kind, "window": window, "channels": 2})
    seen = []
    agent.encoder.register_forward_hook(lambda _module, inputs, _output: seen.append(inputs[0]))
    features = torch.randn(5, n_features)
    agent(features, torch.zeros(5, 1))
    assert torch.equal(seen[0], features[:, -window:])
    # A change in the summary features reaches the decision without passing through the encoder.
    moved = features.clone()
    moved[:, 0] += 3.0
    seen.clear()
    assert not torch.equal(agent(moved, torch.zeros(5, 1))[0], agent(features, torch.zeros(5, 1))[0])
    assert torch.equal(seen[0], seen[1])


def test_a_checkpoint_from_before_the_encoders_loads_as_the_plain_mlp(gspc_bars):
    series = prepare_series(gspc_bars.iloc[:300], 64, torch.device("cpu"))
    agent = ActorCritic(series.features.shape[1], make_action_space(config_from_dict({}).action, 1), (16,))
    checkpoint = policy_checkpoint(agent, series.feature_module)
    del checkpoint["return_window"], checkpoint["encoder"]  # the keys older checkpoints lack
    policy = load_policy(checkpoint)
    assert policy.actor_critic.encoder is None and policy.features.return_window == 0
    window = series.ohlcv[200 - 63:201, 0][None].float()
    with torch.no_grad():
        assert torch.equal(policy(window, torch.zeros(1, 1))[0], ExportPolicy(series.feature_module, agent)(
            window, torch.zeros(1, 1))[0])


def test_encoder_settings_shape_the_fingerprint_only_with_an_encoder():
    plain = training_fingerprint(config_from_dict({}))
    assert training_fingerprint(config_from_dict({"ppo": {"encoder_window": 40}})) == plain
    conv = training_fingerprint(config_from_dict({"ppo": {"encoder": "conv"}}))
    assert conv != plain
    assert training_fingerprint(config_from_dict({"ppo": {"encoder": "conv", "encoder_window": 40}})) != conv


def test_config_refuses_what_the_encoder_cannot_read():
    with pytest.raises(ConfigError, match="ppo.encoder_window"):
        config_from_dict({"ppo": {"encoder": "conv", "encoder_window": 61}})
    with pytest.raises(ConfigError, match="ppo.encoder = conv"):
        config_from_dict({"ppo": {"encoder": "conv"}, "action": {"mode": "portfolio"},
                          "data": {"symbols": ["GSPC", "KO"]}})
    assert config_from_dict({"ppo": {"encoder_window": 40}}).return_window == 0  # the plain MLP adds nothing
    assert config_from_dict({"ppo": {"encoder": "conv", "encoder_window": 40}}).return_window == 40


def test_compare_judges_a_variant_beside_the_reference(tmp_path, capsys):
    base, variant = tmp_path / "base.json", tmp_path / "conv.yaml"
    base.write_text(json.dumps({"ppo": TINY["ppo"] | {"progress": False}, "splits": {"n_folds": 1}}))
    variant.write_text("ppo:\n  encoder: conv\n  encoder_window: 16\n")
    code = main(["compare", "--data", "ml/sample", "--symbols", "GSPC", "--start", "2012-01-01", "--name", "mlp",
                 "--variant", f"conv={variant}", "--config", str(base), "--seeds", "1", "2",
                 "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "conv beats mlp / buy_and_hold" in printed
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    models = [row["model"] for row in result["rows"]]
    assert (models.count("mlp"), models.count("conv"), models.count("buy_and_hold")) == (2, 2, 1)
    assert result["configs"]["conv"]["ppo"]["encoder_window"] == 16
    assert result["summary"]["beats"].keys() == {"conv>mlp", "conv>buy_and_hold", "mlp>buy_and_hold"}
    assert {row["fold"] for row in result["rows"]} == {"2018-01-02"}  # named by its test period


@pytest.mark.parametrize("variant, message", [
    ("conv", "must be NAME=CONFIG_FILE"),
    ("../x=conv.yaml", "a model name of letters, digits and _"),
    ("buy_and_hold=conv.yaml", "not a rule's (buy_and_hold, cash"),
    ("momentum=conv.yaml", "not a rule's"),
    ("mlp=conv.yaml", "each once"),
    ("conv={lookback}", "lookback and splits must equal mlp's"),
    ("conv={costs}", "costs, data and ppo.device must equal mlp's"),
    ("rules={risk}", "keeps mlp's risk rules"),
])
def test_a_bad_variant_gets_one_line(tmp_path, capsys, variant, message):
    (tmp_path / "lookback.yaml").write_text("lookback: 96\n")
    (tmp_path / "costs.yaml").write_text("costs:\n  commission_bps: 5\n")
    (tmp_path / "risk.yaml").write_text("action:\n  mode: strategies\nrisk:\n  max_drawdown: 0.2\n")
    for name in ("lookback", "costs", "risk"):
        variant = variant.replace("{" + name + "}", str(tmp_path / f"{name}.yaml"))
    code = main(["compare", "--data", "ml/sample", "--symbols", "GSPC", "--name", "mlp", "--variant", variant,
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
