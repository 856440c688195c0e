#!/bin/sh
# Run by the postgres image once, when it initialises an empty data directory
# (/docker-entrypoint-initdb.d), as POSTGRES_USER (mlflow) against POSTGRES_DB (mlflow).
# Creates what the stack needs beside MLflow's own database:
#   mlflow_auth     users and permissions of MLflow's basic-auth app, owned by mlflow
#   persona_audit   the jobs' lease and schedule tables, owned by role persona_audit (password
#                   PERSONA_AUDIT_DB_PASSWORD), which can connect to nothing else
# The password is read inside psql (\getenv), never put on a command line.
set -eu
: "${PERSONA_AUDIT_DB_PASSWORD:?must be set (docker/.env)}"
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
\getenv audit_password PERSONA_AUDIT_DB_PASSWORD
\getenv mlflow_db POSTGRES_DB
CREATE DATABASE mlflow_auth;
CREATE ROLE persona_audit LOGIN PASSWORD :'audit_password';
CREATE DATABASE persona_audit OWNER persona_audit;
REVOKE CONNECT, TEMPORARY ON DATABASE :"mlflow_db", mlflow_auth FROM PUBLIC;
REVOKE CONNECT, TEMPORARY ON DATABASE persona_audit FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE persona_audit TO persona_audit;
SQL
