"""A universe run without Airflow: targets, stage records, skip-unchanged against a real registry, the summary."""

from __future__ import annotations

import dataclasses

import pytest

from ml.config import ConfigError, config_from_dict
from ml.pipeline import load_data
from ml.pipeline.rundir import RunFolder, read_json, training_fingerprint, write_json
from ml.pipeline.universe import (NotRun, fold_tasks, plan, skip_if_unchanged, stage, summarize, target_configs,
                                  unchanged_since)


def test_each_symbol_of_the_universe_is_a_target_with_its_own_folder(tmp_path):
    config = config_from_dict({"data": {"universe": ["GSPC", "^VIX", "KO"]}, "ppo": {"total_timesteps": 4096}})
    configs = target_configs(config)
    assert [c.data.symbol for c in configs] == ["GSPC", "^VIX", "KO"]
    assert all(c.data.universe == () and c.ppo.total_timesteps == 4096 for c in configs)
    targets = plan(tmp_path, configs + configs[:1])  # a symbol named twice trains once
    assert [t["target"] for t in targets] == ["GSPC", "VIX", "KO"]
    assert read_json(tmp_path / "universe.json") == targets
    assert read_json(RunFolder(tmp_path / "VIX").config)["data"]["symbol"] == "^VIX"
    assert target_configs(config_from_dict({})) == [config_from_dict({})]


def test_a_universe_is_one_model_per_symbol():
    with pytest.raises(ConfigError, match="data.universe: one model per symbol; it cannot be combined with "
                                          "data.symbols"):
        config_from_dict({"data": {"universe": ["GSPC", "KO"], "symbols": ["GSPC", "KO"]},
                          "action": {"mode": "portfolio"}})
    with pytest.raises(ConfigError, match=r"registry.model_name = mine \(one name for many models\)"):
        config_from_dict({"data": {"universe": ["GSPC", "KO"]}, "registry": {"model_name": "mine"}})


def test_a_stage_runs_only_after_the_one_before_it_and_records_how_it_ended(tmp_path):
    (target,) = plan(tmp_path, [config_from_dict({})])
    run_dir = target["run_dir"]
    with pytest.raises(NotRun, match="GSPC: validate needs load, which did not run"):
        with stage(run_dir, "validate"):
            pytest.fail("must not run")
    with pytest.raises(ValueError):
        with stage(run_dir, "load"):
            raise ValueError("bars.csv: column 'close' is missing\nsecond line never shown")
    assert read_json(RunFolder(run_dir).status("load"))["error"] == "ValueError: bars.csv: column 'close' is missing"
    with pytest.raises(NotRun, match="GSPC: validate needs load, which failed"):
        with stage(run_dir, "validate"):
            pass
    for name in ("load", "validate", "track", "folds"):
        with stage(run_dir, name):
            pass
    write_json(RunFolder(run_dir).folds, [{"index": 0}, {"index": 1}])
    assert [(t["target"], t["fold"]) for t in fold_tasks([target])] == [("GSPC", 0), ("GSPC", 1)]
    with stage(run_dir, "train", fold=0):
        pass
    with pytest.raises(NotRun, match=r"evaluate needs every fold trained; not trained: folds \[1\]"):
        with stage(run_dir, "evaluate"):
            pass


@pytest.fixture
def registry(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return MlflowClient(uri, registry_uri=uri)


def test_a_target_trained_on_the_same_data_and_settings_is_skipped(tmp_path, registry):
    config = config_from_dict({"data": {"symbol": "KO", "start": "2015-01-01"}})
    (target,) = plan(tmp_path / "run1", [config])
    load_data(target["run_dir"], config)
    assert unchanged_since(target["run_dir"]) is None  # nothing registered yet

    dataset_hash = read_json(RunFolder(target["run_dir"]).data)["dataset_hash"]
    registry.create_registered_model("ppo_KO_1d")
    version = registry.create_model_version("ppo_KO_1d", source="file:///unused", tags={
        "dataset_hash": dataset_hash, "config_hash": training_fingerprint(config)}).version
    with pytest.raises(NotRun, match=rf"unchanged: ppo_KO_1d v{version} \(not promoted \(champion: none\)\) "
                                     "was trained on the same data"):
        skip_if_unchanged(target["run_dir"])
    registry.set_registered_model_alias("ppo_KO_1d", "champion", version)
    assert "(the champion)" in unchanged_since(target["run_dir"])

    def fresh(name, changed, force=False):
        (other,) = plan(tmp_path / name, [changed], force=force)
        load_data(other["run_dir"], changed)
        return unchanged_since(other["run_dir"])

    # Where the work runs changes nothing learned: still skipped.
    assert fresh("device", dataclasses.replace(config, ppo=dataclasses.replace(config.ppo, device="cpu", threads=1)))
    # A training setting, the data, or force: trained again.
    assert fresh("lr", dataclasses.replace(config, ppo=dataclasses.replace(config.ppo, learning_rate=1e-4))) is None
    assert fresh("data", dataclasses.replace(config, data=dataclasses.replace(config.data, start="2016-01-01"))) is None
    assert fresh("force", config, force=True) is None


def test_the_summary_says_per_target_what_happened_and_why(tmp_path):
    configs = target_configs(config_from_dict({"data": {"universe": ["GSPC", "KO", "GSPC3L", "GSPC3S"]}}))
    targets = {t["target"]: RunFolder(t["run_dir"]) for t in plan(tmp_path, configs)}
    write_json(targets["GSPC"].registration, {
        "model_name": "ppo_GSPC_1d", "version": "3", "champion": False, "promote_requested": True,
        "gate": {"passed": False, "reasons": ["PASS onnx parity", "FAIL beats-benchmark: PSR 0.41 < 0.95"]}})
    with pytest.raises(NotRun):
        with stage(targets["KO"].root, "load"):
            raise NotRun("unchanged: ppo_KO_1d v2 (the champion) was trained on the same data")
    with pytest.raises(RuntimeError):
        with stage(targets["GSPC3L"].root, "load"):
            raise RuntimeError("lake unreachable")
    with stage(targets["GSPC3S"].root, "load"):
        pass  # and then its validate task was killed: no record

    rows = {row["target"]: row for row in summarize(tmp_path)["targets"]}
    assert rows["GSPC"] == {"target": "GSPC", "outcome": "trained", "model_name": "ppo_GSPC_1d", "version": "3",
                            "champion": False, "why": "gate failed: FAIL beats-benchmark: PSR 0.41 < 0.95"}
    assert rows["KO"] == {"target": "KO", "outcome": "skipped",
                          "why": "unchanged: ppo_KO_1d v2 (the champion) was trained on the same data"}
    assert rows["GSPC3L"] == {"target": "GSPC3L", "outcome": "failed", "why": "load: RuntimeError: lake unreachable"}
    assert rows["GSPC3S"]["outcome"] == "failed" and rows["GSPC3S"]["why"].startswith("stopped after load")
    assert read_json(tmp_path / "summary.json")["counts"] == {"trained": 1, "skipped": 1, "failed": 2}
