//! The background processes: the launcher (`launcher`) keeps worker processes running for every
//! database that has the extension, `event_projections.max_workers` of them in all; each worker
//! serves one database, running rebuild steps and async deliveries (`delivery`). A projection is
//! worked on by one process at a time: the one holding its session-level ownership lock. What each
//! process does now is in the shared pool (`pool`, read by `ep.workers`).
//!
//! A worker never holds a lock between steps other than ownership locks (advisory, session level),
//! so it never blocks `DROP EXTENSION`; it ends when the extension is dropped, and when the
//! launcher wants its slot for another database.

pub mod delivery;
pub mod launcher;
pub mod pool;
pub mod release;

use crate::handoff;
use crate::handoff::inflight;
use crate::pg::catalog;
use crate::pg::settings;
use crate::rebuild::{self, Progress};
use crate::registry::{self, Projection, ProjectionMode};
use crate::sandbox::replay;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pool::{Doing, Verdict};
use std::time::{Duration, Instant};

/// Registers the launcher, which starts the worker processes (from `_PG_init`, during
/// shared_preload_libraries).
pub fn register() {
    launcher::register();
}

/// PostgreSQL's own signal handlers, by their C symbols (pgrx wraps the declarations it exports,
/// and a signal handler must be the C function itself).
mod signals {
    unsafe extern "C-unwind" {
        pub fn die(signal: std::ffi::c_int);
        pub fn SignalHandlerForConfigReload(signal: std::ffi::c_int);
    }
}

/// `lock_timeout` of every worker transaction (hand-offs use the shorter hand-off timeout).
const WORKER_LOCK_TIMEOUT_MS: i32 = 200;

/// How a step ended, as the scheduler sees it.
enum Outcome {
    Progress(Progress),
    Idle,
    /// `stop`: do not retry (the code ran past the handler timeout).
    Failed {
        message: String,
        position: i64,
        stop: bool,
    },
}

/// Installs PostgreSQL's own signal handlers and unblocks signals (launcher and workers).
fn install_signal_handlers() {
    // SAFETY: installs PostgreSQL's own signal handlers before signals are unblocked, as every
    // background worker does.
    unsafe {
        // SIGTERM: the standard `die`, so CHECK_FOR_INTERRUPTS ends even a long handler cleanly.
        pg_sys::pqsignal(pg_sys::SIGHUP as i32, Some(signals::SignalHandlerForConfigReload));
        pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(signals::die));
        pg_sys::BackgroundWorkerUnblockSignals();
    }
}

/// Reads postgresql.conf again after a SIGHUP.
fn reload_config_if_asked() {
    // SAFETY: the reload flag set by SignalHandlerForConfigReload, handled as PostgreSQL's own
    // processes do, between transactions.
    unsafe {
        if pg_sys::ConfigReloadPending != 0 {
            pg_sys::ConfigReloadPending = 0;
            pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
        }
    }
}

/// Sets a setting of this worker's session, once after connecting.
fn set_session_setting(name: &std::ffi::CStr, value: &std::ffi::CStr) {
    // SAFETY: NUL-terminated name and value, outside any transaction, in this process's session.
    unsafe {
        pg_sys::SetConfigOption(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
        );
    }
}

