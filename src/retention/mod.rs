//! Retention policies (README, "Retention"; DESIGN.md, section 17): `ep_set_stream_policy`,
//! `ep_drop_stream_policy`, and the worker's retention work, one small transaction per step:
//! cutting the streams that fell out of a policy (`log::truncate::cut`) and removing what the cuts
//! left in the log (`log::truncate::remove_cut`), never while a rebuild or a registration reads the
//! log and never past the slowest consumer.

use crate::handoff::{self, Mode};
use crate::log::truncate;
use crate::pg::catalog::{self, Catalog};
use crate::pg::error::{required_text, ArgError, SqlError};
use crate::pg::settings;
use crate::pg::spi::{self, Snap, Stmt};
use pgrx::datum::Interval;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::RefCell;

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error(transparent)]
    Arg(#[from] ArgError),
    #[error("a retention policy needs max_age, max_count or truncate_before")]
    NoLimit,
    #[error("retention policies need the 0.4.0 schema of event_projections, and this database has an older one")]
    NeedsUpdate,
    #[error("cannot change retention policy \"{0}\" from inside a projection handler")]
    InsideHandler(String),
}

impl SqlError for RetentionError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            RetentionError::Arg(e) => e.sqlstate(),
            RetentionError::NoLimit => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            RetentionError::NeedsUpdate | RetentionError::InsideHandler(_) => {
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            RetentionError::NoLimit => Some("To remove a policy, SELECT ep_drop_stream_policy(stream_pattern).".into()),
            RetentionError::NeedsUpdate => Some("Run ALTER EXTENSION event_projections UPDATE.".into()),
            _ => None,
        }
    }
}

/// Whether this database's catalog has retention (0.4.0 on; a 0.3.0 database served by this
/// library has not).
pub fn installed(cat: &Catalog) -> bool {
    // SAFETY: a syscache lookup by name in the extension's schema.
    unsafe { pg_sys::get_relname_relid(c"stream_policies".as_ptr(), cat.namespace) != pg_sys::Oid::INVALID }
}

static POSITIVE: Stmt = Stmt { sql: "SELECT $1 > '0'::interval", types: &[pg_sys::INTERVALOID] };

static UPSERT_POLICY: Stmt = Stmt {
    sql: "INSERT INTO ep.stream_policies (stream_pattern, max_age, max_count, truncate_before, set_by) \
          VALUES ($1, $2, $3, $4, $5) \
          ON CONFLICT (stream_pattern) DO UPDATE SET max_age = EXCLUDED.max_age, max_count = EXCLUDED.max_count, \
              truncate_before = EXCLUDED.truncate_before, set_by = EXCLUDED.set_by, set_at = pg_catalog.now(), \
              scan_after = NULL, last_scan_at = NULL, last_error = NULL, last_error_at = NULL",
    types: &[pg_sys::TEXTOID, pg_sys::INTERVALOID, pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::TEXTOID],
};

static DROP_POLICY: Stmt =
    Stmt { sql: "DELETE FROM ep.stream_policies WHERE stream_pattern = $1 RETURNING 1", types: &[pg_sys::TEXTOID] };

/// `ep_set_stream_policy`: sets (or replaces) the policy of `pattern`; the worker applies it at
/// its next scan.
pub fn set_policy(
    pattern: Option<&str>,
    max_age: Option<Interval>,
    max_count: Option<i64>,
    truncate_before: Option<i64>,
) -> Result<(), RetentionError> {
    let pattern = required_text(pattern, "stream_pattern")?;
    refuse_inside_handlers(pattern)?;
    if max_age.is_none() && max_count.is_none() && truncate_before.is_none() {
        return Err(RetentionError::NoLimit);
    }
    at_least_one("max_count", max_count)?;
    at_least_one("truncate_before", truncate_before)?;
    let cat = catalog::require();
    if !installed(&cat) {
        return Err(RetentionError::NeedsUpdate);
    }
    let by = crate::sandbox::role_name(catalog::current_user()).unwrap_or_default();
    let age = max_age.and_then(|a| a.into_datum());
    catalog::privileged(&cat, || {
        Spi::connect(|client| {
            if age.is_some() && spi::exec(client, &POSITIVE, &[age], Snap::Fresh, 0).get::<bool>(0, 1) != Some(true) {
                return Err(ArgError::Invalid { arg: "max_age", problem: "must be longer than 0".into() }.into());
            }
            let args = [
                spi::text(pattern),
                age,
                max_count.and_then(spi::int8),
                truncate_before.and_then(spi::int8),
                spi::text(&by),
            ];
            spi::exec(client, &UPSERT_POLICY, &args, Snap::Fresh, 0);
            Ok(())
        })
    })
}

