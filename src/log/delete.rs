//! Deleting streams (DESIGN.md, section 16): `ep_delete_stream` and `ep_undelete_stream`.
//!
//! Each appends a marker event to the stream through the normal append (so that inline handlers
//! run in the same transaction, async projections, rebuilds and subscriptions read it from the log
//! like any event, and the stream's row lock orders it against every append), which also marks
//! the stream in `ep.streams` under that lock, before any handler runs; then the action is
//! recorded in `ep.stream_deletions`. Never from inside a handler. A hard delete also
//! removes every event of the stream below its marker, as the extension owner.

use super::{append_as, LogError, NewEvent, OwnWrite, Purpose};
use crate::pg::catalog;
use crate::pg::error::{required, required_text};
use crate::pg::spi::{self, Snap, Stmt};
use pgrx::pg_sys;
use pgrx::prelude::*;

/// The marker a delete appends; its data is `{"hard": true|false}`.
pub const DELETED: &str = "$stream_deleted";
/// The marker an undelete appends; its data is `{}`.
pub const UNDELETED: &str = "$stream_undeleted";

static REMOVE: Stmt = Stmt {
    sql: "WITH gone AS (DELETE FROM ep.events WHERE stream_id = $1 AND global_position < $2 RETURNING 1) \
          SELECT count(*) FROM gone",
    types: &[pg_sys::TEXTOID, pg_sys::INT8OID],
};

static RECORD: Stmt = Stmt {
    sql: "INSERT INTO ep.stream_deletions (stream_id, action, marker_position, events_removed, done_by) \
          VALUES ($1, $2, $3, $4, $5)",
    types: &[pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::TEXTOID],
};

/// `ep_delete_stream`: returns the position of the `$stream_deleted` marker.
pub fn delete_stream(stream: Option<&str>, hard: Option<bool>) -> Result<i64, LogError> {
    let stream = required_text(stream, "stream_id")?;
    let hard = required(hard, "hard")?;
    refuse_inside_handlers(stream)?;
    // The append marks the stream under its row lock, before the marker's handlers run.
    let marker = append_marker(stream, DELETED, Purpose::Delete { hard }, serde_json::json!({"hard": hard}))?;
    let removed = if hard { remove_before(stream, marker) } else { 0 };
    record(stream, if hard { "hard" } else { "soft" }, marker, removed);
    Ok(marker)
}

/// Removes every event of `stream` below its hard marker, as the extension owner (the guard lets
/// exactly this DELETE through); returns how many.
fn remove_before(stream: &str, marker: i64) -> i64 {
    let cat = catalog::require();
    catalog::privileged(&cat, || {
        Spi::connect(|client| {
            let _deleting = OwnWrite::start("DELETE");
            spi::exec(client, &REMOVE, &[spi::text(stream), spi::int8(marker)], Snap::Fresh, 0)
                .get::<i64>(0, 1)
                .unwrap_or(0)
        })
    })
}

/// `ep_undelete_stream`: returns the position of the `$stream_undeleted` marker.
pub fn undelete_stream(stream: Option<&str>) -> Result<i64, LogError> {
    let stream = required_text(stream, "stream_id")?;
    refuse_inside_handlers(stream)?;
    let marker = append_marker(stream, UNDELETED, Purpose::Undelete, serde_json::json!({}))?;
    record(stream, "undelete", marker, 0);
    Ok(marker)
}

/// A handler deleting a stream would do it under an event other projections may already have
/// applied (or under the marker being applied): the models would no longer follow the log.
fn refuse_inside_handlers(stream: &str) -> Result<(), LogError> {
    if crate::sandbox::in_user_code() {
        return Err(LogError::InsideHandler(stream.into()));
    }
    Ok(())
}

/// Appends the marker of `purpose` to `stream`; the append checks the stream's state under its
/// row lock. (The marker's stream position minus one is the number of events the stream had.)
fn append_marker(stream: &str, event_type: &str, purpose: Purpose, data: serde_json::Value) -> Result<i64, LogError> {
    let ev = NewEvent {
        event_type: event_type.into(),
        data: pgrx::JsonB(data).into_datum().expect("a jsonb datum"),
        metadata: pgrx::JsonB(serde_json::json!({"by": current_role_name()})).into_datum(),
        id: None,
        subject: None,
    };
    append_as(stream, &[ev], None, purpose)
}

fn record(stream: &str, action: &str, marker: i64, removed: i64) {
    let by = current_role_name();
    let cat = catalog::require();
    catalog::privileged(&cat, || {
        Spi::connect(|client| {
            spi::exec(
                client,
                &RECORD,
                &[spi::text(stream), spi::text(action), spi::int8(marker), spi::int8(removed), spi::text(&by)],
                Snap::Fresh,
                0,
            );
        })
    });
}

/// The calling role's name (recorded by name: a role can be dropped and its oid reused).
fn current_role_name() -> String {
    crate::sandbox::role_name(catalog::current_user()).unwrap_or_default()
}
