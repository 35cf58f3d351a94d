//! Applying a range of the log to a projection, in global order, through its handler. Shared by
//! the registration build (G2, G3), rebuild replays and hand-offs (R1..Rf, B1..Bf) and async
//! delivery.
//! Global order implies stream order: a stream's writers are serialized by its row in ep.streams
//! and take their positions while holding it.

use crate::pg::spi::{self, Snap, Stmt};
use crate::sandbox::handler::Handler;
use pgrx::pg_sys;
use pgrx::prelude::*;

static RANGE: Stmt = Stmt {
    sql: "SELECT e, e.global_position FROM ep.events e \
          WHERE e.global_position > $1 AND e.global_position <= $2 \
            AND ($3::text[] IS NULL OR e.event_type = ANY ($3)) \
            AND ($5::bigint[] IS NULL OR e.global_position <> ALL ($5)) \
          ORDER BY e.global_position LIMIT $4",
    types: &[pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::TEXTARRAYOID, pg_sys::INT8OID, pg_sys::INT8ARRAYOID],
};

/// See `REPLAY_FAILED`.
#[derive(Clone, Copy)]
struct FailedRange {
    replay: pg_sys::Oid,
    version: (u32, u64),
    until: i64,
}

thread_local! {
    /// A replay handler (its OID and pg_proc row version) that failed on a range, and where that
    /// range ended: up to there this process applies event by event (each retry of the whole
    /// range would fail again, and cost a read of all of it for every batch the per-event path
    /// gains). Only a speed hint: it decides which of two equivalent paths applies a range, never
    /// what is applied, so it may outlive the transaction that set it; a new definition of the
    /// function (CREATE OR REPLACE) is a new version and starts afresh.
    static REPLAY_FAILED: std::cell::Cell<Option<FailedRange>> = const { std::cell::Cell::new(None) };
    /// Position of the event (first event of the batch) last handed to a handler: after an error,
    /// the event that failed.
    static ATTEMPTED: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
}

/// The event last handed to a handler by `apply`.
pub fn last_attempted() -> i64 {
    ATTEMPTED.with(|c| c.get())
}

/// What one `apply` call did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Applied {
    /// Events handed to the handler.
    pub events: i64,
    /// Every event of the range at or below this position has been applied: the checkpoint to
    /// commit with the handler's writes.
    pub through: i64,
    /// True when `through` reached the end of the requested range.
    pub done: bool,
}

/// The distance to the head, in positions, at which a replay hands off: what the hand-off then
/// catches up under its exclusive lock while appends to the projection wait. A twentieth of a
/// batch, at most 50 positions, so that a large `batch_size` (chosen for fast batch-handler
/// replays) does not lengthen the stall.
pub fn handoff_threshold(batch: i64) -> i64 {
    (batch / 20).clamp(1, 50)
}

/// How long one worker step may apply events through a per-event handler before it commits what
/// it has and hands the worker on (at least one event is applied per step): a slow handler then
/// delays the projections of others by about this much per round, not by a whole batch.
pub const STEP_BUDGET: std::time::Duration = std::time::Duration::from_millis(200);

/// How many positions one call scans at most, in batches: a projection of a rare event type
/// would otherwise read the whole log in one statement (and one transaction) to fill one batch.
const SCAN_BATCHES: i64 = 64;

/// Applies every event passing `filter` with `after < position <= up_to`, in calls of at most
/// `limit` events, all in the current transaction (the hand-offs' catch-ups and the registration
/// build). Returns the events applied and the position reached (`up_to`).
pub fn apply_all(
    handler: &Handler,
    filter: Filter<'_>,
    events_type: pg_sys::Oid,
    after: i64,
    up_to: i64,
    limit: i64,
    snap: Snap,
) -> Applied {
    let mut total = Applied { events: 0, through: after, done: false };
    while !total.done {
        let a = apply(handler, filter, events_type, (total.through, up_to), limit, snap, None);
        total = Applied { events: total.events + a.events, ..a };
    }
    total
}

/// Which events of the log a projection receives.
#[derive(Clone, Copy, Debug)]
pub struct Filter<'a> {
    /// Subscribed types; None for all.
    pub types: Option<&'a Vec<String>>,
    /// Positions skipped on purpose (ep_skip_event).
    pub skip: Option<&'a Vec<i64>>,
}

