-- The catalog of event_projections: the event log, the streams, the projection registry and the
-- rebuild queue. Everything lives in schema `ep`; the ep_* functions live in the extension's
-- schema (public by default) so they are callable unqualified.
--
-- Nobody but the extension owner may write these tables: the ep_* functions switch to the owner
-- for their own writes and reads, and a guard trigger keeps the log append-only even for the
-- owner. PUBLIC may do nothing here: README.md, "Security", says what to GRANT to whom.

CREATE SCHEMA ep;

-- Global positions. CACHE 1 matters: the in-flight horizon (DESIGN.md, "The high-water mark")
-- reads last_value and must see every position handed out.
CREATE SEQUENCE ep.global_position_seq AS bigint CACHE 1;

CREATE TABLE ep.events (
    global_position bigint      NOT NULL PRIMARY KEY,
    stream_id       text        NOT NULL,
    stream_position bigint      NOT NULL,
    event_type      text        NOT NULL,
    data            jsonb       NOT NULL,
    metadata        jsonb,
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- The caller's id of the event (or one ep_append generated, time-ordered): a retried append
    -- with the same id, stream, type and data returns the first one's position and writes nothing.
    event_id        uuid        NOT NULL,
    -- Erasure (README, "Erasure"; DESIGN.md, section 18): for an event appended with a subject,
    -- the id of the subject's key in ep.subject_keys and the data sealed under it (AES-256-GCM);
    -- `data` then holds the redacted shape {"$redacted": true}. Both NULL for clear data.
    subject_key     bigint,
    sealed          bytea,
    CONSTRAINT events_stream_position_key UNIQUE (stream_id, stream_position),
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_stream_position_check CHECK (stream_position >= 1)
);
-- ep_read_stream and ep_read_all filter by metadata's correlation_id (README, "Event ids and
-- metadata"); only events that carry one are in the index, so no other append pays for it.
-- (Operators qualified: this runs with the extension schema on the path, where another role may
-- have created an operator that matches these argument types better.)
CREATE INDEX events_correlation_idx ON ep.events ((metadata OPERATOR(pg_catalog.->>) 'correlation_id'::text), global_position)
    WHERE metadata OPERATOR(pg_catalog.?) 'correlation_id'::text;
-- Only sealed events are in these two: ep_forget_subject counts a subject's events, and a replay
-- handler's range is checked for sealed events (src/sandbox/replay.rs); no other append pays.
CREATE INDEX events_subject_key_idx ON ep.events (subject_key) WHERE subject_key IS NOT NULL;
CREATE INDEX events_sealed_idx ON ep.events (global_position) WHERE subject_key IS NOT NULL;
COMMENT ON TABLE ep.events IS
  'The event log (append-only; write with ep_append / ep_append_events). Its row type is the value handed to projection handlers.';

-- One row per stream: the row lock serializes writers of one stream, and `version` makes the
-- expected-version check O(1).
CREATE TABLE ep.streams (
    stream_id text   NOT NULL PRIMARY KEY,
    version   bigint NOT NULL CHECK (version >= 1),
    -- NULL for a live stream; 'soft' (hidden from ep_read_stream, appends refused, undeletable)
    -- or 'hard' (its events removed, for good) after ep_delete_stream. Read with the row lock that
    -- every append takes (DESIGN.md, section 16).
    deleted   text   CHECK (deleted IN ('soft', 'hard')),
    -- NULL, or the cut of a retention policy: the stream's events below this stream position are
    -- gone for readers (the worker removes them; ep.stream_truncations). Set under the row lock by
    -- the append of the `$stream_truncated` marker (DESIGN.md, section 17).
    truncated_before bigint CHECK (truncated_before >= 1)
);

