//! Which global positions are still in flight, known exactly, without timeouts.
//!
//! Positions come from a sequence, so transaction T1 can hold position 100 uncommitted while 101
//! commits. A reader that checkpoints past 101 would skip 100 forever. Every backend owns one slot
//! in shared memory holding the smallest position its open transaction took; the reader's
//! high-water mark stops below the smallest slot. The argument is in DESIGN.md, section 4; the
//! code steps are named there (A8, A11, H1..H4).
//!
//! The same shared block carries the worker processes' latches so that a commit that appended can
//! wake the async delivery at once instead of waiting for a poll.

use pgrx::pg_sys;
use pgrx::prelude::*;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// A slot's `min_position` while its backend is between "about to take positions" and "knows the
/// smallest one it took". A reader that sees it must not advance.
const PENDING: u64 = u64::MAX;

/// Upper bound on `event_projections.workers`.
pub const MAX_WORKERS: usize = 16;

#[repr(C)]
struct Slot {
    database: AtomicU32,
    min_position: AtomicU64,
}

#[repr(C)]
struct WorkerSlot {
    /// pgprocno + 1 of a running worker, 0 when none.
    procno: AtomicU32,
    database: AtomicU32,
    /// Whether the worker has async projections or rebuilds to run: commits wake only those
    /// workers (a wake-up is a signal, and appends without async projections should not pay it).
    wants_wakeups: AtomicU32,
}

#[repr(C)]
struct Shared {
    nslots: u32,
    /// Bumped when a projection's registration or status changes (after commit); appenders use it
    /// to tell whether a cached view of the registry can still be trusted.
    registry_epoch: AtomicU64,
    workers: [WorkerSlot; MAX_WORKERS],
    slots: [Slot; 0],
}

static mut SHARED: *mut Shared = std::ptr::null_mut();
static mut PREV_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;

/// True in this backend between taking positions and the end of its transaction.
static mut HOLDING: bool = false;
static mut CALLBACK_REGISTERED: bool = false;
/// True when this transaction changed the registry or handed a projection off.
static mut BUMP_AT_COMMIT: bool = false;
/// True when this transaction appended an event some async projection receives.
static mut WAKE_AT_COMMIT: bool = false;

fn shared_size(nslots: usize) -> usize {
    std::mem::size_of::<Shared>() + nslots * std::mem::size_of::<Slot>()
}

fn slot_count() -> usize {
    // Regular backends, autovacuum, background workers and WAL senders all have pgprocno below
    // MaxBackends; auxiliary processes and prepared-transaction dummies never append.
    unsafe { pg_sys::MaxBackends as usize }
}

