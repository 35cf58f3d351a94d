#!/usr/bin/env bash
# A private PostgreSQL 15 cluster with event_projections preloaded, run as the `postgres` user
# (PostgreSQL refuses to run as root). Used by `make demo`, the connection tests and the benchmarks.
#
#   scripts/cluster.sh start|stop|restart|status|psql [args]|env
#
# Settings (environment): EP_PORT (default 55432), EP_DATA (default /var/tmp/event_projections/$EP_PORT),
# EP_DB (default ep; the database the background worker serves), EP_CONF (extra postgresql.conf lines).
set -euo pipefail

PGBIN=${EP_PGBIN:-/usr/lib/postgresql/15/bin}   # EP_PGBIN: another installation (an older build)
PORT=${EP_PORT:-55432}
DATA=${EP_DATA:-/var/tmp/event_projections/$PORT}
SOCK=$DATA/socket
DB=${EP_DB:-ep}
# The server must not inherit RUST_BACKTRACE: pgrx would put Rust backtraces into error details.
as_pg() { runuser -u postgres -- env -u RUST_BACKTRACE "$@"; }

start() {
  if [ ! -f "$DATA/PG_VERSION" ]; then
    mkdir -p "$DATA"; chown postgres:postgres "$DATA"; chmod 700 "$DATA"
    as_pg "$PGBIN/initdb" -D "$DATA/pgdata" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
    mkdir -p "$SOCK"; chown postgres:postgres "$SOCK"
    cat >> "$DATA/pgdata/postgresql.conf" <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$SOCK'
shared_preload_libraries = 'event_projections'
event_projections.database = '$DB'
max_connections = 100
max_prepared_transactions = 4
fsync = off
full_page_writes = off
log_min_messages = warning
log_line_prefix = '%m [%p] %b '
${EP_CONF:-}
CONF
    touch "$DATA/PG_VERSION"
  fi
  if ! as_pg "$PGBIN/pg_ctl" -D "$DATA/pgdata" status >/dev/null 2>&1; then
    as_pg "$PGBIN/pg_ctl" -D "$DATA/pgdata" -l "$DATA/server.log" -w -t 60 start >/dev/null
  fi
  if ! as_pg "$PGBIN/psql" -h "$SOCK" -p "$PORT" -U postgres -Atqc "SELECT 1 FROM pg_database WHERE datname = '$DB'" postgres | grep -q 1; then
    as_pg "$PGBIN/createdb" -h "$SOCK" -p "$PORT" -U postgres "$DB"
  fi
}

stop() {
  if [ -d "$DATA/pgdata" ]; then
    as_pg "$PGBIN/pg_ctl" -D "$DATA/pgdata" -m "${1:-fast}" -w stop >/dev/null 2>&1 || true
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop "${2:-fast}" ;;
  restart) stop; start ;;
  destroy) stop immediate; rm -rf "$DATA" ;;
  status) as_pg "$PGBIN/pg_ctl" -D "$DATA/pgdata" status ;;
  psql) shift; exec "$PGBIN/psql" -h "$SOCK" -p "$PORT" -U postgres "$DB" "$@" ;;
  env) echo "EP_PORT=$PORT EP_DATA=$DATA EP_SOCK=$SOCK EP_DB=$DB" ;;
  *) echo "usage: $0 start|stop [mode]|restart|destroy|status|psql [args]|env" >&2; exit 2 ;;
esac
