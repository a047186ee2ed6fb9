"""DAG Params and asset events -> pipeline config (without Airflow), and the Params' own schemas."""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from ml.config import SYMBOL_PATTERN, SYMBOL_RULE, ConfigError, config_from_dict
from ml.orchestration import (asset_event_updates, config_from_params, config_roots, data_roots, run_dir_for,
                              training_configs)
from tests.conftest import ROOT

PARAMS = {"source": "sample", "symbol": "GSPC", "interval": "1d", "data_path": None, "start": None,
          "timesteps": 8192, "device": "cpu", "n_folds": 3, "promote": False, "seeds": [3, 4],
          "num_envs": None, "num_steps": None, "config_file": None}


def test_params_map_onto_the_config():
    config = config_from_params(PARAMS)
    assert (config.data.source, config.data.symbol) == ("sample", "GSPC")
    assert config.ppo.total_timesteps == 8192 and config.ppo.device == "cpu"
    assert config.splits.n_folds == 3 and config.seeds == (3, 4) and config.registry.promote is False


def _event(minute, symbol, root="s3://market-data"):
    return SimpleNamespace(timestamp=datetime(2026, 11, 20, 21, minute, tzinfo=timezone.utc),
                           extra={"symbol": symbol, "interval": "1d", "lake_root": root})


def test_coalesced_lake_events_retrain_every_symbol_that_changed(monkeypatch):
    monkeypatch.setenv("ML_DATA_ROOT", "s3://market-data")
    # Events that arrive while a run is queued coalesce into one run: each symbol is trained once.
    events = {"market_data_curated": [_event(31, "KO"), _event(45, "SPY"), _event(40, "GSPC"), _event(50, "KO")]}
    assert [u["symbol"] for u in asset_event_updates(events)] == ["KO", "GSPC", "SPY"]
    configs = training_configs(PARAMS, events)
    assert [(c.data.source, c.data.symbol, c.data.path) for c in configs] == [
        ("lake", symbol, "s3://market-data") for symbol in ("KO", "GSPC", "SPY")]
    assert asset_event_updates({}) == [] and asset_event_updates(None) == []
    # With a universe, the events trigger the whole universe from their lake (skip-unchanged then
    # keeps what did not change), so an event the scheduler dropped loses nothing; a changed
    # symbol outside it is left (the log names it).
    configs = training_configs({**PARAMS, "symbol": None, "universe": ["KO", "GSPC", "JNJ"]}, events)
    assert [(c.data.source, c.data.symbol, c.data.path) for c in configs] == [
        ("lake", symbol, "s3://market-data") for symbol in ("KO", "GSPC", "JNJ")]
    # A lake root outside the data roots (the market_data Param names it) is refused like a data_path.
    for root in ("s3://other-bucket", "s3://market-data-2", "s3://market-data/../x", "/etc"):
        with pytest.raises(ConfigError, match=r"^asset event lake_root = .*: outside the allowed roots"):
            training_configs(PARAMS, {"market_data_curated": [_event(31, "SPY", root)]})


def test_the_universe_comes_from_the_params_the_config_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ML_CONFIG_ROOT", str(tmp_path))
    monkeypatch.setenv("ML_TRAINING_UNIVERSE", "KO, GSPC3L")
    unset = {key: None for key in PARAMS}
    symbols = lambda params: [c.data.symbol for c in training_configs(params)]  # noqa: E731
    assert symbols(unset) == ["KO", "GSPC3L"]  # the scheduled run: nothing set, the environment's universe
    assert symbols({**unset, "symbol": "GSPC"}) == ["GSPC"]  # a symbol set by hand is a run of one
    assert symbols({**unset, "universe": ["GSPC", "KO"]}) == ["GSPC", "KO"]
    config_file = tmp_path / "universe.yaml"
    config_file.write_text("data:\n  universe: [GSPC3S, KO]\n")
    assert symbols({**unset, "config_file": str(config_file)}) == ["GSPC3S", "KO"]  # the file beats the environment
    assert symbols({**unset, "config_file": str(config_file), "symbol": "GSPC"}) == ["GSPC"]
    plain = tmp_path / "plain.yaml"
    plain.write_text("data:\n  symbol: KO\n")
    assert symbols({**unset, "config_file": str(plain)}) == ["KO"]  # a file that names one symbol trains it
    # The scheduled run reads its config file from the environment too.
    monkeypatch.setenv("ML_TRAINING_CONFIG", str(config_file))
    assert symbols(unset) == ["GSPC3S", "KO"]
    with pytest.raises(ConfigError, match=r"^data.universe = \['KO', 'KO'\]: each symbol once"):
        training_configs({**unset, "universe": ["KO", "KO"]})


def test_run_folders_are_safe_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("ML_RUNS_DIR", str(tmp_path))
    path = run_dir_for("ppo_training", "manual__2026-11-21T22:43:20.634018+00:00")
    assert path.parent == tmp_path / "ppo_training" and ":" not in path.name and "+" not in path.name


