#!/bin/sh
# Runs once, when the postgres service initialises an empty data volume: the MLflow
# database (POSTGRES_DB) is created by the image itself; Prefect gets its own database.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set=db="${PREFECT_DB:-prefect}" <<'SQL'
CREATE DATABASE :"db";
SQL
