//! The SQL entry points: argument mapping only. Each function hands its arguments to the module
//! that owns the behaviour and raises that module's error with its SQLSTATE.

use crate::log;
use crate::pg::error::OrRaise;
use crate::pg::types::{RawJsonb, RegProcedure};
use crate::registry;
use crate::retention;
use pgrx::pg_sys;
use pgrx::prelude::*;

/// Appends one event; returns its global position. With `event_id`, a retry of an append that
/// committed returns the first one's position and writes nothing (README, "Event ids and
/// metadata"). With `subject`, the data is sealed under that subject's key, for
/// `ep_forget_subject` to erase (README, "Erasure").
#[pg_extern(volatile, parallel_unsafe, name = "ep_append")]
fn ep_append_v5(
    stream_id: Option<&str>,
    event_type: Option<&str>,
    data: Option<RawJsonb>,
    metadata: default!(Option<RawJsonb>, "NULL"),
    expected_version: default!(Option<i64>, "NULL"),
    event_id: default!(Option<pgrx::Uuid>, "NULL"),
    subject: default!(Option<&str>, "NULL"),
) -> i64 {
    log::append_one(stream_id, event_type, data, metadata, expected_version, event_id, subject).or_raise()
}

/// The six-argument `ep_append` of 0.3.0 and 0.4.0, under the C symbol their SQL names: a
/// database whose extension is not updated yet keeps calling it (no SQL of its own in 0.5.0).
#[pg_extern(volatile, parallel_unsafe, sql = false)]
fn ep_append_v3(
    stream_id: Option<&str>,
    event_type: Option<&str>,
    data: Option<RawJsonb>,
    metadata: Option<RawJsonb>,
    expected_version: Option<i64>,
    event_id: Option<pgrx::Uuid>,
) -> i64 {
    log::append_one(stream_id, event_type, data, metadata, expected_version, event_id, None).or_raise()
}

/// The five-argument `ep_append` of 0.1.0 and 0.2.0, under the C symbol their SQL names.
#[pg_extern(volatile, parallel_unsafe, sql = false)]
fn ep_append(
    stream_id: Option<&str>,
    event_type: Option<&str>,
    data: Option<RawJsonb>,
    metadata: Option<RawJsonb>,
    expected_version: Option<i64>,
) -> i64 {
    log::append_one(stream_id, event_type, data, metadata, expected_version, None, None).or_raise()
}

/// Destroys the key of `subject`: every event appended with that subject reads, and replays, as
/// `{"$redacted": true}` from then on. Returns how many events of the log it sealed (README,
/// "Erasure").
#[pg_extern(volatile, parallel_unsafe)]
fn ep_forget_subject(subject: Option<&str>) -> i64 {
    log::erase::forget_subject(subject).or_raise()
}

/// Deletes a stream: soft (hidden from ep_read_stream, appends refused, `ep_undelete_stream`
/// restores it) or hard (its events removed from the log, for good). Appends the
/// `$stream_deleted` marker projections react to and returns its position (README, "Deleting
/// streams").
#[pg_extern(volatile, parallel_unsafe)]
fn ep_delete_stream(stream_id: Option<&str>, hard: default!(Option<bool>, "false")) -> i64 {
    log::delete::delete_stream(stream_id, hard).or_raise()
}

/// Restores a soft-deleted stream; appends the `$stream_undeleted` marker and returns its position.
#[pg_extern(volatile, parallel_unsafe)]
fn ep_undelete_stream(stream_id: Option<&str>) -> i64 {
    log::delete::undelete_stream(stream_id).or_raise()
}

/// Sets (or replaces) the retention policy of the streams whose id matches `stream_pattern`
/// (LIKE): the worker cuts each such stream below the events the policy keeps, appending the
/// `$stream_truncated` marker, and removes the cut events once every consumer is past them
/// (README, "Retention").
#[pg_extern(volatile, parallel_unsafe)]
fn ep_set_stream_policy(
    stream_pattern: Option<&str>,
    max_age: default!(Option<pgrx::datum::Interval>, "NULL"),
    max_count: default!(Option<i64>, "NULL"),
    truncate_before: default!(Option<i64>, "NULL"),
) {
    retention::set_policy(stream_pattern, max_age, max_count, truncate_before).or_raise()
}

