#!/usr/bin/env bash
# Installs everything the build, the demo and the tests need, on a fresh Debian 12 machine, as root.
# Idempotent: each step is skipped when its result is already present.
set -euo pipefail

PGVER=15
PGRX_VERSION=0.18.1
export PATH="$HOME/.cargo/bin:$PATH"

need_apt=()
for pkg in postgresql-$PGVER postgresql-server-dev-$PGVER sudo libclang-dev clang pkg-config \
           libssl-dev bison flex libreadline-dev zlib1g-dev spin python3-psycopg2 python3-psycopg \
           python3-yaml dpkg-dev; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# The Node example consumer (examples/node) needs node and npm; an image may ship its own node.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "setup: installing nodejs and npm"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

# The real postgres_exporter, to check contrib/postgres_exporter/queries.yaml through it
# (scripts/check-exporter.sh). Unpacked, not installed: the package would start a service.
EXPORTER=/var/tmp/event_projections/tools/usr/bin/prometheus-postgres-exporter
if [ ! -x "$EXPORTER" ]; then
  echo "setup: unpacking prometheus-postgres-exporter into /var/tmp/event_projections/tools"
  dl=$(mktemp -d)
  (cd "$dl" && apt-get download -qq prometheus-postgres-exporter >/dev/null 2>&1) ||
    { apt-get update -qq && (cd "$dl" && apt-get download -qq prometheus-postgres-exporter >/dev/null); }
  mkdir -p /var/tmp/event_projections/tools
  dpkg -x "$dl"/prometheus-postgres-exporter_*.deb /var/tmp/event_projections/tools
  rm -rf "$dl"
fi

# The Debian package creates a default cluster we do not use; stop it so it does not hold port 5432.
if command -v pg_lsclusters >/dev/null 2>&1; then
  pg_lsclusters -h 2>/dev/null | awk '$4=="online"{print $1, $2}' | while read -r v c; do
    pg_ctlcluster "$v" "$c" stop || true
  done
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  echo "setup: installing cargo-pgrx $PGRX_VERSION (takes about 5 minutes)"
  cargo install --quiet --locked cargo-pgrx --version "$PGRX_VERSION"
fi

PG_CONFIG=/usr/lib/postgresql/$PGVER/bin/pg_config
if ! grep -q "pg$PGVER" "$HOME/.pgrx/config.toml" 2>/dev/null; then
  cargo pgrx init --pg$PGVER "$PG_CONFIG" >/dev/null
fi
echo "setup: ok"
