#!/usr/bin/env bash
# The benchmark suite of event_projections (what `make bench` runs). Method and results:
# bench/RESULTS.md.
#
# Starts a private cluster (port 55434, data in /var/tmp/event_projections/bench, created afresh),
# loads a history, and measures every figure against a plain PL/pgSQL baseline (bench/baselines.sql)
# in the same run, interleaving the runs of the two sides. Prints the table of figures (median,
# ratio, target); everything raw goes to bench/out/<time>-<mode>/ (bench/out/latest links to it).
#
# Environment:
#   BENCH_QUICK=1        small sizes, ~3 minutes (default: full, ~25 minutes)
#   BENCH_LIB=auto|system|package   which build of the extension to load (bench/env.sh)
#   BENCH_HIST, BENCH_MEM_BIG, BENCH_ROUNDS_REBUILD, BENCH_ROUNDS_APPEND, BENCH_APPEND_SECONDS,
#   BENCH_ROUNDS_SYNC, BENCH_SYNC_SECONDS, BENCH_STALL_RUNS, BENCH_STALL_RATE, BENCH_LAG_SECONDS,
#   BENCH_STALL_HIST, BENCH_LAG_RATE, BENCH_MEM_EVENT=0|1 (also the per-event handler in the memory
#   figure; default 1 in full mode), BENCH_BIG_BATCH (batch_size of figure 4's large-batch variant,
#   default 100000),
#   BENCH_SKIP="memory lag ..." (phases to skip: rebuild append sync ids stall lag poll memory)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/env.sh

T_START=$(date +%s)
QUICK=${BENCH_QUICK:-0}
if [ "$QUICK" = 1 ]; then
  MODE=quick
  HIST=${BENCH_HIST:-50000}; MEM_BIG=${BENCH_MEM_BIG:-500000}
  ROUNDS_RB=${BENCH_ROUNDS_REBUILD:-3}
  ROUNDS_AP=${BENCH_ROUNDS_APPEND:-3}; T_AP=${BENCH_APPEND_SECONDS:-3}
  ROUNDS_SY=${BENCH_ROUNDS_SYNC:-2}; T_SY=${BENCH_SYNC_SECONDS:-3}
  STALL_RUNS=${BENCH_STALL_RUNS:-1}; STALL_HIST=${BENCH_STALL_HIST:-20000}; LAG_T=${BENCH_LAG_SECONDS:-10}
  EV_VARIANT=0; BATCH_SENS=0; MEM_EVENT=${BENCH_MEM_EVENT:-0}
else
  MODE=full
  HIST=${BENCH_HIST:-1000000}; MEM_BIG=${BENCH_MEM_BIG:-10000000}
  ROUNDS_RB=${BENCH_ROUNDS_REBUILD:-3}
  ROUNDS_AP=${BENCH_ROUNDS_APPEND:-5}; T_AP=${BENCH_APPEND_SECONDS:-10}
  ROUNDS_SY=${BENCH_ROUNDS_SYNC:-3}; T_SY=${BENCH_SYNC_SECONDS:-10}
  STALL_RUNS=${BENCH_STALL_RUNS:-3}; STALL_HIST=${BENCH_STALL_HIST:-50000}; LAG_T=${BENCH_LAG_SECONDS:-30}
  EV_VARIANT=1; BATCH_SENS=1; MEM_EVENT=${BENCH_MEM_EVENT:-1}
fi
STALL_RATE=${BENCH_STALL_RATE:-2000}
LAG_RATE=${BENCH_LAG_RATE:-1000}
ACCOUNTS=$((HIST / 100))          # 100 events per account in every history loaded
APPEND_ACCOUNTS=10000             # streams (accounts) the pgbench clients append to
BIG_BATCH=${BENCH_BIG_BATCH:-100000}  # batch_size of the large-batch variant of figure 4
CLIENTS=8; THREADS=2
SKIP=" ${BENCH_SKIP:-} "
skip() { [[ "$SKIP" == *" $1 "* ]]; }

OUT=bench/out/$(date -u +%Y%m%d-%H%M%S)-$MODE
mkdir -p "$OUT"/pgbench "$OUT"/stall "$OUT"/mem
ln -sfn "$(basename "$OUT")" bench/out/latest
RES=$OUT/results.tsv
printf 'figure\tvariant\tround\tmetric\tvalue\n' > "$RES"
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$RES"; }
log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - T_START ))s] $*" | tee -a "$OUT/log.txt"; }
now() { date +%s.%N; }
calc() { python3 -c "print(round($1, 4))"; }

