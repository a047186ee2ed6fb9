#!/usr/bin/env bash
# Second database on the Airflow metadata server: MLflow's tracking and registry store.
# The postgres image runs this once, when the data volume is first initialised; after changing
# the names or password, recreate the volume (docker compose down -v) or run the SQL by hand.
set -euo pipefail

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v db="${MLFLOW_DB_NAME:-mlflow}" \
    -v user="${MLFLOW_DB_USER:-mlflow}" \
    -v password="${MLFLOW_DB_PASSWORD:-mlflow}" <<'SQL'
CREATE ROLE :"user" WITH LOGIN PASSWORD :'password';
CREATE DATABASE :"db" OWNER :"user";
SQL
