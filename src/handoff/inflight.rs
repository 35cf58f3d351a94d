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
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};

/// A slot's `min_position` while its backend is between "about to take positions" and "knows the
/// smallest one it took". A reader that sees it must not advance.
const PENDING: u64 = u64::MAX;

use crate::pg::error::SqlError;
use crate::pg::settings::{self, MAX_WORKERS};

#[repr(C)]
struct Slot {
    database: AtomicU32,
    min_position: AtomicU64,
    /// The database whose appends this backend waits for in `ep_poll` (0: not waiting).
    waiting_for: AtomicU32,
    /// When the transaction holding `min_position` began (TimestampTz), for `ep_status`.
    since: AtomicI64,
}

#[repr(C)]
struct WorkerSlot {
    /// pgprocno + 1 of a running worker, 0 when none.
    procno: AtomicU32,
    database: AtomicU32,
    /// Whether the worker has async projections or rebuilds to run: commits wake only those
    /// workers (a wake-up is a signal, and appends without async projections should not pay it).
    wants_wakeups: AtomicU32,
    /// 1 + the id of the projection whose user code this worker ran past the handler timeout and
    /// grace, noted just before the process ended; read back by the next worker of the same
    /// database in this slot.
    timed_out: AtomicU32,
    /// The database of `timed_out`.
    timed_out_database: AtomicU32,
    /// The extension (pg_extension oid) of `timed_out`: a DROP and CREATE EXTENSION in between
    /// restarts projection ids, and the note is then about none of the new ones.
    timed_out_extension: AtomicU32,
    /// The extension this slot's worker serves (for `note_timed_out`, in a signal handler).
    extension: AtomicU32,
}

#[repr(C)]
struct Shared {
    nslots: u32,
    /// Bumped when a projection's registration or status changes (after commit); appenders use it
    /// to tell whether a cached view of the registry can still be trusted.
    registry_epoch: AtomicU64,
    /// How many backends wait in `ep_poll`: a commit that appended wakes them only when some do.
    pollers: AtomicU32,
    workers: [WorkerSlot; MAX_WORKERS],
    slots: [Slot; 0],
}

/// The shared block, set once by the shmem startup hook (in the postmaster, inherited by fork).
static SHARED: std::sync::atomic::AtomicPtr<Shared> = std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());
// The hooks that were installed before ours, called first. Written once, in _PG_init, while the
// postmaster loads preloaded libraries (single-threaded), and only read afterwards.
static mut PREV_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;

use std::cell::Cell;

thread_local! {
    /// True in this backend between taking positions and the end of its transaction.
    static HOLDING: Cell<bool> = const { Cell::new(false) };
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
    /// True when this transaction changed the registry or handed a projection off.
    static BUMP_AT_COMMIT: Cell<bool> = const { Cell::new(false) };
    /// True when this transaction appended an event some async projection receives.
    static WAKE_AT_COMMIT: Cell<bool> = const { Cell::new(false) };
}

fn get(flag: &'static std::thread::LocalKey<Cell<bool>>) -> bool {
    flag.with(Cell::get)
}

fn set(flag: &'static std::thread::LocalKey<Cell<bool>>, v: bool) {
    flag.with(|c| c.set(v));
}

/// Takes (reads and clears) a flag.
fn take(flag: &'static std::thread::LocalKey<Cell<bool>>) -> bool {
    flag.with(|c| c.replace(false))
}

use crate::pg::backend::my_database;

/// This backend's index into the PGPROC array.
fn my_procno() -> usize {
    // SAFETY: MyProc is set for every backend and worker that runs our code.
    unsafe { (*pg_sys::MyProc).pgprocno as usize }
}

fn shared_size(nslots: usize) -> usize {
    std::mem::size_of::<Shared>() + nslots * std::mem::size_of::<Slot>()
}

