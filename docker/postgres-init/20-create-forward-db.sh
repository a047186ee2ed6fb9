#!/usr/bin/env bash
# The forward-test ledger's database (ml.forward.ledger), owned by the Airflow user whose tasks
# write it. Runs once, when the data volume is first initialised, like 10-create-mlflow-db.sh.
set -euo pipefail

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v db="${FORWARD_DB_NAME:-forward}" -v owner="$POSTGRES_USER" <<'SQL'
CREATE DATABASE :"db" OWNER :"owner";
SQL