def test_pipeline_loads_curated_bars_from_the_lake(tmp_path):
    from ml.config import config_from_dict
    from ml.data.ingest import ingest_symbol
    from ml.data.lake import Lake
    from ml.pipeline import load_data

    root = tmp_path / "lake"
    assert ingest_symbol(str(root), "KO", source="sample")["status"] == "updated"
    _, curated_hash = Lake(str(root)).snapshot("KO", "1d")
    summary = load_data(tmp_path / "run", config_from_dict({"data": {"source": "lake", "symbol": "KO",
                                                                      "path": str(root)}}))
    assert summary["rows"] == 8313 and summary["close_only"] is True
    assert summary["dataset_hash"] == curated_hash  # the whole series: the same content hash as the lake's


def test_a_config_file_turns_a_dag_run_into_a_portfolio_run(monkeypatch):
    from tests.conftest import ROOT

    monkeypatch.delenv("ML_CONFIG_ROOT", raising=False)  # the default roots hold the project's docs/
    config = config_from_params({**PARAMS, "config_file": str(ROOT / "docs" / "portfolio-config.yaml")})
    assert bool(config.data.symbols) and config.data.symbols == ("GSPC", "KO") and config.action.mode == "portfolio"
    assert config.model_name == "ppo_GSPC_KO_1d" and config.ppo.total_timesteps == 8192


UNSET = {key: None for key in PARAMS}  # a run triggered with the form left empty (every Param's default)
DIFFERENT = """\
data: {source: yfinance, symbol: SPY, interval: 1h, start: "2024-01-02"}
ppo: {total_timesteps: 4096, num_envs: 32, num_steps: 16, device: cpu}
splits: {n_folds: 5}
registry: {promote: false}
seeds: [7, 8]
"""


def test_a_config_file_is_overridden_only_by_the_params_the_user_set(tmp_path, monkeypatch):
    monkeypatch.setenv("ML_CONFIG_ROOT", str(tmp_path))
    (tmp_path / "spy.yaml").write_text(DIFFERENT)
    config = config_from_params({**UNSET, "config_file": str(tmp_path / "spy.yaml")})
    # Every value differs from its built-in default, and every one comes from the file.
    assert (config.data.source, config.data.symbol, config.data.interval, config.data.start) == (
        "yfinance", "SPY", "1h", "2024-01-02")
    assert (config.ppo.total_timesteps, config.ppo.num_envs, config.ppo.num_steps, config.ppo.device) == (
        4096, 32, 16, "cpu")
    assert config.splits.n_folds == 5 and config.registry.promote is False and config.seeds == (7, 8)
    # A Param the user set wins over the file; the rest still come from it.
    config = config_from_params({**UNSET, "config_file": str(tmp_path / "spy.yaml"), "symbol": "QQQ",
                                 "timesteps": 2048, "promote": True})
    assert (config.data.symbol, config.ppo.total_timesteps, config.registry.promote) == ("QQQ", 2048, True)
    assert (config.data.source, config.data.interval, config.splits.n_folds) == ("yfinance", "1h", 5)
    # Without a file, empty Params give the built-in defaults.
    assert config_from_params(UNSET) == config_from_dict({})


# Params that name files or symbols -------------------------------------------------------------

SECRET = "s3cr3t-Zq8-token"


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """A config root and a data root of their own, and a secret-holding file outside both."""
    configs, data, outside = tmp_path / "configs", tmp_path / "data", tmp_path / "outside"
    for folder in (configs, data, outside):
        folder.mkdir()
    monkeypatch.setenv("ML_CONFIG_ROOT", str(configs))
    monkeypatch.setenv("ML_DATA_ROOT", str(data))
    (outside / "secret.yaml").write_text(f"root:$6${SECRET}:20228:0:99999:7:::\n")
    return configs, data, outside


def test_a_config_file_outside_the_root_is_refused_without_reading_it(roots):
    configs, _, outside = roots
    for path in ("/etc/shadow", str(outside / "secret.yaml"), f"{configs}/../outside/secret.yaml"):
        with pytest.raises(ConfigError) as refused:
            config_from_params({**PARAMS, "config_file": path})
        message = str(refused.value)
        assert message.startswith(f"config_file = {path}: outside the allowed roots ['{configs}']"), message
        assert "ML_CONFIG_ROOT" in message and SECRET not in message and "root:" not in message
        assert "\n" not in message


def test_a_link_inside_the_root_to_a_file_outside_is_refused(roots):
    configs, _, outside = roots
    (configs / "link.yaml").symlink_to(outside / "secret.yaml")
    with pytest.raises(ConfigError, match="outside the allowed roots") as refused:
        config_from_params({**PARAMS, "config_file": str(configs / "link.yaml")})
    assert SECRET not in str(refused.value)