/// `ep_drop_stream_policy`: true when there was a policy of `pattern`. What it cut stays cut.
pub fn drop_policy(pattern: Option<&str>) -> Result<bool, RetentionError> {
    let pattern = required_text(pattern, "stream_pattern")?;
    refuse_inside_handlers(pattern)?;
    let cat = catalog::require();
    if !installed(&cat) {
        return Err(RetentionError::NeedsUpdate);
    }
    Ok(catalog::privileged(&cat, || {
        Spi::connect(|client| !spi::exec(client, &DROP_POLICY, &[spi::text(pattern)], Snap::Fresh, 0).is_empty())
    }))
}

fn at_least_one(arg: &'static str, v: Option<i64>) -> Result<(), ArgError> {
    match v {
        Some(n) if n < 1 => Err(ArgError::Invalid { arg, problem: format!("{n} (must be at least 1, or NULL)") }),
        _ => Ok(()),
    }
}

/// A policy set from a handler would be set again by every replay of the event.
fn refuse_inside_handlers(pattern: &str) -> Result<(), RetentionError> {
    if crate::sandbox::in_user_code() {
        return Err(RetentionError::InsideHandler(pattern.into()));
    }
    Ok(())
}

// ---- The worker's part ----------------------------------------------------------------------

thread_local! {
    /// The policy and stream of the cut in progress, for `record_failure`.
    static CUTTING: RefCell<Option<(String, String)>> = const { RefCell::new(None) };
}

/// One step of the database's retention work, in the caller's (worker's) transaction: the next
/// removal if one may go now, else the next piece of a policy's scan. True when it did something
/// (the caller goes on stepping for its time slice).
pub fn step() -> bool {
    // What `record_failure` reads is this step's only: a cut that failed with a lock timeout
    // (which the worker does not record) must not be blamed for a later step's failure.
    CUTTING.with(|c| *c.borrow_mut() = None);
    let Some(cat) = catalog::lookup() else { return false };
    if !installed(&cat) {
        return false;
    }
    remove_step(&cat) || cut_step(&cat)
}

/// Which pending stream has events below its cut the consumers are done with.
static REMOVABLE: Stmt = Stmt {
    sql: "SELECT t.stream_id FROM ep.stream_truncations t, ep.streams s \
           WHERE t.pending AND s.stream_id = t.stream_id \
             AND EXISTS (SELECT FROM ep.events e WHERE e.stream_id = t.stream_id \
                          AND e.stream_position < s.truncated_before AND e.global_position <= $1) \
           ORDER BY t.cut_at, t.stream_id LIMIT 1",
    types: &[pg_sys::INT8OID],
};

static REMOVED: Stmt = Stmt {
    sql: "UPDATE ep.stream_truncations SET events_removed = events_removed + $2, pending = $3, \
              removed_at = CASE WHEN $3 THEN NULL ELSE pg_catalog.now() END \
           WHERE stream_id = $1",
    types: &[pg_sys::TEXTOID, pg_sys::INT8OID, pg_sys::BOOLOID],
};

static ANY_PENDING: Stmt = Stmt { sql: "SELECT FROM ep.stream_truncations WHERE pending LIMIT 1", types: &[] };

/// Pending cuts with nothing left below them (a hard delete removed it, say).
static SETTLE: Stmt = Stmt {
    sql: "UPDATE ep.stream_truncations t SET pending = false, removed_at = pg_catalog.now() \
            FROM ep.streams s \
           WHERE t.pending AND s.stream_id = t.stream_id \
             AND NOT EXISTS (SELECT FROM ep.events e WHERE e.stream_id = t.stream_id AND e.stream_position < s.truncated_before)",
    types: &[],
};