# psql / pgbench are clients: the system's are fine whatever server build runs.
PSQL="$SYS_PGBIN/psql"; PGBENCH="$SYS_PGBIN/pgbench"
q() { local db=$1; shift; "$PSQL" -X -q -A -t -v ON_ERROR_STOP=1 -h "$BENCH_SOCK" -p "$BENCH_PORT" -U postgres "$db" "$@"; }
qb() { q "$BENCH_DB" "$@"; }

BG_PIDS=()
cleanup() {
  local p
  for p in "${BG_PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  cluster_stop
}
trap cleanup EXIT

# ------------------------------------------------------------------------------------------------
# Set-up: a fresh cluster, the extension, the baselines.
as_pg "$SYS_PGBIN/pg_ctl" -D "$BENCH_DATA/pgdata" -m fast -w stop >/dev/null 2>&1 || true
choose_build
log "mode $MODE: history $HIST events over $ACCOUNTS accounts, memory $HIST vs $MEM_BIG events; library $LIBFILE ($LIBSUM, $LIBDATE)"
if [ -n "$LIBCOMMIT" ]; then
  log "the library is a release package of commit $LIBCOMMIT"
else
  newest_src=$(find src sql -type f -newer "$LIBFILE" 2>/dev/null | head -3 | tr '\n' ' ')
  [ -z "$newest_src" ] || log "WARNING: sources newer than the library measured: $newest_src"
fi
cluster_init
cluster_start
qb -f bench/baselines.sql >/dev/null
qb -f bench/setup.sql >/dev/null
wait_workers

python3 - "$OUT/meta.json" <<EOF
import json, os, platform, subprocess, sys
def sh(c):
    try: return subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception: return ""
meta = {
  "mode": "$MODE", "hist_events": $HIST, "accounts": $ACCOUNTS, "mem_big_events": $MEM_BIG,
  "append_accounts": $APPEND_ACCOUNTS, "stall_hist_events": $STALL_HIST,
  "clients": $CLIENTS, "threads": $THREADS, "stall_rate": $STALL_RATE, "lag_rate": $LAG_RATE, "big_batch": $BIG_BATCH,
  "rounds": {"rebuild": $ROUNDS_RB, "append": $ROUNDS_AP, "append_seconds": $T_AP, "sync_on": $ROUNDS_SY, "sync_on_seconds": $T_SY},
  "library": "$LIBFILE", "library_sha256_16": "$LIBSUM", "library_mtime": "$LIBDATE", "library_commit": "$LIBCOMMIT",
  "repo_head": sh("git rev-parse --short HEAD") + (" (src/sql modified)" if sh("git status --porcelain src sql") else ""),
  "cpus": os.cpu_count(), "cpu_model": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
  "mem_gib": round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30, 1),
  "kernel": platform.release(),
  "postgres": sh("$SYS_PGBIN/postgres --version"),
  "shared_buffers": sh("$PSQL -X -A -t -h $BENCH_SOCK -p $BENCH_PORT -U postgres $BENCH_DB -c 'show shared_buffers'"),
  "loadavg_start": open('/proc/loadavg').read().split()[:3],
}
json.dump(meta, open(sys.argv[1], "w"), indent=1)
EOF

# ------------------------------------------------------------------------------------------------
# Helpers.

checkpoint() { qb -c "CHECKPOINT" >/dev/null; }

# load N TYPE MIRROR: appends N events to the history through the restore path (COPY), 100 per
# account (stream).
load() {
  local n=$1 etype=$2 mirror=$3 from accounts=$(( $1 / 100 > 0 ? $1 / 100 : 1 ))
  from=$(( $(qb -c "SELECT COALESCE(max(global_position), 0) FROM ep.events") + 1 ))
  qb -c "COPY (SELECT * FROM bench.history($from, $n, $accounts, '$etype')) TO STDOUT" |
    qb -c "COPY ep.events (global_position, stream_id, stream_position, event_type, data, metadata, created_at, event_id) FROM STDIN"
  qb -c "SELECT bench.after_load($from, $mirror)" >/dev/null
  qb -c "VACUUM (ANALYZE) ep.events, ep.streams, bl.events, bl.streams" >/dev/null
}

# wait_rebuild ID [TIMEOUT_S]: polls the rebuild's status every 20 ms from one session, in short
# statements: no snapshot is held between them. (ep_rebuild_wait() is a function: the statement
# that calls it keeps its snapshot, and so the xmin horizon, for the whole wait, and the rebuild
# then cannot prune a single dead row version of its read model; see RESULTS.md.)
wait_rebuild() {
  local id=$1 limit=${2:-7200} st="" t0=$SECONDS
  coproc WAITQ { "$PSQL" -X -q -A -t -h "$BENCH_SOCK" -p "$BENCH_PORT" -U postgres "$BENCH_DB" 2>&1; }
  while :; do
    echo "SELECT status FROM ep.rebuilds WHERE id = $id;" >&"${WAITQ[1]}"
    read -r -t 60 st <&"${WAITQ[0]}" || st=""
    case $st in done|failed|cancelled|"") break ;; esac
    [ $((SECONDS - t0)) -lt "$limit" ] || break
    sleep 0.02
  done
  echo '\q' >&"${WAITQ[1]}"
  wait "$WAITQ_PID" 2>/dev/null || true
  echo "$st"
}