/// One worker step of a replay or a delivery: `apply` with a snapshot per statement, stopping
/// after `STEP_BUDGET` (at least one event applied) so that a slow handler gives the worker back.
pub fn apply_step(
    handler: &Handler,
    filter: Filter<'_>,
    events_type: pg_sys::Oid,
    after: i64,
    up_to: i64,
    limit: i64,
) -> Applied {
    apply(handler, filter, events_type, (after, up_to), limit, Snap::Fresh, Some(STEP_BUDGET))
}

/// Whether the replay handler may apply `(after, bound]` instead of the handler. The range is
/// always complete (callers pass ranges at or below the high-water mark, or under the hand-off
/// lock); the handler must also *see* all of it, which a VOLATILE function does at READ COMMITTED
/// (every statement takes a snapshot after the range was known to be complete), not under a
/// REPEATABLE READ transaction's older snapshot: a registration in such a transaction replays
/// event by event. It applies every event, so not across a skipped one (ep_skip_event), and not
/// one at a time (`limit` 1: an async retry that must name the failing event).
fn replay_applies(
    handler: &Handler,
    filter: Filter<'_>,
    (after, bound): (i64, i64),
    limit: i64,
) -> Option<pg_sys::Oid> {
    // SAFETY: a plain read of the transaction's isolation level.
    let read_committed = unsafe { pg_sys::XactIsoLevel } < pg_sys::XACT_REPEATABLE_READ as i32;
    let skips_inside = filter.skip.is_some_and(|s| s.iter().any(|p| *p > after && *p <= bound));
    let failed_here = |r: &pg_sys::Oid| {
        REPLAY_FAILED.with(|f| f.get()).is_some_and(|f| {
            f.replay == *r && after < f.until && crate::sandbox::handler::proc_version(*r) == Some(f.version)
        })
    };
    // A sealed event reads as the redacted shape in ep.events itself, where the replay handler
    // reads: such a range goes event by event, through `unseal_rows` (seal).
    let sealed_inside = || crate::seal::sealed_between(&crate::pg::catalog::require(), after, bound);
    handler.replay.filter(|r| read_committed && limit > 1 && !skips_inside && !failed_here(r) && !sealed_inside())
}

/// The range `(after, bound]` through the replay handler, in one call. Progress counts the range's
/// log positions, not its events: counting them would read the range once more, as long as the
/// replay handler itself takes (DESIGN.md, section 13). None when the replay handler failed: its
/// work is rolled back, and the caller applies the range event by event, so that a failure names
/// its event (and async delivery retries exactly that one), as without a replay handler.
fn apply_range(handler: &Handler, replay: pg_sys::Oid, (after, bound): (i64, i64), up_to: i64) -> Option<Applied> {
    ATTEMPTED.with(|c| c.set(after + 1));
    if let Err(e) = crate::pg::backend::in_subtransaction(|| handler.call_range(replay, after, bound)) {
        let r = crate::pg::error::caught_report(&e);
        // SAFETY: a plain read of an interrupt flag.
        let dying = unsafe { pg_sys::ProcDiePending } != 0;
        let interrupted = dying
            || matches!(
                r.sql_error_code(),
                PgSqlErrorCode::ERRCODE_QUERY_CANCELED | PgSqlErrorCode::ERRCODE_ADMIN_SHUTDOWN
            );
        let message = r.message().to_string();
        // Cancels (the handler timeout) and shutdowns stay what they are.
        if interrupted {
            (*e).rethrow();
        }
        warning!("{message}; applying the range event by event");
        let version = crate::sandbox::handler::proc_version(replay).unwrap_or_default();
        REPLAY_FAILED.with(|f| f.set(Some(FailedRange { replay, version, until: bound })));
        return None;
    }
    Some(Applied { events: bound - after, through: bound, done: bound >= up_to })
}

