#!/usr/bin/env bash
# Builds the extension and installs it into the system PostgreSQL 15, replacing the shared
# library by rename so that running servers keep the copy they mapped (overwriting a mapped .so in
# place crashes them). Usage: scripts/install.sh [--debug]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
profile=release; flag=()
if [ "${1:-}" = "--debug" ]; then profile=debug; flag=(--debug); fi
out=target/$profile/event_projections-pg15
cargo pgrx package "${flag[@]}" --pg-config "$PG_CONFIG" --out-dir "$out" >/dev/null
libdir=$("$PG_CONFIG" --pkglibdir); sharedir=$("$PG_CONFIG" --sharedir)
install -m 644 "$out$libdir/event_projections.so" "$libdir/.event_projections.so.new"
mv -f "$libdir/.event_projections.so.new" "$libdir/event_projections.so"
for f in "$out$sharedir"/extension/event_projections*; do
  install -m 644 "$f" "$sharedir/extension/$(basename "$f")"
done
echo "install: event_projections ($profile) installed into $libdir and $sharedir/extension"