/// A worker process: serves the database the launcher started it for (its oid in `bgw_extra`),
/// in slot `arg` of the pool, until the launcher asks it to end or the extension is dropped.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn ep_worker_main(arg: pg_sys::Datum) {
    // SAFETY: the launcher passes the slot index as an Int32 datum.
    let index = unsafe { i32::from_datum(arg, false) }.unwrap_or(0) as usize;
    install_signal_handlers();
    let Ok(oid) = pgrx::bgworkers::BackgroundWorker::get_extra().parse::<u32>() else {
        warning!("event_projections worker {}: started without a database", index + 1);
        return;
    };
    // A database dropped meanwhile is a FATAL here; the launcher notices the process ended.
    pgrx::bgworkers::BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(oid)), None);
    let name = std::ffi::CString::new(format!("event_projections worker {}", index + 1)).unwrap_or_default();
    // The setting (not only the pg_stat_activity field), so that handlers can tell too.
    set_session_setting(c"application_name", &name);
    // SAFETY: reports this process's application name, NUL-terminated.
    unsafe { pg_sys::pgstat_report_appname(name.as_ptr()) };
    // The worker's statements are short and planned once; JIT would only add a compiler's worth
    // of memory to the process the first time a count over a large log crosses jit_above_cost
    // (the benchmark saw the worker grow by 10 MiB that way).
    set_session_setting(c"jit", c"off");
    // The worker's own SQL resolves names in pg_catalog only (user code runs in the sandbox,
    // which sets its own path and undoes every setting it changes).
    set_session_setting(c"search_path", c"pg_catalog, pg_temp");
    crate::sandbox::init_worker_timeouts();

    let installed = in_transaction("event_projections: looking for the extension", || {
        // SAFETY: a syscache lookup by name, missing_ok, in a transaction.
        catalog::lookup().map(|_| unsafe { pg_sys::get_extension_oid(c"event_projections".as_ptr(), true) }.to_u32())
    });
    let Ok(Some(extension)) = installed else {
        pool::set_verdict(index, Verdict::NoExtension);
        return;
    };
    pool::set_verdict(index, Verdict::Serving);
    if index == pool::PROBE {
        return; // the probe only looks; the launcher starts the serving workers
    }
    let timed_out = inflight::take_timed_out(index, extension);
    inflight::register_worker(index, extension);
    if let Some(id) = timed_out {
        let message = format!(
            "its code ran longer than event_projections.handler_timeout ({} ms) and went on after being cancelled, so the worker process was ended",
            settings::handler_timeout_ms()
        );
        let _ = in_transaction("event_projections: recording a failure", || {
            record_failure(id, &message, replay::last_attempted(), true)
        });
    }
    let database = in_transaction("event_projections: starting", || {
        crate::pg::backend::database_name(crate::pg::backend::my_database())
    })
    .ok()
    .flatten()
    .unwrap_or_default();
    log!("event_projections worker {} serving database \"{}\"", index + 1, database);

    // SAFETY: a memory context under TopMemoryContext, for the life of the process.
    let worker_cxt = unsafe {
        pg_sys::AllocSetContextCreateExtended(
            pg_sys::TopMemoryContext,
            c"event_projections worker".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        )
    };
    let mut round: usize = 0;
    loop {
        pgrx::check_for_interrupts!();
        reload_config_if_asked();
        // SAFETY: the context switch and reset are of this worker's own context, between
        // transactions (nothing of a transaction lives in it).
        unsafe {
            pg_sys::MemoryContextSwitchTo(worker_cxt);
            pg_sys::MemoryContextReset(worker_cxt);
        }
        if pool::report(index, Doing::Idle, 0).1 {
            // The launcher wants the slot for another database; no lock is held between rounds.
            inflight::unregister_worker(index);
            return;
        }
        let Some(busy) = run_round(index, index + round) else {
            log!("event_projections worker {}: the extension was dropped from database \"{}\"", index + 1, database);
            inflight::unregister_worker(index);
            pool::set_verdict(index, Verdict::NoExtension);
            return;
        };
        round = round.wrapping_add(1);
        if !busy {
            rebuild_sleep(settings::naptime_ms() as i64);
        }
    }
}

fn rebuild_sleep(ms: i64) {
    // SAFETY: reports this process's state; a NULL activity is allowed.
    unsafe {
        pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, std::ptr::null());
    }
    crate::pg::backend::sleep_ms(ms);
}

