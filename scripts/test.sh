#!/usr/bin/env bash
# `make test`: every test, from a fresh machine. Single-session tests with `cargo pgrx test`, then
# the suites that need real connections against a running cluster, then the model check.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
t0=$(date +%s)
bash scripts/setup.sh

echo "== cargo pgrx test (single-session tests)"
PGDATA_TEST=/var/tmp/event_projections/pgrx-test
mkdir -p "$PGDATA_TEST" && chown postgres:postgres "$PGDATA_TEST"
cargo pgrx test pg15 --runas postgres --pgdata "$PGDATA_TEST"
t1=$(date +%s)

# `cargo pgrx test` installed the extension (built with its test functions) into the system
# PostgreSQL; the connection suites use that installation.
echo "== connection tests (real clients against a cluster with the extension preloaded)"
bash scripts/connection-tests.sh
t2=$(date +%s)

echo "== model check (spin)"
bash model/check.sh
t3=$(date +%s)

# The Debian package, from a debug build, installed into a copy of PostgreSQL with the demo run
# on it (`make package` builds the release package).
echo "== package"
EP_PACKAGE_DEBUG=1 bash scripts/package.sh
bash scripts/package-test.sh
t4=$(date +%s)

echo "== make test: ok in $((t4 - t0)) s (pgrx test $((t1 - t0)) s incl. setup, connection tests $((t2 - t1)) s, model $((t3 - t2)) s, package $((t4 - t3)) s)"
