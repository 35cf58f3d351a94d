//! The extension's settings (GUCs). Documented in README.md, "Settings".

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

/// Upper bound on `event_projections.max_workers` (the shared worker slots are sized by it).
pub const MAX_WORKERS: usize = 16;

static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
static WORKERS: GucSetting<i32> = GucSetting::<i32>::new(2);
static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1000);
static HANDOFF_LOCK_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(20);
static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(5);
static RETRY_BACKOFF: GucSetting<i32> = GucSetting::<i32>::new(100);
static NAPTIME: GucSetting<i32> = GucSetting::<i32>::new(1000);
static HANDLER_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(60_000);
static REPLAY_RANGE: GucSetting<i32> = GucSetting::<i32>::new(1_000_000);
static RETENTION_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(60_000);

pub fn define() {
    GucRegistry::define_string_guc(
        c"event_projections.database",
        c"Only database served by the event_projections background workers; empty: every database.",
        c"By default the workers run rebuilds and async projections of every database that has the extension.",
        &DATABASE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"event_projections.max_workers",
        c"Most event_projections worker processes, over all databases.",
        c"The launcher shares them fairly among the databases that have the extension; each projection's rebuild or async delivery is run by one of them at a time. max_worker_processes must leave room for these and the launcher.",
        &WORKERS,
        1,
        MAX_WORKERS as i32,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"event_projections.batch_size",
        c"Events per transaction in replays and async delivery, and per call of a batch handler.",
        c"",
        &BATCH_SIZE,
        1,
        1_000_000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"event_projections.handoff_lock_timeout",
        c"How long a rebuild hand-off waits for its exclusive lock before backing off and retrying.",
        c"Appends queued behind a waiting hand-off are delayed at most this long by it.",
        &HANDOFF_LOCK_TIMEOUT,
        1,
        60_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"event_projections.max_attempts",
        c"Attempts of a failing async handler before its projection stops.",
        c"",
        &MAX_ATTEMPTS,
        1,
        1000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"event_projections.retry_backoff",
        c"First delay before retrying a failed async batch; doubles with each attempt.",
        c"",
        &RETRY_BACKOFF,
        1,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"event_projections.naptime",
        c"Longest sleep of an idle worker between looks at the catalog.",
        c"Commits that append wake the workers at once; this only bounds how late they notice other changes.",
        &NAPTIME,
        10,
        60_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"event_projections.handler_timeout",
        c"Longest a call of user code (handler, setup function) may run in a worker; 0 disables.",
        c"A call that runs longer is cancelled, and the worker process ends if the code catches the cancel; the projection (or its rebuild) stops as failed.",
        &HANDLER_TIMEOUT,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"event_projections.replay_range",
        c"Most log positions one call of a replay handler covers.",
        c"Larger ranges replay faster (fewer merges into the model) and make longer transactions.",
        &REPLAY_RANGE,
        1,
        i32::MAX,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"event_projections.retention_interval",
        c"Shortest time between two scans of the streams a retention policy matches.",
        c"Each scan cuts the streams that fell out of the policy; the cut events are removed as the consumers let it, whatever this says.",
        &RETENTION_INTERVAL,
        10,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    // SAFETY: reserves our prefix (unknown event_projections.* settings become errors), once at load.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"event_projections".as_ptr()) };
}

pub fn database() -> String {
    DATABASE.get().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}
pub fn max_workers() -> usize {
    WORKERS.get() as usize
}
pub fn batch_size() -> i32 {
    BATCH_SIZE.get()
}
pub fn handoff_lock_timeout_ms() -> i32 {
    HANDOFF_LOCK_TIMEOUT.get()
}
pub fn max_attempts() -> i32 {
    MAX_ATTEMPTS.get()
}
pub fn retry_backoff_ms() -> i32 {
    RETRY_BACKOFF.get()
}
pub fn naptime_ms() -> i32 {
    NAPTIME.get()
}
pub fn handler_timeout_ms() -> i32 {
    HANDLER_TIMEOUT.get()
}
pub fn replay_range() -> i32 {
    REPLAY_RANGE.get()
}
pub fn retention_interval_ms() -> i32 {
    RETENTION_INTERVAL.get()
}
