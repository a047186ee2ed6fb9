"""
### PPO training pipeline

Nightly at 02:00 UTC (cron `0 2 * * *`), and whenever `market_data` updates the curated lake.
For each target of the run (a symbol of the universe, or one symbol or portfolio): load bars ->
Great Expectations gate -> walk-forward PPO training (one mapped task per fold, all targets
sharing the training pool) -> test backtests beside baselines -> ONNX export with parity check
-> MLflow registration (`challenger`, and `champion` when the gate passes) -> a summary.

- **Universe**: the `universe` Param, else the config's `data.universe`, else
  `$ML_TRAINING_UNIVERSE` (comma-separated) for a run with no symbol and no config file; the
  scheduled run also reads its config file from `$ML_TRAINING_CONFIG`. A run triggered by
  curated-data events retrains every symbol whose data changed (within the universe, if set).
- **Skip unchanged**: a target whose data (dataset hash) and training settings match the newest
  version registered for its model is skipped after loading, with the reason in its log; set
  `force` to retrain anyway.
- **Failures**: a failing target stops only itself; the `summary` task lists each target as
  trained / skipped / failed, its version, whether it is champion and why, and fails the run
  when any target failed.

Every task calls one stage of `ml.pipeline` for one target; tasks hand over through the
target's run folder, and XCom carries only paths.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

import ml
from ml.config import INTERVALS, SYMBOL_PATTERN  # imports no torch: parsing stays fast


# Where training runs: the Docker/Celery stack sets these to its `gpu` queue and pool. The
# defaults suit the embedded LocalExecutor (which ignores queues and needs no extra pool).
TRAINING_QUEUE = os.environ.get("ML_TRAINING_QUEUE", "default")
TRAINING_POOL = os.environ.get("ML_TRAINING_POOL", "default_pool")
# Trainings that share one machine's cores (ml.agent.threads divides the cores by it). With the
# embedded LocalExecutor (one machine, one environment) it also caps how many train tasks run at
# once; the Celery stack sets it on the workers only, where worker slots and the pool cap them.
TRAINING_SLOTS = int(os.environ["ML_TRAINING_SLOTS"]) if os.environ.get("ML_TRAINING_SLOTS") else None
# The bundled series (source 'sample'), listed in the trigger form.
SAMPLE_SYMBOLS = sorted(path.stem for path in (Path(ml.__file__).parent / "sample").glob("*.csv"))


log = logging.getLogger(__name__)
# Mapped tasks are labelled by their target (symbol or portfolio) in the grid.
TARGET_LABEL = "{{ task.op_kwargs['target'] }}"


@contextmanager
def target_stage(run_dir: str, stage: str, fold: int | None = None):
    """One stage of one target: skipped (with the reason) when its data is unchanged or an earlier
    stage of the same target did not finish; a failure stops this target only. Bad data or a bad
    setting fails without retries: it will not fix itself (yfinance pulls retry on their own)."""
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    from ml.pipeline import universe

    try:
        with universe.stage(run_dir, stage, fold):
            yield
    except universe.NotRun as reason:
        raise AirflowSkipException(str(reason)) from None
    except universe.BAD_INPUT as error:
        raise AirflowFailException(str(error)) from None


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
    description="Nightly 02:00 UTC (cron 0 2 * * *) and on curated market data updates: train a universe, "
                "gate, register.",
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
                                    f"Bundled samples (source sample): {', '.join(SAMPLE_SYMBOLS)}. "
                                    "Empty: the config's data.symbol (built-in: GSPC)."),
        "data_path": Param(None, type=["null", "string"],
                           description="CSV/parquet path when source is 'file'; lake root when source is 'lake'. "
                                       "Must lie under $ML_DATA_ROOT. Empty: the config's data.path."),
        "universe": Param(None, type=["null", "array"], items={"type": "string", "pattern": SYMBOL_PATTERN},
                          minItems=1, maxItems=200, uniqueItems=True,
                          description="Symbols to train, one model each (e.g. [\"GSPC\", \"KO\"]). Empty: the "
                                      "config's data.universe, else $ML_TRAINING_UNIVERSE, else the one symbol."),
        "force": Param(False, type="boolean",
                       description="Retrain targets whose data and training settings are unchanged since their "
                                   "newest registered version (skipped otherwise)."),
        "interval": Param(None, type=["null", "string"], enum=[None, *INTERVALS],
                          description="Bar interval (yfinance spelling). Empty: the config's data.interval "
                                      "(built-in: 1d)."),
        "start": Param(None, type=["null", "string"], format="date",
                       description="First date to use (YYYY-MM-DD). Empty: the config's data.start (built-in: "
                                   "all the data)."),
        "timesteps": Param(None, type=["null", "integer"], allOf=[{"minimum": 1024, "maximum": 1_000_000_000}],
                           title="timesteps (1,024 to 1,000,000,000)",
                           description="PPO environment steps per walk-forward fold, not updates: each update "
                                       "collects num_envs x num_steps steps, so 500000 at 512 x 64 makes 15 "
                                       "updates. Empty: the config's ppo.total_timesteps (built-in: 500000)."),
        "num_envs": Param(None, type=["null", "integer"], allOf=[{"minimum": 1, "maximum": 1_000_000}],
                          title="num_envs (1 to 1,000,000)",
                          description="Parallel episodes. Empty: the config's ppo.num_envs (built-in: 512)."),
        "num_steps": Param(None, type=["null", "integer"], allOf=[{"minimum": 8, "maximum": 4096}],
                           title="num_steps (8 to 4,096)",
                           description="Rollout length per update. Empty: the config's ppo.num_steps "
                                       "(built-in: 64)."),
        "n_folds": Param(None, type=["null", "integer"], allOf=[{"minimum": 1, "maximum": 60}],
                         title="n_folds (1 to 60)",
                         description="Walk-forward test folds, one year each, the most recent last. Empty: the "
                                     "config's setting, by default every year back to the start of the data "
                                     "(16 folds on the 20-year sample)."),
        "seeds": Param(None, type=["null", "array"], items={"type": "integer", "minimum": 0}, minItems=1,
                       maxItems=16, title="seeds (1 to 16 integers, each 0 or more)", description="PPO seeds per fold (default from config: [1]). Validation picks "
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
    def plan_universe(params=None, run_id=None, dag=None, triggering_asset_events=None) -> list[dict]:
        from airflow.sdk.exceptions import AirflowFailException

        from ml import orchestration
        from ml.config import ConfigError
        from ml.pipeline import universe

        try:
            configs = orchestration.training_configs(params, triggering_asset_events)
        except ConfigError as error:  # a bad setting will not fix itself: fail now, without retries
            raise AirflowFailException(f"invalid pipeline config: {error}") from None
        return universe.plan(orchestration.run_dir_for(dag.dag_id, run_id), configs, force=bool(params.get("force")))

    @task(map_index_template=TARGET_LABEL)
    def load_data(target: str, run_dir: str) -> None:
        from ml import pipeline
        from ml.pipeline import universe
        from ml.pipeline.rundir import RunFolder, read_config

        with target_stage(run_dir, "load"):
            pipeline.load_data(run_dir, read_config(RunFolder(run_dir)))
            universe.skip_if_unchanged(run_dir)

    @task(map_index_template=TARGET_LABEL, trigger_rule="all_done")
    def validate_data(target: str, run_dir: str) -> None:
        from ml import pipeline

        # GX logs ~100 lines of its own start-up at INFO in every task process
        logging.getLogger("great_expectations").setLevel(logging.WARNING)
        with target_stage(run_dir, "validate"):
            pipeline.validate_data(run_dir)

    @task(map_index_template=TARGET_LABEL, trigger_rule="all_done")
    def start_tracking(target: str, run_dir: str, run_id=None) -> None:
        from ml import pipeline

        from mlflow_link import push_mlflow_links  # plugins/ is on the path of Airflow processes

        with target_stage(run_dir, "track"):
            tracking = pipeline.start_tracking(run_dir, run_name=f"ppo_training/{run_id}/{target}")
        push_mlflow_links(tracking)

    @task(map_index_template=TARGET_LABEL, trigger_rule="all_done")
    def plan_folds(target: str, run_dir: str) -> None:
        from ml import pipeline

        with target_stage(run_dir, "folds"):
            pipeline.plan_folds(run_dir)

    @task(trigger_rule="all_done")
    def fold_tasks(targets: list[dict] | None) -> list[dict]:
        from airflow.sdk.exceptions import AirflowSkipException

        from ml.pipeline import universe

        if targets is None:  # plan_universe failed: there is nothing to train
            raise AirflowSkipException("no targets: plan_universe did not finish")
        return universe.fold_tasks(targets)

    @task(execution_timeout=timedelta(hours=6), queue=TRAINING_QUEUE, pool=TRAINING_POOL,
          max_active_tis_per_dag=TRAINING_SLOTS,
          map_index_template="{{ task.op_kwargs['target'] }} fold {{ task.op_kwargs['fold'] }}")
    def train(target: str, run_dir: str, fold: int) -> None:
        from ml import pipeline

        with target_stage(run_dir, "train", fold):
            pipeline.train_fold_seeds(run_dir, fold)

    @task(map_index_template=TARGET_LABEL, trigger_rule="all_done")
    def evaluate(target: str, run_dir: str) -> None:
        from ml import pipeline

        with target_stage(run_dir, "evaluate"):
            pipeline.evaluate(run_dir)

    @task(map_index_template=TARGET_LABEL, trigger_rule="all_done")
    def export_onnx(target: str, run_dir: str) -> None:
        from ml import pipeline

        with target_stage(run_dir, "export"):
            pipeline.export_model(run_dir)

    @task(map_index_template=TARGET_LABEL, trigger_rule="all_done")
    def register(target: str, run_dir: str) -> dict:
        from ml import pipeline

        from mlflow_link import push_mlflow_links

        with target_stage(run_dir, "register"):
            result = pipeline.register(run_dir)
        push_mlflow_links(result)
        return {"model_name": result["model_name"], "version": result["version"], "champion": result["champion"]}

    @task(trigger_rule="all_done")
    def summary(run_id=None, dag=None) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from ml import orchestration
        from ml.pipeline import universe

        run_root = orchestration.run_dir_for(dag.dag_id, run_id)
        if not (run_root / universe.UNIVERSE_FILE).exists():
            raise AirflowFailException("no targets: plan_universe did not finish, nothing was trained")
        result = universe.summarize(run_root)
        failed = [row for row in result["targets"] if row["outcome"] == "failed"]
        if failed:
            raise AirflowFailException(f"{len(failed)} of {len(result['targets'])} targets failed: "
                                       + "; ".join(f"{row['target']} ({row['why']})" for row in failed))
        return result["counts"]

    targets = plan_universe()
    loaded = load_data.expand_kwargs(targets)
    validated = validate_data.expand_kwargs(targets)
    tracked = start_tracking.expand_kwargs(targets)
    folds_laid_out = plan_folds.expand_kwargs(targets)
    fold_list = fold_tasks(targets)
    trained = train.expand_kwargs(fold_list)
    evaluated = evaluate.expand_kwargs(targets)
    exported = export_onnx.expand_kwargs(targets)
    registered = register.expand_kwargs(targets)
    loaded >> validated >> tracked >> folds_laid_out >> fold_list
    trained >> evaluated >> exported >> registered >> summary()

ppo_training()
