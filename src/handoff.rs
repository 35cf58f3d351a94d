//! The lock hand-off: the advisory locks that order appends against registrations and rebuild
//! hand-offs, and the REPEATABLE READ check. DESIGN.md, sections 1 to 3, names the steps.
//!
//! Locks are taken with `LockAcquire` directly (what `pg_advisory_xact_lock_shared(int, int)` does)
//! so they show in `pg_locks` as advisory locks with `classid` = `LOCK_CLASS`, `objid` = the
//! projection id (0 for the registry) and `objsubid` = 2.

use crate::error::SqlError;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::fmt::Display;

/// `classid` of the registry and projection locks.
pub const LOCK_CLASS: u32 = 0x4550_0001;
/// `classid` of the worker ownership locks (session level).
pub const OWNER_CLASS: u32 = 0x4550_0002;
/// `objid` of the registry lock.
pub const REGISTRY: u32 = 0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Shared,
    Exclusive,
}

fn tag(class: u32, object: u32) -> pg_sys::LOCKTAG {
    pg_sys::LOCKTAG {
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: class,
        locktag_field3: object,
        locktag_field4: 2,
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
    unsafe {
        pg_sys::LockAcquire(&t, lockmode(mode), false, false);
    }
}

/// Tries to take a session-level ownership lock without waiting.
pub fn try_own(object: u32) -> bool {
    let t = tag(OWNER_CLASS, object);
    unsafe { pg_sys::LockAcquire(&t, pg_sys::ExclusiveLock as pg_sys::LOCKMODE, true, true) != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL }
}

/// Releases an ownership lock taken by `try_own`.
pub fn disown(object: u32) {
    let t = tag(OWNER_CLASS, object);
    unsafe {
        pg_sys::LockRelease(&t, pg_sys::ExclusiveLock as pg_sys::LOCKMODE, true);
    }
}

/// Sets `lock_timeout` for the rest of the current transaction (hand-offs use it so that appends
/// queued behind a waiting exclusive request are never held for long).
pub fn set_local_lock_timeout(ms: i32) {
    let v = std::ffi::CString::new(format!("{ms}ms")).expect("no NUL");
    unsafe {
        pg_sys::set_config_option(
            c"lock_timeout".as_ptr(),
            v.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            0,
            false,
        );
    }
}

/// Whether the transaction uses one snapshot for all its statements (REPEATABLE READ, SERIALIZABLE).
pub fn uses_transaction_snapshot() -> bool {
    unsafe { pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32 }
}

/// A6: whether the row version created by `xmin` is visible to this transaction's snapshot.
/// Only meaningful when `uses_transaction_snapshot()`.
pub fn visible_to_transaction_snapshot(xmin: u32) -> bool {
    let xid = pg_sys::TransactionId::from_inner(xmin);
    unsafe {
        if !pg_sys::TransactionIdIsNormal(xid) {
            return true; // frozen or bootstrap: visible to everyone
        }
        if pg_sys::TransactionIdIsCurrentTransactionId(xid) {
            return true;
        }
        !pg_sys::XidInMVCCSnapshot(xid, pg_sys::GetTransactionSnapshot())
    }
}

/// The error of A6 (and of a reader whose snapshot predates a blue-green switch).
#[derive(Debug)]
pub struct CrossedHandoff {
    pub projection: String,
}

impl Display for CrossedHandoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "could not serialize access: projection \"{}\" was handed off after this transaction's snapshot was taken",
            self.projection
        )
    }
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
