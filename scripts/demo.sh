#!/usr/bin/env bash
# Run the ppo_training DAG once on the bundled sample with an embedded Airflow, then summarize.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
PY="$ROOT/.venv/bin"
TIMESTEPS="${TIMESTEPS:-500000}"

echo "==> Airflow metadata database ($AIRFLOW_HOME)"
"$PY/airflow" db migrate > "$AIRFLOW_HOME/db-migrate.log" 2>&1 || { cat "$AIRFLOW_HOME/db-migrate.log"; exit 1; }

echo "==> airflow dags test ppo_training (sample GSPC, $TIMESTEPS timesteps per fold)"
LOG="$ROOT/.local/demo-dag-run.log"
# force: the demo always trains, even when an earlier demo registered a model of the same data and settings.
CONF="{\"source\": \"sample\", \"symbol\": \"GSPC\", \"timesteps\": $TIMESTEPS, \"force\": true, \"config_file\": \"$ROOT/docs/demo-config.yaml\"}"
# `dags test` runs the tasks one after another: each training has the machine's cores to itself.
if ! ML_TRAINING_SLOTS=1 "$PY/airflow" dags test ppo_training -c "$CONF" > "$LOG" 2>&1; then
    tail -n 80 "$LOG"; echo "DAG run failed; full log: $LOG"; exit 1
fi
grep -E "Marking run .* (successful|failed)|DagRun Finished" "$LOG" | tail -n 1 || true

echo
echo "==> Result"
"$PY/python" -m ml summary --model ppo_GSPC_1d
RUN_DIR="$(ls -td "$ML_RUNS_DIR"/ppo_training/*/ | head -n 1)GSPC"
cat <<MSG

Where to look
  Run folder         : $RUN_DIR
                       (report.html to read, report.json, model.onnx, equity curves, plots/)
  DAG run log        : $LOG
  MLflow store       : $MLFLOW_TRACKING_URI
  MLflow UI          : .venv/bin/mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI --port 5000
  Airflow UI         : source scripts/env.sh && .venv/bin/airflow standalone   (http://127.0.0.1:8080)
MSG