fn slot_count() -> usize {
    // Regular backends, autovacuum, background workers and WAL senders all have pgprocno below
    // MaxBackends; auxiliary processes and prepared-transaction dummies never append.
    // SAFETY: a plain read of a global set before shared memory is sized.
    unsafe { pg_sys::MaxBackends as usize }
}

/// Called from `_PG_init` when loaded through shared_preload_libraries.
pub fn install_hooks() {
    // SAFETY: _PG_init during shared_preload_libraries: single-threaded, before any hook runs.
    unsafe {
        PREV_REQUEST_HOOK = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(on_shmem_request);
        PREV_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(on_shmem_startup);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_shmem_request() {
    // SAFETY: called by the postmaster once; the previous hook was saved by install_hooks.
    unsafe {
        if let Some(prev) = PREV_REQUEST_HOOK {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(shared_size(slot_count()));
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_shmem_startup() {
    // SAFETY: called once per (re)initialisation of shared memory, under AddinShmemInitLock as
    // PostgreSQL requires; the block is sized by on_shmem_request for slot_count() slots, and
    // zeroed memory is a valid state of every atomic in it.
    unsafe {
        if let Some(prev) = PREV_STARTUP_HOOK {
            prev();
        }
        let n = slot_count();
        let mut found = false;
        // AddinShmemInitLock is slot 21 of the main LWLock array (lwlocknames.txt).
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let ptr = pg_sys::ShmemInitStruct(c"event_projections".as_ptr(), shared_size(n), &mut found) as *mut Shared;
        if !found {
            // Zeroed memory is a valid state for every atomic: no slot holds a position.
            std::ptr::write_bytes(ptr as *mut u8, 0, shared_size(n));
            (*ptr).nslots = n as u32;
        }
        SHARED.store(ptr, Ordering::SeqCst);
        pg_sys::LWLockRelease(init_lock);
    }
}

/// Whether the shared block exists, i.e. the library was preloaded.
pub fn available() -> bool {
    !SHARED.load(Ordering::Relaxed).is_null()
}

fn shared() -> Option<&'static Shared> {
    // SAFETY: the pointer is null or the shared block, which lives as long as the process.
    unsafe { SHARED.load(Ordering::Relaxed).as_ref() }
}

fn my_slot() -> Option<&'static Slot> {
    let sh = shared()?;
    let procno = my_procno();
    if procno >= sh.nslots as usize {
        return None;
    }
    // SAFETY: the block holds nslots slots after its header (on_shmem_request sized it so).
    unsafe { Some(&*(sh.slots.as_ptr().add(procno))) }
}

fn slots() -> &'static [Slot] {
    match shared() {
        // SAFETY: as in my_slot: nslots slots follow the header, for the life of the process.
        Some(sh) => unsafe { std::slice::from_raw_parts(sh.slots.as_ptr(), sh.nslots as usize) },
        None => &[],
    }
}

fn ensure_callback() {
    if !get(&CALLBACK_REGISTERED) {
        // SAFETY: registers a callback with static lifetime, once per backend.
        unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
        set(&CALLBACK_REGISTERED, true);
    }
}

/// Whether this backend's transaction has taken positions (and so must not be prepared).
#[cfg(any(test, feature = "pg_test"))]
pub fn holding() -> bool {
    get(&HOLDING)
}

/// A8, first half: announce that positions are about to be taken. Keeps an earlier, smaller
/// position of the same transaction if there is one.
pub fn begin_allocation() {
    ensure_callback();
    set(&HOLDING, true);
    let Some(slot) = my_slot() else { return };
    if slot.min_position.load(Ordering::SeqCst) == 0 {
        slot.database.store(my_database(), Ordering::SeqCst);
        // SAFETY: reads the start time of this backend's open transaction.
        slot.since.store(unsafe { pg_sys::GetCurrentTransactionStartTimestamp() }, Ordering::SeqCst);
        slot.min_position.store(PENDING, Ordering::SeqCst);
    }
}

/// The commit of this transaction should wake the workers: it appends an event an async projection
/// receives.
pub fn wake_at_commit() {
    ensure_callback();
    set(&WAKE_AT_COMMIT, true);
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
#[derive(Debug, PartialEq, Eq)]
pub enum Horizon {
    /// Some backend is between PENDING and knowing its position: try again in a moment.
    Unsettled,
    /// Every position up to and including this one is resolved (given `last_value` read in H1).
    UpTo(i64),
}

/// H2..H3: `last_value` must have been read (H1) before this call, and the events must be read
/// with a snapshot taken after it (H4).
pub fn horizon(last_value: i64) -> Horizon {
    horizon_skipping(last_value, None)
}

/// `horizon`, leaving out this backend's own slot: for a reader in the transaction that holds
/// those positions, to which its own events are visible (and which, rolled back, takes whatever
/// it read of them back with it).
pub fn horizon_for_own_reads(last_value: i64) -> Horizon {
    horizon_skipping(last_value, Some(my_procno()))
}

fn horizon_skipping(last_value: i64, skip: Option<usize>) -> Horizon {
    let db = my_database();
    // min_position first: its store follows the database store in the appender.
    horizon_of(
        last_value,
        db,
        slots()
            .iter()
            .enumerate()
            .filter(|(procno, _)| Some(*procno) != skip)
            .map(|(_, s)| (s.min_position.load(Ordering::SeqCst), s.database.load(Ordering::SeqCst))),
    )
}

/// H2..H3 over slot states `(min_position, database)`: the pure part of `horizon`.
pub fn horizon_of(last_value: i64, db: u32, slots: impl Iterator<Item = (u64, u32)>) -> Horizon {
    let mut hw = last_value;
    for (min, database) in slots {
        if min == 0 || database != db {
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
    let db = my_database();
    slots()
        .iter()
        .enumerate()
        .filter_map(|(procno, s)| {
            let min = s.min_position.load(Ordering::SeqCst);
            if min == 0 || min == PENDING || s.database.load(Ordering::SeqCst) != db {
                return None;
            }
            // SAFETY: procno < nslots <= the size of the PGPROC array.
            let pid = unsafe { (*(*pg_sys::ProcGlobal).allProcs.add(procno)).pid };
            Some((pid, min as i64))
        })
        .collect()
}

/// Of the positions in flight in this database, the smallest, with the start of the transaction
/// holding it (TimestampTz); None when none is.
pub fn oldest_in_flight() -> Option<(i64, i64)> {
    let db = my_database();
    slots()
        .iter()
        .filter_map(|s| {
            let min = s.min_position.load(Ordering::SeqCst);
            let mine = min != 0 && min != PENDING && s.database.load(Ordering::SeqCst) == db;
            mine.then(|| (min as i64, s.since.load(Ordering::SeqCst)))
        })
        .min()
}

/// Registers this backend as waiting for appends of its database (`ep_poll` with a `wait`) for the
/// value's lifetime: every commit that appends sets its latch meanwhile.
pub struct Waiting(());

impl Waiting {
    pub fn start() -> Waiting {
        if let (Some(sh), Some(slot)) = (shared(), my_slot()) {
            slot.waiting_for.store(my_database(), Ordering::SeqCst);
            sh.pollers.fetch_add(1, Ordering::SeqCst);
        }
        Waiting(())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let (Some(sh), Some(slot)) = (shared(), my_slot()) {
            if slot.waiting_for.swap(0, Ordering::SeqCst) != 0 {
                sh.pollers.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

/// Sets the latch of every backend waiting in `ep_poll` for this database (after a commit that
/// appended, which is visible by then).
fn wake_pollers() {
    let Some(sh) = shared() else { return };
    if sh.pollers.load(Ordering::SeqCst) == 0 {
        return;
    }
    let db = my_database();
    for (procno, slot) in slots().iter().enumerate() {
        if slot.waiting_for.load(Ordering::SeqCst) == db {
            // SAFETY: procno < nslots <= the size of the PGPROC array, in shared memory for the
            // life of the server; setting another process's latch is what latches are for.
            unsafe { pg_sys::SetLatch(&mut (*(*pg_sys::ProcGlobal).allProcs.add(procno)).procLatch) };
        }
    }
}

/// The registry epoch: bumped whenever a committed change of `ep.projections` may have changed what
/// appends must do (a trigger on the table calls `bump_epoch_at_commit`). Appends keep their view
/// of the registry as long as it has not moved (`registry::view_for_appends`).
pub fn registry_epoch() -> u64 {
    shared().map(|s| s.registry_epoch.load(Ordering::SeqCst)).unwrap_or(0)
}

/// Called by registrations and hand-offs: bump the epoch when this transaction commits (after
/// the commit is visible, before its locks are released).
pub fn bump_epoch_at_commit() {
    ensure_callback();
    set(&BUMP_AT_COMMIT, true);
}

/// Whether this transaction has changed the registry (at any subtransaction level, rolled back to
/// a savepoint or not): until it ends, this backend's view of the registry is not the committed
/// one, and the epoch cannot say so.
pub fn registry_changed_here() -> bool {
    get(&BUMP_AT_COMMIT)
}

fn bump_registry_epoch() {
    if let Some(s) = shared() {
        s.registry_epoch.fetch_add(1, Ordering::SeqCst);
    }
}

/// This process's worker index (-1: not a worker) and the projection it works on (0: none), for
/// `note_timed_out`, which runs in a signal handler and can only read atomics.
static WORKER_INDEX: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);
static WORKING_ON: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// The worker says which projection's step it is running (0 when none).
pub fn working_on(id: i32) {
    WORKING_ON.store(id, Ordering::SeqCst);
}

/// Signal context, just before the worker ends itself over runaway user code: remember for the
/// restarted worker which projection did it.
pub fn note_timed_out() {
    let (index, id) = (WORKER_INDEX.load(Ordering::SeqCst), WORKING_ON.load(Ordering::SeqCst));
    if let (Some(sh), Ok(index)) = (shared(), usize::try_from(index)) {
        if index < MAX_WORKERS && id > 0 {
            let w = &sh.workers[index];
            w.timed_out_extension.store(w.extension.load(Ordering::SeqCst), Ordering::SeqCst);
            sh.workers[index].timed_out_database.store(my_database(), Ordering::SeqCst);
            sh.workers[index].timed_out.store(id as u32 + 1, Ordering::SeqCst);
        }
    }
}

/// The projection of this database whose user code ended a previous process in this slot, if
/// any (and forgets it). A note for another database stays for that database's next worker.
pub fn take_timed_out(index: usize, extension: u32) -> Option<i32> {
    let w = shared()?.workers.get(index)?;
    if w.timed_out_database.load(Ordering::SeqCst) != my_database() {
        return None;
    }
    let v = w.timed_out.swap(0, Ordering::SeqCst);
    // A note from before the extension was dropped and created again names no projection now.
    (v > 0 && w.timed_out_extension.load(Ordering::SeqCst) == extension).then(|| (v - 1) as i32)
}

/// The database a note of `take_timed_out` in slot `index` is for, if there is one (the launcher
/// gives the slot to that database's next worker).
pub fn timed_out_database(index: usize) -> Option<u32> {
    let w = shared()?.workers.get(index)?;
    (w.timed_out.load(Ordering::SeqCst) != 0).then(|| w.timed_out_database.load(Ordering::SeqCst))
}

/// Why no worker can run this database's rebuilds and async projections.
#[derive(Debug, thiserror::Error)]
pub enum NoWorker {
    #[error("event_projections is not loaded through shared_preload_libraries, so no worker can run rebuilds or async projections")]
    NotPreloaded,
    #[error(
        "the event_projections workers serve only database \"{served}\" (event_projections.database), not this one"
    )]
    OtherDatabase { served: String },
}

impl SqlError for NoWorker {
    fn sqlstate(&self) -> PgSqlErrorCode {
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
    }
    fn hint(&self) -> Option<String> {
        Some(match self {
            NoWorker::NotPreloaded => "Add shared_preload_libraries = 'event_projections' to postgresql.conf and restart the server.".into(),
            NoWorker::OtherDatabase { .. } => "Set event_projections.database to '' (every database) or to this database in postgresql.conf and reload (SELECT pg_reload_conf()).".into(),
        })
    }
}

/// Checks that a worker can run work of this database.
pub fn require_worker() -> Result<(), NoWorker> {
    if !available() {
        return Err(NoWorker::NotPreloaded);
    }
    let served = settings::database();
    if served.is_empty() {
        return Ok(());
    }
    let here = crate::pg::backend::database_name(my_database()).unwrap_or_default();
    if served != here {
        return Err(NoWorker::OtherDatabase { served });
    }
    Ok(())
}

/// A worker process announces itself so that commits can wake it, with the extension it serves.
pub fn register_worker(index: usize, extension: u32) {
    WORKER_INDEX.store(index as i32, Ordering::SeqCst);
    if let Some(sh) = shared() {
        if index < MAX_WORKERS {
            let w = &sh.workers[index];
            w.extension.store(extension, Ordering::SeqCst);
            w.database.store(my_database(), Ordering::SeqCst);
            w.procno.store(my_procno() as u32 + 1, Ordering::SeqCst);
        }
    }
}

/// A worker process ends: commits stop waking it.
pub fn unregister_worker(index: usize) {
    if let Some(w) = shared().and_then(|sh| sh.workers.get(index)) {
        w.procno.store(0, Ordering::SeqCst);
        w.wants_wakeups.store(0, Ordering::SeqCst);
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
    let db = my_database();
    for w in &sh.workers {
        let procno = w.procno.load(Ordering::SeqCst);
        if procno != 0
            && w.database.load(Ordering::SeqCst) == db
            && (all || w.wants_wakeups.load(Ordering::SeqCst) != 0)
        {
            // SAFETY: procno - 1 is a worker's index into the PGPROC array, which lives in shared
            // memory for the life of the server; setting a latch is safe from any process.
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
    match event {
        XACT_EVENT_PRE_PREPARE if get(&HOLDING) || get(&BUMP_AT_COMMIT) => {
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
            if take(&BUMP_AT_COMMIT) {
                bump_registry_epoch();
                wake_workers_of(true); // a new async projection or rebuild: everyone looks
            }
            if take(&HOLDING) {
                release_slot();
                wake_pollers();
            }
            if take(&WAKE_AT_COMMIT) {
                wake_workers_of(false);
            }
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            set(&BUMP_AT_COMMIT, false);
            set(&WAKE_AT_COMMIT, false);
            if take(&HOLDING) {
                release_slot();
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A slot: (min_position, database), with 0 = none and PENDING drawn often enough to matter.
    fn slot() -> impl Strategy<Value = (u64, u32)> {
        (prop_oneof![Just(0u64), Just(PENDING), 1u64..200], 1u32..3)
    }

    proptest! {
        /// The mark never passes a position some backend of this database holds, never exceeds
        /// the last value, and is exactly the smaller of the two; a PENDING slot of this database
        /// always means "unsettled", whatever the others hold; other databases never matter.
        #[test]
        fn horizon_stops_below_every_position_in_flight(last in 0i64..200, slots in proptest::collection::vec(slot(), 0..8)) {
            let got = horizon_of(last, 1, slots.iter().copied());
            let mine: Vec<u64> = slots.iter().filter(|s| s.1 == 1 && s.0 != 0).map(|s| s.0).collect();
            if mine.contains(&PENDING) {
                prop_assert_eq!(got, Horizon::Unsettled);
            } else {
                let expected = mine.iter().map(|m| *m as i64 - 1).fold(last, i64::min);
                prop_assert_eq!(got, Horizon::UpTo(expected));
                for m in mine {
                    prop_assert!(expected < m as i64, "passed in-flight position {}", m);
                }
            }
        }
    }
}
