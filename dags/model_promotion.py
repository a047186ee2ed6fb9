"""
### Model promotion

Manual: move the `champion` alias of a registered PPO model.

- `promote`: make `version` the champion. Only a version that passed its promotion gate can be
  promoted; the gate's reasons are on the version in the MLflow UI.
- `rollback`: re-point champion to the version it replaced, or to `version` when given.

Every move is recorded on the version (tags `previous_champion`, `champion_reason`, `rolled_back_to`).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task


@dag(
    dag_id="model_promotion",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["ml", "registry"],
    doc_md=__doc__,
    params={
        "action": Param("rollback", enum=["promote", "rollback"], description="What to do with `champion`."),
        "model_name": Param("ppo_GSPC_1d", type="string", minLength=1, description="Registered model name."),
        "version": Param(None, type=["null", "string"], pattern=r"^[0-9]+$",
                         description="Version to promote, or to roll back to (rollback default: previous champion)."),
    },
)
def model_promotion():
    @task
    def move_champion(params=None) -> dict:
        from airflow.sdk.exceptions import AirflowFailException
        from ml_operators import MlflowRegistryHook  # plugins/ is on the path of Airflow processes

        registry = MlflowRegistryHook()
        if params["action"] == "promote":
            if not params["version"]:
                raise AirflowFailException("promote needs a version")
            return registry.promote(params["model_name"], params["version"])
        return registry.rollback(params["model_name"], params["version"])

    move_champion()


model_promotion()
