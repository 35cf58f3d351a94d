//! Deleting streams (DESIGN.md, section 16): `ep_delete_stream` and `ep_undelete_stream`.
//!
//! Each appends a marker event to the stream through the normal append (so that inline handlers
//! run in the same transaction, async projections, rebuilds and subscriptions read it from the log
//! like any event, and the stream's row lock orders it against every append), then marks the
//! stream in `ep.streams` and records the action in `ep.stream_deletions`. A hard delete also
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

static MARK: Stmt =
    Stmt { sql: "UPDATE ep.streams SET deleted = $2 WHERE stream_id = $1", types: &[pg_sys::TEXTOID, pg_sys::TEXTOID] };

static REMOVE: Stmt = Stmt {
    sql: "WITH gone AS (DELETE FROM ep.events WHERE stream_id = $1 AND global_position < $2 RETURNING 1) \
          SELECT count(*) FROM gone",
    types: &[pg_sys::TEXTOID, pg_sys::INT8OID],
};

static RECORD: Stmt = Stmt {
    sql: "INSERT INTO ep.stream_deletions (stream_id, action, marker_position, events_removed, done_by) \
          VALUES ($1, $2, $3, $4, $5::oid::regrole)",
    types: &[pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::OIDOID],
};

/// `ep_delete_stream`: returns the position of the `$stream_deleted` marker.
pub fn delete_stream(stream: Option<&str>, hard: Option<bool>) -> Result<i64, LogError> {
    let stream = required_text(stream, "stream_id")?;
    let hard = required(hard, "hard")?;
    let purpose = Purpose::Delete { hard };
    let marker = append_marker(stream, DELETED, purpose, serde_json::json!({"hard": hard}))?;
    let cat = catalog::require();
    let removed = catalog::privileged(&cat, || {
        Spi::connect(|client| {
            spi::exec(
                client,
                &MARK,
                &[spi::text(stream), spi::text(if hard { "hard" } else { "soft" })],
                Snap::Fresh,
                0,
            );
            if !hard {
                return 0;
            }
            let _deleting = OwnWrite::start("DELETE");
            spi::exec(client, &REMOVE, &[spi::text(stream), spi::int8(marker)], Snap::Fresh, 0)
                .get::<i64>(0, 1)
                .unwrap_or(0)
        })
    });
    record(stream, if hard { "hard" } else { "soft" }, marker, removed);
    Ok(marker)
}

/// `ep_undelete_stream`: returns the position of the `$stream_undeleted` marker.
pub fn undelete_stream(stream: Option<&str>) -> Result<i64, LogError> {
    let stream = required_text(stream, "stream_id")?;
    let marker = append_marker(stream, UNDELETED, Purpose::Undelete, serde_json::json!({}))?;
    let cat = catalog::require();
    catalog::privileged(&cat, || {
        Spi::connect(|client| {
            spi::exec(client, &MARK, &[spi::text(stream), None], Snap::Fresh, 0);
        })
    });
    record(stream, "undelete", marker, 0);
    Ok(marker)
}

/// Appends the marker of `purpose` to `stream`; the append checks the stream's state under its
/// row lock. (The marker's stream position minus one is the number of events the stream had.)
fn append_marker(stream: &str, event_type: &str, purpose: Purpose, data: serde_json::Value) -> Result<i64, LogError> {
    let ev = NewEvent {
        event_type: event_type.into(),
        data: pgrx::JsonB(data).into_datum().expect("a jsonb datum"),
        metadata: pgrx::JsonB(serde_json::json!({"by": current_role_name()})).into_datum(),
        id: None,
    };
    append_as(stream, &[ev], None, purpose)
}

fn record(stream: &str, action: &str, marker: i64, removed: i64) {
    let by = catalog::current_user();
    let cat = catalog::require();
    catalog::privileged(&cat, || {
        Spi::connect(|client| {
            spi::exec(
                client,
                &RECORD,
                &[spi::text(stream), spi::text(action), spi::int8(marker), spi::int8(removed), by.into_datum()],
                Snap::Fresh,
                0,
            );
        })
    });
}

fn current_role_name() -> String {
    // SAFETY: the name of the current user id, which exists while the session runs.
    unsafe {
        let name = pg_sys::GetUserNameFromId(catalog::current_user(), false);
        std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned()
    }
}
