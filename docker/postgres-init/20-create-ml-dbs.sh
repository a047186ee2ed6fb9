#!/usr/bin/env bash
# The ml package's own databases, owned by the Airflow user whose tasks write them: the
# forward-test ledger (ml.forward.ledger) and the Optuna studies of ppo_tuning (ml.tuning). Runs
# once, when the data volume is first initialised, like 10-create-mlflow-db.sh.
set -euo pipefail

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v forward_db="${FORWARD_DB_NAME:-forward}" -v tuning_db="${TUNING_DB_NAME:-optuna}" \
    -v owner="$POSTGRES_USER" <<'SQL'
CREATE DATABASE :"forward_db" OWNER :"owner";
CREATE DATABASE :"tuning_db" OWNER :"owner";
SQL
