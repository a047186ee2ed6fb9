"""The forward test: a champion trained on the bundled GSPC up to a cut, then fed the bars after
the cut a few at a time, as market_data would curate them.

Checked: the ledger equals an offline backtest of the same exported model on the same bars
(identical decisions and NAV through the environment's accounting) and the torch policy's
backtest to the export's parity; a rerun changes nothing; a champion change starts a new
segment; through `airflow dags test forward_test`, the ledger grows and the page is written;
an injected volatility shift fails monitoring naming feature drift, and an injected collapse
fails it naming action collapse (and rolls champion back when asked).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ml.config import config_from_dict
from ml.data.lake import Lake
from ml.evaluation.backtest import run_backtest
from ml.evaluation.walkforward import backtest_policy
from ml.forward import Ledger, MonitorRules, monitor_champion, trade_champion
from ml.forward.paper import lake_series, load_champion
from ml.market.calendar import periods_per_year
from ml.pipeline import run_pipeline
from ml.pipeline.rundir import RunFolder, load_agent, read_config, read_json
from ml.release import registry
from ml.release.tracking import store_client
from ml.serving import Policy
from tests.conftest import ROOT
from tests.test_dags import AIRFLOW, airflow_env  # noqa: F401  (the fixture)
from tests.test_pipeline import TINY

CUT = 80  # bars after the cut: what the champion never saw
MODEL = "ppo_GSPC_1d"


def curate(lake: Lake, bars: pd.DataFrame, end: int) -> None:
    """The lake holds the first ``end`` bars, as market_data leaves it after a pull."""
    lake.curate(bars.iloc[:end].reset_index(drop=True))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, gspc_bars):
    """A champion trained (tiny budget) from a lake holding GSPC up to the cut."""
    root = tmp_path_factory.mktemp("forward")
    lake_root = root / "lake"
    curate(Lake(lake_root), gspc_bars, len(gspc_bars) - CUT)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    config = config_from_dict({**TINY, "data": {**TINY["data"], "source": "lake", "path": str(lake_root)},
                               "registry": {"tracking_uri": uri}})
    result = run_pipeline(config, root / "run")
    if not result["champion"]:
        registry.promote(uri, MODEL, result["version"])
    return {"root": root, "lake": lake_root, "uri": uri, "run": root / "run", "version": result["version"]}


def onnx_decisions(policy: Policy, series) -> callable:
    """The exported model on the raw window ending at bar t: what a service runs, offline."""
    ohlcv = series.ohlcv[:, 0].numpy()
    return lambda _features, position, t: torch.from_numpy(
        policy.decide(ohlcv[t + 1 - policy.lookback:t + 1], position.numpy()))


def test_the_ledger_is_the_offline_backtest_of_the_same_model_and_a_rerun_changes_nothing(trained, gspc_bars,
                                                                                       tmp_path):
    lake, ledger = Lake(trained["lake"]), Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    first = trade_champion(MODEL, trained["uri"], ledger, tmp_path / "work", str(trained["lake"]))
    assert first["segment_started"] and first["new_bars"] == 1  # the decision on the model's last bar
    data = read_json(RunFolder(trained["run"]).data)
    assert first["start_bar"] == pd.Timestamp(data["last"]).strftime("%Y-%m-%dT%H:%M:%SZ")
    # The bars after the cut arrive 1, 7, 30 and 42 at a time.
    end = len(gspc_bars) - CUT
    for batch in (1, 7, 30, 42):
        end += batch
        curate(lake, gspc_bars, end)
        done = trade_champion(MODEL, trained["uri"], ledger, tmp_path / "work", str(trained["lake"]))
        assert done["new_bars"] == batch and not done["segment_started"]
    segment = ledger.current_segment(MODEL)
    rows = ledger.rows(segment.id)
    assert len(rows) == CUT + 1

    again = trade_champion(MODEL, trained["uri"], ledger, tmp_path / "work", str(trained["lake"]))
    assert again["new_bars"] == 0 and ledger.rows(segment.id) == rows

    # Offline: the same exported model, the same bars, through the training environment.
    champion = load_champion(trained["uri"], MODEL, tmp_path / "offline")
    config = champion.config
    series = lake_series(config, str(trained["lake"]))
    start = len(series.timestamps) - CUT - 1
    ppy = periods_per_year(config.data.interval, config.data.calendar)
    offline = run_backtest(onnx_decisions(champion.policy, series), series, (start, len(series.timestamps) - 1),
                           config.costs, champion.action_space, ppy)
    nav = np.array([row.nav for row in rows])
    decisions = np.array([row.decision for row in rows])
    np.testing.assert_array_equal(decisions[:-1], offline.decision)  # the last decision waits for its fill
    np.testing.assert_allclose(nav, offline.nav, rtol=1e-12, atol=0)
    # The backtest keeps the held shares as the policy reads them, in float32.
    np.testing.assert_allclose(np.array([row.weights for row in rows]), offline.weights, rtol=0, atol=1e-7)
    assert [row.bar_time for row in rows] == [t.strftime("%Y-%m-%dT%H:%M:%SZ") for t in offline.timestamps]

    # Training = backtest = serving: the torch policy the export came from, on the pipeline's backtest.
    run = RunFolder(trained["run"])
    agent, _ = load_agent(run, read_json(run.folds)[-1]["index"])
    torch_backtest = backtest_policy(agent, series, (start, len(series.timestamps) - 1), read_config(run))
    np.testing.assert_allclose(decisions[:-1], torch_backtest.decision, atol=1e-5)
    np.testing.assert_allclose(nav, torch_backtest.nav, rtol=1e-5)


def register_as_new_version(trained, onnx: Path, tmp_path: Path) -> str:
    """``onnx`` registered from a copy of the champion's training run (its report artifacts), gate passed."""
    client = store_client(trained["uri"])
    source = client.get_run(client.get_model_version(MODEL, trained["version"]).run_id)
    run_id = client.create_run(source.info.experiment_id).info.run_id
    client.log_artifacts(run_id, client.download_artifacts(source.info.run_id, "report", str(tmp_path)), "report")
    example = dict(np.load(RunFolder(trained["run"]).parity_windows))
    version = registry.register_onnx(trained["uri"], run_id, MODEL, onnx, example, tags={})
    registry.record_decision(trained["uri"], MODEL, version, {"passed": True, "reasons": ["test"], "numbers": {}},
                             "test")
    return version