-- Every ep_delete_stream and ep_undelete_stream: who, when, and what left the log.
CREATE SEQUENCE ep.stream_deletion_id_seq AS bigint;
CREATE TABLE ep.stream_deletions (
    id             bigint      NOT NULL PRIMARY KEY DEFAULT pg_catalog.nextval('ep.stream_deletion_id_seq'),
    stream_id      text        NOT NULL,
    action         text        NOT NULL CHECK (action IN ('soft', 'hard', 'undelete')),
    -- The $stream_deleted / $stream_undeleted event the action appended.
    marker_position bigint     NOT NULL,
    -- Hard deletes: how many events were removed (every event of the stream before the marker).
    events_removed bigint      NOT NULL DEFAULT 0,
    done_by        text        NOT NULL,  -- the role's name (a role can be dropped, an oid reused)
    done_at        timestamptz NOT NULL DEFAULT pg_catalog.now()
);

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

-- Erasure: one key per subject, created by its first append with that subject and deleted by
-- ep_forget_subject (after which the events sealed under it read as {"$redacted": true}). Only
-- the extension owner may read it: no GRANT on it is ever needed.
CREATE SEQUENCE ep.subject_key_id_seq AS bigint;
CREATE TABLE ep.subject_keys (
    key_id     bigint      NOT NULL PRIMARY KEY DEFAULT pg_catalog.nextval('ep.subject_key_id_seq'),
    subject    text        NOT NULL UNIQUE CHECK (subject <> ''),
    key        bytea       NOT NULL CHECK (pg_catalog.octet_length(key) = 32),
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);

-- Every ep_forget_subject that destroyed a key: which key (not the subject's name, which is
-- what was to be forgotten), how many events it sealed, who and when.
CREATE TABLE ep.erasures (
    key_id       bigint      NOT NULL PRIMARY KEY,
    events       bigint      NOT NULL,
    forgotten_by text        NOT NULL,  -- the role's name
    forgotten_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);

CREATE SEQUENCE ep.projection_id_seq AS integer;

CREATE TABLE ep.projections (
    id                 integer     NOT NULL PRIMARY KEY DEFAULT pg_catalog.nextval('ep.projection_id_seq'),
    name               text        NOT NULL UNIQUE,
    handler            regprocedure NOT NULL,
    batch              boolean     NOT NULL,  -- the handler takes ep.events[] instead of ep.events
    mode               text        NOT NULL CHECK (mode IN ('inline', 'async')),
    event_types        text[],                -- NULL: every type
    read_model_schema  text,
    owner              regrole     NOT NULL,  -- handlers run as this role, everywhere
    search_path        text        NOT NULL,  -- the registering session's path, after read_model_schema
    status             text        NOT NULL CHECK (status IN ('active', 'rebuilding', 'stale', 'failed')),
    -- Bumped by every hand-off (status flip, schema or handler switch). A REPEATABLE READ append
    -- whose snapshot cannot see the current generation of an active projection gets 40001.
    generation         bigint      NOT NULL DEFAULT 1,
    -- Async delivery: every event at or below `position` has been delivered.
    position           bigint      NOT NULL DEFAULT 0,
    attempts           integer     NOT NULL DEFAULT 0,
    failing_position   bigint,
    last_error         text,
    last_error_at      timestamptz,
    last_applied_at    timestamptz,
    registered_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- The set-based twin of `handler`: (after_position bigint, up_to_position bigint) RETURNS void,
    -- called for replays and catch-ups over ranges the extension guarantees complete.
    replay_handler     regprocedure
);

CREATE SEQUENCE ep.rebuild_id_seq AS bigint;

