"""
### Model promotion

Manual only (no schedule): move the `champion` alias of a registered PPO model. The form has no
default action, so a run does nothing until someone picks one.

- `promote`: make `version` the champion. Only a version that passed its promotion gate can be
  promoted; the gate's reasons are on the version in the MLflow UI.
- `rollback`: re-point champion to the version it replaced, or to `version` when given.

Every move is recorded on the version (tags `previous_champion`, `champion_reason`, `rolled_back_to`).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

ACTIONS = ("promote", "rollback")


@dag(
    dag_id="model_promotion",
    description="Manual: promote a version to champion, or roll champion back. No schedule.",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["ml", "registry"],
    doc_md=__doc__,
    params={
        # No default: the form and the REST API refuse a run until an action is chosen.
        "action": Param(type="string", enum=list(ACTIONS), title="Action (required)",
                        description="promote: make `version` the champion (it must have passed its gate). "
                                    "rollback: point champion back to the version it replaced, or to `version`."),
        "model_name": Param("ppo_GSPC_1d", type="string", minLength=1, title="Registered model",
                            description="Registered model name: ppo_<SYMBOL>_<interval>, e.g. ppo_GSPC_1d."),
        "version": Param(None, type=["null", "string"], pattern=r"^[1-9][0-9]*$", title="Version",
                         description="Version number (1, 2, ...). Required to promote; for rollback, empty means "
                                     "the previous champion."),
    },
)
def model_promotion():
    @task
    def move_champion(params=None) -> dict:
        from airflow.sdk.exceptions import AirflowFailException
        from ml_operators import MlflowRegistryHook  # plugins/ is on the path of Airflow processes

        action, name, version = params.get("action"), params["model_name"], params.get("version")
        if action not in ACTIONS:  # the Param refuses this already; a run must never guess
            raise AirflowFailException(f"action = {action!r}: choose one of {', '.join(ACTIONS)}")
        registry = MlflowRegistryHook()
        if action == "promote":
            if not version:
                raise AirflowFailException("version: promote needs the version to make champion")
            return registry.promote(name, version)  # the registry logs the move
        return registry.rollback(name, version)

    move_champion()


model_promotion()
