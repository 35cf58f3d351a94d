-- SQL-language parts of the API: reads, status, and grants. Runs after the Rust functions exist.

CREATE FUNCTION ep_stream_version(stream_id text) RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT COALESCE((SELECT s.version FROM ep.streams s WHERE s.stream_id = $1), 0) $$;
COMMENT ON FUNCTION ep_stream_version(text) IS 'Number of events in the stream (0 when it does not exist).';

COMMENT ON FUNCTION ep_read_stream(text, bigint, int, text) IS
  'Events of one stream from a stream position, in stream order; with correlation_id, only those whose metadata carries it.';


CREATE VIEW ep.projection_status WITH (security_barrier) AS
SELECT p.name,
       p.mode,
       p.status,
       p.event_types,
       p.read_model_schema,
       p.handler,
       p.owner,
       r.id                                       AS rebuild_id,
       r.strategy                                 AS rebuild_strategy,
       r.status                                   AS rebuild_status,
       r.phase                                    AS rebuild_phase,
       r.events_done                              AS rebuild_events_done,
       r.events_total                             AS rebuild_events_total,
       CASE WHEN r.events_total > 0
            THEN round(100.0 * LEAST(r.events_done, r.events_total) / r.events_total, 1) END AS rebuild_progress_pct,
       CASE WHEN r.status = 'running' AND r.events_done > 0 AND r.events_total > r.events_done
            THEN (clock_timestamp() - r.started_at) * ((r.events_total - r.events_done)::float8 / r.events_done) END
                                                  AS rebuild_eta,
       -- Errors can quote the events they failed on: shown to the roles that act for the
       -- projection, or that may read the registry's error column (a monitoring role may see
       -- every projection without them: README, "Security").
       CASE WHEN pg_catalog.pg_has_role(p.owner, 'USAGE')
                 OR pg_catalog.has_column_privilege('ep.projections', 'last_error', 'SELECT')
            THEN r.error END                      AS rebuild_error,
       CASE WHEN p.mode = 'async' THEN p.position END AS position,
       head.position                              AS head_position,
       CASE WHEN p.mode = 'async' THEN
           (SELECT count(*) FROM ep.events e
             WHERE e.global_position > p.position
               AND (p.event_types IS NULL OR e.event_type = ANY (p.event_types))) END AS lag_events,
       CASE WHEN p.mode = 'async' THEN
           COALESCE(extract(epoch FROM clock_timestamp() -
               (SELECT e.created_at FROM ep.events e
                 WHERE e.global_position > p.position
                   AND (p.event_types IS NULL OR e.event_type = ANY (p.event_types))
                 ORDER BY e.global_position LIMIT 1))::float8, 0) END AS lag_seconds,
       p.attempts,
       p.failing_position,
       CASE WHEN pg_catalog.pg_has_role(p.owner, 'USAGE')
                 OR pg_catalog.has_column_privilege('ep.projections', 'last_error', 'SELECT')
            THEN p.last_error END                 AS last_error,
       p.last_error_at,
       p.last_applied_at,
       p.replay_handler
FROM ep.projections p
CROSS JOIN (SELECT max(global_position) AS position FROM ep.events) head
LEFT JOIN LATERAL (
    SELECT * FROM ep.rebuilds r
     WHERE r.projection_id = p.id
     ORDER BY (r.status IN ('queued', 'running')) DESC, r.id DESC
     LIMIT 1) r ON true
-- The view reads the catalog with its owner's rights; a role sees the projections it acts for, or
-- all of them with SELECT on any column of the registry (their errors only as above).
WHERE pg_catalog.pg_has_role(p.owner, 'USAGE')
   OR pg_catalog.has_any_column_privilege('ep.projections', 'SELECT');
COMMENT ON VIEW ep.projection_status IS
  'One row per projection the current role acts for: mode, status, the current (or last) rebuild with progress and an estimate of the time left, async lag, and the last error.';

-- Durable subscriptions, one row per member. Lag counts the member's share after its acknowledged
-- position (including what is above the high-water mark, not deliverable yet).
CREATE VIEW ep.subscription_status WITH (security_barrier) AS
SELECT s.name                                   AS subscription,
       m.member,
       s.members,
       s.event_types,
       s.owner,
       m.position,
       m.delivered,
       (SELECT count(*) FROM ep.events e
         WHERE e.global_position > m.position
           AND (s.event_types IS NULL OR e.event_type = ANY (s.event_types))
           AND (pg_catalog.hashtextextended(e.stream_id, 0) & 9223372036854775807) % s.members = m.member) AS lag_events,
       COALESCE(extract(epoch FROM clock_timestamp() -
           (SELECT e.created_at FROM ep.events e
             WHERE e.global_position > m.position
               AND (s.event_types IS NULL OR e.event_type = ANY (s.event_types))
               AND (pg_catalog.hashtextextended(e.stream_id, 0) & 9223372036854775807) % s.members = m.member
             ORDER BY e.global_position LIMIT 1))::float8, 0) AS lag_seconds,
       m.last_poll_at,
       m.last_ack_at