CREATE TABLE ep.rebuilds (
    id               bigint      NOT NULL PRIMARY KEY DEFAULT pg_catalog.nextval('ep.rebuild_id_seq'),
    -- Unregistering a projection deletes its rebuilds, also one queued concurrently (ep_rebuild
    -- locks the projection's row; registry::unregister deletes the rebuilds after the row).
    projection_id    integer     NOT NULL,
    projection       text        NOT NULL,
    strategy         text        NOT NULL CHECK (strategy IN ('in_place', 'blue_green')),
    status           text        NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    -- queued -> replaying (the read model emptied, or the copy created) -> done | failed | cancelled;
    -- the values of `rebuild::Phase`
    phase            text        NOT NULL DEFAULT 'queued'
                     CHECK (phase IN ('queued', 'replaying', 'done', 'failed', 'cancelled')),
    new_handler      regprocedure,
    setup_function   regprocedure,
    build_schema     text,
    previous_schema  text,
    checkpoint       bigint      NOT NULL DEFAULT 0,
    -- The head of the log when the rebuild started: an async in-place rebuild is done once its
    -- projection has delivered up to here (it goes on being delivered to like any other after).
    target_position  bigint,
    -- How far the replay was behind the head at its last step: a rebuild no longer gaining on a
    -- write load hands off anyway (DESIGN.md 3.2).
    behind           bigint,
    events_done      bigint      NOT NULL DEFAULT 0,
    events_total     bigint,
    cancel_requested boolean     NOT NULL DEFAULT false,
    requested_by     regrole     NOT NULL,
    queued_at        timestamptz NOT NULL DEFAULT pg_catalog.now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    attempts         integer     NOT NULL DEFAULT 0,
    error            text
);
-- At most one rebuild per projection is queued or running.
CREATE UNIQUE INDEX rebuilds_one_open ON ep.rebuilds (projection_id) WHERE status IN ('queued', 'running');

-- Async events skipped on purpose with ep_skip_event: the record the issue asks for.
CREATE TABLE ep.skipped_events (
    projection      text        NOT NULL,
    global_position bigint      NOT NULL,
    error           text,
    skipped_by      regrole     NOT NULL,
    skipped_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (projection, global_position)
);

-- Durable subscriptions for consumers outside the database (ep_subscribe, ep_poll, ep_ack). State
-- in tables, so that they survive restarts, dump/restore and transaction-pooling connection
-- poolers. Member m of a subscription receives the streams with
-- (hashtextextended(stream_id, 0) & x'7fffffffffffffff'::bigint) % members = m.
CREATE TABLE ep.subscriptions (
    name        text        NOT NULL PRIMARY KEY CHECK (name <> '' AND octet_length(name) <= 60),
    event_types text[],                 -- NULL: every type
    members     integer     NOT NULL CHECK (members >= 1 AND members <= 1024),
    owner       regrole     NOT NULL,   -- who may poll and ack
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now()
);

CREATE TABLE ep.subscription_members (
    subscription text        NOT NULL REFERENCES ep.subscriptions (name) ON DELETE CASCADE,
    member       integer     NOT NULL,
    -- Acknowledged: every event of this member's share at or below it has been processed.
    position     bigint      NOT NULL DEFAULT 0,
    -- The last event the last poll returned, and how far that poll read: acknowledging `delivered`
    -- acknowledges up to `delivered_through` (nothing of the share lies between).
    delivered         bigint NOT NULL DEFAULT 0,
    delivered_through bigint NOT NULL DEFAULT 0,
    last_poll_at timestamptz,
    last_ack_at  timestamptz,
    PRIMARY KEY (subscription, member)
);

-- Dump and restore: extension tables are skipped by pg_dump unless registered here.
SELECT pg_catalog.pg_extension_config_dump('ep.events', '');
SELECT pg_catalog.pg_extension_config_dump('ep.streams', '');
SELECT pg_catalog.pg_extension_config_dump('ep.projections', '');
SELECT pg_catalog.pg_extension_config_dump('ep.rebuilds', '');
SELECT pg_catalog.pg_extension_config_dump('ep.skipped_events', '');
SELECT pg_catalog.pg_extension_config_dump('ep.subscriptions', '');
SELECT pg_catalog.pg_extension_config_dump('ep.subscription_members', '');
SELECT pg_catalog.pg_extension_config_dump('ep.global_position_seq', '');
SELECT pg_catalog.pg_extension_config_dump('ep.projection_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('ep.rebuild_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('ep.stream_deletions', '');
SELECT pg_catalog.pg_extension_config_dump('ep.stream_deletion_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('ep.stream_policies', '');
SELECT pg_catalog.pg_extension_config_dump('ep.stream_truncations', '');
SELECT pg_catalog.pg_extension_config_dump('ep.subject_keys', '');
SELECT pg_catalog.pg_extension_config_dump('ep.subject_key_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('ep.erasures', '');