/// Runs `f` in a transaction of its own at READ COMMITTED (the protocol's reads after a lock rely on
/// a new snapshot per statement). An ERROR rolls it back and comes back as `Err`; FATAL and
/// shutdown requests are raised again.
fn in_transaction<R>(activity: &str, f: impl FnOnce() -> R) -> Result<R, (PgSqlErrorCode, String)> {
    // SAFETY: a plain read of the current memory context.
    let cxt = unsafe { pg_sys::CurrentMemoryContext };
    // SAFETY: a worker transaction begun outside any other (the caller is the main loop), with
    // an active snapshot; it is committed or aborted below on every path.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::XactIsoLevel = pg_sys::XACT_READ_COMMITTED as i32;
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        // Shorter than deadlock_timeout: when a step and a user's DDL (DROP EXTENSION, ALTER TABLE
        // on a read model) wait for each other, the step gives up and is retried later, instead of
        // the deadlock detector possibly cancelling the user's statement.
        handoff::set_local_lock_timeout(WORKER_LOCK_TIMEOUT_MS);
        let a = std::ffi::CString::new(activity).unwrap_or_default();
        pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, a.as_ptr());
    }
    let f = std::panic::AssertUnwindSafe(f);
    let result = PgTryBuilder::new(move || {
        let f = f; // the whole AssertUnwindSafe, not the closure inside it
        let r = (f.0)();
        // SAFETY: pops the snapshot pushed above and commits the transaction begun above.
        unsafe {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        }
        Ok(r)
    })
    .catch_others(|e| {
        let r = crate::pg::error::caught_report(&e);
        let message = match r.detail() {
            Some(d) => format!("{} ({})", r.message(), d),
            None => r.message().to_string(),
        };
        let (level, code) = (r.level(), r.sql_error_code());
        // SAFETY: a plain read of an interrupt flag.
        if level >= PgLogLevel::FATAL || unsafe { pg_sys::ProcDiePending != 0 } {
            e.rethrow();
        }
        Err((code, message))
    })
    .execute();
    if result.is_err() {
        // SAFETY: aborts the transaction begun above, after the error was caught (pgrx's
        // BackgroundWorker::transaction does not, which is why this one exists).
        unsafe {
            pg_sys::AbortCurrentTransaction();
        }
    }
    // SAFETY: back to the context the caller had.
    unsafe {
        pg_sys::MemoryContextSwitchTo(cxt);
    }
    result
}

/// The projections that may have work, in a rotating order so workers spread over them; None
/// when the extension is not installed (any more).
fn candidates(rotate: usize) -> Option<Vec<Projection>> {
    let r = in_transaction("event_projections: scanning projections", || {
        catalog::lookup()?;
        let open: Vec<i32> = Spi::connect(|c| {
            c.select("SELECT projection_id FROM ep.rebuilds WHERE status IN ('queued', 'running')", None, &[])
                .map(|t| t.filter_map(|r| r.get::<i32>(1).ok().flatten()).collect())
                .unwrap_or_default()
        });
        Some(
            registry::all()
                .into_iter()
                .filter(|p| p.mode == ProjectionMode::Async || open.contains(&p.id))
                .collect::<Vec<_>>(),
        )
    });
    // A failed scan (a lock timeout against DDL, say) is no work this round, not a dropped extension.
    let mut v = match r {
        Ok(found) => found?,
        Err(_) => Vec::new(),
    };
    if !v.is_empty() {
        let k = rotate % v.len();
        v.rotate_left(k);
    }
    Some(v)
}

/// One pass over the projections. True when any step did work; None when the extension is gone.
fn run_round(index: usize, rotate: usize) -> Option<bool> {
    let mut busy = false;
    let work = candidates(rotate)?;
    inflight::want_wakeups(index, !work.is_empty());
    for p in work {
        // Asked to end: the round stops between projections (the caller ends the process).
        if pool::report(index, Doing::Idle, 0).1 {
            break;
        }
        let owned = in_transaction("event_projections: claiming", || handoff::try_own(p.id as u32)).unwrap_or(false);
        if !owned {
            continue;
        }
        busy |= work_on(index, p.id, p.mode);
        handoff::disown(p.id as u32);
    }
    busy |= retention(index);
    Some(busy)
}

/// The database's retention work, for up to a time slice, by one worker at a time (the one that
/// holds its ownership lock). True when any step did work.
fn retention(index: usize) -> bool {
    let owned = in_transaction("event_projections: claiming retention", || {
        catalog::lookup().is_some_and(|c| crate::retention::installed(&c)) && handoff::try_own(handoff::RETENTION)
    })
    .unwrap_or(false);
    if !owned {
        return false;
    }
    let slice = Instant::now();
    let mut busy = false;
    while slice.elapsed() < Duration::from_millis(200) {
        if pool::report(index, Doing::Retention, 0).1 {
            break;
        }
        match in_transaction("event_projections: retention", crate::retention::step) {
            Ok(true) => busy = true,
            Ok(false) => break,
            // A lock another transaction holds (a rebuild being queued, a registration reading
            // the log, a handler's own lock): the step is tried again next round.
            Err((PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE, _)) => break,
            Err((_, message)) => {
                let _ = in_transaction("event_projections: recording a retention failure", || {
                    crate::retention::record_failure(&message)
                });
                busy = true;
                break;
            }
        }
    }
    pool::report(index, Doing::Idle, 0);
    handoff::disown(handoff::RETENTION);
    busy
}