/// Removes the retention policy of `stream_pattern`; true when there was one. What it cut stays cut.
#[pg_extern(volatile, parallel_unsafe)]
fn ep_drop_stream_policy(stream_pattern: Option<&str>) -> bool {
    retention::drop_policy(stream_pattern).or_raise()
}

/// Appends a JSON array of `{"type", "data", "metadata"}` to one stream, all or nothing; returns
/// the global position of the last event.
#[pg_extern(volatile, parallel_unsafe)]
fn ep_append_events(
    stream_id: Option<&str>,
    events: Option<RawJsonb>,
    expected_version: default!(Option<i64>, "NULL"),
) -> i64 {
    log::append_many(stream_id, events, expected_version).or_raise()
}

/// Registers a projection. Inline projections are built from the whole log before this returns.
/// `replay_handler`, if given, applies whole ranges of the log set-based (README, "Replay
/// handlers").
#[pg_extern(volatile, parallel_unsafe, name = "ep_register_projection")]
fn ep_register_projection_v2(
    name: Option<&str>,
    handler: Option<RegProcedure>,
    mode: default!(Option<&str>, "'inline'"),
    event_types: default!(Option<Vec<Option<String>>>, "NULL"),
    read_model_schema: default!(Option<&str>, "NULL"),
    replay_handler: default!(Option<RegProcedure>, "NULL"),
) {
    registry::register(name, handler.map(|h| h.0), mode, event_types, read_model_schema, replay_handler.map(|h| h.0))
        .or_raise()
}

/// The five-argument `ep_register_projection` of 0.1.0, under the C symbol its SQL names: a
/// database whose extension is not updated yet keeps calling it (no SQL of its own in 0.2.0).
#[pg_extern(volatile, parallel_unsafe, sql = false)]
fn ep_register_projection(
    name: Option<&str>,
    handler: Option<RegProcedure>,
    mode: Option<&str>,
    event_types: Option<Vec<Option<String>>>,
    read_model_schema: Option<&str>,
) {
    registry::register(name, handler.map(|h| h.0), mode, event_types, read_model_schema, None).or_raise()
}

/// Removes a projection; its read-model tables are left alone.
#[pg_extern(volatile, parallel_unsafe)]
fn ep_unregister_projection(name: Option<&str>) {
    registry::unregister(name).or_raise()
}

/// Queues a rebuild that the worker runs; returns its id (the id of the one already queued or
/// running, if any). `new_handler` and `setup` are for 'blue_green'.
#[pg_extern(volatile, parallel_unsafe)]
fn ep_rebuild(
    projection: Option<&str>,
    strategy: default!(Option<&str>, "'in_place'"),
    new_handler: default!(Option<RegProcedure>, "NULL"),
    setup: default!(Option<RegProcedure>, "NULL"),
) -> i64 {
    crate::rebuild::queue(projection, strategy, new_handler.map(|h| h.0), setup.map(|h| h.0)).or_raise()
}

/// Waits until the rebuild ends; returns 'done', 'failed' or 'cancelled'.
#[pg_extern(volatile, parallel_unsafe)]
fn ep_rebuild_wait(
    rebuild_id: Option<i64>,
    timeout: default!(Option<pgrx::datum::Interval>, "'10 minutes'"),
) -> String {
    crate::rebuild::wait(rebuild_id, timeout).or_raise()
}

/// The status of a rebuild: 'queued', 'running', 'done', 'failed' or 'cancelled'.
#[pg_extern(volatile, parallel_unsafe)]
fn ep_rebuild_status(rebuild_id: Option<i64>) -> String {
    crate::rebuild::status(rebuild_id).or_raise()
}

/// Cancels the projection's queued or running rebuild; returns its id, or NULL when there was none.
#[pg_extern(volatile, parallel_unsafe)]
fn ep_cancel_rebuild(projection: Option<&str>) -> Option<i64> {
    crate::rebuild::cancel(projection).or_raise()
}

