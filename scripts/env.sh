# Environment of the embedded, single-machine deployment. Sourced by the Makefile recipes.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$ROOT/.local/airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="${AIRFLOW__CORE__DAGS_FOLDER:-$ROOT/dags}"
export AIRFLOW__CORE__PLUGINS_FOLDER="$ROOT/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__EXECUTOR=LocalExecutor
# `airflow standalone` starts each component as a plain `airflow` process: the project's venv first.
case ":$PATH:" in *":$ROOT/.venv/bin:"*) ;; *) export PATH="$ROOT/.venv/bin:$PATH" ;; esac
# The UI and API answer on this machine only; AIRFLOW__API__HOST=0.0.0.0 exposes them to the network.
export AIRFLOW__API__HOST="${AIRFLOW__API__HOST:-127.0.0.1}"
export AIRFLOW__API__PORT="${AIRFLOW__API__PORT:-8080}"
# Task processes report their state to this API server.
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="${AIRFLOW__CORE__EXECUTION_API_SERVER_URL:-http://127.0.0.1:$AIRFLOW__API__PORT/execution/}"
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="${AIRFLOW__DATABASE__SQL_ALCHEMY_CONN:-sqlite:///$AIRFLOW_HOME/airflow.db}"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$ROOT/.local/mlflow/mlflow.db}"
export ML_RUNS_DIR="${ML_RUNS_DIR:-$ROOT/.local/runs}"
# Trainings that share this machine's cores: fold tasks run at most this many at once, each on
# cores / this many threads (ml/agent/threads.py). One per core by default.
export ML_TRAINING_SLOTS="${ML_TRAINING_SLOTS:-$(nproc)}"
export GX_ANALYTICS_ENABLED=false
export MLFLOW_ENABLE_TELEMETRY=false
export DO_NOT_TRACK=1
# Airflow logs whatever a task writes to stderr as ERROR: MLflow logs through Airflow's logging
# instead of its own stderr handler and draws no download bars, and torch.onnx keeps its warnings
# about optional packages (torchvision) to itself.
export MLFLOW_CONFIGURE_LOGGING=false
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
export TORCH_LOGS="${TORCH_LOGS:--onnx}"
mkdir -p "$AIRFLOW_HOME" "$ROOT/.local/mlflow" "$ML_RUNS_DIR"