def test_a_champion_change_starts_a_new_segment(trained, gspc_bars, tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    trade_champion(MODEL, trained["uri"], ledger, tmp_path / "work", str(trained["lake"]))
    # The same file registered again, from a new training run, as a version that passed its gate.
    new = register_as_new_version(trained, registry.download_model(trained["uri"], MODEL, trained["version"]),
                                  tmp_path)
    try:
        registry.promote(trained["uri"], MODEL, new)
        moved = trade_champion(MODEL, trained["uri"], ledger, tmp_path / "work", str(trained["lake"]))
        assert moved["version"] == new, (moved, new)
        assert moved["segment_started"], moved
        assert [(s.version, s.start_bar) for s in ledger.segments(MODEL)] == [
            (trained["version"], moved["start_bar"]), (new, moved["start_bar"])]
    finally:
        registry.promote(trained["uri"], MODEL, trained["version"])


def drifted(bars: pd.DataFrame, after: int, scale: float) -> pd.DataFrame:
    """Every price move after bar ``after`` made ``scale`` times larger (bar ranges included)."""
    out = bars.copy()
    log_close = np.log(bars["close"].to_numpy())
    moves = np.diff(log_close, prepend=log_close[0])
    moves[after:] *= scale
    new_close = np.exp(np.cumsum(moves) - moves[0] + log_close[0])
    for column in ("open", "high", "low"):
        offset = np.log(bars[column].to_numpy()) - log_close
        offset[after:] *= scale
        out[column] = new_close * np.exp(offset)
    out["close"] = new_close
    return out


def test_injected_volatility_shift_fails_monitoring_naming_feature_drift(trained, gspc_bars, tmp_path):
    lake_root = tmp_path / "lake"
    cut = len(gspc_bars) - CUT
    shifted = drifted(gspc_bars, cut, 4.0)
    curate(Lake(lake_root), shifted, cut)
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    trade_champion(MODEL, trained["uri"], ledger, tmp_path / "work", str(lake_root))
    curate(Lake(lake_root), shifted, cut + 40)
    trade_champion(MODEL, trained["uri"], ledger, tmp_path / "work", str(lake_root))
    result = monitor_champion(MODEL, trained["uri"], ledger, tmp_path / "work", MonitorRules(), str(lake_root))
    assert [b["rule"] for b in result["breaches"] if b["rule"] == "feature drift"] == ["feature drift"], result["checks"]
    drift = next(b for b in result["breaches"] if b["rule"] == "feature drift")
    assert "range_1" in drift["detail"] and "KS" in drift["detail"]
    page = Path(result["page"]).read_text()
    assert "Monitoring breached" in page and "feature drift" in page and "data:image/png;base64," in page
    assert "live exposure histogram" in page

    # The segment's MLflow run holds the page, which the task's "report.html" button opens.
    from ml.orchestration import mlflow_ui_links

    client = store_client(trained["uri"])
    assert {a.path for a in client.list_artifacts(result["run_id"], "report")} == {
        "report/forward_test.html", "report/monitoring.json"}
    assert client.get_run(result["run_id"]).data.metrics["forward/breaches"] >= 1
    links = mlflow_ui_links({"tracking_uri": trained["uri"], "run_id": result["run_id"], "model_name": MODEL,
                             "version": result["version"], "report_path": "report/forward_test.html"},
                            "http://127.0.0.1:5000")
    assert links["report"] == f"{links['run']}/artifacts/report/forward_test.html"


def collapsed_version(trained, tmp_path: Path) -> str:
    """The champion's policy with its actor forced to one level, exported and promoted."""
    from ml.agent.policy import load_policy
    from ml.release.export import export_onnx

    run = RunFolder(trained["run"])
    latest = read_json(run.folds)[-1]["index"]
    _, checkpoint = load_agent(run, latest)
    policy = load_policy(checkpoint)
    head = policy.actor_critic.actor
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-50.0)
        head.bias[-1] = 50.0  # the highest exposure level, whatever the input
    metadata = dict(Policy(run.model, prefer_gpu=False).metadata)
    path = export_onnx(policy, tmp_path / "collapsed.onnx", metadata)
    version = register_as_new_version(trained, path, tmp_path)
    registry.promote(trained["uri"], MODEL, version)
    return version


