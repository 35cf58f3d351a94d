//! Retention cuts (DESIGN.md, section 17): what a retention policy does to one stream's part of
//! the log. Deciding which streams to cut and when is `retention`'s; this module only appends the
//! cut and removes what it cut.
//!
//! A cut is the `$stream_truncated` marker, appended through the normal append (inline handlers
//! run in its transaction, async projections, rebuilds and subscriptions read it from the log), and
//! the stream's `truncated_before`, set under the stream's row lock by that append. From its
//! commit, readers of the stream start at the cut; the events below it leave the log later, in
//! small transactions, by `remove_cut`.

use super::{append_as, LogError, NewEvent, OwnWrite, Purpose};
use crate::pg::catalog;
use crate::pg::spi::{self, Snap, Stmt};
use pgrx::pg_sys;
use pgrx::prelude::*;

/// The marker of a cut; its data is `{"truncate_before": N}`: the stream's events below stream
/// position N are gone.
pub const TRUNCATED: &str = "$stream_truncated";

/// Appends the marker of a cut of `stream` below stream position `before`; returns its global
/// position. Refused (and nothing written) when the stream was deleted meanwhile.
pub fn cut(stream: &str, before: i64, policy: &str, set_by: &str) -> Result<i64, LogError> {
    let ev = NewEvent {
        event_type: TRUNCATED.into(),
        data: pgrx::JsonB(serde_json::json!({"truncate_before": before})).into_datum().expect("a jsonb datum"),
        metadata: pgrx::JsonB(serde_json::json!({"policy": policy, "set_by": set_by})).into_datum(),
        id: None,
        subject: None,
    };
    append_as(stream, &[ev], None, Purpose::Truncate { before })
}

/// Up to $3 events of stream $1 below its cut and at or below global position $2, first ones
/// first, removed.
static REMOVE: Stmt = Stmt {
    sql: "WITH gone AS ( \
            DELETE FROM ep.events WHERE global_position IN ( \
              SELECT e.global_position FROM ep.events e, ep.streams s \
               WHERE s.stream_id = $1 AND e.stream_id = $1 AND e.stream_position < s.truncated_before \
                 AND e.global_position <= $2 \
               ORDER BY e.stream_position LIMIT $3) \
            RETURNING 1) \
          SELECT count(*) FROM gone",
    types: &[pg_sys::TEXTOID, pg_sys::INT8OID, pg_sys::INT8OID],
};

static LEFT_BELOW_CUT: Stmt = Stmt {
    sql: "SELECT EXISTS (SELECT FROM ep.events e, ep.streams s \
           WHERE s.stream_id = $1 AND e.stream_id = $1 AND e.stream_position < s.truncated_before)",
    types: &[pg_sys::TEXTOID],
};

/// Removes up to `limit` events of `stream` that its cut left in the log, none above global
/// position `horizon`, as the extension owner (the guard lets exactly this DELETE through).
/// Returns how many went, and whether any event below the cut is still in the log.
pub fn remove_cut(stream: &str, horizon: i64, limit: i64) -> (i64, bool) {
    let cat = catalog::require();
    catalog::privileged(&cat, || {
        Spi::connect(|client| {
            let removed = {
                let _deleting = OwnWrite::start("DELETE");
                spi::exec(client, &REMOVE, &[spi::text(stream), spi::int8(horizon), spi::int8(limit)], Snap::Fresh, 0)
                    .get::<i64>(0, 1)
                    .unwrap_or(0)
            };
            let left = spi::exec(client, &LEFT_BELOW_CUT, &[spi::text(stream)], Snap::Fresh, 0)
                .get::<bool>(0, 1)
                .unwrap_or(false);
            (removed, left)
        })
    })
}
