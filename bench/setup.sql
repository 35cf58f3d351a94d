-- The extension's side of the benchmark suite: read models and handlers. A per-account balance,
-- the representative projection: each event is {"account": int, "amount": int}; the model holds
-- the balance and the number of events per account.
--
-- Projections (registered by bench/run.sh when their phase starts):
--   live      inline, per-event handler, type 'Credited'  (append with a projection)
--   stall     inline, per-event handler, type 'Moved'     (append stall at the rebuild hand-offs)
--   rb_event  inline, per-event handler, type 'Deposited' (rebuild, per-event)
--   rb_batch  inline, batch handler,     type 'Deposited' (rebuild, batch; worker memory)
--   rb_replay inline, per-event handler with a replay handler, type 'Deposited' (rebuild, set-based)
--   lag       async,  per-event handler, type 'Paid'      (async lag)
-- Appends of type 'Noted' are subscribed by no projection (append without a projection).
--
-- Handlers name their table unqualified: the read-model schema comes first on the handler's
-- search_path, as with any projection the extension runs.

CREATE EXTENSION IF NOT EXISTS event_projections;
CREATE SCHEMA bench;

CREATE SCHEMA live;
CREATE SCHEMA rb_event;
CREATE SCHEMA rb_batch;
CREATE SCHEMA rb_replay;
CREATE SCHEMA lag;
CREATE SCHEMA stall;
CREATE TABLE live.balances     (account int PRIMARY KEY, balance bigint NOT NULL, events bigint NOT NULL);
CREATE TABLE rb_event.balances (LIKE live.balances INCLUDING ALL);
CREATE TABLE rb_batch.balances (LIKE live.balances INCLUDING ALL);
CREATE TABLE rb_replay.balances (LIKE live.balances INCLUDING ALL);
CREATE TABLE lag.balances      (LIKE live.balances INCLUDING ALL);
CREATE TABLE stall.balances    (LIKE live.balances INCLUDING ALL);
-- Async lag: one row per delivered event. Its xmin is the delivery transaction, whose commit
-- timestamp (track_commit_timestamp) is when the event became visible in the read model.
CREATE TABLE lag.applied (global_position bigint PRIMARY KEY, handler_at timestamptz NOT NULL);

-- The per-event handler: the same body as bl.balance_inline / bl.balance_loop (bench/baselines.sql).
-- One function per projection so that each keeps its own cached plans.
CREATE FUNCTION bench.balance_live(e ep.events) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO balances AS b (account, balance, events)
        VALUES ((e.data ->> 'account')::int, (e.data ->> 'amount')::bigint, 1)
        ON CONFLICT (account) DO UPDATE SET balance = b.balance + excluded.balance, events = b.events + 1;
END $$;

CREATE FUNCTION bench.balance_event(e ep.events) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO balances AS b (account, balance, events)
        VALUES ((e.data ->> 'account')::int, (e.data ->> 'amount')::bigint, 1)
        ON CONFLICT (account) DO UPDATE SET balance = b.balance + excluded.balance, events = b.events + 1;
END $$;

CREATE FUNCTION bench.balance_stall(e ep.events) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO balances AS b (account, balance, events)
        VALUES ((e.data ->> 'account')::int, (e.data ->> 'amount')::bigint, 1)
        ON CONFLICT (account) DO UPDATE SET balance = b.balance + excluded.balance, events = b.events + 1;
END $$;

