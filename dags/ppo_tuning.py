"""
### PPO hyperparameter search

Manual. Continues the Optuna study named by `study` (created on first use) over the search
space (`space_file`, else the default: learning rate, entropy, layers, lookback, turnover
penalty), for the symbol or portfolio the Params and `config_file` describe, as `ppo_training`
reads them:

1. `plan`: the study, and one task per trial to run.
2. `trial` (mapped, on the training queue and pool): asks the study for a configuration, trains
   its walk-forward folds and tells the mean validation score. The test windows are never read;
   the median pruner stops a trial that falls behind after a fold.
3. `retrain_best`: the best configuration so far, retrained by the whole pipeline. Its report
   counts every trial of the study in the deflated Sharpe and the PBO, and it is registered and
   judged by the promotion gate like any training.

The study lives in `$ML_TUNING_STORAGE` (an SQLAlchemy URL: the stack's Postgres under Celery),
else SQLite beside the run folders; its trial folders in `runs/ppo_tuning/<study>/`.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task

from ml.config import MODEL_NAME_PATTERN, SYMBOL_PATTERN  # imports no torch: parsing stays fast

TRAINING_QUEUE = os.environ.get("ML_TRAINING_QUEUE", "default")
TRAINING_POOL = os.environ.get("ML_TRAINING_POOL", "default_pool")
TRAINING_SLOTS = int(os.environ["ML_TRAINING_SLOTS"]) if os.environ.get("ML_TRAINING_SLOTS") else None


def _plan(params: dict):
    """The study of this run; a bad setting fails at once, without retries."""
    from airflow.sdk.exceptions import AirflowFailException

    from ml.config import ConfigError
    from ml.orchestration import tuning_plan

    try:
        return tuning_plan(params)
    except ConfigError as error:
        raise AirflowFailException(f"invalid tuning setup: {error}") from None


@dag(
    dag_id="ppo_tuning",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["ml", "ppo", "tuning"],
    description="Manual: Optuna trials as mapped tasks on validation folds, then the best config retrained and "
                "registered.",
    doc_md=__doc__,
    default_args={"retries": 0, "execution_timeout": timedelta(hours=6)},
    params={
        "study": Param("ppo_study", type="string", pattern=MODEL_NAME_PATTERN, title="Study",
                       description="Optuna study to continue (created on first use); names its folder."),
        # Bounds under allOf: the form then refuses a value out of range instead of moving it to the bound.
        "trials": Param(8, type="integer", allOf=[{"minimum": 1, "maximum": 500}], title="trials (1 to 500)",
                        description="Trials this run adds to the study, one task each."),
        "symbol": Param(None, type=["null", "string"], pattern=SYMBOL_PATTERN,
                        description="Ticker or sample name. Empty: the config's data.symbol (built-in: GSPC)."),
        "config_file": Param(None, type=["null", "string"],
                             description="Base YAML/JSON pipeline config (under $ML_CONFIG_ROOT) the searched "
                                         "fields are set over."),
        "space_file": Param(None, type=["null", "string"],
                            description="YAML/JSON search space (under $ML_CONFIG_ROOT). Empty: the default space."),
    },
)
def ppo_tuning():
    @task
    def plan(params=None) -> list[int]:
        from ml.tuning import create_study

        study, storage, _, _, _ = _plan(params)
        create_study(study, storage)
        return list(range(params["trials"]))

    @task(queue=TRAINING_QUEUE, pool=TRAINING_POOL, max_active_tis_per_dag=TRAINING_SLOTS,
          map_index_template="trial {{ task.op_kwargs['index'] }} of this run")
    def trial(index: int, params=None) -> dict:
        from ml.tuning import run_trial

        study, storage, folder, config, space = _plan(params)
        return run_trial(study, storage, config, space, folder)

    @task(trigger_rule="all_done")
    def retrain_best(params=None) -> dict:
        from airflow.sdk.exceptions import AirflowFailException
        from mlflow_link import push_mlflow_links  # plugins/ is on the path of Airflow processes

        from ml.config import ConfigError
        from ml.tuning import tune

        study, storage, folder, config, space = _plan(params)
        try:
            result = tune(study, storage, config, space, folder, n_trials=0)
        except ConfigError as error:  # e.g. no trial of the study completed
            raise AirflowFailException(str(error)) from None
        push_mlflow_links(result)
        return {"model_name": result["model_name"], "version": result["version"], "champion": result["champion"]}

    trials = trial.expand(index=plan())
    trials >> retrain_best()


ppo_tuning()
