# Sourced by bench/run.sh: the benchmark's private cluster (port 55434, data under
# /var/tmp/event_projections/bench) and the build of the extension it loads.
#
# Which build: BENCH_LIB=auto (default) | system | package
#   system   the extension installed in the system PostgreSQL 15 (what `make install` puts there);
#   package  the release package `cargo pgrx package` left in target/release/event_projections-pg15,
#            loaded by a private copy of the PostgreSQL 15 binaries (PostgreSQL finds its lib and
#            share directories relative to its binary), so that the system installation is not
#            touched;
#   auto     system when the installed library is a release build, else package. A debug build
#            (what `cargo pgrx test` installs) is many times slower and is never measured silently.

BENCH_PORT=55434
BENCH_DATA=/var/tmp/event_projections/bench
BENCH_DB=bench
BENCH_SOCK=$BENCH_DATA/socket
SYS_PGBIN=/usr/lib/postgresql/15/bin
PKG_DIR=${BENCH_PKG_DIR:-target/release/event_projections-pg15}
PGBIN=$SYS_PGBIN
LIBCOMMIT=

as_pg() { runuser -u postgres -- env -u RUST_BACKTRACE "$@"; }
die() { echo "bench: $*" >&2; exit 1; }

is_debug_build() { readelf -S "$1" 2>/dev/null | grep -q '\.debug_info'; }

private_root() {
  local root=$BENCH_DATA/pgroot
  [ -f "$PKG_DIR/usr/lib/postgresql/15/lib/event_projections.so" ] ||
    die "no release package in $PKG_DIR (build it with: cargo pgrx package --pg-config $SYS_PGBIN/pg_config)"
  rm -rf "$root"
  mkdir -p "$root/usr/lib/postgresql" "$root/usr/share/postgresql"
  cp -a /usr/lib/postgresql/15 "$root/usr/lib/postgresql/"
  cp -a /usr/share/postgresql/15 "$root/usr/share/postgresql/"
  cp -p "$PKG_DIR/usr/lib/postgresql/15/lib/event_projections.so" "$root/usr/lib/postgresql/15/lib/"
  cp -p "$PKG_DIR"/usr/share/postgresql/15/extension/event_projections* "$root/usr/share/postgresql/15/extension/"
  chmod -R a+rX "$root"
  PGBIN=$root/usr/lib/postgresql/15/bin
  LIBCOMMIT=$(cat "$PKG_DIR/COMMIT" 2>/dev/null || true)
}

choose_build() {
  local sys_so=/usr/lib/postgresql/15/lib/event_projections.so
  case ${BENCH_LIB:-auto} in
    system) PGBIN=$SYS_PGBIN ;;
    package) private_root ;;
    auto)
      if [ -f "$sys_so" ] && ! is_debug_build "$sys_so"; then
        PGBIN=$SYS_PGBIN
      else
        echo "bench: the installed event_projections.so is a debug build; measuring the release package $PKG_DIR instead"
        private_root
      fi ;;
    *) die "BENCH_LIB must be auto, system or package" ;;
  esac
  LIBFILE=$("$PGBIN/pg_config" --pkglibdir)/event_projections.so
  [ -f "$LIBFILE" ] || die "no event_projections.so in $("$PGBIN/pg_config" --pkglibdir)"
  if is_debug_build "$LIBFILE"; then
    [ "${BENCH_ALLOW_DEBUG:-0}" = 1 ] || die "$LIBFILE is a debug build (set BENCH_ALLOW_DEBUG=1 to measure it anyway)"
  fi
  LIBSUM=$(sha256sum "$LIBFILE" | cut -c1-16)
  LIBDATE=$(date -u -r "$LIBFILE" '+%Y-%m-%d %H:%M UTC')
}

cluster_init() {
  as_pg "$PGBIN/pg_ctl" -D "$BENCH_DATA/pgdata" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$BENCH_DATA/pgdata" "$BENCH_SOCK" "$BENCH_DATA/server.log"
  mkdir -p "$BENCH_DATA" "$BENCH_SOCK"
  chown postgres:postgres "$BENCH_DATA" "$BENCH_SOCK"; chmod 700 "$BENCH_DATA"
  as_pg "$PGBIN/initdb" -D "$BENCH_DATA/pgdata" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
  cat >> "$BENCH_DATA/pgdata/postgresql.conf" <<CONF
port = $BENCH_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$BENCH_SOCK'
shared_preload_libraries = 'event_projections'
event_projections.database = '$BENCH_DB'
max_connections = 50
shared_buffers = 512MB
# Durable settings: synchronous_commit is the only knob the runs change.
fsync = on
full_page_writes = on
synchronous_commit = off
max_wal_size = 8GB
checkpoint_timeout = 30min
log_min_messages = warning
log_line_prefix = '%m [%p] %b '
${BENCH_CONF:-}
CONF
  touch "$BENCH_DATA/PG_VERSION"
}

cluster_start() {
  as_pg "$PGBIN/pg_ctl" -D "$BENCH_DATA/pgdata" -l "$BENCH_DATA/server.log" -w -t 120 start >/dev/null
  if ! q postgres -c "SELECT 1 FROM pg_database WHERE datname = '$BENCH_DB'" | grep -q 1; then
    as_pg "$PGBIN/createdb" -h "$BENCH_SOCK" -p "$BENCH_PORT" -U postgres "$BENCH_DB"
  fi
  wait_workers
}

cluster_stop() {
  as_pg "$PGBIN/pg_ctl" -D "$BENCH_DATA/pgdata" -m fast -w stop >/dev/null 2>&1 || true
}

cluster_restart() { cluster_stop; cluster_start; }

# q DB ARGS...: psql, unaligned, quiet, stop on error.
q() { local db=$1; shift; "$PGBIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h "$BENCH_SOCK" -p "$BENCH_PORT" -U postgres "$db" "$@"; }
qb() { q "$BENCH_DB" "$@"; }

# The launcher starts the workers of a database once it has the extension: wait until both serve
# it (nothing to wait for before bench/setup.sql has created the extension).
wait_workers() {
  local i
  [ "$(qb -c "SELECT count(*) FROM pg_extension WHERE extname = 'event_projections'" 2>/dev/null)" = 1 ] || return 0
  for i in $(seq 1 100); do
    if [ "$(q postgres -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'event_projections worker' AND datname = '$BENCH_DB'" 2>/dev/null)" = "2" ]; then
      return 0
    fi
    sleep 0.2
  done
  die "the event_projections workers did not start (see $BENCH_DATA/server.log)"
}

postmaster_pid() { head -1 "$BENCH_DATA/pgdata/postmaster.pid"; }
cluster_cpu() { python3 bench/lib.py cpu "$BENCH_DATA/pgdata"; }