/// Steps of one projection for up to a time slice. True when any did work.
fn work_on(index: usize, id: i32, mode: ProjectionMode) -> bool {
    let slice = Instant::now();
    let mut busy = false;
    let doing = match mode {
        ProjectionMode::Inline => Doing::Rebuilding,
        ProjectionMode::Async => Doing::Delivering,
    };
    while slice.elapsed() < Duration::from_millis(200) {
        let (before, end) = pool::report(index, doing, id);
        if end {
            return busy;
        }
        inflight::working_on(id);
        let outcome = in_transaction("event_projections: step", || step(id));
        inflight::working_on(0);
        let timed_out = crate::sandbox::take_timed_out();
        let outcome = match outcome {
            Ok(o) => o,
            Err((PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE, _)) => Outcome::Progress(Progress::LockBusy),
            // In a worker only the handler timeout (or an administrator) cancels: stop, do not retry.
            Err((PgSqlErrorCode::ERRCODE_QUERY_CANCELED, message)) => Outcome::Failed {
                message: if timed_out && !message.contains("handler_timeout") {
                    format!(
                        "{message}: its code ran longer than event_projections.handler_timeout ({} ms)",
                        settings::handler_timeout_ms()
                    )
                } else {
                    message
                },
                position: replay::last_attempted(),
                stop: true,
            },
            Err((_, message)) => Outcome::Failed { message, position: replay::last_attempted(), stop: false },
        };
        match outcome {
            Outcome::Progress(Progress::Busy) => busy = true,
            Outcome::Progress(Progress::Finished) => return true,
            Outcome::Progress(Progress::LockBusy) => {
                // Let the appends that queued behind our request through, then try again.
                crate::pg::backend::sleep_ms(5);
                busy = true;
            }
            Outcome::Idle => {
                // Nothing to do: the slot says what it said before this look.
                pool::restore(index, before);
                return busy;
            }
            Outcome::Failed { message, position, stop } => {
                let _ = in_transaction("event_projections: recording a failure", || {
                    record_failure(id, &message, position, stop)
                });
                return busy;
            }
        }
    }
    busy
}

/// One step of projection `id`, read afresh.
fn step(id: i32) -> Outcome {
    let Some(cat) = catalog::lookup() else { return Outcome::Idle };
    let Some(p) = registry::by_id(id) else { return Outcome::Idle };
    let activity = match p.mode {
        ProjectionMode::Inline => format!("event_projections: rebuilding {}", p.name),
        ProjectionMode::Async => format!("event_projections: delivering to {}", p.name),
    };
    // SAFETY: reports this process's activity with a NUL-terminated string.
    unsafe {
        let a = std::ffi::CString::new(activity).unwrap_or_default();
        pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, a.as_ptr());
    }
    // User code in the step may release this process's session locks (pg_advisory_unlock_all), and
    // then another worker may run the projection at the same time. Every checkpoint moves only from
    // the position its step started at (`rebuild::advance`, `delivery::deliver`): of two such steps
    // one commits, the other rolls back, so nothing is applied twice.
    match p.mode {
        ProjectionMode::Inline => match rebuild::open(p.id) {
            Some(r) => Outcome::Progress(rebuild::step_inline(&cat, &p, &r)),
            None => Outcome::Idle,
        },
        ProjectionMode::Async => match delivery::step(&cat, &p) {
            Some(progress) => Outcome::Progress(progress),
            None => Outcome::Idle,
        },
    }
}

/// Records a failed step of projection `id`; with `stop`, the projection (or its rebuild) stops
/// as failed at once instead of being retried.
fn record_failure(id: i32, message: &str, position: i64, stop: bool) {
    let Some(cat) = catalog::lookup() else { return };
    let Some(p) = registry::by_id(id) else { return };
    warning!("event_projections: projection \"{}\": {}", p.name, message);
    match rebuild::open(p.id) {
        Some(r) => {
            let attempts = rebuild::record_failure(&cat, &r, message);
            if stop || attempts >= settings::max_attempts() as i64 {
                let _ = rebuild::finish_unsuccessfully(&cat, &p, &r, rebuild::RebuildStatus::Failed, Some(message));
            }
        }
        None => delivery::record_failure(&cat, &p, message, position, stop),
    }
}
