#!/usr/bin/env bash
# Builds a release package of a commit (default HEAD) for the benchmark, without touching the
# working tree, its target/ or the system installation:
#   git archive <commit> -> /var/tmp/event_projections/bench/src, built with its own target dir
#   (seeded from target/release for the dependencies), packaged into
#   /var/tmp/event_projections/bench/pkg.
# Then: BENCH_LIB=package BENCH_PKG_DIR=/var/tmp/event_projections/bench/pkg bash bench/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
commit=${1:-HEAD}
B=/var/tmp/event_projections/bench
rm -rf "$B/src" "$B/pkg"
mkdir -p "$B/src" "$B/target"
git archive "$commit" | tar -x -C "$B/src"
# git archive keeps commit times; make sure the crate itself is rebuilt.
find "$B/src/src" "$B/src/sql" -type f -exec touch {} +
[ -d "$B/target/release" ] || { [ -d target/release ] && cp -a target/release "$B/target/"; } || true
(cd "$B/src" && CARGO_TARGET_DIR="$B/target" nice -n 10 cargo pgrx package \
  --pg-config /usr/lib/postgresql/15/bin/pg_config --out-dir "$B/pkg" >/dev/null)
git rev-parse --short "$commit" > "$B/pkg/COMMIT"
echo "build-package: $(cat "$B/pkg/COMMIT") packaged in $B/pkg"
