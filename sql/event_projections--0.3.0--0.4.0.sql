-- event_projections 0.3.0 -> 0.4.0 (ALTER EXTENSION event_projections UPDATE).
--
-- 0.4.0 adds retention: ep_set_stream_policy and ep_drop_stream_policy, the policies and cuts
-- (ep.stream_policies, ep.stream_truncations, ep.streams.truncated_before), the views ep.retention
-- and ep.retention_horizon, and ep_read_stream starting a cut stream at its cut. No function
-- changes its signature; nothing is rewritten (the new column of ep.streams is NULL, which
-- PostgreSQL adds without touching the rows). The 0.4.0 library serves a database still at
-- 0.3.0 (or older) until this script runs, without retention there. pgrx-tests/tests/upgrade.rs
-- checks that a database updated by this script has the same objects, with the same definitions,
-- privileges and comments, as one created at 0.4.0.

\echo Use "ALTER EXTENSION event_projections UPDATE" to load this file. \quit

-- Both tables at once, first, in the order appends lock them (ep.events, then ep.streams): an
-- update from 0.3.0 to a later version alters ep.events after ep.streams in the same transaction,
-- and appends waiting in between would deadlock with it (added in 0.5.0; harmless alone).
LOCK TABLE ep.events, ep.streams IN ACCESS EXCLUSIVE MODE;

-- The retention cut of a stream (sql/schema.sql): set under the stream's row lock, NULL before.
ALTER TABLE ep.streams ADD COLUMN truncated_before bigint CHECK (truncated_before >= 1);

-- Retention (README, "Retention"; DESIGN.md, section 17): what ep_set_stream_policy set. Every
-- stream whose id matches `stream_pattern` (LIKE) keeps the events that no policy of it cuts.
CREATE TABLE ep.stream_policies (
    stream_pattern  text        NOT NULL PRIMARY KEY CHECK (stream_pattern <> ''),
    max_age         interval    CHECK (max_age > '0'::interval),
    max_count       bigint      CHECK (max_count >= 1),
    truncate_before bigint      CHECK (truncate_before >= 1),
    set_by          text        NOT NULL,  -- the role's name
    set_at          timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- The worker's scan of the matching streams: the last stream looked at (NULL: the next scan
    -- starts from the first), and when the last complete scan ended.
    scan_after      text,
    last_scan_at    timestamptz,
    -- The last cut that failed (a handler's error on the marker, say): that stream is skipped
    -- until the next scan.
    last_error      text,
    last_error_at   timestamptz,
    CHECK (max_age IS NOT NULL OR max_count IS NOT NULL OR truncate_before IS NOT NULL)
);

-- One row per stream a policy cut: its events below ep.streams.truncated_before are gone for
-- readers from the moment the `$stream_truncated` marker at `marker_position` committed, and the
-- worker removes them in small transactions (`pending` until none is left).
CREATE TABLE ep.stream_truncations (
    stream_id       text        NOT NULL PRIMARY KEY,
    marker_position bigint      NOT NULL,
    stream_pattern  text        NOT NULL,  -- the policy that set the latest cut
    events_removed  bigint      NOT NULL DEFAULT 0,
    pending         boolean     NOT NULL DEFAULT true,
    cut_at          timestamptz NOT NULL DEFAULT pg_catalog.now(),
    removed_at      timestamptz
);
CREATE INDEX stream_truncations_pending_idx ON ep.stream_truncations (cut_at) WHERE pending;

SELECT pg_catalog.pg_extension_config_dump('ep.stream_policies', '');
SELECT pg_catalog.pg_extension_config_dump('ep.stream_truncations', '');

-- As in sql/api.sql: a stream cut by a retention policy starts at its cut.
CREATE OR REPLACE FUNCTION ep_read_stream(stream_id text, from_position bigint DEFAULT 1, max_count int DEFAULT 1000,
                               correlation_id text DEFAULT NULL)
RETURNS SETOF ep.events
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    hidden boolean;
    cut    bigint;
BEGIN
    IF stream_id IS NULL THEN
        RAISE EXCEPTION 'stream_id must not be NULL' USING ERRCODE = '22004';
    ELSIF from_position IS NULL OR from_position < 1 THEN
        RAISE EXCEPTION 'invalid from_position: % (stream positions start at 1)', from_position USING ERRCODE = '22023';
    ELSIF max_count IS NULL OR max_count < 1 THEN
        RAISE EXCEPTION 'invalid max_count: % (must be at least 1)', max_count USING ERRCODE = '22023';
    END IF;
    -- A deleted stream is hidden (README, "Deleting streams"); a stream cut by a retention policy
    -- starts at the cut, also while the worker is still removing the events below it (README,
    -- "Retention").
    SELECT s.deleted IS NOT NULL, s.truncated_before INTO hidden, cut
      FROM ep.streams s WHERE s.stream_id = ep_read_stream.stream_id;
    IF hidden THEN
        RETURN;
    END IF;
    from_position := GREATEST(from_position, COALESCE(cut, 1));
    IF correlation_id IS NULL THEN
        RETURN QUERY
            SELECT e.* FROM ep.events e
            WHERE e.stream_id = ep_read_stream.stream_id AND e.stream_position >= from_position
            ORDER BY e.stream_position LIMIT max_count;
    ELSE
        RETURN QUERY
            SELECT e.* FROM ep.events e
            WHERE e.stream_id = ep_read_stream.stream_id AND e.stream_position >= from_position
              AND e.metadata ? 'correlation_id' AND (e.metadata ->> 'correlation_id') = ep_read_stream.correlation_id
            ORDER BY e.stream_position LIMIT max_count;
    END IF;
END $$;

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

COMMENT ON VIEW ep.workers IS
  'One row per event_projections worker process of any database: its slot, pid, the database it serves, what it does now (starting, idle, rebuilding, delivering, retention, yielding), the projection (named for this database), since when, and when it started.';

-- Generated by pgrx for 0.4.0 (src/api.rs), copied as generated.
CREATE  FUNCTION "ep_set_stream_policy"(
	"stream_pattern" TEXT, /* Option < & str > */
	"max_age" interval DEFAULT NULL, /* Option < pgrx :: datum :: Interval > */
	"max_count" bigint DEFAULT NULL, /* Option < i64 > */
	"truncate_before" bigint DEFAULT NULL /* Option < i64 > */
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'ep_set_stream_policy_wrapper';

CREATE  FUNCTION "ep_drop_stream_policy"(
	"stream_pattern" TEXT /* Option < & str > */
) RETURNS bool /* bool */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'ep_drop_stream_policy_wrapper';

-- PUBLIC may do nothing here either (sql/api.sql revokes it for every routine at CREATE EXTENSION).
REVOKE ALL ON FUNCTION ep_set_stream_policy(text, interval, bigint, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION ep_drop_stream_policy(text) FROM PUBLIC;
