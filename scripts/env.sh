# Environment of the embedded, single-machine deployment. Sourced by the Makefile recipes.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$ROOT/.local/airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$ROOT/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__EXECUTOR=LocalExecutor
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="${AIRFLOW__DATABASE__SQL_ALCHEMY_CONN:-sqlite:///$AIRFLOW_HOME/airflow.db}"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$ROOT/.local/mlflow/mlflow.db}"
export ML_RUNS_DIR="${ML_RUNS_DIR:-$ROOT/.local/runs}"
# Trainings that share this machine's cores: fold tasks run at most this many at once, each on
# cores / this many threads (ml/agent/threads.py). One per core by default.
export ML_TRAINING_SLOTS="${ML_TRAINING_SLOTS:-$(nproc)}"
export GX_ANALYTICS_ENABLED=false
export MLFLOW_ENABLE_TELEMETRY=false
export DO_NOT_TRACK=1
mkdir -p "$AIRFLOW_HOME" "$ROOT/.local/mlflow" "$ML_RUNS_DIR"
