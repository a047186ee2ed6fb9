"""What the trigger forms of the DAGs show and refuse, read from the parsed DAGs (no services).

The Airflow 3.3 form moves a number typed past a Param's top-level `minimum`/`maximum` to the
bound without a word; bounds under `allOf` are checked on trigger and refused with a message that
names the Param (seen in Chromium: tests/test_airflow_ui.py). So number bounds live under `allOf`,
and the form states them in each Param's title or description.
"""

from __future__ import annotations

import pytest

from tests.conftest import ROOT

SAMPLES = sorted(path.stem for path in (ROOT / "ml" / "sample").glob("*.csv"))


@pytest.fixture(scope="module")
def dags(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-home")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW_HOME", str(home))
        env.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(ROOT / "dags"))
        env.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{home}/airflow.db")
        from airflow.dag_processing.dagbag import BundleDagBag

        bag = BundleDagBag(dag_folder=str(ROOT / "dags"), bundle_path=ROOT / "dags", bundle_name="dags-folder")
    assert bag.import_errors == {}
    return bag.dags


def shown(param) -> str:
    return f"{param.schema.get('title', '')} {param.description or ''}"


def numbers(value) -> set[str]:
    return {str(value), f"{value:,}"}


def test_number_params_state_their_bounds_and_are_refused_not_clamped(dags):
    for dag_id, dag in dags.items():
        for name in dag.params:
            param = dag.params.get_param(name)
            types = param.schema.get("type", [])
            types = [types] if isinstance(types, str) else types
            where = f"{dag_id}: Param {name}"
            if {"integer", "number"} & set(types):
                assert not {"minimum", "maximum"} & set(param.schema), f"{where}: the form would clamp it; use allOf"
            for rule in param.schema.get("allOf", []):
                for key in ("minimum", "maximum"):
                    if key in rule:
                        assert any(n in shown(param) for n in numbers(rule[key])), f"{where}: {key} not shown"


def test_the_forms_name_the_schedule_and_the_bundled_samples(dags):
    assert "0 2 * * *" in (dags["ppo_training"].description or "")
    assert "30 21 * * 1-5" in dags["market_data"].description
    assert "No schedule" in dags["model_promotion"].description
    symbol = shown(dags["ppo_training"].params.get_param("symbol"))
    assert SAMPLES and all(sample in symbol for sample in SAMPLES), symbol
    timesteps = shown(dags["ppo_training"].params.get_param("timesteps"))
    assert "not updates" in timesteps, timesteps


def test_model_promotion_has_no_default_action(dags):
    from airflow.sdk.exceptions import ParamValidationError

    params = dags["model_promotion"].params
    assert not params.get_param("action").has_value
    with pytest.raises(ParamValidationError, match="action: No value passed"):
        params.validate()
