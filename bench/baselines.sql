-- Baselines of the benchmark suite: what a user writes in plain PL/pgSQL without the extension.
-- Every figure of bench/run.sh compares event_projections with one of these, measured in the same
-- run on the same machine.
--
--   (1) bl.append               an append with a stream version check: a streams table holding the
--                               version (its row lock serializes a stream's writers), an events
--                               table whose positions come from a sequence (bigserial), the
--                               expected-version check, the insert.
--   (2) bl.append_projected     (1) plus one inline projection gated the way the seeds did it: a
--                               shared transaction-level advisory lock, the projection's status
--                               row, and the projection function called if the status is 'active'.
--   (3) bl.rebuild_loop         FOR e IN SELECT ... LOOP PERFORM handler(e) END LOOP over the log.
--   (4) bl.rebuild_set          one INSERT ... SELECT ... GROUP BY: the physical limit of a rebuild.
--
-- And two references that are not targets but say what bounds the rebuild figures: the same
-- handlers driven without the extension, committing every 1000 events as the extension does.
--   (3b) bl.rebuild_loop_commit  (3) with a COMMIT every 1000 events (a procedure).
--   (4b) bl.rebuild_batches      the batch handler's body over arrays of 1000 events, COMMIT after
--                                each (a procedure).
--
-- The tables have the same shape (columns, keys, CHECK) as ep.events / ep.streams, and the
-- projection functions have the same bodies as the extension's handlers in bench/setup.sql.

CREATE SCHEMA bl;

CREATE TABLE bl.streams (
    stream_id text   NOT NULL PRIMARY KEY,
    version   bigint NOT NULL CHECK (version >= 1)
);

CREATE TABLE bl.events (
    global_position bigserial   NOT NULL PRIMARY KEY,
    stream_id       text        NOT NULL,
    stream_position bigint      NOT NULL,
    event_type      text        NOT NULL,
    data            jsonb       NOT NULL,
    metadata        jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stream_id, stream_position),
    CHECK (stream_position >= 1)
);