worker_pids() { qb -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'event_projections worker'" | tr '\n' ' '; }

# The worker that runs a projection's rebuild (or empty if none is seen within 5 s).
rebuilding_worker() {
  local i pid
  for i in $(seq 1 250); do
    pid=$(qb -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'event_projections worker' AND query LIKE 'event_projections: rebuilding $1'" | head -1)
    [ -n "$pid" ] && { echo "$pid"; return; }
    [ "$(qb -c "SELECT count(*) FROM ep.rebuilds WHERE projection = '$1' AND status IN ('queued', 'running')")" = 0 ] && return
    sleep 0.02
  done
}

# rebuild_ep PROJECTION LABEL: one in-place rebuild through the worker, from ep_rebuild() until its
# status is 'done' (wait_rebuild); sets RB_WALL, RB_CPU (cluster CPU seconds) and RB_MEM (memsum
# JSON file).
rebuild_ep() {
  local p=$1 label=$2 a s id e b w sp samples=$OUT/mem/$2.samples
  checkpoint
  python3 bench/lib.py sample "$samples" 0.25 $(worker_pids) & sp=$!; BG_PIDS+=("$sp")
  sleep 0.3
  a=$(cluster_cpu); s=$(now)
  id=$(qb -c "SELECT ep_rebuild('$p')")
  w=$(rebuilding_worker "$p")
  [ "$(wait_rebuild "$id")" = done ] || die "rebuild $id of $p did not finish: $(qb -c "SELECT error FROM ep.rebuilds WHERE id = $id")"
  e=$(now); b=$(cluster_cpu)
  sleep 0.3; kill "$sp"; wait "$sp" 2>/dev/null || true
  RB_WALL=$(calc "$e - $s"); RB_CPU=$(calc "$b - $a")
  RB_MEM=$OUT/mem/$label.json
  if [ -n "$w" ]; then python3 bench/lib.py memsum "$RB_MEM" "$samples" "$w" >/dev/null; else echo '{}' > "$RB_MEM"; fi
}

# rebuild_bl SQL: a baseline rebuild in one psql call; sets RB_WALL, RB_CPU.
rebuild_bl() {
  local a s e b
  checkpoint
  a=$(cluster_cpu); s=$(now)
  qb -c "$1" >/dev/null
  e=$(now); b=$(cluster_cpu)
  RB_WALL=$(calc "$e - $s"); RB_CPU=$(calc "$b - $a")
}

# pgb LABEL SCRIPT SECONDS [pgbench args]: one pgbench run; sets PGB_TPS, PGB_N, PGB_CPU_US, PGB_LAT.
pgb() {
  local label=$1 script=$2 t=$3 a b f=$OUT/pgbench/$1.txt
  shift 3
  a=$(cluster_cpu)
  "$PGBENCH" -n -M prepared -c "$CLIENTS" -j "$THREADS" -T "$t" -D accounts="$APPEND_ACCOUNTS" \
    -h 127.0.0.1 -p "$BENCH_PORT" -U postgres -f "bench/pgbench/$script.sql" "$@" "${PGB_DB:-$BENCH_DB}" > "$f" 2>&1 ||
    { cat "$f"; die "pgbench $label failed"; }
  b=$(cluster_cpu)
  PGB_TPS=$(grep -oP 'tps = \K[0-9.]+' "$f")
  PGB_N=$(grep -oP 'actually processed: \K[0-9]+' "$f")
  PGB_LAT=$(grep -oP 'latency average = \K[0-9.]+' "$f")
  PGB_CPU_US=$(calc "($b - $a) * 1e6 / $PGB_N")
}

# ------------------------------------------------------------------------------------------------
# The history, and the projections the rebuilds replay it into. They are registered on the empty
# log (registering on a full one would replay it, which is not what is measured), and the history
# is written with COPY, which runs no handler: the first rebuild makes the models complete, and
# every measured rebuild starts by emptying them.
qb -c "SELECT ep_register_projection('rb_event', 'bench.balance_event(ep.events)', 'inline', '{Deposited}', 'rb_event')" >/dev/null
qb -c "SELECT ep_register_projection('rb_batch', 'bench.balance_batch(ep.events[])', 'inline', '{Deposited}', 'rb_batch')" >/dev/null
qb -c "SELECT ep_register_projection('rb_replay', 'bench.balance_replay_event(ep.events)', 'inline', '{Deposited}', 'rb_replay', 'bench.balance_replay(bigint, bigint)')" >/dev/null
qb -c "SELECT ep_register_projection('live', 'bench.balance_live(ep.events)', 'inline', '{Credited}', 'live')" >/dev/null
qb -c "SELECT ep_register_projection('stall', 'bench.balance_stall(ep.events)', 'inline', '{Moved}', 'stall')" >/dev/null
s=$(now); load "$HIST" Deposited true; log "loaded $HIST events (ep.events and bl.events) in $(calc "$(now) - $s") s"

# ------------------------------------------------------------------------------------------------
# Rebuilds: per-event handler vs the FOR loop; batch handler and replay handler vs the set-based
# INSERT ... SELECT.
if ! skip rebuild; then
  log "rebuilds of $HIST events, $ROUNDS_RB interleaved rounds"
  qb -c "ALTER SYSTEM SET autovacuum = off" -c "SELECT pg_reload_conf()" >/dev/null
  steps=(ep_event bl_loop ep_batch bl_set ep_replay bl_loop_commit bl_batches)
  for r in $(seq 1 "$ROUNDS_RB"); do
    for k in 0 1 2 3 4 5 6; do
      st=${steps[$(( (k + r - 1) % 7 ))]}
      case $st in
        ep_event) rebuild_ep rb_event "rebuild_ep_event_r$r" ;;
        ep_batch) rebuild_ep rb_batch "rebuild_ep_batch_r$r" ;;
        ep_replay) rebuild_ep rb_replay "rebuild_ep_replay_r$r" ;;
        bl_loop) rebuild_bl "SELECT bl.rebuild_loop('Deposited')" ;;
        bl_set) rebuild_bl "SELECT bl.rebuild_set('Deposited')" ;;
        bl_loop_commit) rebuild_bl "CALL bl.rebuild_loop_commit('Deposited')" ;;
        bl_batches) rebuild_bl "CALL bl.rebuild_batches('Deposited')" ;;
      esac
      record rebuild "$st" "$r" wall_s "$RB_WALL"; record rebuild "$st" "$r" cpu_s "$RB_CPU"
      log "  round $r $st: ${RB_WALL} s, cluster CPU ${RB_CPU} s"
    done
  done
  if [ "$BATCH_SENS" = 1 ]; then
    qb -c "ALTER SYSTEM SET event_projections.batch_size = $BIG_BATCH" -c "SELECT pg_reload_conf()" >/dev/null; sleep 1
    for r in $(seq 1 "$ROUNDS_RB"); do
      rebuild_ep rb_batch "rebuild_ep_batch_big_r$r"
      record rebuild ep_batch_big "$r" wall_s "$RB_WALL"; record rebuild ep_batch_big "$r" cpu_s "$RB_CPU"
      log "  round $r ep_batch with batch_size $BIG_BATCH: ${RB_WALL} s, cluster CPU ${RB_CPU} s"
    done
    qb -c "ALTER SYSTEM RESET event_projections.batch_size" -c "SELECT pg_reload_conf()" >/dev/null
  fi
  # All the models were built from the same events: they must be equal.
  diff=0
  for m in bl_loop bl_set bl_loopc bl_batches rb_batch rb_replay; do
    d=$(qb -c "SELECT (SELECT count(*) FROM (SELECT * FROM rb_event.balances EXCEPT SELECT * FROM $m.balances) x)
                    + (SELECT count(*) FROM (SELECT * FROM $m.balances EXCEPT SELECT * FROM rb_event.balances) x)")
    diff=$((diff + d))
  done
  record check models_differ 0 rows "$diff"
  [ "$diff" = 0 ] && log "  the seven read models are equal ($(qb -c "SELECT count(*) FROM rb_event.balances") accounts)" || log "  ERROR: the read models differ in $diff rows"
  qb -c "ALTER SYSTEM RESET autovacuum" -c "SELECT pg_reload_conf()" >/dev/null
fi

# ------------------------------------------------------------------------------------------------
# Appends: 8 clients, interleaved runs of the four configurations, rotating which goes first.
append_rounds() {   # FIGURE ROUNDS SECONDS CONFIG... (PGOPTIONS passes synchronous_commit)
  local fig=$1 rounds=$2 t=$3; shift 3
  local cfgs=("$@") n=$# r k c extra
  for r in $(seq 1 "$rounds"); do
    for k in $(seq 0 $((n - 1))); do
      c=${cfgs[$(( (k + r - 1) % n ))]}
      extra=(); [[ $c == *_ev ]] && extra=(--max-tries=10)
      checkpoint
      pgb "${fig//\//_}_${c}_r$r" "$c" "$t" "${extra[@]}"
      record "$fig" "$c" "$r" tps "$PGB_TPS"; record "$fig" "$c" "$r" cpu_us "$PGB_CPU_US"; record "$fig" "$c" "$r" lat_ms "$PGB_LAT"
      log "  $fig round $r $c: $PGB_TPS tps, $PGB_CPU_US µs server CPU per append"
    done
  done
}
if ! skip append; then
  qb -c "VACUUM (ANALYZE)" >/dev/null
  log "appends, synchronous_commit=off: $ROUNDS_AP rounds of ${T_AP} s"
  cfgs=(ep_append bl_append ep_append_proj bl_append_proj)
  [ "$EV_VARIANT" = 1 ] && cfgs+=(ep_append_ev bl_append_ev)
  PGOPTIONS="-c synchronous_commit=off" append_rounds append/sync_off "$ROUNDS_AP" "$T_AP" "${cfgs[@]}"
fi
if ! skip sync; then
  log "appends, synchronous_commit=on: $ROUNDS_SY rounds of ${T_SY} s"
  PGOPTIONS="-c synchronous_commit=on" append_rounds append/sync_on "$ROUNDS_SY" "$T_SY" ep_append bl_append ep_append_proj bl_append_proj
fi

# ------------------------------------------------------------------------------------------------
# What event ids cost an append: the same library serving two fresh databases side by side, one
# created at 0.2.0 (its log has no event_id column, the library appends without one) and one at
# the current version; there, appends without an id (one is generated), with the caller's random
# UUID v4, with the caller's time-ordered id, and with a correlation_id in metadata. 8 clients, synchronous_commit off, interleaved.
if ! skip ids; then
  SHARE=$("$PGBIN/pg_config" --sharedir)/extension
  cp pgrx-tests/fixtures/event_projections--0.2.0.sql "$SHARE/" 2>/dev/null ||
    die "cannot put the 0.2.0 install script into $SHARE"
  for db in bench_ids bench_v020; do q postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null; done
  q bench_ids -c "CREATE EXTENSION event_projections" >/dev/null
  q bench_v020 -c "CREATE EXTENSION event_projections VERSION '0.2.0'" >/dev/null
  log "event ids: $ROUNDS_AP rounds of ${T_AP} s, 0.2.0 database vs current"
  ids_cfgs=(v020 gen id id7 corr subj)
  for r in $(seq 1 "$ROUNDS_AP"); do
    for k in 0 1 2 3 4 5; do
      c=${ids_cfgs[$(( (k + r - 1) % 6 ))]}
      case $c in
        v020) db=bench_v020 script=ep_append ;;
        gen) db=bench_ids script=ep_append ;;
        id) db=bench_ids script=ep_append_id ;;
        id7) db=bench_ids script=ep_append_id7 ;;
        corr) db=bench_ids script=ep_append_corr ;;
        subj) db=bench_ids script=ep_append_subj ;;
      esac
      q "$db" -c "CHECKPOINT" >/dev/null
      PGB_DB=$db PGOPTIONS="-c synchronous_commit=off" pgb "ids_${c}_r$r" "$script" "$T_AP"
      record ids "$c" "$r" tps "$PGB_TPS"; record ids "$c" "$r" cpu_us "$PGB_CPU_US"; record ids "$c" "$r" lat_ms "$PGB_LAT"
      log "  ids round $r $c: $PGB_TPS tps, $PGB_CPU_US µs server CPU per append"
    done
  done
  record ids size 0 index_mb_event_id "$(q bench_ids -c "SELECT pg_relation_size('ep.events_event_id_key') / 1048576.0")"
  record ids size 0 events_bench_ids "$(q bench_ids -c "SELECT count(*) FROM ep.events")"
  for db in bench_ids bench_v020; do q postgres -c "DROP DATABASE $db WITH (FORCE)" >/dev/null; done
