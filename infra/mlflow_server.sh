#!/usr/bin/env bash
# Starts an MLflow tracking server (UI + REST API + proxied artifacts) in the foreground; Ctrl-C stops it.
#   bash infra/mlflow_server.sh                                   # sqlite + artifacts under ./data/mlflow-server
#   MLFLOW_SERVER_DIR=/srv/hyformer/mlflow bash infra/mlflow_server.sh
#   MLFLOW_BACKEND_URI=postgresql://mlflow:PASSWORD@db:5432/mlflow bash infra/mlflow_server.sh
# then, in the shell that runs the workflow (or submits it: jobs/submit.py forwards the variable):
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
#
# Environment (all optional):
#   MLFLOW_SERVER_DIR     folder of the default sqlite db and the artifacts (default: <project>/data/mlflow-server)
#   MLFLOW_BACKEND_URI    backend store; default sqlite:///<MLFLOW_SERVER_DIR>/mlflow.db (PostgreSQL: postgresql://...,
#                         needs the psycopg2 package)
#   MLFLOW_ARTIFACTS_DIR  where proxied artifacts are stored (default: <MLFLOW_SERVER_DIR>/artifacts); a local path
#                         or e.g. s3://bucket/prefix
#   MLFLOW_HOST           interface to bind (default 127.0.0.1: this machine only; 0.0.0.0 for the network)
#   MLFLOW_PORT           port (default 5000)
#   MLFLOW_ALLOWED_HOSTS  passed to --allowed-hosts: needed when clients reach the server by a name or public IP
#                         (MLflow 3 accepts only localhost and private IPs in the Host header by default)
# Clients log artifacts through the server (--artifacts-destination, served as mlflow-artifacts:/): they need no
# access to the artifact folder. One worker process is enough for a team's daily runs and keeps sqlite writes serial.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

SERVER_DIR="$(realpath -m "${MLFLOW_SERVER_DIR:-$ROOT/data/mlflow-server}")"
BACKEND_URI="${MLFLOW_BACKEND_URI:-sqlite:///$SERVER_DIR/mlflow.db}"   # sqlite:/// + /abs/path = 4 slashes
ARTIFACTS="${MLFLOW_ARTIFACTS_DIR:-$SERVER_DIR/artifacts}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"

if [[ -x "$ROOT/.venv/bin/mlflow" ]]; then MLFLOW="$ROOT/.venv/bin/mlflow"; else MLFLOW="$(command -v mlflow)" || {
  echo "mlflow_server: no mlflow in $ROOT/.venv or on PATH (bash infra/install.sh)" >&2; exit 2; }; fi
if [[ "$ARTIFACTS" != *://* ]]; then ARTIFACTS="$(realpath -m "$ARTIFACTS")"; mkdir -p "$ARTIFACTS"; fi
[[ "$BACKEND_URI" == sqlite:///* ]] && mkdir -p "$(dirname "${BACKEND_URI#sqlite:///}")"

# the backend URI may hold a database password: it goes to mlflow by environment (its --backend-store-uri envvar),
# never on the command line, where every user of the host sees it in `ps`
export MLFLOW_BACKEND_STORE_URI="$BACKEND_URI"
args=(server --artifacts-destination "$ARTIFACTS" --host "$HOST" --port "$PORT" --workers 1)
[[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]] && args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")

client_host="$HOST"; [[ "$HOST" == "0.0.0.0" ]] && client_host="$(hostname -f 2>/dev/null || hostname)"
echo "mlflow_server: backend $BACKEND_URI" | sed -E 's#(://[^:/@]+):[^@]*@#\1:***@#' >&2   # password masked
echo "mlflow_server: artifacts $ARTIFACTS" >&2
echo "export MLFLOW_TRACKING_URI=http://$client_host:$PORT"
exec "$MLFLOW" "${args[@]}"