-- (1) The append.
CREATE FUNCTION bl.append(p_stream text, p_type text, p_data jsonb, p_metadata jsonb DEFAULT NULL,
                          p_expected bigint DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v   bigint;
    pos bigint;
BEGIN
    IF p_stream IS NULL OR p_type IS NULL OR p_data IS NULL THEN
        RAISE EXCEPTION 'stream_id, event_type and data are required' USING ERRCODE = '22004';
    END IF;
    -- Locks the stream row (serializes its writers) and returns the new version.
    INSERT INTO bl.streams AS s (stream_id, version) VALUES (p_stream, 1)
        ON CONFLICT (stream_id) DO UPDATE SET version = s.version + 1
        RETURNING s.version INTO v;
    IF p_expected IS NOT NULL AND p_expected <> v - 1 THEN
        RAISE EXCEPTION 'wrong expected version for stream "%": expected %, actual %', p_stream, p_expected, v - 1
            USING ERRCODE = '40001';
    END IF;
    INSERT INTO bl.events (stream_id, stream_position, event_type, data, metadata)
        VALUES (p_stream, v, p_type, p_data, p_metadata)
        RETURNING global_position INTO pos;
    RETURN pos;
END $$;

-- The read models of the baselines: same table as the extension's projections (bench/setup.sql).
CREATE SCHEMA bl_inline;   -- (2)
CREATE SCHEMA bl_loop;     -- (3)
CREATE SCHEMA bl_set;      -- (4)
CREATE SCHEMA bl_loopc;    -- (3b)
CREATE SCHEMA bl_batches;  -- (4b)
CREATE TABLE bl_inline.balances (account int PRIMARY KEY, balance bigint NOT NULL, events bigint NOT NULL);
CREATE TABLE bl_loop.balances   (LIKE bl_inline.balances INCLUDING ALL);
CREATE TABLE bl_set.balances    (LIKE bl_inline.balances INCLUDING ALL);
CREATE TABLE bl_loopc.balances  (LIKE bl_inline.balances INCLUDING ALL);
CREATE TABLE bl_batches.balances (LIKE bl_inline.balances INCLUDING ALL);

-- The projection function: the same body as bench.balance_* (bench/setup.sql).
CREATE FUNCTION bl.balance_inline(e bl.events) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bl_inline.balances AS b (account, balance, events)
        VALUES ((e.data ->> 'account')::int, (e.data ->> 'amount')::bigint, 1)
        ON CONFLICT (account) DO UPDATE SET balance = b.balance + excluded.balance, events = b.events + 1;
END $$;

CREATE FUNCTION bl.balance_loop(e bl.events) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bl_loop.balances AS b (account, balance, events)
        VALUES ((e.data ->> 'account')::int, (e.data ->> 'amount')::bigint, 1)
        ON CONFLICT (account) DO UPDATE SET balance = b.balance + excluded.balance, events = b.events + 1;
END $$;

-- (2) The seeds' gate: the registry of the hand-written projections. bl.append_projected repeats
-- bl.append's body rather than calling it, as a user would write it: a nested PL/pgSQL call would
-- add its own cost to what is measured.
CREATE TABLE bl.projections (name text PRIMARY KEY, status text NOT NULL);
INSERT INTO bl.projections VALUES ('balance', 'active');

CREATE FUNCTION bl.append_projected(p_stream text, p_type text, p_data jsonb, p_metadata jsonb DEFAULT NULL,
                                    p_expected bigint DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v   bigint;
    e   bl.events;
    st  text;
BEGIN
    IF p_stream IS NULL OR p_type IS NULL OR p_data IS NULL THEN
        RAISE EXCEPTION 'stream_id, event_type and data are required' USING ERRCODE = '22004';
    END IF;
    INSERT INTO bl.streams AS s (stream_id, version) VALUES (p_stream, 1)
        ON CONFLICT (stream_id) DO UPDATE SET version = s.version + 1
        RETURNING s.version INTO v;
    IF p_expected IS NOT NULL AND p_expected <> v - 1 THEN
        RAISE EXCEPTION 'wrong expected version for stream "%": expected %, actual %', p_stream, p_expected, v - 1
            USING ERRCODE = '40001';
    END IF;
    INSERT INTO bl.events AS x (stream_id, stream_position, event_type, data, metadata)
        VALUES (p_stream, v, p_type, p_data, p_metadata)
        RETURNING x.* INTO e;
    -- The gate: a rebuild takes this lock EXCLUSIVE to flip the status.
    PERFORM pg_advisory_xact_lock_shared(4242, 1);
    SELECT p.status INTO st FROM bl.projections p WHERE p.name = 'balance';
    IF st = 'active' THEN
        PERFORM bl.balance_inline(e);
    END IF;
    RETURN e.global_position;
END $$;

-- (3) The naive rebuild: one transaction, one call per event.
CREATE FUNCTION bl.rebuild_loop(p_type text) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    e bl.events;
    n bigint := 0;
BEGIN
    TRUNCATE bl_loop.balances;
    FOR e IN SELECT * FROM bl.events WHERE event_type = p_type ORDER BY global_position LOOP
        PERFORM bl.balance_loop(e);
        n := n + 1;
    END LOOP;
    RETURN n;
END $$;

-- (4) The set-based rebuild: what the database can do at best.
CREATE FUNCTION bl.rebuild_set(p_type text) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    TRUNCATE bl_set.balances;
    INSERT INTO bl_set.balances (account, balance, events)
        SELECT (e.data ->> 'account')::int, sum((e.data ->> 'amount')::bigint), count(*)
        FROM bl.events e WHERE e.event_type = p_type
        GROUP BY 1;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- (3b) The loop of (3), committing every 1000 events.
CREATE FUNCTION bl.balance_loopc(e bl.events) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bl_loopc.balances AS b (account, balance, events)
        VALUES ((e.data ->> 'account')::int, (e.data ->> 'amount')::bigint, 1)
        ON CONFLICT (account) DO UPDATE SET balance = b.balance + excluded.balance, events = b.events + 1;
END $$;

CREATE PROCEDURE bl.rebuild_loop_commit(p_type text) LANGUAGE plpgsql AS $$
DECLARE
    e bl.events;
    n bigint := 0;
BEGIN
    TRUNCATE bl_loopc.balances;
    COMMIT;
    FOR e IN SELECT * FROM bl.events WHERE event_type = p_type ORDER BY global_position LOOP
        PERFORM bl.balance_loopc(e);
        n := n + 1;
        IF n % 1000 = 0 THEN
            COMMIT;
        END IF;
    END LOOP;
END $$;

-- (4b) The batch handler's body over arrays of 1000 events, one transaction per array.
CREATE FUNCTION bl.balance_batch(es bl.events[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bl_batches.balances AS b (account, balance, events)
        SELECT (u.data ->> 'account')::int, sum((u.data ->> 'amount')::bigint), count(*)
        FROM unnest(es) AS u
        GROUP BY 1
        ON CONFLICT (account) DO UPDATE SET balance = b.balance + excluded.balance, events = b.events + excluded.events;
END $$;

CREATE PROCEDURE bl.rebuild_batches(p_type text, p_batch int DEFAULT 1000) LANGUAGE plpgsql AS $$
DECLARE
    after bigint := 0;
    es bl.events[];
BEGIN
    TRUNCATE bl_batches.balances;
    COMMIT;
    LOOP
        SELECT array_agg(x ORDER BY x.global_position) INTO es
        FROM (SELECT * FROM bl.events e WHERE e.global_position > after AND e.event_type = p_type
              ORDER BY e.global_position LIMIT p_batch) x;
        EXIT WHEN es IS NULL;
        PERFORM bl.balance_batch(es);
        after := es[array_length(es, 1)].global_position;
        COMMIT;
    END LOOP;
END $$;