fi

# ------------------------------------------------------------------------------------------------
# Stall at the hand-offs: 8 writers append events of the inline projection `stall` (a history of
# STALL_HIST events of its type is loaded first) at a fixed rate with per-transaction logging,
# while an in-place rebuild of `stall` starts (R0) and finishes (Rf). A poller records when the
# status flips; a hand-off window is [start of the hand-off transaction, when its commit became
# visible]. The writers run long enough for the rebuild to finish (it must also replay what
# they append meanwhile).
qb -c "CREATE UNLOGGED TABLE bench.transitions (run int, at timestamptz, status text)" >/dev/null
if ! skip stall; then
  load "$STALL_HIST" Moved false
  rebuild_ep stall stall_dry
  T_ST=$(python3 -c "import math; print(max(20, math.ceil(10 * $RB_WALL) + 10))")
  log "stall at the hand-offs: $STALL_RUNS runs, $STALL_RATE appends/s for $T_ST s (rebuild of stall alone: $RB_WALL s, $(qb -c "SELECT count(*) FROM ep.events WHERE event_type = 'Moved'") events; log: $(qb -c "SELECT count(*) FROM ep.events") events)"
  for r in $(seq 1 "$STALL_RUNS"); do
    checkpoint
    rm -f "$OUT"/stall/r"$r".log*
    "$PGBENCH" -n -M prepared -c "$CLIENTS" -j "$THREADS" -T "$T_ST" -R "$STALL_RATE" -D accounts="$APPEND_ACCOUNTS" \
      -h 127.0.0.1 -p "$BENCH_PORT" -U postgres -f bench/pgbench/ep_append_stall.sql -l --log-prefix="$OUT/stall/r$r.log" \
      "$BENCH_DB" > "$OUT/stall/r$r.pgbench.txt" 2>&1 & pg=$!; BG_PIDS+=("$pg")
    sleep 4
    qb -c "DO \$\$
      DECLARE s text; prev text := ''; seen boolean := false; t0 timestamptz := clock_timestamp();
      BEGIN
        LOOP
          SELECT p.status INTO s FROM ep.projections p WHERE p.name = 'stall';
          IF s IS DISTINCT FROM prev THEN
            INSERT INTO bench.transitions VALUES ($r, clock_timestamp(), s);
            prev := s; seen := seen OR s = 'rebuilding';
          END IF;
          EXIT WHEN (seen AND s = 'active') OR clock_timestamp() - t0 > interval '30 minutes';
          PERFORM pg_sleep(0.002);
        END LOOP;
      END \$\$" & poller=$!; BG_PIDS+=("$poller")
    sleep 0.5
    t_rb=$(now)
    id=$(qb -c "SELECT ep_rebuild('stall')")
    st=$(wait_rebuild "$id" 1800)
    t_done=$(now)
    wait "$poller" || true
    wait "$pg" || { cat "$OUT/stall/r$r.pgbench.txt"; die "pgbench failed in the stall run"; }
    [ "$st" = done ] || die "rebuild $id of stall: $st"
    t_end=$(now)
    if python3 -c "import sys; sys.exit(0 if $t_end - $t_done > 1 else 1)"; then :; else
      log "  WARNING: the writers stopped less than 1 s after the rebuild finished; the Rf window may be incomplete"
    fi
    qb -F ' ' -c "SELECT 'R0', extract(epoch FROM r.started_at), extract(epoch FROM (SELECT min(t.at) FROM bench.transitions t WHERE t.run = $r AND t.status = 'rebuilding'))
           FROM ep.rebuilds r WHERE r.id = $id
           UNION ALL
           SELECT 'Rf', extract(epoch FROM r.finished_at), extract(epoch FROM (SELECT max(t.at) FROM bench.transitions t WHERE t.run = $r AND t.status = 'active'))
           FROM ep.rebuilds r WHERE r.id = $id" > "$OUT/stall/r$r.windows"
    python3 bench/lib.py stall "$OUT/stall/r$r.json" "$OUT/stall/r$r.windows" "$OUT"/stall/r"$r".log* > /dev/null
    read -r inmax outmax p99 r0 rf r0len rflen <<<"$(python3 -c "
