#!/usr/bin/env bash
# `make demo`: a local PostgreSQL with the extension preloaded, and the extension at work from psql.
set -euo pipefail
cd "$(dirname "$0")/.."
export EP_PORT=${EP_PORT:-55432} EP_DB=${EP_DB:-ep}
bash scripts/cluster.sh start
psql_demo() { bash scripts/cluster.sh psql -X -q -v ON_ERROR_STOP=1 -P pager=off "$@"; }
psql_demo -f examples/demo.sql
cat <<MSG

The cluster keeps running: connect with
  bash scripts/cluster.sh psql        (or: psql -h 127.0.0.1 -p $EP_PORT -U postgres $EP_DB)
and stop it with
  bash scripts/cluster.sh stop
MSG
