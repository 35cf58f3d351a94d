#!/usr/bin/env bash
# `make soak`: the randomized histories of pgrx-tests/tests/histories.rs (test `soak`) for
# EP_SOAK_SECONDS (default 600) against a private cluster, while the memory of the worker processes
# and of the histories' client backends (their pids from pg_stat_activity, their memory from
# /proc/<pid>/status) is sampled at the start, after a warm-up, at 1/4, 1/2 and 3/4 of the run and
# at the end. The sessions stay connected from one history to the next and the soak makes no crashes
# (EP_SOAK_CRASHES=1 allows one per history, but then processes are restarted and their memory
# cannot be compared), so the same processes are measured throughout.
#
# Fails (exit 1) when a history fails, or when a process's memory grew, from the sample after the
# warm-up to the last one, by more than EP_SOAK_MAX_GROWTH_KB (default 8192 kB) of RssAnon (its
# private heap), or of VmRSS by more than that plus shared_buffers (128 MB): VmRSS also counts the
# pages of shared_buffers a process has touched (RssShmem), which grow towards shared_buffers for any
# busy backend, and the pages of the binaries it has run (RssFile); neither says anything about
# leaks. All three are printed.
#
# Settings (environment): EP_SOAK_SECONDS; EP_SOAK_MAX_GROWTH_KB; EP_SOAK_REPORT_SECONDS (default 60:
# a progress line with the histories and operations of the round); EP_SEED (replay); EP_PORT
# (default 55434) and EP_DATA (default /var/tmp/event_projections/soak): the cluster, started here
# and stopped at the end. The extension must be installed (`make install`).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

export EP_PORT=${EP_PORT:-55434}
export EP_HOST=127.0.0.1
export EP_DATA=${EP_DATA:-/var/tmp/event_projections/soak}
TOTAL=${EP_SOAK_SECONDS:-600}
export EP_SOAK_SECONDS=$TOTAL
MAX_GROWTH_KB=${EP_SOAK_MAX_GROWTH_KB:-8192}
SOCK=$EP_DATA/socket
PSQL=("${EP_PGBIN:-/usr/lib/postgresql/15/bin}/psql" -h "$SOCK" -p "$EP_PORT" -U postgres -X -At ep)

work=$(mktemp -d)
test_pid=
cleanup() {
  if [ -n "$test_pid" ] && kill -0 "$test_pid" 2>/dev/null; then
    pkill -TERM -P "$test_pid" 2>/dev/null || true   # cargo's child, the test binary
    kill "$test_pid" 2>/dev/null || true
  fi
  bash scripts/cluster.sh stop || true
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$(dirname "$EP_DATA")"
bash scripts/cluster.sh start
echo "soak: building the histories"
(cd pgrx-tests && cargo test --release --test histories --no-run 2>&1 | tail -1)

# One sample: "<label> <pid> <kind> <VmRSS kB> <RssShmem kB> <RssAnon kB>" lines into $work/samples.
sample() {
  local label=$1 pid kind vm shm anon
  while IFS='|' read -r pid kind; do
    [ -r "/proc/$pid/status" ] || continue
    read -r vm shm anon < <(awk '/^VmRSS:/ {v=$2} /^RssShmem:/ {s=$2} /^RssAnon:/ {a=$2} END {print v, s, a}' "/proc/$pid/status" 2>/dev/null) || continue
    [ -n "$vm" ] && [ -n "$anon" ] || continue
    echo "$label $pid $kind $vm $shm $anon" >> "$work/samples"
  done < <("${PSQL[@]}" -c "SELECT pid, CASE WHEN backend_type = 'event_projections worker' THEN 'worker' ELSE 'backend' END
                              FROM pg_stat_activity
                             WHERE backend_type = 'event_projections worker' OR application_name = 'ep-history'
                             ORDER BY 2 DESC, 1" 2>/dev/null || true)
  local t=$(( $(date +%s) - start ))
  printf 'soak: memory at %-7s (t=%4ss):' "$label" "$t"
  awk -v l="$label" '$1 == l {printf " %s %s %d/%d kB", $3, $2, $4, $6}' "$work/samples"
  echo "   (VmRSS/RssAnon kB)"
}

start=$(date +%s)
(cd pgrx-tests && exec cargo test --release --test histories soak -- --ignored --nocapture) > >(tee "$work/test.log") 2>&1 &
test_pid=$!

# The start: once the sessions are connected.
for _ in $(seq 1 300); do
  n=$("${PSQL[@]}" -c "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'ep-history'" 2>/dev/null || echo 0)
  [ "${n:-0}" -ge 3 ] && break
  kill -0 "$test_pid" 2>/dev/null || break
  sleep 0.2
done
sample start
warm=$(( TOTAL / 10 < 60 ? TOTAL / 10 : 60 ))
points=("warmup:$warm" "q1:$(( TOTAL / 4 ))" "half:$(( TOTAL / 2 ))" "q3:$(( TOTAL * 3 / 4 ))" "end:$(( TOTAL - 5 > 0 ? TOTAL - 5 : TOTAL ))")
last=start
for p in "${points[@]}"; do
  label=${p%%:*} at=${p#*:}
  while [ $(( $(date +%s) - start )) -lt "$at" ] && kill -0 "$test_pid" 2>/dev/null; do sleep 1; done
  kill -0 "$test_pid" 2>/dev/null || break
  sample "$label"
  last=$label
done

status=0
wait "$test_pid" || status=$?
test_pid=
echo
sed -n '/^== soak/,/^$/p' "$work/test.log" | sed 's/^/soak: /' || true

# The growth, per process, from the warm-up sample (or the start, for a short run) to the last.
base=warmup
grep -q "^warmup " "$work/samples" 2>/dev/null || base=start
verdict=$(awk -v b="$base" -v e="$last" -v max="$MAX_GROWTH_KB" -v shared=131072 '
  $1 == b {vm0[$2] = $4; p0[$2] = $6; kind[$2] = $3}
  $1 == e {vm1[$2] = $4; p1[$2] = $6; kind[$2] = $3}
  END {
    bad = 0
    for (pid in p0) {
      if (!(pid in p1)) { printf "soak: %s %s is gone by the %s sample (a restart?)\n", kind[pid], pid, e; continue }
      dp = p1[pid] - p0[pid]; dv = vm1[pid] - vm0[pid]
      flag = (dp > max || dv > max + shared) ? "  <-- grew more than the bound" : ""
      if (flag != "") bad = 1
      printf "soak: %-7s %6s: RssAnon %6d -> %6d kB (%+d), VmRSS %6d -> %6d kB (%+d)%s\n", kind[pid], pid, p0[pid], p1[pid], dp, vm0[pid], vm1[pid], dv, flag
    }
    exit bad
  }' "$work/samples") || status_mem=$?
echo "$verdict"
echo "soak: growth measured from the $base sample to the $last sample; bound per process: $MAX_GROWTH_KB kB of RssAnon, $MAX_GROWTH_KB kB + shared_buffers (131072 kB) of VmRSS"

if [ "$status" -ne 0 ]; then
  echo "soak: FAILED: a history failed (exit $status); its seed and history are printed above"
  exit 1
fi
if [ "${status_mem:-0}" -ne 0 ]; then
  echo "soak: FAILED: memory grew more than the bound"
  exit 1
fi
if [ "$last" = start ]; then
  echo "soak: FAILED: the run ended before a second memory sample"
  exit 1
fi
echo "soak: ok"