/// Removes up to a batch of one stream's cut events, if any may go. The SHARE lock on ep.rebuilds
/// keeps a rebuild from being queued until this commits, and the registration lock waits for
/// every registration reading the log; the horizon is read after both (DESIGN.md, 17.2).
fn remove_step(cat: &Catalog) -> bool {
    let stream = catalog::privileged(cat, || {
        Spi::connect(|client| {
            // Most rounds have nothing pending: no lock for them.
            if spi::exec(client, &ANY_PENDING, &[], Snap::Fresh, 0).is_empty() {
                return None;
            }
            spi::exec(client, &Stmt { sql: "LOCK TABLE ep.rebuilds IN SHARE MODE", types: &[] }, &[], Snap::Fresh, 0);
            handoff::lock(handoff::LOG_BUILD, Mode::Exclusive);
            let horizon = spi::exec(
                client,
                &Stmt { sql: "SELECT horizon FROM ep.retention_horizon", types: &[] },
                &[],
                Snap::Fresh,
                0,
            )
            .get::<i64>(0, 1)
            .unwrap_or(0);
            if horizon <= 0 {
                return None;
            }
            match spi::exec(client, &REMOVABLE, &[spi::int8(horizon)], Snap::Fresh, 0).get::<String>(0, 1) {
                Some(s) => Some((s, horizon)),
                None => {
                    spi::exec(client, &SETTLE, &[], Snap::Fresh, 0);
                    None
                }
            }
        })
    });
    let Some((stream, horizon)) = stream else { return false };
    let (removed, left) = truncate::remove_cut(&stream, horizon, settings::batch_size() as i64);
    catalog::privileged(cat, || {
        Spi::connect(|client| {
            let args = [spi::text(&stream), spi::int8(removed), left.into_datum()];
            spi::exec(client, &REMOVED, &args, Snap::Fresh, 0);
        })
    });
    true
}

/// The policy whose scan is due: one in progress, else the one scanned longest ago (at most
/// every `event_projections.retention_interval`).
static DUE: Stmt = Stmt {
    sql: "SELECT stream_pattern, max_age, max_count, truncate_before, set_by, scan_after FROM ep.stream_policies \
           WHERE scan_after IS NOT NULL OR last_scan_at IS NULL \
              OR last_scan_at <= pg_catalog.now() - $1 * '1 millisecond'::interval \
           ORDER BY scan_after IS NULL, last_scan_at NULLS FIRST, stream_pattern LIMIT 1 FOR UPDATE",
    types: &[pg_sys::INT4OID],
};

/// The streams of a scan, in stream id order from `$2`, with the cut the policy asks for
/// (never above the next version: a cut only covers events that exist) and whether it cuts any
/// event not cut yet other than the extension's own markers (so that a stream whose events all
/// aged out is not cut again and again for its latest marker).
static SCAN: Stmt = Stmt {
    sql: "SELECT s.stream_id, c.cut, EXISTS ( \
                SELECT FROM ep.events e WHERE e.stream_id = s.stream_id \
                   AND e.stream_position >= COALESCE(s.truncated_before, 1) AND e.stream_position < c.cut \
                   AND pg_catalog.left(e.event_type, 1) <> '$') \
            FROM ep.streams s \
            CROSS JOIN LATERAL (SELECT LEAST(s.version + 1, GREATEST( \
                COALESCE($3, 0), \
                CASE WHEN $4 IS NULL THEN 0 ELSE COALESCE((SELECT e.stream_position FROM ep.events e \
                      WHERE e.stream_id = s.stream_id AND pg_catalog.left(e.event_type, 1) <> '$' \
                      ORDER BY e.stream_position DESC OFFSET $4 - 1 LIMIT 1), 0) END, \
                CASE WHEN $5 IS NULL THEN 0 ELSE COALESCE((SELECT min(e.stream_position) FROM ep.events e \
                      WHERE e.stream_id = s.stream_id AND e.created_at >= pg_catalog.now() - $5), s.version + 1) END)) AS cut) c \
           WHERE s.stream_id LIKE $1 AND ($2 IS NULL OR s.stream_id > $2) AND s.deleted IS NULL \
           ORDER BY s.stream_id LIMIT $6",
    types: &[pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::INTERVALOID, pg_sys::INT8OID],
};

/// How many streams one step of a scan looks at.
const SCAN_STEP: i64 = 100;

static SCANNED: Stmt = Stmt {
    sql: "UPDATE ep.stream_policies SET scan_after = $2, \
              last_scan_at = CASE WHEN $2 IS NULL THEN pg_catalog.now() ELSE last_scan_at END \
           WHERE stream_pattern = $1",
    types: &[pg_sys::TEXTOID, pg_sys::TEXTOID],
};

static RECORD_CUT: Stmt = Stmt {
    sql: "INSERT INTO ep.stream_truncations (stream_id, marker_position, stream_pattern) VALUES ($1, $2, $3) \
          ON CONFLICT (stream_id) DO UPDATE SET marker_position = EXCLUDED.marker_position, \
              stream_pattern = EXCLUDED.stream_pattern, pending = true, cut_at = pg_catalog.now(), removed_at = NULL",
    types: &[pg_sys::TEXTOID, pg_sys::INT8OID, pg_sys::TEXTOID],
};

