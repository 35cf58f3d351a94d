//! The lock hand-off: the advisory locks that order appends against registrations and rebuild
//! hand-offs, and the REPEATABLE READ check. DESIGN.md, sections 1 to 3, names the steps.
//!
//! Locks are taken with `LockAcquire` directly. They show in `pg_locks` as advisory locks with
//! `classid` = `LOCK_CLASS`, `objid` = the projection id (0 for the registry) and `objsubid` =
//! `LOCK_SPACE`. SQL's advisory lock functions make only `objsubid` 1 (`pg_advisory_lock(bigint)`)
//! or 2 (`pg_advisory_lock(int, int)`), so no role can take, hold or wait on these locks.

pub mod highwater;
pub mod inflight;

use crate::pg::error::SqlError;
use crate::pg::spi::{self, Snap, Stmt};
use pgrx::pg_sys;
use pgrx::prelude::*;

/// `classid` of the registry and projection locks.
pub const LOCK_CLASS: u32 = 0x4550_0001;
/// `classid` of the worker ownership locks (session level).
pub const OWNER_CLASS: u32 = 0x4550_0002;
/// `objid` of the registry lock.
pub const REGISTRY: u32 = 0;
/// Ownership (OWNER_CLASS) of the database's retention work: one worker at a time runs it.
/// (Projection ids come from an int4 sequence starting at 1: never this.)
pub const RETENTION: u32 = u32::MAX;
/// Taken SHARED (LOCK_CLASS, transaction level) by a registration building an inline projection
/// from the log, EXCLUSIVE by each removal of events a retention policy cut: no removal runs
/// while a build reads the log (DESIGN.md, section 17).
pub const LOG_BUILD: u32 = u32::MAX;
/// `objsubid` of every lock of the extension: a value no SQL function produces.
pub const LOCK_SPACE: u16 = 0x4550;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Shared,
    Exclusive,
}

fn tag(class: u32, object: u32) -> pg_sys::LOCKTAG {
    pg_sys::LOCKTAG {
        // SAFETY: a plain read of a global set once at connection.
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: class,
        locktag_field3: object,
        locktag_field4: LOCK_SPACE,
        locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
        locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
    }
}

fn lockmode(mode: Mode) -> pg_sys::LOCKMODE {
    match mode {
        Mode::Shared => pg_sys::ShareLock as pg_sys::LOCKMODE,
        Mode::Exclusive => pg_sys::ExclusiveLock as pg_sys::LOCKMODE,
    }
}

/// Takes a transaction-level lock, waiting as long as it takes (subject to `lock_timeout` and the
/// deadlock detector). Held until the transaction ends.
pub fn lock(object: u32, mode: Mode) {
    let t = tag(LOCK_CLASS, object);
    // SAFETY: LockAcquire with a tag we built; a transaction is open (sessionLock false), and an
    // error (deadlock, lock_timeout) is raised as usual.
    unsafe {
        pg_sys::LockAcquire(&t, lockmode(mode), false, false);
    }
}

/// Takes a transaction-level lock without ever keeping others queued behind us for more than
/// `timeout_ms`: each attempt waits at most that long inside a subtransaction; on a timeout the
/// subtransaction (and our place in the queue) is given up and, after a pause that lets the
/// queued requests through, we try again. For hand-offs made in a user's transaction, such as a
/// registration, where the transaction cannot simply be retried.
pub fn lock_patiently(object: u32, mode: Mode, timeout_ms: i32) {
    let mut pause_ms = 1;
    loop {
        // Each attempt in a subtransaction of its own: a timed-out one gives up only itself (and
        // our place in the queue); a granted lock passes to the transaction.
        let attempt = crate::pg::backend::in_subtransaction(|| {
            // SAFETY: a GUC nest level of this subtransaction, undone before it is released (on
            // an error, its rollback undoes it).
            let nest = unsafe { pg_sys::NewGUCNestLevel() };
            set_local_lock_timeout(timeout_ms);
            lock(object, mode);
            // SAFETY: closes the nest level opened above, keeping nothing of it.
            unsafe { pg_sys::AtEOXact_GUC(true, nest) };
        });
        let got = match attempt {
            Ok(()) => true,
            Err(e)
                if crate::pg::error::caught_report(&e).sql_error_code()
                    == PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE =>
            {
                false
            }
            // Any other error (a cancel, a statement timeout, a deadlock) ends the wait.
            Err(e) => (*e).rethrow(),
        };
        if got {
            return;
        }
        raise_if_statement_timed_out();
        crate::pg::backend::sleep_ms(pause_ms);
        pause_ms = (pause_ms * 2).min(50);
    }
}

