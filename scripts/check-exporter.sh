#!/usr/bin/env bash
# The postgres_exporter queries (contrib/postgres_exporter/queries.yaml) against a live database,
# as a role with only the README's "Monitoring" grants, and through the real exporter (Debian's
# prometheus-postgres-exporter, which setup.sh unpacks).
# Needs a running cluster (EP_PORT, EP_HOST as in connection-tests.sh, which calls this).
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${EP_PORT:-55433}
HOST=${EP_HOST:-127.0.0.1}
psql_() { psql -h "$HOST" -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -Atq "$@"; }
# The test cluster's workers serve only its test database; serve this one too while we check.
psql_ -d postgres -c "ALTER SYSTEM SET event_projections.database = ''" -c "SELECT pg_reload_conf()" >/dev/null
trap 'psql_ -d postgres -c "ALTER SYSTEM RESET event_projections.database" -c "SELECT pg_reload_conf()" >/dev/null' EXIT
psql_ -d postgres -c "DROP DATABASE IF EXISTS t_exporter WITH (FORCE)" -c "CREATE DATABASE t_exporter" 2>/dev/null
psql_ -d t_exporter >/dev/null <<'SQL'
SET client_min_messages = warning;
CREATE EXTENSION event_projections;
CREATE SCHEMA m;
CREATE TABLE m.counts (stream_id text PRIMARY KEY, n bigint NOT NULL);
CREATE FUNCTION m.count_event(e ep.events) RETURNS void LANGUAGE sql AS
  $$ INSERT INTO m.counts VALUES (e.stream_id, 1) ON CONFLICT (stream_id) DO UPDATE SET n = counts.n + 1 $$;
SELECT ep_register_projection('exported', 'm.count_event(ep.events)'::regprocedure, 'async', NULL, 'm');
SELECT ep_subscribe('exported_sub');
SELECT ep_append('s' || i % 3, 'T', '{}') FROM generate_series(1, 50) i;
SELECT ep_wait_for('exported', 50, '30 s');
-- The "Monitoring" grant set of README.md.
DROP ROLE IF EXISTS m_exporter;
CREATE ROLE m_exporter LOGIN;
GRANT USAGE ON SCHEMA ep TO m_exporter;
GRANT SELECT ON ep.projection_status, ep.subscription_status, ep.workers TO m_exporter;
GRANT SELECT (id, name) ON ep.projections TO m_exporter;
GRANT SELECT (name) ON ep.subscriptions TO m_exporter;
GRANT EXECUTE ON FUNCTION ep_status(), ep.worker_processes() TO m_exporter;
SQL
status=0
"${EP_PYTHON3:-/usr/bin/python3}" contrib/postgres_exporter/check_queries.py contrib/postgres_exporter/queries.yaml \
  "host=$HOST port=$PORT dbname=t_exporter user=m_exporter sslmode=disable" \
  "${EP_EXPORTER:-/var/tmp/event_projections/tools/usr/bin/prometheus-postgres-exporter}" || status=$?
psql_ -d postgres -c "DROP DATABASE t_exporter WITH (FORCE)" -c "DROP ROLE m_exporter"
exit $status
