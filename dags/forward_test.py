"""
### Forward test (paper trading) of every champion

Runs whenever `market_data` updates the curated lake. For each registered model with a
`champion` (or the models named in the `models` Param):

1. `trade`: the champion decides on every new curated bar, as a service would run it (the exported
   ONNX with its risk overlay); each decision fills at the next bar's open with the training costs.
   Decisions, fills, NAV and the model version go to the ledger (`$ML_FORWARD_DB`, a SQLAlchemy
   URL; SQLite beside the run folders by default). A bar is written once: a rerun changes nothing.
   A champion change starts a new ledger segment.
2. `monitor`: forward Sharpe, drawdown, turnover and exposure against the backtest band of the same
   model, action collapse, feature drift against the training window. Writes the forward-test
   page (button "report.html" on the task, and in the segment's MLflow run, experiment
   `forward_test`), then fails naming every rule that breached. With `rollback_on_breach`,
   `champion` moves back to the version it replaced.
"""

from __future__ import annotations

import logging

import pendulum
from airflow.sdk import Asset, Param, dag, task

from ml.config import MODEL_NAME_PATTERN  # imports no torch: parsing stays fast

log = logging.getLogger(__name__)


@dag(
    dag_id="forward_test",
    schedule=Asset("market_data_curated"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one writer per ledger segment
    tags=["ml", "forward-test", "monitoring"],
    description="On curated market data updates: paper-trade every champion on the new bars, then monitor it.",
    doc_md=__doc__,
    params={
        "models": Param(None, type=["null", "array"], items={"type": "string", "pattern": MODEL_NAME_PATTERN},
                        minItems=1,
                        title="Registered models",
                        description="Models to forward-test, e.g. [\"ppo_GSPC_1d\"]. Empty: every model with a "
                                    "champion."),
        # Bounds under allOf: the form then refuses a value out of range instead of moving it to the bound.
        "min_bars": Param(20, type="integer", allOf=[{"minimum": 2, "maximum": 10_000}], title="min_bars (2 to 10,000)",
                          description="Live bars a segment needs before the monitoring rules judge it."),
        "rollback_on_breach": Param(False, type="boolean",
                                    description="Move `champion` back to the version it replaced when a "
                                                "monitoring rule breaches."),
    },
)
def forward_test():
    @task
    def plan(params=None) -> list[str]:
        from ml_operators import MlflowRegistryHook  # plugins/ is on the path of Airflow processes

        from ml import forward

        models = params.get("models") or forward.champions(MlflowRegistryHook().tracking_uri)
        log.info("forward-testing %d model(s): %s", len(models), ", ".join(models) or "none has a champion")
        return models

    @task(map_index_template="{{ task.op_kwargs['model_name'] }}")
    def trade(model_name: str, run_id=None) -> dict:
        from airflow.sdk.exceptions import AirflowFailException
        from ml_operators import MlflowRegistryHook

        from ml import forward
        from ml.orchestration import run_dir_for

        workdir = run_dir_for("forward_test", run_id) / model_name
        try:
            return forward.trade_champion(model_name, MlflowRegistryHook().tracking_uri, forward.Ledger(), workdir)
        except forward.BAD_INPUT as error:  # a bad name or bars that break a rule: retrying will not help
            raise AirflowFailException(str(error)) from None

    @task(map_index_template="{{ task.op_kwargs['model_name'] }}")
    def monitor(model_name: str, params=None, run_id=None) -> dict:
        from airflow.sdk.exceptions import AirflowFailException
        from ml_operators import MlflowRegistryHook
        from mlflow_link import push_mlflow_links

        from ml import forward
        from ml.orchestration import run_dir_for

        rules = forward.MonitorRules(min_bars=params["min_bars"], rollback=params["rollback_on_breach"])
        workdir = run_dir_for("forward_test", run_id) / model_name
        try:
            result = forward.monitor_champion(model_name, MlflowRegistryHook().tracking_uri, forward.Ledger(),
                                              workdir, rules)
        except forward.BAD_INPUT as error:
            raise AirflowFailException(str(error)) from None
        if "run_id" in result:
            push_mlflow_links({"tracking_uri": result["tracking_uri"], "run_id": result["run_id"],
                               "model_name": model_name, "version": result["version"],
                               "report_path": "report/forward_test.html"})
        if result["breaches"]:
            raise AirflowFailException(f"{model_name} v{result['version']}: monitoring breached: "
                                       + "; ".join(f"{b['rule']}: {b['detail']}" for b in result["breaches"]))
        return {"model_name": model_name, "bars": result.get("bars"), "skipped": result.get("skipped")}

    models = plan()
    trade.expand(model_name=models) >> monitor.expand(model_name=models)


forward_test()