FROM ep.subscriptions s
JOIN ep.subscription_members m ON m.subscription = s.name
WHERE pg_catalog.pg_has_role(s.owner, 'USAGE')
   OR pg_catalog.has_any_column_privilege('ep.subscriptions', 'SELECT');
COMMENT ON VIEW ep.subscription_status IS
  'One row per member of each subscription the current role acts for: acknowledged position, last delivered event, lag in events and seconds, last poll and ack.';

-- ep_rebuild_wait is a function: the statement that calls it keeps its snapshot for the whole wait,
-- which keeps VACUUM and page pruning from removing dead rows everywhere meanwhile, the rebuilt read
-- model included (the benchmark measured a 3x slower rebuild behind a waiting SELECT). This
-- procedure waits the same way but commits between polls, so the snapshot it holds never outlives
-- one poll. No SET clause (a procedure with one may not COMMIT): every name is qualified instead,
-- and it runs with the caller's rights, so the caller's search_path can only affect the caller.
CREATE PROCEDURE ep_rebuild_await(rebuild_id bigint, timeout interval DEFAULT '10 minutes', INOUT status text DEFAULT NULL)
LANGUAGE plpgsql
AS $$
DECLARE
    deadline timestamptz := pg_catalog.clock_timestamp() + timeout;
BEGIN
    IF rebuild_id IS NULL THEN
        RAISE EXCEPTION 'rebuild_id must not be NULL' USING ERRCODE = '22004';
    ELSIF timeout IS NULL OR timeout < '0'::interval THEN
        RAISE EXCEPTION 'invalid timeout: % (must be 0 or more)', timeout USING ERRCODE = '22023';
    END IF;
    LOOP
        status := @extschema@.ep_rebuild_status(rebuild_id);  -- 42704 for a rebuild the caller may not see
        IF status IN ('done', 'failed', 'cancelled') THEN
            RETURN;
        ELSIF pg_catalog.clock_timestamp() > deadline THEN
            RAISE EXCEPTION 'rebuild % did not finish within %', rebuild_id, timeout
                USING ERRCODE = '57014', HINT = 'The rebuild goes on; call ep_rebuild_await again or watch ep.projection_status.';
        END IF;
        COMMIT;
        PERFORM pg_catalog.pg_sleep(0.05);
        COMMIT;
    END LOOP;
END $$;
COMMENT ON PROCEDURE ep_rebuild_await(bigint, interval, text) IS
  'Like ep_rebuild_wait, but commits between polls, so that its snapshot never outlives one 50 ms poll (CALL it outside a transaction block).';

-- A registered handler or replay handler, a setup or new handler of an open rebuild, and a read-model schema cannot
-- be dropped from under their projection: the DROP fails (2BP01) and says what to unregister.
-- SECURITY DEFINER so that any role's DROP can read the registry; a pinned search_path.
CREATE FUNCTION ep.guard_dependencies() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    d record;
    used_by text;
BEGIN
    IF pg_catalog.to_regclass('ep.projections') IS NULL THEN
        RETURN;  -- the extension itself is being dropped
    END IF;
    FOR d IN SELECT * FROM pg_catalog.pg_event_trigger_dropped_objects() LOOP
        used_by := NULL;
        IF d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass THEN
            SELECT pg_catalog.string_agg(pg_catalog.quote_literal(n.name), ', ') INTO used_by FROM (
                SELECT p.name FROM ep.projections p
                 WHERE p.handler::oid = d.objid OR p.replay_handler::oid = d.objid
                UNION
                SELECT r.projection FROM ep.rebuilds r
                 WHERE r.status IN ('queued', 'running')
                   AND (r.new_handler::oid = d.objid OR r.setup_function::oid = d.objid)) n;
        ELSIF d.classid = 'pg_catalog.pg_namespace'::pg_catalog.regclass THEN
            SELECT pg_catalog.string_agg(pg_catalog.quote_literal(p.name), ', ') INTO used_by
              FROM ep.projections p WHERE p.read_model_schema = d.object_name;
        END IF;
        IF used_by IS NOT NULL THEN
            RAISE EXCEPTION 'cannot drop % because projection % uses it', d.object_identity, used_by
                USING ERRCODE = '2BP01',
                      HINT = pg_catalog.format('SELECT ep_unregister_projection(%s) first (or cancel its rebuild).', used_by);
        END IF;
    END LOOP;
END $$;
CREATE EVENT TRIGGER ep_guard_dependencies ON sql_drop EXECUTE FUNCTION ep.guard_dependencies();