import json; d = json.load(open('$OUT/stall/r$r.json')); w = {x['label']: x for x in d['windows']}
g = lambda l, k: w[l][k] if l in w else 0
print(d['inside_max_exec_ms'], d['outside_max_exec_ms'], d['outside_p99_exec_ms'], g('R0', 'max_exec_ms'), g('Rf', 'max_exec_ms'), g('R0', 'length_ms'), g('Rf', 'length_ms'))")"
    rbs=$(calc "$t_done - $t_rb")
    tps=$(grep -oP 'tps = \K[0-9.]+' "$OUT/stall/r$r.pgbench.txt")
    record stall run "$r" inside_max_ms "$inmax"; record stall run "$r" outside_max_ms "$outmax"
    record stall run "$r" outside_p99_ms "$p99"; record stall run "$r" r0_max_ms "$r0"; record stall run "$r" rf_max_ms "$rf"
    record stall run "$r" r0_window_ms "$r0len"; record stall run "$r" rf_window_ms "$rflen"
    record stall run "$r" rebuild_s "$rbs"; record stall run "$r" tps "$tps"
    log "  run $r: longest append in the hand-off windows $inmax ms (R0 $r0 ms in a $r0len ms window, Rf $rf ms in $rflen ms), outside: max $outmax, p99 $p99 ms; rebuild $rbs s under $tps appends/s"
  done
