-- The demo `make demo` runs: appends, an inline projection, both rebuild strategies and an async
-- projection, on a fresh copy of the extension in database `ep`.
\set ECHO queries
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS event_projections CASCADE;
DROP SCHEMA IF EXISTS bank, bank__ep_prev_1, bank__ep_prev_2, audit CASCADE;
CREATE EXTENSION event_projections;

-- A read model: one balance per account, kept by an inline projection.
CREATE SCHEMA bank;
CREATE TABLE bank.balances (account text PRIMARY KEY, balance numeric NOT NULL DEFAULT 0, events int NOT NULL DEFAULT 0);
CREATE FUNCTION bank.apply(e ep.events) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO balances (account) VALUES (e.stream_id) ON CONFLICT DO NOTHING;
    UPDATE balances
       SET balance = balance + CASE e.event_type WHEN 'Deposited' THEN 1 ELSE -1 END * (e.data->>'amount')::numeric,
           events = events + 1
     WHERE account = e.stream_id;
END $$;
SELECT ep_register_projection('balances', 'bank.apply(ep.events)', 'inline', ARRAY['Deposited', 'Withdrawn'], 'bank');

-- Appends. The inline projection runs inside each append's transaction.
SELECT ep_append('acct-1', 'Deposited', '{"amount": 100}');
-- With an expected version: acct-1 is at version 1, so expecting 2 fails (SQLSTATE 40001) and
-- writes nothing.
\set ON_ERROR_STOP 0
SELECT ep_append('acct-1', 'Withdrawn', '{"amount": 30}', '{"teller": "ann"}', 2);
\set ON_ERROR_STOP 1
SELECT ep_append('acct-1', 'Withdrawn', '{"amount": 30}', '{"teller": "ann"}', 1);
SELECT ep_append_events('acct-2', '[{"type": "Deposited", "data": {"amount": 50}},
                                    {"type": "Withdrawn", "data": {"amount": 5}}]');
SELECT count(ep_append('acct-' || (i % 20), 'Deposited', jsonb_build_object('amount', i))) AS appended
  FROM generate_series(1, 20000) i;
SELECT * FROM bank.balances WHERE account IN ('acct-1', 'acct-2') ORDER BY account;

-- An in-place rebuild: the worker empties the model and replays the log while appends go on;
-- queries can ask whether the model is ready and fail fast otherwise.
SELECT ep_rebuild('balances') AS rebuild \gset
SELECT name, status, rebuild_strategy, rebuild_status, rebuild_events_done, rebuild_events_total FROM ep.projection_status;
SELECT ep_rebuild_wait(:rebuild);
SELECT count(*) AS accounts, sum(events) AS events FROM bank.balances WHERE ep_require_ready('balances');

-- A blue-green rebuild with a new handler version: the copy is built beside the live model and
-- switched in atomically; the old copy stays as bank__ep_prev_<id>.
CREATE FUNCTION bank.apply_v2(e ep.events) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO balances (account, balance, events)
    VALUES (e.stream_id, CASE e.event_type WHEN 'Deposited' THEN 1 ELSE -1 END * (e.data->>'amount')::numeric, 1)
    ON CONFLICT (account) DO UPDATE SET balance = balances.balance + excluded.balance, events = balances.events + 1;
END $$;
SELECT ep_rebuild('balances', 'blue_green', 'bank.apply_v2(ep.events)') AS rebuild \gset
SELECT ep_rebuild_wait(:rebuild);
SELECT name, handler, status, rebuild_strategy, rebuild_status FROM ep.projection_status;
SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bank%' ORDER BY 1;
SELECT * FROM bank.balances WHERE account IN ('acct-1', 'acct-2') ORDER BY account;

-- An async projection: the background worker delivers committed events, in order, exactly once.
CREATE SCHEMA audit;
CREATE TABLE audit.per_type (event_type text PRIMARY KEY, n bigint NOT NULL);
CREATE FUNCTION audit.count(es ep.events[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO per_type SELECT e.event_type, count(*) FROM unnest(es) e GROUP BY 1
    ON CONFLICT (event_type) DO UPDATE SET n = per_type.n + excluded.n;
END $$;
SELECT ep_register_projection('per_type', 'audit.count(ep.events[])', 'async', NULL, 'audit');
SELECT ep_append('acct-3', 'Deposited', '{"amount": 7}') AS pos \gset
SELECT ep_wait_for('per_type', :pos) AS caught_up;
SELECT * FROM audit.per_type ORDER BY 1;
SELECT name, mode, status, position, head_position, lag_events FROM ep.projection_status ORDER BY name;
