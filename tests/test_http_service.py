"""The HTTP service (`python -m ml serve --http`, a real server on loopback) over a real registry:
the library's decisions for one window and a batch, bad requests answered with one line naming
the field and the rule, and a champion alias that moves (once to a version that cannot be loaded)
while requests keep coming. Risk-overlay and portfolio models are served in-process."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient

from ml.agent.policy import ActorCritic, ExportPolicy
from ml.config import ActionConfig
from ml.data.schema import ohlcv_array
from ml.env.action_space import PortfolioWeights, make_action_space
from ml.env.risk import RiskOverlay
from ml.market.features import FeatureModule
from ml.release import registry
from ml.release.export import export_onnx
from ml.service import Champion, create_app
from ml.serving import InputError, Policy
from tests.conftest import ROOT
from tests.servers import free_port, stop, wait_until_up
from tests.test_risk import ALL_RULES, _risk_json
from tests.test_serving_inputs import LOOKBACK, export

MODEL = "ppo_HTTP_1d"
CHAMPION = f"models:/{MODEL}@champion"


@pytest.fixture(scope="module")
def bars(gspc_bars):
    """Real windows of the bundled GSPC sample, as a client sends them: bars and ISO times."""
    ohlcv = ohlcv_array(gspc_bars)
    times = gspc_bars["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ").tolist()
    ends = (len(ohlcv), len(ohlcv) - 7, len(ohlcv) - 40)
    return [(ohlcv[end - LOOKBACK:end].tolist(), times[end - LOOKBACK:end]) for end in ends]


@pytest.fixture(scope="module")
def store(tmp_path_factory, bars):
    """A registry (SQLite store, local artifacts) holding v1 (full bars), v2 (close only) and v3,
    whose stored file is then broken; all three passed their gate, v1 is the champion."""
    folder = tmp_path_factory.mktemp("http_store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    paths = {"1": export(folder / "full", use_range=True), "2": export(folder / "close", use_range=False)}
    paths["3"] = paths["1"]
    example = {"ohlcv": np.asarray([bars[0][0]], np.float32), "position": np.zeros((1, 1), np.float32)}
    client = MlflowClient(uri)
    experiment = client.create_experiment("http", artifact_location=(folder / "artifacts").as_uri())
    for version, path in paths.items():
        run_id = client.create_run(experiment).info.run_id
        assert registry.register_onnx(uri, run_id, MODEL, Path(path), example, tags={}) == version
        registry.record_decision(uri, MODEL, version, {"passed": True, "reasons": ["test"], "numbers": {}},
                                 "test version")
    registry.promote(uri, MODEL, "1")
    # v3's stored file is overwritten: the registry says it is fine, loading it fails.
    stored = sorted(Path(urlsplit(client.get_model_version(MODEL, "3").source).path).rglob("*.onnx"))
    assert stored
    for onnx_file in stored:
        onnx_file.write_bytes(b"not a model")
    return uri, paths


@pytest.fixture(scope="module")
def service(store, tmp_path_factory):
    """`python -m ml serve --http` on a free loopback port, checking the alias every 0.3 s, in a
    process where importing torch or Airflow fails: the service runs without either."""
    url, _ = store
    port = free_port()
    log_path = tmp_path_factory.mktemp("http_service") / "service.log"
    without = ("import sys; sys.modules['torch'] = None; sys.modules['airflow'] = None; "
               "from ml.cli import main; sys.exit(main(sys.argv[1:]))")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", without, "serve", "--http", "--model", CHAMPION, "--tracking-uri", url,
             "--port", str(port), "--reload-interval", "0.3", "--max-batch", "4"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", process, "policy service", timeout=90)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        stop(process)
        print(log_path.read_text()[-3000:])


def library(paths, version, bars, positions, with_times=True):
    policy = Policy(paths[version], prefer_gpu=False)
    ohlcv = np.asarray([window for window, _ in bars], np.float32)
    times = np.array([[t.rstrip("Z") for t in stamps] for _, stamps in bars], dtype="datetime64[ns]")
    return policy.decide(ohlcv, np.asarray(positions, np.float32).reshape(-1, 1), times if with_times else None)


def test_health_and_model_name_the_served_version(service):
    health = service.get("/health").json()
    assert health["status"] == "ok" and health["model_version"] == "1" and health["follows_alias"] is True
    assert health["model"] == CHAMPION and health["reload_error"] is None
    model = service.get("/model").json()
    assert (model["name"], model["alias"], model["model_version"]) == (MODEL, "champion", "1")
    assert model["lookback"] == LOOKBACK and model["held"] == "position" and model["risk_overlay"] is False
    assert model["metadata"]["close_only"] == "false" and model["max_batch"] == 4


def test_decisions_equal_the_library_for_one_window_and_a_batch(service, store, bars):
    _, paths = store
    window, times = bars[0]
    one = service.post("/decide", json={"ohlcv": window, "position": 0.5, "timestamps": times})
    assert one.status_code == 200, one.text
    assert one.json()["model_version"] == "1"
    assert one.json()["target_exposure"] == pytest.approx(float(library(paths, "1", bars[:1], [0.5])[0, 0]), abs=1e-6)
    positions = [0.0, 1.0, -0.5]
    batch = service.post("/decide/batch", json={"windows": [{"ohlcv": w, "position": p}
                                                            for (w, _), p in zip(bars, positions)]})
    assert batch.status_code == 200, batch.text
    expected = library(paths, "1", bars, positions, with_times=False)[:, 0]
    assert [d["target_exposure"] for d in batch.json()["decisions"]] == pytest.approx(expected.tolist(), abs=1e-6)


def broken_low(bars):
    window = [list(bar) for bar in bars[0][0]]
    window[-1][2] = -window[-1][2]
    return window


@pytest.mark.parametrize("path, body, status, words", [
    ("/decide", lambda b: {"ohlcv": b[0][0]}, 422, "position: required"),
    ("/decide", lambda b: {"ohlcv": b[0][0][:10], "position": 0}, 422, "ohlcv: shape [10, 5], must be [64, 5]"),
    ("/decide", lambda b: {"ohlcv": [["x"] * 5] * LOOKBACK, "position": 0}, 422, "ohlcv: numbers only"),
    ("/decide", lambda b: {"ohlcv": b[0][0], "position": 11}, 422, "position: must be finite and within [-10, 10]"),
    ("/decide", lambda b: {"ohlcv": b[0][0], "position": "flat"}, 422, "position: Input should be a valid number"),
    ("/decide", lambda b: {"ohlcv": b[0][0], "positon": 0}, 422, "positon: unknown field"),
    ("/decide", lambda b: {"ohlcv": b[0][0], "position": 0, "nav": 1e6}, 422, "nav: this model has no risk overlay"),
    ("/decide", lambda b: {"ohlcv": b[0][0], "position": 0, "timestamps": b[0][1][::-1]}, 422,
     "breaks rule 'timestamps increasing'"),
    ("/decide", lambda b: {"ohlcv": b[0][0], "position": 0, "timestamps": b[0][1][:-1] + ["soon"]}, 422,
     "timestamps[63]: Input should be a valid datetime"),
    ("/decide", lambda b: {"ohlcv": broken_low(b), "position": 0}, 422,
     "ohlcv: window 0 bar 63 (the last): low -"),
    ("/decide", "{not json", 400, "body: not valid JSON"),
    ("/decide/batch", lambda b: {"windows": [{"ohlcv": b[1][0], "position": 0},
                                             {"ohlcv": broken_low(b), "position": 0}]},
     422, "ohlcv: window 1 bar 63 (the last): low -"),
    ("/decide/batch", lambda b: {"windows": [{"ohlcv": b[0][0], "position": 0, "timestamps": b[0][1]},
                                             {"ohlcv": b[1][0], "position": 0}]},
     422, "windows[1].timestamps: send them with every window of a batch or with none"),
    ("/decide/batch", lambda b: {"windows": [{"ohlcv": b[0][0], "position": 0}] * 5}, 422,
     "windows: 5 in one request, at most 4"),
])
def test_bad_requests_get_one_line_naming_the_field_and_the_rule(service, bars, path, body, status, words):
    answer = (service.post(path, content=body, headers={"content-type": "application/json"}) if isinstance(body, str)
              else service.post(path, json=body(bars)))
    assert answer.status_code == status, answer.text
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and words in detail, detail


def test_a_broken_bar_gets_the_library_message_word_for_word(service, store, bars):
    _, paths = store
    with pytest.raises(InputError) as refused:
        Policy(paths["1"], prefer_gpu=False).decide(np.asarray(broken_low(bars), np.float32), np.zeros((1, 1)))
    answer = service.post("/decide", json={"ohlcv": broken_low(bars), "position": 0})
    assert answer.json() == {"detail": str(refused.value)}
    assert "breaks rule 'low strictly positive'" in str(refused.value)


def wait_for(check, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def test_the_champion_moves_while_requests_keep_coming(service, store, bars):
    url, paths = store
    window, times = bars[0]
    answers, stopping = [], threading.Event()

    def keep_deciding():  # a downstream consumer asking all along, on its own connection
        with httpx.Client(base_url=str(service.base_url), timeout=30) as own:
            while not stopping.is_set():
                reply = own.post("/decide", json={"ohlcv": window, "position": 0.0, "timestamps": times})
                json_body = reply.headers.get("content-type") == "application/json"
                answers.append((reply.status_code, reply.json() if json_body else {"text": reply.text}))

    consumer = threading.Thread(target=keep_deciding)
    consumer.start()
    try:
        wait_for(lambda: len(answers) >= 5, "answers from v1")
        registry.promote(url, MODEL, "2")
        wait_for(lambda: service.get("/health").json()["model_version"] == "2", "v2 served")
        wait_for(lambda: sum(a.get("model_version") == "2" for _, a in answers) >= 5, "answers from v2")

        # A champion whose file cannot be loaded: v2 keeps serving and the health check says why.
        registry.promote(url, MODEL, "3")
        stale = wait_for(lambda: (lambda h: h if h["status"] == "stale" else None)(service.get("/health").json()),
                         "the failed reload reported")
        assert stale["model_version"] == "2" and f"{CHAMPION} (v3): " in stale["reload_error"], stale
        assert "not a loadable ONNX model" in stale["reload_error"]
        count = len(answers)
        wait_for(lambda: len(answers) >= count + 5, "answers while v3 is refused")
        registry.rollback(url, MODEL)  # back to v2: nothing to load, the error clears
        wait_for(lambda: service.get("/health").json()["status"] == "ok", "the health check back to ok")
    finally:
        stopping.set()
        consumer.join(timeout=30)

    assert all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:3]
    versions = [a["model_version"] for _, a in answers]
    assert versions == sorted(versions) and set(versions) == {"1", "2"}, "every request answered, v1 then v2"
    expected = {v: float(library(paths, v, bars[:1], [0.0])[0, 0]) for v in ("1", "2")}
    for _, answer in answers:
        assert answer["target_exposure"] == pytest.approx(expected[answer["model_version"]], abs=1e-6)


def test_a_model_it_cannot_load_is_refused_at_start_in_one_line(store, capsys, tmp_path, monkeypatch):
    from ml.cli import main

    # As a deployment runs it (scripts/env.sh, the compose file): no MLflow download bars on stderr.
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    url, _ = store
    missing = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for model, store_args, words in (
            ("models:/no_such@champion", ["--tracking-uri", url], "no version of no_such has the alias 'champion'"),
            (f"models:/{MODEL}@challenger", ["--tracking-uri", url], f"no version of {MODEL} has the alias"),
            (f"models:/{MODEL}/3", ["--tracking-uri", url], "not a loadable ONNX model"),
            (CHAMPION, [], "no MLflow store named: pass --tracking-uri or set MLFLOW_TRACKING_URI"),
            (CHAMPION, ["--tracking-uri", missing], "no MLflow store at")):
        assert main(["serve", "--http", "--model", model, *store_args, "--port", str(free_port())]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"REJECTED {model}") and words in lines[0], lines
    assert not (tmp_path / "mlflow.db").exists()


# Risk overlay and portfolio models, in-process ------------------------------------------------

@pytest.fixture(scope="module")
def overlay_model(tmp_path_factory) -> str:
    torch.manual_seed(0)
    features = FeatureModule(LOOKBACK)
    agent = ActorCritic(features.n_features, make_action_space(ActionConfig(mode="continuous")), (16,))
    with torch.no_grad():  # a policy whose exposure moves with the window
        agent.actor.weight.normal_(0.0, 0.5)
    policy = ExportPolicy(features, agent, RiskOverlay(ALL_RULES, 1, 252.0, "1d"))
    return str(export_onnx(policy, tmp_path_factory.mktemp("overlay") / "model.onnx",
                           {"lookback": LOOKBACK, "interval": "1d", "risk": _risk_json(ALL_RULES)}))


def test_a_risk_overlay_model_takes_nav_and_hands_back_its_state(overlay_model, bars):
    policy = Policy(overlay_model, prefer_gpu=False)
    ohlcv = np.asarray([w for w, _ in bars[:2]], np.float32)
    times = np.array([[t.rstrip("Z") for t in stamps] for _, stamps in bars[:2]], dtype="datetime64[ns]")
    with TestClient(create_app(Champion(overlay_model, prefer_gpu=False))) as client:
        window = {"ohlcv": bars[0][0], "position": 0.2, "timestamps": bars[0][1], "nav": 1000.0}
        first = client.post("/decide", json=window).json()
        fresh = policy.decide_with_risk(ohlcv[:1], np.array([[0.2]]), 1000.0, times[:1])
        assert first["executed_target"] == pytest.approx(float(fresh.target[0, 0]), abs=1e-6)
        assert first["target_exposure"] == pytest.approx(float(fresh.policy_target[0, 0]), abs=1e-6)
        assert first["risk_state"] == pytest.approx(fresh.state[0].tolist(), rel=1e-6)

        # A batch: one account passes the state back, the other starts fresh.
        later = {"ohlcv": bars[1][0], "position": 0.1, "timestamps": bars[1][1], "nav": 990.0,
                 "risk_state": first["risk_state"]}
        batch = client.post("/decide/batch", json={"windows": [later, window]}).json()["decisions"]
        state = np.stack([fresh.state[0], policy.initial_risk_state(np.array([1000.0]))[0]])
        both = policy.decide_with_risk(ohlcv[[1, 0]], np.array([[0.1], [0.2]]), np.array([990.0, 1000.0]),
                                       times[[1, 0]], state)
        assert [d["executed_target"] for d in batch] == pytest.approx(both.target[:, 0].tolist(), abs=1e-6)
        assert batch[0]["risk_state"] == pytest.approx(both.state[0].tolist(), rel=1e-6)

        for change, words in (({"nav": None}, "nav: required by this model's risk overlay"),
                              ({"timestamps": None}, "timestamps: required by the risk overlay"),
                              ({"nav": -5.0}, "nav: must be 1 finite values above 0"),
                              ({"risk_state": [1.0, 2.0]}, "risk_state: must be the 8 finite numbers")):
            answer = client.post("/decide", json={**window, **change})
            assert answer.status_code == 422 and words in answer.json()["detail"], answer.text


def test_a_portfolio_model_takes_weights_and_names_each_asset(tmp_path, bars, ko_bars):
    torch.manual_seed(0)
    features = FeatureModule(LOOKBACK)
    agent = ActorCritic(features.n_features * 2, PortfolioWeights(2), (16,))
    path = str(export_onnx(ExportPolicy(features, agent), tmp_path / "model.onnx",
                           {"lookback": LOOKBACK, "symbols": "GSPC,KO"}))
    ko = ohlcv_array(ko_bars)[-LOOKBACK:]
    window = np.stack([np.asarray(bars[0][0], np.float32), ko.astype(np.float32)], axis=1)  # [L, 2, 5]
    with TestClient(create_app(Champion(path, prefer_gpu=False))) as client:
        answer = client.post("/decide", json={"ohlcv": window.tolist(), "weights": [0.3, 0.2]})
        assert answer.status_code == 200, answer.text
        expected = Policy(path, prefer_gpu=False).decide(window, np.array([[0.3, 0.2]]))[0]
        assert answer.json()["target_weights"] == pytest.approx({"GSPC": expected[0], "KO": expected[1]}, abs=1e-6)
        assert client.get("/model").json()["symbols"] == ["GSPC", "KO"]
        for body, words in (({"ohlcv": window.tolist(), "position": 0.5}, "position: this portfolio model takes "
                                                                          "weights"),
                            ({"ohlcv": window.tolist(), "weights": [0.5]}, "weights: 1 values for the assets"),
                            ({"ohlcv": bars[0][0], "weights": [0.3, 0.2]}, "ohlcv: shape [64, 5], must be [64, 2, 5]")):
            answer = client.post("/decide", json=body)
            assert answer.status_code == 422 and words in answer.json()["detail"], answer.text