/// When a lock timeout and the statement timeout expire together, PostgreSQL reports the lock
/// timeout and clears the statement timeout's indicator; `lock_patiently` catches the former and
/// would wait on past `statement_timeout`. So it looks at the clock itself between attempts.
fn raise_if_statement_timed_out() {
    // SAFETY: plain reads of a setting, of the statement's start and of the clock.
    let (timeout_ms, elapsed_us) = unsafe {
        (pg_sys::StatementTimeout, pg_sys::GetCurrentTimestamp() - pg_sys::GetCurrentStatementStartTimestamp())
    };
    if timeout_ms > 0 && elapsed_us >= timeout_ms as i64 * 1000 {
        pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_QUERY_CANCELED,
            "canceling statement due to statement timeout",
            "event_projections",
        )
        .report(PgLogLevel::ERROR);
    }
}

/// Tries to take a session-level ownership lock without waiting.
pub fn try_own(object: u32) -> bool {
    let t = tag(OWNER_CLASS, object);
    // SAFETY: a session-level, non-waiting LockAcquire with a tag we built.
    unsafe {
        pg_sys::LockAcquire(&t, pg_sys::ExclusiveLock as pg_sys::LOCKMODE, true, true)
            != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
    }
}

/// The error of a worker step whose projection another process advanced meanwhile: the step rolls
/// back, and is retried like a step that found its lock busy (55P03).
pub fn raise_overtaken(projection: &str) -> ! {
    crate::pg::error::raise(&Overtaken { projection: projection.into() })
}

#[derive(Debug, thiserror::Error)]
#[error("projection \"{projection}\" was advanced by another process during this step, which is rolled back")]
struct Overtaken {
    projection: String,
}

impl SqlError for Overtaken {
    fn sqlstate(&self) -> PgSqlErrorCode {
        PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE
    }
}

/// Releases an ownership lock taken by `try_own` (if user code released it already, nothing).
pub fn disown(object: u32) {
    let t = tag(OWNER_CLASS, object);
    // SAFETY: a lookup in this backend's local lock table.
    if !unsafe { pg_sys::LockHeldByMe(&t, pg_sys::ExclusiveLock as pg_sys::LOCKMODE) } {
        return;
    }
    // SAFETY: releases a session lock this process took with try_own (a missing one only warns).
    unsafe {
        pg_sys::LockRelease(&t, pg_sys::ExclusiveLock as pg_sys::LOCKMODE, true);
    }
}

/// Sets `lock_timeout` for the rest of the current transaction (hand-offs use it so that appends
/// queued behind a waiting exclusive request are never held for long).
pub fn set_local_lock_timeout(ms: i32) {
    let v = std::ffi::CString::new(format!("{ms}ms")).expect("digits and letters");
    crate::pg::backend::set_setting(c"lock_timeout", &v, pg_sys::GucAction::GUC_ACTION_LOCAL);
}

/// Whether the transaction uses one snapshot for all its statements (REPEATABLE READ, SERIALIZABLE).
pub fn uses_transaction_snapshot() -> bool {
    // SAFETY: a plain read of the transaction's isolation level.
    unsafe { pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32 }
}

static GENERATIONS_IN_SNAPSHOT: Stmt =
    Stmt { sql: "SELECT id, generation FROM ep.projections WHERE id = ANY ($1)", types: &[pg_sys::INT4ARRAYOID] };

/// A6: the first of `latest` (id, generation, name) whose generation, as this transaction's
/// snapshot sees it, is not the latest one: its last hand-off committed after the snapshot was
/// taken. (Comparing generations, not xmin, so that freezing and wraparound cannot fool it.)
pub fn first_crossed<'a>(latest: &'a [(i32, i64, &'a str)]) -> Option<&'a str> {
    if latest.is_empty() {
        return None;
    }
    let ids: Vec<i32> = latest.iter().map(|l| l.0).collect();
    let seen: Vec<(i32, i64)> = crate::pg::catalog::read(|| {
        Spi::connect(|client| {
            // Snap::Fresh under REPEATABLE READ / SERIALIZABLE is the transaction snapshot.
            let rows = spi::exec(client, &GENERATIONS_IN_SNAPSHOT, &[ids.into_datum()], Snap::Fresh, 0);
            (0..rows.len()).map(|i| (rows.get(i, 1).unwrap_or(0), rows.get(i, 2).unwrap_or(0))).collect()
        })
    });
    latest.iter().find(|(id, generation, _)| !seen.iter().any(|(sid, sg)| sid == id && sg == generation)).map(|l| l.2)
}

/// The error of A6 (and of a reader whose snapshot predates a blue-green switch).
#[derive(Debug, thiserror::Error)]
#[error(
    "could not serialize access: projection \"{projection}\" was handed off after this transaction's snapshot was taken"
)]
pub struct CrossedHandoff {
    pub projection: String,
}

impl SqlError for CrossedHandoff {
    fn sqlstate(&self) -> PgSqlErrorCode {
        PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE
    }
    fn detail(&self) -> Option<String> {
        Some("A rebuild or registration of the projection committed after the snapshot of this REPEATABLE READ or SERIALIZABLE transaction; its handler would not see the read model the hand-off wrote.".into())
    }
    fn hint(&self) -> Option<String> {
        Some("Retry the transaction.".into())
    }
}