def test_a_config_file_inside_the_root_is_read_and_must_be_yaml_or_json(roots):
    configs, _, _ = roots
    (configs / "tiny.yaml").write_text("ppo:\n  num_steps: 16\n")
    assert config_from_params({**PARAMS, "config_file": str(configs / "tiny.yaml")}).ppo.num_steps == 16
    (configs / "notes.txt").write_text(f"{SECRET}\n")
    with pytest.raises(ConfigError, match=r"^config_file = .*notes.txt: must be a \.yaml, \.yml, \.json file$"):
        config_from_params({**PARAMS, "config_file": str(configs / "notes.txt")})
    # Inside the root, a file that is no config is refused without its contents.
    (configs / "secret.yaml").write_text(f"root:$6${SECRET}:20228:0:99999:7:::\n")
    with pytest.raises(ConfigError) as refused:
        config_from_params({**PARAMS, "config_file": str(configs / "secret.yaml")})
    assert SECRET not in str(refused.value)


def test_a_data_path_outside_the_data_root_is_refused(roots, gspc_bars):
    _, data, outside = roots
    (outside / "bars.csv").write_text(f"Date,Close\n2020-01-01,{SECRET}\n")
    for path in ("/etc/passwd", str(outside / "bars.csv"), f"{data}/../outside/bars.csv"):
        with pytest.raises(ConfigError) as refused:
            config_from_params({**PARAMS, "source": "file", "data_path": path})
        assert str(refused.value) == (f"data_path = {path}: outside the allowed roots ['{data}'] "
                                      "(set ML_DATA_ROOT to allow another)")
    gspc_bars.to_csv(data / "GSPC.csv", index=False)
    config = config_from_params({**PARAMS, "source": "file", "data_path": str(data / "GSPC.csv")})
    assert config.data.path == str((data / "GSPC.csv").resolve())
    with pytest.raises(ConfigError, match=r"must be a \.csv, \.parquet, \.pq file"):
        config_from_params({**PARAMS, "source": "file", "data_path": str(data)})
    # A lake root is a folder: any folder under the root.
    assert config_from_params({**PARAMS, "source": "lake", "data_path": str(data)}).data.path == str(data.resolve())


def test_default_roots_are_the_docs_and_airflow_home_folders(monkeypatch, tmp_path):
    for name in ("ML_CONFIG_ROOT", "ML_DATA_ROOT", "ML_LAKE_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    assert config_roots() == [str(ROOT / "docs"), str(tmp_path / "ml-configs")]
    assert data_roots() == [str(tmp_path / "data"), str(ROOT / "lake")]
    monkeypatch.setenv("ML_CONFIG_ROOT", f"{tmp_path}/a, {tmp_path}/b")
    monkeypatch.setenv("ML_DATA_ROOT", "s3://market-data")
    assert config_roots() == [f"{tmp_path}/a", f"{tmp_path}/b"] and data_roots() == ["s3://market-data"]


def test_a_symbol_param_that_is_a_path_is_refused_by_the_config():
    with pytest.raises(ConfigError) as refused:
        config_from_params({**PARAMS, "symbol": "../../../tmp/x/evil"})
    assert str(refused.value) == f"data.symbol = ../../../tmp/x/evil: {SYMBOL_RULE}"
    assert config_from_params({**PARAMS, "symbol": "^GSPC"}).model_name == "ppo_GSPC_1d"


@pytest.fixture(scope="module")
def dag_params(tmp_path_factory):
    """The two DAGs' Params, as the trigger form and the REST API validate them (no DAG run)."""
    import runpy

    home = tmp_path_factory.mktemp("airflow")
    with pytest.MonkeyPatch.context() as patch:  # Airflow reads its home when first imported
        patch.setenv("AIRFLOW_HOME", str(home))
        patch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{home}/airflow.db")
        training = runpy.run_path(str(ROOT / "dags" / "ppo_training.py"))["ppo_training"]()
        market = runpy.run_path(str(ROOT / "dags" / "market_data.py"))["market_data"]()
    return training.params, market.params


@pytest.mark.parametrize("symbol", ["../../../tmp/x/evil", "a/b", "a\\b", "..", "GS PC", ""])
def test_the_dag_params_refuse_a_symbol_that_is_no_ticker(dag_params, symbol):
    from airflow.sdk.exceptions import ParamValidationError

    training, market = dag_params
    with pytest.raises(ParamValidationError):
        training.get_param("symbol").resolve(symbol)
    with pytest.raises(ParamValidationError):
        market.get_param("symbols").resolve(["GSPC", symbol])


@pytest.mark.parametrize("symbol", ["GSPC", "^GSPC", "BRK-B", "BTC-USD", "EURUSD=X"])
def test_the_dag_params_accept_real_tickers(dag_params, symbol):
    training, market = dag_params
    assert training.get_param("symbol").resolve(symbol) == symbol
    assert market.get_param("symbols").resolve([symbol]) == [symbol]
    assert training.get_param("symbol").schema["pattern"] == SYMBOL_PATTERN
    assert market.get_param("symbols").schema["items"]["pattern"] == SYMBOL_PATTERN


@pytest.mark.parametrize("run_id", ["..", ".", "...", "../../etc"])
def test_a_run_id_never_names_a_folder_outside_its_dag_folder(run_id, tmp_path, monkeypatch):
    monkeypatch.setenv("ML_RUNS_DIR", str(tmp_path))
    folder = run_dir_for("ppo_training", run_id)
    assert folder.parent == tmp_path / "ppo_training" and folder.resolve().parent == (tmp_path / "ppo_training").resolve()