fi

# ------------------------------------------------------------------------------------------------
# Async lag: an async projection, appends at a fixed rate. The lag of an event is the time from
# the commit of its append to the commit of the delivery transaction that applied it, both from
# the commit timestamps PostgreSQL records (track_commit_timestamp); the handler also records
# clock_timestamp(), and created_at (= now(), the append transaction's start) is kept for
# comparison.
if ! skip lag; then
  qb -c "ALTER SYSTEM SET track_commit_timestamp = on" >/dev/null
  cluster_restart
  qb -c "SELECT ep_register_projection('lag', 'bench.balance_lag(ep.events)', 'async', '{Paid}', 'lag')" >/dev/null
  for i in $(seq 1 600); do
    [ "$(qb -c "SELECT p.position >= (SELECT last_value FROM ep.global_position_seq) FROM ep.projections p WHERE p.name = 'lag'")" = t ] && break
    sleep 0.1
  done
  qb -c "TRUNCATE lag.applied" >/dev/null
  checkpoint
  log "async lag: $LAG_RATE appends/s for $LAG_T s"
  a=$(cluster_cpu)
  "$PGBENCH" -n -M prepared -c "$CLIENTS" -j "$THREADS" -T "$LAG_T" -R "$LAG_RATE" -D accounts="$APPEND_ACCOUNTS" \
    -h 127.0.0.1 -p "$BENCH_PORT" -U postgres -f bench/pgbench/ep_append_async.sql "$BENCH_DB" > "$OUT/lag.pgbench.txt" 2>&1 ||
    { cat "$OUT/lag.pgbench.txt"; die "pgbench failed in the lag run"; }
  last=$(qb -c "SELECT max(global_position) FROM ep.events WHERE event_type = 'Paid'")
  [ "$(qb -c "SELECT ep_wait_for('lag', $last, '120 seconds')")" = t ] || log "  WARNING: the async projection did not catch up within 120 s"
  b=$(cluster_cpu)
  qb -F $'\t' -P footer=off -c "
    SELECT round((extract(epoch FROM pg_xact_commit_timestamp(a.xmin) - pg_xact_commit_timestamp(e.xmin)) * 1000)::numeric, 3) AS visible,
           round((extract(epoch FROM a.handler_at - pg_xact_commit_timestamp(e.xmin)) * 1000)::numeric, 3) AS handler,
           round((extract(epoch FROM a.handler_at - e.created_at) * 1000)::numeric, 3) AS created
    FROM lag.applied a JOIN ep.events e USING (global_position) ORDER BY a.global_position" > "$OUT/lag.rows"
  (echo "visible handler created"; cat "$OUT/lag.rows") > "$OUT/lag.tsv"
  python3 bench/lib.py lag "$OUT/lag.json" "$OUT/lag.tsv" > /dev/null
  python3 - "$OUT/lag.json" "$RES" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
