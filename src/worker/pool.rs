//! The worker pool's shared state: the launcher, and one slot per worker process saying which
//! database it serves, what it does now and since when (the `ep.workers` view reads it), and what
//! the launcher asked of it. One LWLock guards it all: it is read and written a few times per
//! worker step, never on the append path.

use crate::pg::settings::MAX_WORKERS;
use pgrx::lwlock::PgLwLock;
use pgrx::pg_sys;
use pgrx::shmem::PGRXSharedMemory;
use std::sync::atomic::{AtomicBool, Ordering};

/// What a worker slot's process does now.
#[derive(Copy, Clone, Default, Debug, PartialEq, Eq)]
pub enum Doing {
    /// No process in the slot.
    #[default]
    Free,
    /// Started, not yet connected or not yet sure the database has the extension.
    Starting,
    Idle,
    Rebuilding,
    Delivering,
    /// Asked to make room for another database's worker; ends at its next round.
    Yielding,
}

impl Doing {
    pub fn as_sql(self) -> &'static str {
        match self {
            Doing::Free => "free",
            Doing::Starting => "starting",
            Doing::Idle => "idle",
            Doing::Rebuilding => "rebuilding",
            Doing::Delivering => "delivering",
            Doing::Yielding => "yielding",
        }
    }
}

/// What a worker found about its database, for the launcher to read after the process ends.
#[derive(Copy, Clone, Default, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing known (it never connected, or crashed before it could tell).
    #[default]
    Unknown,
    /// The database has the extension; the worker serves it.
    Serving,
    /// The database does not have the extension (or it was dropped).
    NoExtension,
}

#[derive(Copy, Clone, Default, Debug)]
pub struct Slot {
    pub pid: i32,
    /// The database the launcher started this slot's process for.
    pub database: u32,
    pub doing: Doing,
    /// The projection being worked on (0: none).
    pub projection: i32,
    /// When `doing` or `projection` last changed (TimestampTz).
    pub since: i64,
    pub started: i64,
    pub yield_requested: bool,
    pub verdict: Verdict,
    /// `Pool::probe_requests` when the process was started: a "no extension" verdict is stale if
    /// CREATE EXTENSION committed since (the process may have looked before the commit).
    pub probes_at_start: u64,
}

#[derive(Copy, Clone, Default, Debug)]
pub struct Pool {
    pub launcher_pid: i32,
    /// pgprocno + 1 of the launcher (0: not running), to set its latch.
    pub launcher_procno: u32,
    pub launcher_started: i64,
    /// Bumped by CREATE EXTENSION (and ALTER EXTENSION UPDATE): the launcher then looks again at
    /// the databases it found without the extension.
    pub probe_requests: u64,
    pub slots: [Slot; MAX_WORKERS],
}

// SAFETY: Pool is plain old data (integers, bools and fieldless enums, no pointers), so a copy in
// shared memory means the same in every process.
unsafe impl PGRXSharedMemory for Pool {}

// SAFETY: the lock's name is ours alone (the extension's prefix); pg_shmem_init! in init() attaches
// it to shared memory before any process uses it, and every use checks `available()` first.
static POOL: PgLwLock<Pool> = unsafe { PgLwLock::new(c"event_projections pool") };
static INITIALIZED: AtomicBool = AtomicBool::new(false);

/// Requests the shared block and its lock (from `_PG_init`, while preloading).
pub fn init() {
    use pgrx::pg_guard;
    pgrx::pg_shmem_init!(POOL);
    // Set in the postmaster before it forks any process that reads it.
    INITIALIZED.store(true, Ordering::SeqCst);
}

/// The pool exists only when the library was preloaded.
fn available() -> bool {
    INITIALIZED.load(Ordering::SeqCst)
}

fn now() -> i64 {
    // SAFETY: reads the clock; no state.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// A copy of the whole pool (None when not preloaded).
pub fn snapshot() -> Option<Pool> {
    available().then(|| *POOL.share())
}

/// Runs `f` on the pool under the exclusive lock (nothing when not preloaded).
fn update<R>(f: impl FnOnce(&mut Pool) -> R) -> Option<R> {
    available().then(|| f(&mut POOL.exclusive()))
}

/// The launcher announces itself (its latch is what commits and workers set).
pub fn launcher_started() {
    // SAFETY: plain reads of this process's identity, set before any of our code runs.
    let (pid, procno) = unsafe { (pg_sys::MyProcPid, (*pg_sys::MyProc).pgprocno as u32 + 1) };
    update(|p| {
        p.launcher_pid = pid;
        p.launcher_procno = procno;
        p.launcher_started = now();
    });
}

/// Wakes the launcher, if it runs.
pub fn wake_launcher() {
    let Some(procno) = snapshot().map(|p| p.launcher_procno).filter(|n| *n != 0) else { return };
    // SAFETY: procno - 1 is the launcher's index into the PGPROC array, which lives in shared
    // memory for the life of the server; setting a latch is safe from any process.
    unsafe {
        let proc_ = (*pg_sys::ProcGlobal).allProcs.add(procno as usize - 1);
        pg_sys::SetLatch(&mut (*proc_).procLatch);
    }
}

/// CREATE EXTENSION runs here: once it commits, the launcher should look again at the databases
/// it found without the extension (a worker looking before the commit would not see it).
pub fn request_probe() {
    if available() {
        pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, || {
            update(|p| p.probe_requests += 1);
            wake_launcher();
        });
    }
}

/// The launcher hands slot `index` to a new process for `database`.
pub fn assign(index: usize, database: u32) {
    update(|p| {
        p.slots[index] = Slot {
            database,
            doing: Doing::Starting,
            since: now(),
            started: now(),
            probes_at_start: p.probe_requests,
            ..Slot::default()
        }
    });
}

/// The launcher empties a slot whose process ended, and learns what it found (a "no extension"
/// overtaken by a CREATE EXTENSION that committed meanwhile counts as nothing learnt).
pub fn release(index: usize) -> Verdict {
    update(|p| {
        let s = std::mem::take(&mut p.slots[index]);
        match s.verdict {
            Verdict::NoExtension if p.probe_requests != s.probes_at_start => Verdict::Unknown,
            v => v,
        }
    })
    .unwrap_or_default()
}

/// The launcher asks slot `index`'s process to end at its next round.
pub fn request_yield(index: usize) {
    update(|p| {
        let s = &mut p.slots[index];
        s.yield_requested = true;
        s.doing = Doing::Yielding;
        s.since = now();
    });
}

/// A worker process says what it found about its database.
pub fn set_verdict(index: usize, verdict: Verdict) {
    update(|p| {
        // SAFETY: a plain read of this process's pid.
        p.slots[index].pid = unsafe { pg_sys::MyProcPid };
        p.slots[index].verdict = verdict;
    });
    wake_launcher();
}

/// A worker process reports what it does now. True when the launcher asked it to end.
pub fn report(index: usize, doing: Doing, projection: i32) -> bool {
    update(|p| {
        let s = &mut p.slots[index];
        if !s.yield_requested && (s.doing != doing || s.projection != projection) {
            s.doing = doing;
            s.projection = projection;
            s.since = now();
        }
        s.yield_requested
    })
    .unwrap_or(false)
}