-- The batch handler: set-based SQL over the array.
CREATE FUNCTION bench.balance_batch(es ep.events[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO balances AS b (account, balance, events)
        SELECT (u.data ->> 'account')::int, sum((u.data ->> 'amount')::bigint), count(*)
        FROM unnest(es) AS u
        GROUP BY 1
        ON CONFLICT (account) DO UPDATE SET balance = b.balance + excluded.balance, events = b.events + excluded.events;
END $$;

-- The replay handler: the set-based baseline's GROUP BY (bl.rebuild_set), over one range of the log,
-- merged into the model (a rebuild calls it for consecutive ranges). Appends use balance_replay_event.
CREATE FUNCTION bench.balance_replay(after_position bigint, up_to_position bigint) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO balances AS b (account, balance, events)
        SELECT (e.data ->> 'account')::int, sum((e.data ->> 'amount')::bigint), count(*)
        FROM ep.events e
        WHERE e.global_position > after_position AND e.global_position <= up_to_position
          AND e.event_type = 'Deposited'
        GROUP BY 1
        ON CONFLICT (account) DO UPDATE SET balance = b.balance + excluded.balance, events = b.events + excluded.events;
END $$;

CREATE FUNCTION bench.balance_replay_event(e ep.events) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO balances AS b (account, balance, events)
        VALUES ((e.data ->> 'account')::int, (e.data ->> 'amount')::bigint, 1)
        ON CONFLICT (account) DO UPDATE SET balance = b.balance + excluded.balance, events = b.events + 1;
END $$;

CREATE FUNCTION bench.balance_lag(e ep.events) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO balances AS b (account, balance, events)
        VALUES ((e.data ->> 'account')::int, (e.data ->> 'amount')::bigint, 1)
        ON CONFLICT (account) DO UPDATE SET balance = b.balance + excluded.balance, events = b.events + 1;
    INSERT INTO applied (global_position, handler_at) VALUES (e.global_position, clock_timestamp());
END $$;

-- Bulk load of the history the rebuilds replay: `n` events of type `etype` spread over `accounts`
-- streams ("acct-<k>"), written through the restore path (COPY ep.events, which the guard lets
-- through for the table owner) and mirrored into bl.events. Appending them one by one would only
-- measure the append again. Run as: psql -c "COPY (SELECT * FROM bench.history(...)) TO STDOUT" |
-- psql -c "COPY ep.events (global_position, ..., event_id) FROM STDIN"; then bench.after_load().
CREATE FUNCTION bench.history(first_position bigint, n bigint, accounts int, etype text)
RETURNS TABLE (global_position bigint, stream_id text, stream_position bigint, event_type text,
               data jsonb, metadata jsonb, created_at timestamptz, event_id uuid)
LANGUAGE sql AS $$
    WITH v AS MATERIALIZED (SELECT s.stream_id, s.version FROM ep.streams s)
    SELECT first_position + g.i - 1,
           g.sid,
           -- a stream continues after its current version
           COALESCE(v.version, 0) + (g.i - 1) / accounts + 1,
           etype,
           jsonb_build_object('account', g.i % accounts + 1, 'amount', (g.i * 7919) % 100 + 1),
           NULL::jsonb,
           now(),
           gen_random_uuid()
    FROM (SELECT i, 'acct-' || (i % accounts + 1) AS sid FROM generate_series(1::bigint, n) AS i) g
    -- (a hash join on the few streams: the rows come out in generation order, so the heap is
    -- in position order, as a log written by appends is)
    LEFT JOIN v ON v.stream_id = g.sid
$$;

-- After a COPY into ep.events: the streams, the sequence, and (when `mirror`) the baseline's copy
-- of the log, so that both sides replay the same events.
CREATE FUNCTION bench.after_load(from_position bigint, mirror boolean) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ep.streams AS s (stream_id, version)
        SELECT e.stream_id, max(e.stream_position) FROM ep.events e
        WHERE e.global_position >= from_position GROUP BY e.stream_id
        ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version;
    PERFORM setval('ep.global_position_seq', (SELECT max(global_position) FROM ep.events));
    IF mirror THEN
        WITH ins AS (
            INSERT INTO bl.events (stream_id, stream_position, event_type, data, metadata, created_at)
                SELECT e.stream_id, e.stream_position, e.event_type, e.data, e.metadata, e.created_at
                FROM ep.events e WHERE e.global_position >= from_position ORDER BY e.global_position
                RETURNING stream_id, stream_position)
        INSERT INTO bl.streams AS s (stream_id, version)
            SELECT ins.stream_id, max(ins.stream_position) FROM ins GROUP BY ins.stream_id
            ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version;
    END IF;
END $$;