with open(sys.argv[2], "a") as f:
    for name in ("visible", "handler", "created"):
        for m in ("median", "p90", "p99", "max"):
            f.write(f"lag\t{name}\t1\t{m}_ms\t{d[name][m]}\n")
EOF
  n=$(grep -oP 'actually processed: \K[0-9]+' "$OUT/lag.pgbench.txt"); tps=$(grep -oP 'tps = \K[0-9.]+' "$OUT/lag.pgbench.txt")
  record lag rate 1 appends_per_s "$tps"; record lag cpu 1 us_per_append "$(calc "($b - $a) * 1e6 / $n")"
  log "  $(python3 -c "import json; d = json.load(open('$OUT/lag.json')); print('; '.join(f\"{k}: median {v['median']} ms, p99 {v['p99']} ms, max {v['max']} ms (n={v['n']})\" for k, v in d.items()))")"
  qb -c "SELECT ep_unregister_projection('lag')" -c "ALTER SYSTEM RESET track_commit_timestamp" >/dev/null
fi

# ------------------------------------------------------------------------------------------------
# Subscription wake-up lag: a consumer blocked in ep_poll(..., wait) while pgbench appends at a
# fixed rate; the lag of an event is from the commit of its append to the return of the poll that
# delivered it (bench/poll_lag.py). Needs Python with psycopg 3 (Debian's python3-psycopg).
if ! skip poll; then
  qb -c "ALTER SYSTEM SET track_commit_timestamp = on" >/dev/null
  cluster_restart
  qb -c "SELECT ep_subscribe('bench_poll', '{Paid}')" \
     -c "UPDATE ep.subscription_members SET position = (SELECT last_value FROM ep.global_position_seq) WHERE subscription = 'bench_poll'" >/dev/null
  log "poll lag: $LAG_RATE appends/s for $LAG_T s, one consumer waiting in ep_poll"
  "${EP_PYTHON3:-/usr/bin/python3}" bench/poll_lag.py "host=127.0.0.1 port=$BENCH_PORT user=postgres dbname=$BENCH_DB" \
    bench_poll "$((LAG_T + 2))" "$OUT/poll.tsv" &
  consumer=$!; BG_PIDS+=("$consumer")
  sleep 1
  "$PGBENCH" -n -M prepared -c "$CLIENTS" -j "$THREADS" -T "$LAG_T" -R "$LAG_RATE" -D accounts="$APPEND_ACCOUNTS" \
    -h 127.0.0.1 -p "$BENCH_PORT" -U postgres -f bench/pgbench/ep_append_async.sql "$BENCH_DB" > "$OUT/poll.pgbench.txt" 2>&1 ||
    { cat "$OUT/poll.pgbench.txt"; die "pgbench failed in the poll run"; }
  wait "$consumer" || die "the poll consumer failed"
  python3 bench/lib.py lag "$OUT/poll.json" "$OUT/poll.tsv" > /dev/null
  python3 - "$OUT/poll.json" "$RES" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))["poll"]