-- Retention (README, "Retention"): how far the worker may remove events a policy cut. Nothing
-- while a rebuild is queued or running; otherwise up to the slowest consumer, so that no async
-- projection and no subscription misses an event to retention. `waiting_for` names what holds
-- the removal back (NULL: nothing; every event is delivered and acknowledged).
CREATE VIEW ep.retention_horizon AS
WITH rebuild AS (
    SELECT r.projection FROM ep.rebuilds r WHERE r.status IN ('queued', 'running') ORDER BY r.id LIMIT 1
), slowest AS (
    SELECT c.position, c.who FROM (
        SELECT p.position, pg_catalog.format('projection %I (delivered up to %s)', p.name, p.position) AS who
          FROM ep.projections p WHERE p.mode = 'async'
        UNION ALL
        SELECT m.position, pg_catalog.format('subscription %I member %s (acknowledged up to %s)', m.subscription, m.member, m.position)
          FROM ep.subscription_members m) c
     ORDER BY c.position LIMIT 1
), head AS (
    SELECT COALESCE(max(e.global_position), 0) AS position FROM ep.events e
)
SELECT CASE WHEN EXISTS (SELECT FROM rebuild) THEN 0
            ELSE LEAST((SELECT s.position FROM slowest s), (SELECT h.position FROM head h)) END AS horizon,
       COALESCE((SELECT pg_catalog.format('rebuild of projection %I', r.projection) FROM rebuild r),
                (SELECT s.who FROM slowest s, head h WHERE s.position < h.position)) AS waiting_for;
COMMENT ON VIEW ep.retention_horizon IS
  'How far retention may remove events (global position; 0 while a rebuild is queued or running), and what holds it back.';

-- One row per retention policy, with its progress.
CREATE VIEW ep.retention AS
SELECT p.stream_pattern,
       p.max_age,
       p.max_count,
       p.truncate_before,
       p.set_by,
       p.set_at,
       p.scan_after IS NOT NULL                    AS scanning,
       p.last_scan_at,
       COALESCE(t.streams_cut, 0)                  AS streams_cut,
       COALESCE(t.events_removed, 0)::bigint       AS events_removed,
       COALESCE(t.events_pending, 0)::bigint       AS events_pending,
       CASE WHEN COALESCE(t.events_pending, 0) > 0 THEN h.waiting_for END AS waiting_for,
       -- A handler's error can quote an event: shown to roles that may read the column.
       CASE WHEN pg_catalog.has_column_privilege('ep.stream_policies', 'last_error', 'SELECT')
            THEN p.last_error END                  AS last_error,
       p.last_error_at
FROM ep.stream_policies p
CROSS JOIN ep.retention_horizon h
LEFT JOIN LATERAL (
    SELECT count(*) AS streams_cut,
           sum(x.events_removed) AS events_removed,
           sum((SELECT count(*) FROM ep.events e, ep.streams s
                 WHERE s.stream_id = x.stream_id AND e.stream_id = x.stream_id
                   AND e.stream_position < s.truncated_before)) FILTER (WHERE x.pending) AS events_pending
      FROM ep.stream_truncations x
     WHERE x.stream_pattern = p.stream_pattern) t ON true;
COMMENT ON VIEW ep.retention IS
  'One row per retention policy: its limits, who set it, the worker''s scan, how many streams it cut and events it removed, how many cut events are still in the log, and what holds their removal back.';

-- The launcher and worker processes of the whole cluster (shared memory), one row per busy slot.
CREATE VIEW ep.workers AS
SELECT w.slot, w.pid, w.database, w.doing, w.projection_id, w.projection, w.since, w.started
  FROM ep.worker_processes() w;
COMMENT ON VIEW ep.workers IS
  'One row per event_projections worker process of any database: its slot, pid, the database it serves, what it does now (starting, idle, rebuilding, delivering, retention, yielding), the projection (named for this database), since when, and when it started.';

-- After CREATE EXTENSION, PUBLIC may do nothing with the log or the registry: no EXECUTE on any
-- of the extension's functions (PostgreSQL grants it to PUBLIC by default), no privilege on its
-- tables or its schema. README.md, "Security", lists the GRANTs for writers, readers, projection
-- owners and administrators.
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT d.objid::regprocedure FROM pg_catalog.pg_depend d
              WHERE d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass
                AND d.refobjid = (SELECT e.oid FROM pg_catalog.pg_extension e WHERE e.extname = 'event_projections')
                AND d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                AND d.deptype = 'e' LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON ROUTINE %s FROM PUBLIC', f);
    END LOOP;
END $$;

-- A new database with the extension: the launcher starts serving it without a restart.
SELECT ep.request_launcher_probe();