/// Read-your-writes: true once every event up to `global_position` reached the projection.
#[pg_extern(volatile, parallel_unsafe)]
fn ep_wait_for(
    projection: Option<&str>,
    global_position: Option<i64>,
    timeout: default!(Option<pgrx::datum::Interval>, "'30 seconds'"),
) -> bool {
    crate::worker::delivery::wait_for(projection, global_position, timeout).or_raise()
}

/// Resumes a stopped async projection (retries its failing event now).
#[pg_extern(volatile, parallel_unsafe)]
fn ep_retry_projection(projection: Option<&str>) {
    crate::worker::delivery::retry(projection).or_raise()
}

/// Skips the event a stopped async projection is failing on, recorded in ep.skipped_events.
#[pg_extern(volatile, parallel_unsafe)]
fn ep_skip_event(projection: Option<&str>, global_position: Option<i64>) {
    crate::worker::delivery::skip(projection, global_position).or_raise()
}

/// True, or an error (55000) while the projection is not ready to be read; 40001 for a REPEATABLE
/// READ transaction whose snapshot predates the projection's last hand-off. Call it in the query
/// that reads the model: `SELECT ... FROM model WHERE ep_require_ready('p')`.
#[pg_extern(stable, parallel_restricted)]
fn ep_require_ready(projection: Option<&str>) -> bool {
    crate::registry::status::require_ready(projection).or_raise()
}

/// Whether the projection is ready to be read (its status is 'active').
#[pg_extern(stable, parallel_restricted)]
fn ep_projection_ready(projection: Option<&str>) -> bool {
    crate::registry::status::is_ready(projection).or_raise()
}

/// The backends of this database holding appended positions uncommitted, with the smallest
/// position each holds: what async delivery and rebuild replays are waiting for.
#[pg_extern(volatile, parallel_restricted)]
fn ep_in_flight() -> TableIterator<'static, (name!(pid, i32), name!(global_position, i64))> {
    TableIterator::new(crate::handoff::inflight::in_flight())
}

// ------------------------------------------------------------------------------------------------
// The log for consumers outside the database

/// The committed events after `after_position`, in global order, none above the high-water mark:
/// a reader that continues after the last position it received never misses an event. With
/// `correlation_id`, only the events whose metadata carries that `correlation_id`.
#[pg_extern(volatile, parallel_unsafe, name = "ep_read_all")]
fn ep_read_all_v3(
    after_position: default!(Option<i64>, "0"),
    max_count: default!(Option<i32>, "1000"),
    correlation_id: default!(Option<&str>, "NULL"),
) -> SetOfIterator<'static, pgrx::composite_type!('static, "ep.events")> {
    events(crate::subscription::read_all(after_position, max_count, correlation_id).or_raise())
}

/// The two-argument `ep_read_all` of 0.1.0 and 0.2.0, under the C symbol their SQL names.
#[pg_extern(volatile, parallel_unsafe, sql = false)]
fn ep_read_all(
    after_position: Option<i64>,
    max_count: Option<i32>,
) -> SetOfIterator<'static, pgrx::composite_type!('static, "ep.events")> {
    events(crate::subscription::read_all(after_position, max_count, None).or_raise())
}

/// The events of one stream from a stream position, in stream order; with `correlation_id`, only
/// those whose metadata carries it. A deleted stream has none; a cut one starts at its cut.
#[pg_extern(volatile, parallel_unsafe)]
fn ep_read_stream(
    stream_id: Option<&str>,
    from_position: default!(Option<i64>, "1"),
    max_count: default!(Option<i32>, "1000"),
    correlation_id: default!(Option<&str>, "NULL"),
) -> SetOfIterator<'static, pgrx::composite_type!('static, "ep.events")> {
    events(crate::subscription::read_stream(stream_id, from_position, max_count, correlation_id).or_raise())
}

/// An `ep.events` row as the extension's reads return it: with its data unsealed while its
/// subject's key exists, redacted once it was forgotten; any other row unchanged. For the roles
/// that may read the log (README, "Erasure").
#[pg_extern(stable, parallel_safe)]
fn ep_unseal(event: Option<pgrx::composite_type!("ep.events")>) -> Option<pgrx::composite_type!('static, "ep.events")> {
    let row = event?.into_composite_datum()?;
    let row = crate::subscription::unseal(row).or_raise();
    // SAFETY: an ep.events row value built in this function's memory context.
    Some(unsafe { PgHeapTuple::from_composite_datum(row) })
}