with open(sys.argv[2], "a") as f:
    for m in ("median", "p90", "p99", "max"):
        f.write(f"poll\twake\t1\t{m}_ms\t{d[m]}\n")
EOF
  record poll rate 1 appends_per_s "$(grep -oP 'tps = \K[0-9.]+' "$OUT/poll.pgbench.txt")"
  log "  $(python3 -c "import json; v = json.load(open('$OUT/poll.json'))['poll']; print(f\"ep_poll wake-up: median {v['median']} ms, p99 {v['p99']} ms, max {v['max']} ms (n={v['n']})\")")"
  qb -c "SELECT ep_unsubscribe('bench_poll')" -c "ALTER SYSTEM RESET track_commit_timestamp" >/dev/null
fi

# ------------------------------------------------------------------------------------------------
# Worker memory: the batch-handler rebuild of the history, then of a history ten times as long,
# each by a freshly started worker (restart), sampling its /proc/<pid>/status.
if ! skip memory; then
  mem_rebuild() {   # SIZE_LABEL PROJECTION VARIANT
    cluster_restart
    rebuild_ep "$2" "memory_$1_$2"
    local ev; ev=$(qb -c "SELECT events_done FROM ep.rebuilds WHERE projection = '$2' ORDER BY id DESC LIMIT 1")
    python3 - "$RB_MEM" "$RES" "$3" "$ev" "$RB_WALL" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1])); v = sys.argv[3]
with open(sys.argv[2], "a") as f:
    for k in ("peak_rss_anon_kb", "peak_vmhwm_kb", "peak_vmrss_kb", "first_rss_anon_kb", "peak_rss_shmem_kb",
              "q1_rss_anon_kb", "replay_growth_kb"):
        if k in d:
            f.write(f"memory\t{v}\t1\t{k}\t{d[k]}\n")
    f.write(f"memory\t{v}\t1\tevents\t{sys.argv[4]}\n")
    f.write(f"memory\t{v}\t1\twall_s\t{sys.argv[5]}\n")
EOF
    log "  $3: $ev events in $RB_WALL s; worker $(python3 -c "import json; d = json.load(open('$RB_MEM')); print(f\"peak RssAnon {d.get('peak_rss_anon_kb', 0) / 1024:.1f} MiB, VmHWM {d.get('peak_vmhwm_kb', 0) / 1024:.1f} MiB\")")"
  }
  log "worker memory: rebuild of $HIST then $MEM_BIG events"
  mem_rebuild small rb_batch small
  if [ "$MEM_EVENT" = 1 ]; then mem_rebuild small rb_event small_event; fi
  s=$(now); load $((MEM_BIG - HIST)) Deposited false; log "  loaded $((MEM_BIG - HIST)) more events in $(calc "$(now) - $s") s"
  mem_rebuild big rb_batch big
  if [ "$MEM_EVENT" = 1 ]; then mem_rebuild big rb_event big_event; fi
fi

# ------------------------------------------------------------------------------------------------
T_TOTAL=$(( $(date +%s) - T_START ))
python3 - "$OUT/meta.json" "$T_TOTAL" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1])); m["run_seconds"] = int(sys.argv[2]); m["loadavg_end"] = open('/proc/loadavg').read().split()[:3]
json.dump(m, open(sys.argv[1], "w"), indent=1)
EOF
log "done in ${T_TOTAL} s; raw results in $OUT"
python3 bench/summarize.py "$OUT" | tee -a "$OUT/log.txt"
# The charts next to the results document (bench/charts/*.png, shown in bench/RESULTS.md), from
# Debian's matplotlib; BENCH_CHARTS=0 leaves them as they are (a partial run, say).
if [ "${BENCH_CHARTS:-1}" = 1 ]; then
  /usr/bin/python3 -c 'import matplotlib' 2>/dev/null ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-matplotlib >/dev/null
  /usr/bin/python3 bench/charts.py "$OUT" bench/charts | tee -a "$OUT/log.txt"
fi