/// Called from `_PG_init` when loaded through shared_preload_libraries.
pub fn install_hooks() {
    unsafe {
        PREV_REQUEST_HOOK = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(on_shmem_request);
        PREV_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(on_shmem_startup);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_shmem_request() {
    unsafe {
        if let Some(prev) = PREV_REQUEST_HOOK {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(shared_size(slot_count()));
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_shmem_startup() {
    unsafe {
        if let Some(prev) = PREV_STARTUP_HOOK {
            prev();
        }
        let n = slot_count();
        let mut found = false;
        // AddinShmemInitLock is slot 21 of the main LWLock array (lwlocknames.txt).
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let ptr = pg_sys::ShmemInitStruct(c"event_projections".as_ptr(), shared_size(n), &mut found)
            as *mut Shared;
        if !found {
            // Zeroed memory is a valid state for every atomic: no slot holds a position.
            std::ptr::write_bytes(ptr as *mut u8, 0, shared_size(n));
            (*ptr).nslots = n as u32;
        }
        SHARED = ptr;
        pg_sys::LWLockRelease(init_lock);
    }
}

/// Whether the shared block exists, i.e. the library was preloaded.
pub fn available() -> bool {
    unsafe { !SHARED.is_null() }
}

fn shared() -> Option<&'static Shared> {
    unsafe { SHARED.as_ref() }
}

fn my_slot() -> Option<&'static Slot> {
    let sh = shared()?;
    let procno = unsafe { (*pg_sys::MyProc).pgprocno } as usize;
    if procno >= sh.nslots as usize {
        return None;
    }
    unsafe { Some(&*(sh.slots.as_ptr().add(procno))) }
}

fn slots() -> &'static [Slot] {
    match shared() {
        Some(sh) => unsafe { std::slice::from_raw_parts(sh.slots.as_ptr(), sh.nslots as usize) },
        None => &[],
    }
}

fn ensure_callback() {
    unsafe {
        if !CALLBACK_REGISTERED {
            pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
            CALLBACK_REGISTERED = true;
        }
    }
}

/// Whether this backend's transaction has taken positions (and so must not be prepared).
#[cfg(any(test, feature = "pg_test"))]
pub fn holding() -> bool {
    unsafe { HOLDING }
}

/// A8, first half: announce that positions are about to be taken. Keeps an earlier, smaller
/// position of the same transaction if there is one.
pub fn begin_allocation() {
    ensure_callback();
    unsafe { HOLDING = true };
    let Some(slot) = my_slot() else { return };
    if slot.min_position.load(Ordering::SeqCst) == 0 {
        slot.database.store(unsafe { pg_sys::MyDatabaseId }.to_u32(), Ordering::SeqCst);
        slot.min_position.store(PENDING, Ordering::SeqCst);
    }
}

/// The commit of this transaction should wake the workers: it appends an event an async projection
/// receives.
pub fn wake_at_commit() {
    ensure_callback();
    unsafe { WAKE_AT_COMMIT = true };
}

/// A8, second half: the smallest position this call took.
pub fn end_allocation(smallest: i64) {
    let Some(slot) = my_slot() else { return };
    if slot.min_position.load(Ordering::SeqCst) == PENDING {
        slot.min_position.store(smallest as u64, Ordering::SeqCst);
    }
}

fn release_slot() {
    if let Some(slot) = my_slot() {
        slot.min_position.store(0, Ordering::SeqCst);
    }
}

/// The result of scanning the slots (H2).
pub enum Horizon {
    /// Some backend is between PENDING and knowing its position: try again in a moment.
    Unsettled,
    /// Every position up to and including this one is resolved (given `last_value` read in H1).
    UpTo(i64),
}

/// H2..H3: `last_value` must have been read (H1) before this call, and the events must be read
/// with a snapshot taken after it (H4).
pub fn horizon(last_value: i64) -> Horizon {
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let mut hw = last_value;
    for slot in slots() {
        // min_position first: its store follows the database store in the appender.
        let min = slot.min_position.load(Ordering::SeqCst);
        if min == 0 || slot.database.load(Ordering::SeqCst) != db {
            continue;
        }
        if min == PENDING {
            return Horizon::Unsettled;
        }
        hw = hw.min(min as i64 - 1);
    }
    Horizon::UpTo(hw)
}

/// (pid, smallest position) of every backend of this database holding positions uncommitted:
/// what holds async delivery and rebuild replays back (`ep_in_flight()`).
pub fn in_flight() -> Vec<(i32, i64)> {
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    slots()
        .iter()
        .enumerate()
        .filter_map(|(procno, s)| {
            let min = s.min_position.load(Ordering::SeqCst);
            if min == 0 || min == PENDING || s.database.load(Ordering::SeqCst) != db {
                return None;
            }
            let pid = unsafe { (*(*pg_sys::ProcGlobal).allProcs.add(procno)).pid };
            Some((pid, min as i64))
        })
        .collect()
}

/// The registry epoch: bumped whenever a committed change of `ep.projections` may have changed what
/// appends must do (a trigger on the table calls `bump_epoch_at_commit`). Appends keep their view
/// of the registry as long as it has not moved (`registry::projections_for_appends`).
pub fn registry_epoch() -> u64 {
    shared().map(|s| s.registry_epoch.load(Ordering::SeqCst)).unwrap_or(0)
}

/// Called by registrations and hand-offs: bump the epoch when this transaction commits (after
/// the commit is visible, before its locks are released).
pub fn bump_epoch_at_commit() {
    ensure_callback();
    unsafe { BUMP_AT_COMMIT = true };
    // This backend's own view must not survive its own change (the epoch moves only at commit).
    crate::registry::forget_inline_view();
}

fn bump_registry_epoch() {
    if let Some(s) = shared() {
        s.registry_epoch.fetch_add(1, Ordering::SeqCst);
    }
}

/// A worker process announces itself so that commits can wake it.
pub fn register_worker(index: usize) {
    if let Some(sh) = shared() {
        if index < MAX_WORKERS {
            let w = &sh.workers[index];
            w.database.store(unsafe { pg_sys::MyDatabaseId }.to_u32(), Ordering::SeqCst);
            w.procno.store(unsafe { (*pg_sys::MyProc).pgprocno } as u32 + 1, Ordering::SeqCst);
        }
    }
}

/// A worker says whether commits should wake it.
pub fn want_wakeups(index: usize, yes: bool) {
    if let Some(sh) = shared() {
        if index < MAX_WORKERS {
            sh.workers[index].wants_wakeups.store(yes as u32, Ordering::SeqCst);
        }
    }
}

/// Wakes the workers serving this database that have async work (all of them with `all`).
pub fn wake_workers_of(all: bool) {
    let Some(sh) = shared() else { return };
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    for w in &sh.workers {
        let procno = w.procno.load(Ordering::SeqCst);
        if procno != 0
            && w.database.load(Ordering::SeqCst) == db
            && (all || w.wants_wakeups.load(Ordering::SeqCst) != 0)
        {
            unsafe {
                let proc_ = (*pg_sys::ProcGlobal).allProcs.add(procno as usize - 1);
                pg_sys::SetLatch(&mut (*proc_).procLatch);
            }
        }
    }
}

/// A11. COMMIT runs after `ProcArrayEndTransaction`, so clearing the slot there can only let a
/// reader pass positions whose events are already visible.
#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    unsafe {
        match event {
            XACT_EVENT_PRE_PREPARE if HOLDING || BUMP_AT_COMMIT => {
                pgrx::pg_sys::panic::ErrorReport::new(
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    "cannot PREPARE a transaction that appended events or changed a projection",
                    "event_projections",
                )
                .set_detail("Its commit would come from another session, after this one stopped tracking the positions it holds, so async delivery and rebuilds could pass them.")
                .set_hint("Commit the transaction directly; two-phase commit is not supported with ep_append.")
                .report(PgLogLevel::ERROR);
            }
            XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
                if BUMP_AT_COMMIT {
                    BUMP_AT_COMMIT = false;
                    bump_registry_epoch();
                    wake_workers_of(true); // a new async projection or rebuild: everyone looks
                }
                if HOLDING {
                    HOLDING = false;
                    release_slot();
                }
                if WAKE_AT_COMMIT {
                    WAKE_AT_COMMIT = false;
                    wake_workers_of(false);
                }
            }
            XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
                BUMP_AT_COMMIT = false;
                WAKE_AT_COMMIT = false;
                if HOLDING {
                    HOLDING = false;
                    release_slot();
                }
            }
            _ => {}
        }
    }
}
