"""
### PPO training pipeline

Nightly, and whenever `market_data` updates the curated lake: load bars -> Great Expectations gate ->
walk-forward PPO training (one mapped task per fold) ->
test backtests beside baselines -> ONNX export with parity check -> MLflow
registration (`challenger`, and `champion` when the gate passes).

Every task calls one stage of `ml.pipeline`; tasks hand over through a run
folder, and XCom carries only that folder's path. Trigger it by hand with the
form to change the symbol, source, budget or folds.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import pendulum
from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

from ml.config import INTERVALS, SYMBOL_PATTERN  # imports no torch: parsing stays fast


# Where training runs: the Docker/Celery stack sets these to its `gpu` queue and pool. The
# defaults suit the embedded LocalExecutor (which ignores queues and needs no extra pool).
TRAINING_QUEUE = os.environ.get("ML_TRAINING_QUEUE", "default")
TRAINING_POOL = os.environ.get("ML_TRAINING_POOL", "default_pool")
# Trainings that share one machine's cores (ml.agent.threads divides the cores by it). With the
# embedded LocalExecutor (one machine, one environment) it also caps how many train tasks run at
# once; the Celery stack sets it on the workers only, where worker slots and the pool cap them.
TRAINING_SLOTS = int(os.environ["ML_TRAINING_SLOTS"]) if os.environ.get("ML_TRAINING_SLOTS") else None


log = logging.getLogger(__name__)


def log_failure(context) -> None:
    """One line a person can act on: which task, which run, which attempt, what broke, where the files are."""
    from ml.orchestration import run_dir_for

    ti = context["task_instance"]
    run_dir = run_dir_for("ppo_training", context["run_id"])
    log.error("ppo_training FAILED: task=%s map_index=%s run_id=%s try=%s error=%r run_folder=%s",
              ti.task_id, getattr(ti, "map_index", -1), context["run_id"], ti.try_number,
              context.get("exception"), run_dir)


@dag(
    dag_id="ppo_training",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("0 2 * * *", timezone="UTC"),
        assets=Asset("market_data_curated"),
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["ml", "ppo", "training"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1), "retry_exponential_backoff": True,
                  "execution_timeout": timedelta(hours=1), "on_failure_callback": log_failure},
    params={
        # Every Param defaults to null: a null Param leaves the config file's value (or, without a
        # file, the built-in default named in its description), so a file is never overridden by
        # a form default. Precedence: built-in defaults < config_file < Params set < asset event.
        "source": Param(None, type=["null", "string"], enum=[None, "sample", "file", "yfinance", "lake"],
                        description="Where bars come from: the bundled sample, a CSV/parquet file, yfinance, "
                                    "or the curated data lake (runs triggered by market_data use the lake). "
                                    "Empty: the config's data.source (built-in: sample)."),
        "symbol": Param(None, type=["null", "string"], pattern=SYMBOL_PATTERN,
                        description="Ticker (yfinance) or sample name, e.g. GSPC, ^GSPC, BRK-B, EURUSD=X. "
                                    "Empty: the config's data.symbol (built-in: GSPC)."),
        "data_path": Param(None, type=["null", "string"],
                           description="CSV/parquet path when source is 'file'; lake root when source is 'lake'. "
                                       "Must lie under $ML_DATA_ROOT. Empty: the config's data.path."),
        "interval": Param(None, type=["null", "string"], enum=[None, *INTERVALS],
                          description="Bar interval (yfinance spelling). Empty: the config's data.interval "
                                      "(built-in: 1d)."),
        "start": Param(None, type=["null", "string"], format="date",
                       description="First date to use (YYYY-MM-DD). Empty: the config's data.start (built-in: "
                                   "all the data)."),
        "timesteps": Param(None, type=["null", "integer"], minimum=1024, maximum=1_000_000_000,
                           description="PPO environment steps per walk-forward fold. Empty: the config's "
                                       "ppo.total_timesteps (built-in: 500000)."),
        "num_envs": Param(None, type=["null", "integer"], minimum=1, maximum=1_000_000,
                          description="Parallel episodes. Empty: the config's ppo.num_envs (built-in: 512)."),
        "num_steps": Param(None, type=["null", "integer"], minimum=8, maximum=4096,
                           description="Rollout length per update. Empty: the config's ppo.num_steps "
                                       "(built-in: 64)."),
        "n_folds": Param(None, type=["null", "integer"], minimum=1, maximum=60,
                         description="Walk-forward test folds, one year each, the most recent last. Empty: the "
                                     "config's setting, by default every year back to the start of the data "
                                     "(16 folds on the 20-year sample)."),
        "seeds": Param(None, type=["null", "array"], items={"type": "integer", "minimum": 0}, minItems=1,
                       maxItems=16, description="PPO seeds per fold (default from config: [1]). Validation picks "
                                                "one; the report shows the test spread across all."),
        "device": Param(None, type=["null", "string"], enum=[None, "auto", "cpu", "cuda"],
                        description="Training device; auto = CUDA if present. Empty: the config's ppo.device "
                                    "(built-in: auto)."),
        "promote": Param(None, type=["null", "boolean"],
                         description="Set `champion` when the gate passes. Empty: the config's registry.promote "
                                     "(built-in: true)."),
        "config_file": Param(None, type=["null", "string"],
                             description="Optional YAML/JSON pipeline config, under $ML_CONFIG_ROOT. The other "
                                         "Params override it only where set."),
    },
)
def ppo_training():
    @task
    def load_data(params=None, run_id=None, dag=None, triggering_asset_events=None) -> str:
        from airflow.sdk.exceptions import AirflowFailException

        from ml import orchestration, pipeline
        from ml.config import ConfigError

        run_dir = orchestration.run_dir_for(dag.dag_id, run_id)
        event = orchestration.newest_asset_event(triggering_asset_events)
        try:
            config = orchestration.config_from_params(params, event)
        except ConfigError as error:  # a bad setting will not fix itself: fail now, without retries
            raise AirflowFailException(f"invalid pipeline config: {error}") from None
        pipeline.load_data(run_dir, config)
        return str(run_dir)

    @task
    def validate_data(run_dir: str) -> str:
        from ml import pipeline

        pipeline.validate_data(run_dir)
        return run_dir

    @task
    def start_tracking(run_dir: str, run_id=None) -> str:
        from ml import pipeline

        pipeline.start_tracking(run_dir, run_name=f"ppo_training/{run_id}")
        return run_dir

    @task
    def plan_folds(run_dir: str) -> list[int]:
        from ml import pipeline

        return pipeline.plan_folds(run_dir)

    @task(execution_timeout=timedelta(hours=6), queue=TRAINING_QUEUE, pool=TRAINING_POOL,
          max_active_tis_per_dag=TRAINING_SLOTS, map_index_template="fold {{ task.op_kwargs['fold'] }}")
    def train(run_dir: str, fold: int) -> int:
        from ml import pipeline

        pipeline.train_fold_seeds(run_dir, fold)
        return fold

    @task
    def evaluate(run_dir: str, trained_folds: list[int]) -> str:
        from ml import pipeline

        pipeline.evaluate(run_dir)
        return run_dir

    @task
    def export_onnx(run_dir: str) -> str:
        from ml import pipeline

        pipeline.export_model(run_dir)
        return run_dir

    @task
    def register(run_dir: str) -> dict:
        from ml import pipeline

        result = pipeline.register(run_dir)
        return {"model_name": result["model_name"], "version": result["version"], "champion": result["champion"]}

    run_dir = start_tracking(validate_data(load_data()))
    trained = train.partial(run_dir=run_dir).expand(fold=plan_folds(run_dir))
    register(export_onnx(evaluate(run_dir, trained)))


ppo_training()