def test_injected_collapse_fails_monitoring_and_rolls_champion_back_when_asked(trained, gspc_bars, tmp_path):
    lake_root = tmp_path / "lake"
    cut = len(gspc_bars) - CUT
    curate(Lake(lake_root), gspc_bars, cut)
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    version = collapsed_version(trained, tmp_path)
    try:
        trade_champion(MODEL, trained["uri"], ledger, tmp_path / "work", str(lake_root))
        curate(Lake(lake_root), gspc_bars, cut + 30)
        trade_champion(MODEL, trained["uri"], ledger, tmp_path / "work", str(lake_root))
        quiet = monitor_champion(MODEL, trained["uri"], ledger, tmp_path / "work", MonitorRules(), str(lake_root))
        collapse = [b for b in quiet["breaches"] if b["rule"] == "action collapse"]
        assert collapse and "100% of 31 live decisions at" in collapse[0]["detail"], quiet["checks"]
        assert registry.alias_version(trained["uri"], MODEL, registry.CHAMPION) == version  # off by default

        rolled = monitor_champion(MODEL, trained["uri"], ledger, tmp_path / "work", MonitorRules(rollback=True),
                                  str(lake_root))
        assert rolled["rollback"]["rolled_back"] and rolled["rollback"]["previous"] == version
        assert registry.alias_version(trained["uri"], MODEL, registry.CHAMPION) == rolled["rollback"]["champion"]
    finally:
        registry.promote(trained["uri"], MODEL, trained["version"])


def test_airflow_dags_test_forward_test_trades_new_bars_and_writes_the_page(trained, gspc_bars, airflow_env,  # noqa: F811
                                                                          tmp_path):
    lake_root = tmp_path / "lake"
    cut = len(gspc_bars) - CUT
    curate(Lake(lake_root), gspc_bars, cut + 25)
    env = {**airflow_env, "MLFLOW_TRACKING_URI": trained["uri"], "ML_LAKE_ROOT": str(lake_root),
           "ML_FORWARD_DB": f"sqlite:///{tmp_path / 'ledger.db'}", "ML_RUNS_DIR": str(tmp_path / "runs")}

    def run(conf: dict) -> subprocess.CompletedProcess:
        return subprocess.run([AIRFLOW, "dags", "test", "forward_test", "-c", json.dumps(conf)], env=env,
                              capture_output=True, text=True, cwd=env["AIRFLOW_HOME"])

    proc = run({"models": [MODEL]})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    ledger = Ledger(env["ML_FORWARD_DB"])
    rows = ledger.rows(ledger.current_segment(MODEL).id)
    assert len(rows) == 26
    champion = load_champion(trained["uri"], MODEL, tmp_path / "offline")
    series = lake_series(champion.config, str(lake_root))
    last = len(series.timestamps) - 1
    offline = run_backtest(onnx_decisions(champion.policy, series), series, (last - 25, last),
                           champion.config.costs, champion.action_space, champion.periods_per_year)
    np.testing.assert_array_equal(np.array([row.decision for row in rows])[:-1], offline.decision)
    np.testing.assert_allclose([row.nav for row in rows], offline.nav, rtol=1e-12, atol=0)
    pages = list((tmp_path / "runs" / "forward_test").rglob("forward_test.html"))
    assert len(pages) == 1 and "No rule breached" in pages[0].read_text()

    # A rerun of the same day adds nothing.
    again = run({"models": [MODEL]})
    assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
    assert ledger.rows(ledger.current_segment(MODEL).id) == rows

    # Bars whose moves are four times as large: monitoring fails the run and names the rule.
    shifted = drifted(gspc_bars, cut, 4.0)
    other_lake = tmp_path / "shifted"
    curate(Lake(other_lake), shifted, cut + 40)
    env.update({"ML_LAKE_ROOT": str(other_lake), "ML_FORWARD_DB": f"sqlite:///{tmp_path / 'shifted.db'}"})
    failed = run({"models": [MODEL]})
    log = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert f"{MODEL} v{trained['version']}: monitoring breached:" in log, log[-5000:]
    assert "feature drift: 1 one-bar feature(s) drifted" in log and "range_1 KS" in log


