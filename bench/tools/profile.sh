#!/usr/bin/env bash
# Profiles one part of the extension on the benchmark cluster (started and loaded by a previous
# bench/run.sh; start it again with `bash bench/tools/profile.sh start`), with perf sampling
# cpu-clock (hardware counters are not available in this VM) and DWARF call graphs, and
# attributes the samples to phases (tools/perf_phases.py).
#
#   bench/tools/profile.sh start                      start the cluster left by run.sh
#   bench/tools/profile.sh append SCRIPT [SECONDS]    the backends of 8 pgbench clients running
#                                                     bench/pgbench/SCRIPT.sql (e.g. ep_append)
#   bench/tools/profile.sh rebuild PROJECTION [SECONDS]  the worker running an in-place rebuild
#   bench/tools/profile.sh stop
set -euo pipefail
cd "$(dirname "$0")/../.."
source bench/env.sh
# The system installation, unless BENCH_LIB=package (the private copy the last run.sh made).
[ "${BENCH_LIB:-system}" = package ] && PGBIN=$BENCH_DATA/pgroot/usr/lib/postgresql/15/bin
OUT=bench/out/profile; mkdir -p "$OUT"
q() { "$SYS_PGBIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h "$BENCH_SOCK" -p "$BENCH_PORT" -U postgres "$BENCH_DB" "$@"; }

case ${1:-} in
  start) cluster_start ;;
  stop) cluster_stop ;;
  append)
    script=$2; secs=${3:-5}
    "$SYS_PGBIN/pgbench" -n -M prepared -c 8 -j 2 -T $((secs + 4)) -D accounts=10000 -h 127.0.0.1 -p "$BENCH_PORT" \
      -U postgres -f "bench/pgbench/$script.sql" "$BENCH_DB" > "$OUT/$script.pgbench.txt" 2>&1 &
    pg=$!
    sleep 1.5
    pids=$(q -c "SELECT string_agg(pid::text, ',') FROM pg_stat_activity WHERE application_name = 'pgbench'")
    perf record -q -e cpu-clock -F 1999 --call-graph dwarf,32768 -p "$pids" -o "$OUT/$script.data" -- sleep "$secs" 2>/dev/null
    wait "$pg"
    grep tps "$OUT/$script.pgbench.txt"
    perf script -i "$OUT/$script.data" -F comm,tid,ip,sym 2>/dev/null | python3 bench/tools/perf_phases.py bench/tools/markers-append.txt
    ;;
  rebuild)
    p=$2; secs=${3:-5}
    id=$(q -c "SELECT ep_rebuild('$p')")
    sleep 0.5
    w=$(q -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'event_projections worker' AND query LIKE 'event_projections: rebuilding $p'")
    perf record -q -e cpu-clock -F 1999 --call-graph dwarf,32768 -p "$w" -o "$OUT/rebuild_$p.data" -- sleep "$secs" 2>/dev/null
    while [ "$(q -c "SELECT status FROM ep.rebuilds WHERE id = $id")" != done ]; do sleep 0.2; done
    perf script -i "$OUT/rebuild_$p.data" -F comm,tid,ip,sym 2>/dev/null | python3 bench/tools/perf_phases.py bench/tools/markers-rebuild.txt
    ;;
  *) echo "usage: $0 start|stop|append SCRIPT [SECONDS]|rebuild PROJECTION [SECONDS]" >&2; exit 2 ;;
esac
