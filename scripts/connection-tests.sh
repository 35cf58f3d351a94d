#!/usr/bin/env bash
# The tests that need real client connections: the Rust suite in pgrx-tests/ (concurrency,
# registration hand-offs, atomic inline handlers, dump/restore, guards), then the Python example.
# They run against a private cluster of their own (port 55433, data under
# /var/tmp/event_projections/ctest), started here and stopped at the end, pass or fail.
# The extension must already be installed into the system PostgreSQL 15 (`make install`).
#
# Settings (environment): EP_TEST_THREADS (default 4): tests run at once, each in its own
# database; EP_SEED: replay the random schedules of a failed run; EP_PYTHON: the Python to use.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

export EP_PORT=55433
export EP_HOST=127.0.0.1
export EP_DATA=/var/tmp/event_projections/ctest

# A Python with psycopg2: the first of these that has it, else pip installs the binary wheel.
python_with_psycopg2() {
  local py
  for py in ${EP_PYTHON:-} python3 /usr/bin/python3; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import psycopg2' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  echo "connection-tests: installing psycopg2-binary for $(command -v python3)" >&2
  # A Debian system Python refuses plain pip installs (PEP 668); say that we mean it.
  python3 -m pip install --quiet psycopg2-binary >&2 ||
    python3 -m pip install --quiet --break-system-packages psycopg2-binary >&2
  python3 -c 'import psycopg2' && echo python3
}
PYTHON=$(python_with_psycopg2)
# The external consumers of the subscription tests: Python with psycopg 3 (Debian's python3-psycopg,
# from setup.sh) and Node with node-postgres (npm).
export EP_PYTHON3=${EP_PYTHON3:-/usr/bin/python3}
"$EP_PYTHON3" -c 'import psycopg' || { echo "connection-tests: $EP_PYTHON3 has no psycopg 3 (run make setup)" >&2; exit 1; }
(cd examples/node && npm install --silent --no-audit --no-fund)

mkdir -p "$(dirname "$EP_DATA")"
trap 'bash scripts/cluster.sh stop' EXIT
bash scripts/cluster.sh start

start=$(date +%s)
echo "connection-tests: Rust suite (pgrx-tests), cluster on port $EP_PORT"
(cd pgrx-tests && cargo test --release --no-fail-fast -- --test-threads="${EP_TEST_THREADS:-4}")

echo "connection-tests: postgres_exporter queries"
bash scripts/check-exporter.sh

echo "connection-tests: Python example ($PYTHON)"
"$PYTHON" examples/python/example.py

echo "connection-tests: passed in $(( $(date +%s) - start ))s"