/// The high-water mark: every position at or below it is committed and visible, or never will be.
#[pg_extern(volatile, parallel_unsafe)]
fn ep_high_water() -> i64 {
    crate::subscription::high_water()
}

/// Creates a durable subscription with `members` members (each receives a share of the streams).
#[pg_extern(volatile, parallel_unsafe)]
fn ep_subscribe(
    name: Option<&str>,
    event_types: default!(Option<Vec<Option<String>>>, "NULL"),
    members: default!(Option<i32>, "1"),
) {
    crate::subscription::subscribe(name, event_types, members).or_raise()
}

/// Removes a subscription.
#[pg_extern(volatile, parallel_unsafe)]
fn ep_unsubscribe(name: Option<&str>) {
    crate::subscription::unsubscribe(name).or_raise()
}

/// Changes the number of members of a subscription without skipping or reordering a stream.
#[pg_extern(volatile, parallel_unsafe)]
fn ep_set_members(subscription: Option<&str>, members: Option<i32>) {
    crate::subscription::set_members(subscription, members).or_raise()
}

/// The next events of a member's share after its acknowledged position; with `wait`, blocks until
/// some arrive or the time passes.
#[pg_extern(volatile, parallel_unsafe)]
fn ep_poll(
    subscription: Option<&str>,
    member: default!(Option<i32>, "0"),
    max_count: default!(Option<i32>, "100"),
    wait: default!(Option<pgrx::datum::Interval>, "'0'"),
) -> SetOfIterator<'static, pgrx::composite_type!('static, "ep.events")> {
    events(crate::subscription::poll(subscription, member, max_count, wait).or_raise())
}

/// Acknowledges that a member processed its events up to `global_position`.
#[pg_extern(volatile, parallel_unsafe)]
fn ep_ack(subscription: Option<&str>, member: Option<i32>, global_position: Option<i64>) {
    crate::subscription::ack(subscription, member, global_position).or_raise()
}

/// Composite `ep.events` datums as the rows of a set-returning function.
fn events(datums: Vec<pg_sys::Datum>) -> SetOfIterator<'static, pgrx::composite_type!('static, "ep.events")> {
    // SAFETY: every datum is an `ep.events` row value copied into this function's memory context.
    SetOfIterator::new(datums.into_iter().map(|d| unsafe { PgHeapTuple::from_composite_datum(d) }))
}

// ------------------------------------------------------------------------------------------------
// Monitoring

/// The whole state of this database's event store in one document (README, "Monitoring").
#[pg_extern(volatile, parallel_restricted)]
fn ep_status() -> pgrx::JsonB {
    let status = crate::monitor::status();
    match serde_json::to_value(status) {
        Ok(v) => pgrx::JsonB(v),
        Err(e) => error!("event_projections: could not build the status document: {e}"),
    }
}

/// The worker processes of every database (the `ep.workers` view).
// pgrx reads the column names from the signature itself, so the type cannot be an alias.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_restricted, schema = "ep")]
fn worker_processes() -> TableIterator<
    'static,
    (
        name!(slot, i32),
        name!(pid, Option<i32>),
        name!(database, Option<String>),
        name!(doing, String),
        name!(projection_id, Option<i32>),
        name!(projection, Option<String>),
        name!(since, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(started, Option<pgrx::datum::TimestampWithTimeZone>),
    ),
> {
    TableIterator::new(
        crate::monitor::workers().into_iter().map(|w| {
            (w.slot, w.pid, w.database, w.doing.to_string(), w.projection_id, w.projection, w.since, w.started)
        }),
    )
}

/// Asks the launcher to look again for databases with the extension (run by CREATE EXTENSION and
/// ALTER EXTENSION ... UPDATE; harmless anywhere else).
#[pg_extern(volatile, parallel_unsafe, schema = "ep")]
fn request_launcher_probe() {
    crate::worker::pool::request_probe();
}