def test_the_cli_trades_and_monitors_and_refuses_a_bad_model_name_in_one_line(trained, gspc_bars, tmp_path):
    lake_root = tmp_path / "lake"
    curate(Lake(lake_root), gspc_bars, len(gspc_bars) - CUT + 25)
    base = [sys.executable, "-m", "ml", "forward", "--tracking-uri", trained["uri"], "--lake", str(lake_root),
            "--ledger", f"sqlite:///{tmp_path / 'ledger.db'}", "--out", str(tmp_path / "out")]
    env = {**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    done = subprocess.run(base, capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{MODEL} v{trained['version']}: 26 new bar(s)" in done.stdout
    assert "OK         action collapse" in done.stdout and "feature drift" in done.stdout
    assert (tmp_path / "out" / MODEL / "forward_test.html").exists()

    refused = subprocess.run(base + ["--model", "../../etc"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == [
        "forward: model name '../../etc': letters, digits, '_', '.', '=' and '-' only, starting with a letter or "
        "digit (e.g. ppo_GSPC_1d)"]
    assert not (tmp_path / "etc").exists()


def test_the_ledger_runs_on_postgres_and_refuses_a_bar_twice(tmp_path):
    """The stack's ledger: a fresh database on the local PostgreSQL, floats kept exactly."""
    import psycopg2
    import sqlalchemy as sa

    from ml.forward.ledger import BarRow
    from tests.test_airflow_services import PG_HOST, PG_PORT, PG_USER, ensure_postgres

    ensure_postgres()
    name = f"forward_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=5)
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")
    ledger = Ledger(f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}")
    try:
        segment = ledger.start_segment(MODEL, "3", "GSPC", "1d", "2018-10-03T00:00:00Z", "run")
        row = BarRow(bar_time="2018-10-04T00:00:00Z", version="3", close=[2901.61], fill_price=[2919.35],
                     cost=0.1 / 3, traded=0.999999999999, nav=1.0 / 3, cash=-1e-17, units=[0.1 / 7],
                     weights=[0.1 / 9], decision=[0.5], executed=[0.25], risk_state=[1.0 / 3, 2.0 / 3])
        assert ledger.append(segment.id, [row]) == 1
        assert ledger.rows(segment.id) == [row] and ledger.last_row(segment.id) == row
        with pytest.raises(sa.exc.IntegrityError):
            ledger.append(segment.id, [row, row])
        assert ledger.rows(segment.id) == [row]
        assert ledger.current_segment(MODEL) == segment
    finally:
        ledger.dispose()
        admin.cursor().execute(f"DROP DATABASE {name}")
        admin.close()


def test_a_risk_overlay_model_keeps_its_state_across_runs_like_the_backtest(gspc_bars, tmp_path):
    """A champion with volatility targeting and a drawdown breaker, fed its bars in three runs."""
    lake_root = tmp_path / "lake"
    cut = len(gspc_bars) - CUT
    curate(Lake(lake_root), gspc_bars, cut)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    risk = {"target_volatility": 0.1, "max_leverage": 1.5, "max_drawdown": 0.02, "drawdown_cooldown_bars": 5}
    config = config_from_dict({**TINY, "data": {**TINY["data"], "source": "lake", "path": str(lake_root)},
                               "risk": risk, "registry": {"tracking_uri": uri}})
    result = run_pipeline(config, tmp_path / "run")
    if not result["champion"]:
        registry.promote(uri, MODEL, result["version"])
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    for end in (cut, cut + 30, cut + CUT):
        curate(Lake(lake_root), gspc_bars, end)
        trade_champion(MODEL, uri, ledger, tmp_path / "work", str(lake_root))
    rows = ledger.rows(ledger.current_segment(MODEL).id)
    assert len(rows) == CUT + 1 and all(row.risk_state for row in rows)

    run = RunFolder(tmp_path / "run")
    agent, _ = load_agent(run, read_json(run.folds)[-1]["index"])
    series = lake_series(read_config(run), str(lake_root))
    last = len(series.timestamps) - 1
    offline = backtest_policy(agent, series, (last - CUT, last), read_config(run))
    assert offline.trips.any(), "the drawdown breaker never tripped: the test would not see its state"
    np.testing.assert_allclose(np.array([row.executed for row in rows])[:-1], offline.executed, atol=2e-5)
    np.testing.assert_allclose([row.nav for row in rows], offline.nav, rtol=2e-5)
