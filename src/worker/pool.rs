//! The worker pool's shared state: the launcher, and one slot per worker process saying which
//! database it serves, what it does now and since when (the `ep.workers` view reads it), and what
//! the launcher asked of it. One LWLock guards it all: it is read and written a few times per
//! worker step, never on the append path.

use crate::pg::settings::MAX_WORKERS;

/// The slot of the probe: one process at a time that only looks whether a database has the
/// extension and ends, outside the `max_workers` serving slots (so looking at databases never
/// takes a slot from one that is served).
pub const PROBE: usize = MAX_WORKERS;
use pgrx::lwlock::PgLwLock;
use pgrx::pg_sys;
use pgrx::shmem::PGRXSharedMemory;
use std::sync::atomic::{AtomicBool, Ordering};

crate::registry::sql_enum! {
    /// What a worker slot's process does now (`ep.workers.doing`). `Free`: no process in the slot;
    /// `Starting`: not yet connected or not yet sure of the extension; `Yielding`: asked to make
    /// room (or to leave the database alone), ends at its next step.
    Doing {
        Free = "free",
        Starting = "starting",
        Idle = "idle",
        Rebuilding = "rebuilding",
        Delivering = "delivering",
        Retention = "retention",
        Yielding = "yielding",
    }
}

// sql_enum! declares the enum; a #[default] variant attribute cannot pass through it.
#[allow(clippy::derivable_impls)]
impl Default for Doing {
    fn default() -> Self {
        Doing::Free
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
    /// `Pool::generation` of the launcher that started the process: one started by an earlier
    /// launcher (which crashed or was terminated) ends at its next round.
    pub generation: u64,
}

#[derive(Copy, Clone, Default, Debug)]
pub struct Pool {
    pub launcher_pid: i32,
    /// pgprocno + 1 of the launcher (0: not running), to set its latch.
    pub launcher_procno: u32,
    pub launcher_started: i64,
    /// Bumped by each launcher start.
    pub generation: u64,
    /// Bumped by CREATE EXTENSION (and ALTER EXTENSION UPDATE): the launcher then looks again at
    /// the databases it found without the extension.
    pub probe_requests: u64,
    /// The database of the latest probe request: looked at first.
    pub probe_hint: u32,
    /// A database a statement needs without other connections (`release`), and until when (a
    /// TimestampTz) the launcher starts no process there.
    pub released: u32,
    pub released_until: i64,
    /// The serving slots, then the probe's (`PROBE`).
    pub slots: [Slot; MAX_WORKERS + 1],
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

/// The launcher announces itself (its latch is what commits and workers set). Returns the slots
/// still held by processes of an earlier launcher: they are asked to end, and stay taken until
/// they have.
pub fn launcher_started() -> Vec<usize> {
    // SAFETY: plain reads of this process's identity, set before any of our code runs.
    let (pid, procno) = unsafe { (pg_sys::MyProcPid, (*pg_sys::MyProc).pgprocno as u32 + 1) };
    update(|p| {
        p.launcher_pid = pid;
        p.launcher_procno = procno;
        p.launcher_started = now();
        p.generation += 1;
        let mut held = Vec::new();
        for (i, s) in p.slots.iter_mut().enumerate() {
            if s.doing != Doing::Free {
                s.yield_requested = true;
                s.doing = Doing::Yielding;
                held.push(i);
            }
        }
        held
    })
    .unwrap_or_default()
}

/// Whether the process of slot `index` (of an earlier launcher) has ended: its pid is no longer a
/// backend's, or it never got as far as writing one within `grace_us` of its start.
pub fn orphan_gone(index: usize, grace_us: i64) -> bool {
    let Some(p) = snapshot() else { return true };
    let s = p.slots[index];
    if s.pid == 0 {
        return now() - s.started > grace_us;
    }
    // SAFETY: a lookup in the shared PGPROC array by pid, under ProcArrayLock inside.
    unsafe { pg_sys::BackendPidGetProc(s.pid).is_null() }
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
        let here = crate::pg::backend::my_database();
        pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, move || {
            update(|p| {
                p.probe_requests += 1;
                p.probe_hint = here;
            });
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
            generation: p.generation,
            ..Slot::default()
        }
    });
}

/// What slot `index`'s process found, as the launcher may trust it: a "no extension" overtaken by
/// a CREATE EXTENSION that committed since the process started counts as nothing learnt.
fn trusted(p: &Pool, s: &Slot) -> Verdict {
    match s.verdict {
        Verdict::NoExtension if p.probe_requests != s.probes_at_start => Verdict::Unknown,
        v => v,
    }
}

/// What slot `index`'s running process has found so far (`trusted`).
pub fn verdict(index: usize) -> Verdict {
    snapshot().map(|p| trusted(&p, &p.slots[index])).unwrap_or_default()
}

/// The launcher empties a slot whose process ended, and learns what it found (`trusted`).
pub fn release(index: usize) -> Verdict {
    update(|p| {
        let s = std::mem::take(&mut p.slots[index]);
        trusted(p, &s)
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

/// What a slot says its process does: restored by `restore` after a step that found nothing to do,
/// so that an idle worker looking at its projections stays `idle` since it last did work.
#[derive(Clone, Copy)]
pub struct Reported {
    doing: Doing,
    projection: i32,
    since: i64,
}

/// A worker process reports what it does now, and gets what the slot said before. True in `.1`
/// when it should end (the launcher asked it to, or a later launcher runs).
pub fn report(index: usize, doing: Doing, projection: i32) -> (Option<Reported>, bool) {
    update(|p| {
        let generation = p.generation;
        let s = &mut p.slots[index];
        let before = Reported { doing: s.doing, projection: s.projection, since: s.since };
        let end = s.yield_requested || s.generation != generation;
        if !end && (s.doing != doing || s.projection != projection) {
            s.doing = doing;
            s.projection = projection;
            s.since = now();
        }
        (Some(before), end)
    })
    .unwrap_or((None, false))
}

/// Puts back what `report` replaced (the step it announced found nothing to do).
pub fn restore(index: usize, before: Option<Reported>) {
    let Some(b) = before else { return };
    update(|p| {
        let s = &mut p.slots[index];
        if !s.yield_requested {
            (s.doing, s.projection, s.since) = (b.doing, b.projection, b.since);
        }
    });
}

/// Leaves database `database` to a statement that needs it alone: its processes are asked to end
/// and none starts there for `pause`. False when no process of the pool is connected to it.
pub fn release_database(database: u32, pause: std::time::Duration) -> bool {
    let asked = update(|p| {
        let mut asked = false;
        for s in p.slots.iter_mut().filter(|s| s.doing != Doing::Free && s.database == database) {
            s.yield_requested = true;
            s.doing = Doing::Yielding;
            asked = true;
        }
        p.released = database;
        p.released_until = now() + pause.as_micros() as i64;
        asked
    })
    .unwrap_or(false);
    wake_launcher();
    asked
}

/// Whether some process of the pool is (still) connected to `database`.
pub fn serves(database: u32) -> bool {
    snapshot().is_some_and(|p| p.slots.iter().any(|s| s.doing != Doing::Free && s.database == database))
}

/// Whether the launcher must leave `database` alone for now (`release_database`).
pub fn is_released(database: u32) -> bool {
    snapshot().is_some_and(|p| p.released == database && now() < p.released_until)
}

/// The statement that needed `database` alone is over: the launcher may serve it again.
pub fn end_release(database: u32) {
    update(|p| {
        if p.released == database {
            p.released_until = 0;
        }
    });
    wake_launcher();
}