struct Due {
    pattern: String,
    set_by: String,
    after: Option<String>,
    /// (stream, cut, whether the cut removes anything new)
    streams: Vec<(String, i64, bool)>,
}

/// The next piece of the due policy's scan: up to SCAN_STEP streams looked at, and the first
/// that fell out of the policy cut (its marker appended, its handlers run, in this transaction).
fn cut_step(cat: &Catalog) -> bool {
    let Some(due) = due_scan(cat) else { return false };
    let looked = due.streams.len() as i64;
    let mut scanned_to = due.after.clone();
    for (stream, cut, worth) in &due.streams {
        scanned_to = Some(stream.clone());
        if !worth {
            continue;
        }
        CUTTING.with(|c| *c.borrow_mut() = Some((due.pattern.clone(), stream.clone())));
        let marker = truncate::cut(stream, *cut, &due.pattern, &due.set_by);
        CUTTING.with(|c| *c.borrow_mut() = None);
        match marker {
            Ok(position) => {
                catalog::privileged(cat, || {
                    Spi::connect(|client| {
                        let args = [spi::text(stream), spi::int8(position), spi::text(&due.pattern)];
                        spi::exec(client, &RECORD_CUT, &args, Snap::Fresh, 0);
                    })
                });
                record_scan(cat, &due.pattern, Some(stream));
                return true;
            }
            // Deleted since the scan read it, say. Raised, never passed over: the refused append
            // already bumped the stream's version at A7, which only the rollback undoes (the
            // failure is then recorded on the policy and the scan goes on after the stream).
            Err(e) => crate::pg::error::raise(&e),
        }
    }
    // No cut in this piece: the scan goes on after it, or is complete.
    let end = if looked < SCAN_STEP { None } else { scanned_to };
    let more = end.is_some();
    record_scan(cat, &due.pattern, end.as_deref());
    more
}

fn due_scan(cat: &Catalog) -> Option<Due> {
    catalog::privileged(cat, || {
        Spi::connect(|client| {
            let interval = settings::retention_interval_ms();
            let p = spi::exec(client, &DUE, &[interval.into_datum()], Snap::Fresh, 0);
            let pattern: String = p.get(0, 1)?;
            let (age, count, before) = (p.datum(0, 2), p.datum(0, 3), p.datum(0, 4));
            let set_by: String = p.get(0, 5).unwrap_or_default();
            let after: Option<String> = p.get(0, 6);
            let args =
                [spi::text(&pattern), after.as_deref().and_then(spi::text), before, count, age, spi::int8(SCAN_STEP)];
            let rows = spi::exec(client, &SCAN, &args, Snap::Fresh, 0);
            let streams = (0..rows.len())
                .filter_map(|i| Some((rows.get::<String>(i, 1)?, rows.get::<i64>(i, 2)?, rows.get::<bool>(i, 3)?)))
                .collect();
            Some(Due { pattern, set_by, after, streams })
        })
    })
}

fn record_scan(cat: &Catalog, pattern: &str, after: Option<&str>) {
    catalog::privileged(cat, || {
        Spi::connect(|client| {
            spi::exec(client, &SCANNED, &[spi::text(pattern), after.and_then(spi::text)], Snap::Fresh, 0);
        })
    });
}

static FAILED: Stmt = Stmt {
    sql: "UPDATE ep.stream_policies SET last_error = $3, last_error_at = pg_catalog.now(), scan_after = $2 \
           WHERE stream_pattern = $1",
    types: &[pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::TEXTOID],
};

/// After a step failed (in a new transaction): a failed cut is recorded on its policy, whose scan
/// goes on after that stream; a failed removal is simply tried again at the next step.
pub fn record_failure(message: &str) {
    let Some((pattern, stream)) = CUTTING.with(|c| c.borrow_mut().take()) else { return };
    let Some(cat) = catalog::lookup() else { return };
    warning!("event_projections: retention policy \"{pattern}\" could not cut stream \"{stream}\": {message}");
    let text = format!("stream \"{stream}\": {message}");
    catalog::privileged(&cat, || {
        Spi::connect(|client| {
            spi::exec(client, &FAILED, &[spi::text(&pattern), spi::text(&stream), spi::text(&text)], Snap::Fresh, 0);
        })
    });
}