/// Applies the events passing `filter` with `after < position <= up_to`, at most `limit` of them
/// and scanning at most `limit * SCAN_BATCHES` positions, read under `snap`. Batch handlers get
/// them as one array; a replay handler, when it may (`replay_applies`), the whole scanned range.
fn apply(
    handler: &Handler,
    filter: Filter<'_>,
    events_type: pg_sys::Oid,
    (after, up_to): (i64, i64),
    limit: i64,
    snap: Snap,
    budget: Option<std::time::Duration>,
) -> Applied {
    if after >= up_to {
        return Applied { events: 0, through: after, done: true }; // nothing to call anyone for
    }
    let range_end = up_to.min(after.saturating_add(crate::pg::settings::replay_range() as i64));
    if let Some(replay) = replay_applies(handler, filter, (after, range_end), limit) {
        if let Some(a) = apply_range(handler, replay, (after, range_end), up_to) {
            return a;
        }
    }
    // Event by event (or in batches) through the handler.
    let bound = scan_bound(after, up_to, limit);
    Spi::connect(|client| {
        let types = filter.types.and_then(|t| t.clone().into_datum());
        let skip = filter.skip.filter(|s| !s.is_empty()).and_then(|s| s.clone().into_datum());
        let rows = crate::pg::catalog::read(|| {
            spi::exec(client, &RANGE, &[spi::int8(after), spi::int8(bound), types, spi::int8(limit), skip], snap, 0)
        });
        let n = rows.len();
        if n == 0 {
            return progress(bound, up_to, limit, 0, after);
        }
        let cat = crate::pg::catalog::require();
        if handler.batch {
            let mut datums = Vec::with_capacity(n);
            for i in 0..n {
                datums.push(rows.datum(i, 1).expect("event row is never NULL"));
            }
            crate::seal::unseal_rows(&cat, &mut datums);
            let first: i64 = rows.get(0, 2).unwrap_or(after);
            let last: i64 = rows.get(n - 1, 2).unwrap_or(after);
            let arr = spi::composite_array(&datums, events_type);
            ATTEMPTED.with(|c| c.set(first));
            handler.call(arr, &|| format!("events {first}..{last}"));
            progress(bound, up_to, limit, n, last)
        } else {
            let mut events: Vec<pg_sys::Datum> =
                (0..n).map(|i| rows.datum(i, 1).expect("event row is never NULL")).collect();
            crate::seal::unseal_rows(&cat, &mut events);
            let positions: Vec<i64> = (0..n).map(|i| rows.get(i, 2).unwrap_or(after)).collect();
            let deadline = budget.map(|b| std::time::Instant::now() + b);
            let made = handler.call_until(
                &events,
                deadline,
                |i| ATTEMPTED.with(|c| c.set(positions[i])),
                |i| format!("event {}", positions[i]),
            );
            if made < n {
                // Out of time: everything up to the last event applied is done, as after a full batch.
                return Applied { events: made as i64, through: positions[made - 1], done: false };
            }
            progress(bound, up_to, limit, n, positions[n - 1])
        }
    })
}

/// The last position one `apply` call reads: at most `limit * SCAN_BATCHES` positions past
/// `after`, and never past `up_to`.
pub fn scan_bound(after: i64, up_to: i64, limit: i64) -> i64 {
    up_to.min(after.saturating_add(limit.saturating_mul(SCAN_BATCHES)))
}

/// What an `apply` call that read up to `bound` and got `n` events (the last at `last`) did:
/// fewer than `limit` matched, so everything up to the bound is done; or the batch was full, and
/// only up to its last event is.
pub fn progress(bound: i64, up_to: i64, limit: i64, n: usize, last: i64) -> Applied {
    let full = n as i64 >= limit;
    Applied { events: n as i64, through: if full { last } else { bound }, done: !full && bound >= up_to }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Splitting a range into `apply` calls over any log (a set of positions, each matching
        /// the filter or not) visits every matching position exactly once, in order, in batches
        /// of at most `limit`, and ends exactly at `up_to`: what a replay's checkpoints rely on.
        #[test]
        fn batches_cover_the_range_once(
            after in 0i64..50,
            len in 0i64..400,
            limit in 1i64..20,
            log in proptest::collection::btree_set(0i64..500, 0..200),
        ) {
            let up_to = after + len;
            let mut through = after;
            let mut seen = Vec::new();
            for _ in 0..10_000 {
                let bound = scan_bound(through, up_to, limit);
                prop_assert!(bound <= up_to && bound > through || through == up_to);
                let rows: Vec<i64> = if bound > through {
                    log.range(through + 1..=bound).copied().take(limit as usize).collect()
                } else {
                    Vec::new()
                };
                let a = progress(bound, up_to, limit, rows.len(), rows.last().copied().unwrap_or(through));
                prop_assert!(a.through > through || (a.done && through == up_to));
                seen.extend(rows);
                through = a.through;
                if a.done {
                    break;
                }
            }
            let expected: Vec<i64> = log.range(after + 1..up_to + 1).copied().collect();
            prop_assert_eq!(through, up_to);
            prop_assert_eq!(seen, expected);
        }
    }
}
