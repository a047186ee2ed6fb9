#!/usr/bin/env bash
# MLflow's databases on the Airflow metadata server: the tracking and registry store, and the
# basic-auth store (users and permissions). The postgres image runs this once, when the data
# volume is first initialised; after changing the names or password, recreate the volume
# (docker compose down -v) or run the SQL by hand.
set -euo pipefail

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v db="${MLFLOW_DB_NAME:-mlflow}" \
    -v auth_db="${MLFLOW_AUTH_DB_NAME:-mlflow_auth}" \
    -v user="${MLFLOW_DB_USER:-mlflow}" \
    -v password="${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set}" <<'SQL'
CREATE ROLE :"user" WITH LOGIN PASSWORD :'password';
CREATE DATABASE :"db" OWNER :"user";
CREATE DATABASE :"auth_db" OWNER :"user";
SQL
