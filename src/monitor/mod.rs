//! What a DBA watches: `ep_status()`, the whole state of this database's event store in one jsonb
//! document (serde types below, documented field by field in README "Monitoring"), and the worker
//! processes of every database (`ep.workers`).
//!
//! Everything read from tables goes through the status views with the caller's rights, so a role
//! sees in `ep_status()` exactly the projections and subscriptions `ep.projection_status` and
//! `ep.subscription_status` show it. Positions and worker states come from shared memory.

use crate::handoff::{highwater, inflight};
use crate::pg::backend::{database_name, my_database};
use crate::pg::catalog;
use crate::worker::pool::{self, Pool};
use pgrx::prelude::*;
use pgrx::spi::SpiHeapTupleData;
use serde::Serialize;

type Ts = pgrx::datum::TimestampWithTimeZone;

#[derive(Serialize)]
pub struct Status {
    /// Version of the loaded library.
    pub library_version: &'static str,
    /// Version of the extension's SQL objects in this database (differs from the library's until
    /// ALTER EXTENSION event_projections UPDATE).
    pub extension_version: Option<String>,
    pub database: String,
    /// Whether the library is in shared_preload_libraries (without it no worker runs).
    pub preloaded: bool,
    /// Every position at or below it is committed and visible, or never will be.
    pub high_water: i64,
    pub in_flight: InFlight,
    pub projections: Vec<ProjectionStatus>,
    pub subscriptions: Vec<SubscriptionStatus>,
    pub launcher: Option<LauncherStatus>,
    /// The worker processes of every database.
    pub workers: Vec<WorkerStatus>,
}

#[derive(Serialize)]
pub struct InFlight {
    /// The smallest position an open transaction of this database holds uncommitted.
    pub oldest_position: Option<i64>,
    /// When that transaction began.
    pub oldest_since: Option<Ts>,
    pub oldest_age_seconds: Option<f64>,
}

#[derive(Serialize)]
pub struct ProjectionStatus {
    pub name: String,
    pub mode: String,
    pub status: String,
    pub position: Option<i64>,
    pub head_position: Option<i64>,
    pub lag_events: Option<i64>,
    pub lag_seconds: Option<f64>,
    pub attempts: Option<i32>,
    pub failing_position: Option<i64>,
    pub last_error: Option<String>,
    pub last_applied_at: Option<Ts>,
    pub rebuild: Option<RebuildStatus>,
}

#[derive(Serialize)]
pub struct RebuildStatus {
    pub id: i64,
    pub strategy: Option<String>,
    pub status: Option<String>,
    pub phase: Option<String>,
    pub events_done: Option<i64>,
    pub events_total: Option<i64>,
    pub progress_pct: Option<f64>,
    pub error: Option<String>,
}

#[derive(Serialize)]
pub struct SubscriptionStatus {
    pub subscription: String,
    pub member: i32,
    pub members: i32,
    pub position: i64,
    pub lag_events: Option<i64>,
    pub lag_seconds: Option<f64>,
    pub last_poll_at: Option<Ts>,
    pub last_ack_at: Option<Ts>,
}

#[derive(Serialize)]
pub struct LauncherStatus {
    pub pid: i32,
    pub started: Option<Ts>,
}

#[derive(Serialize)]
pub struct WorkerStatus {
    pub slot: i32,
    pub pid: Option<i32>,
    pub database: Option<String>,
    /// starting, idle, rebuilding, delivering or yielding.
    pub doing: &'static str,
    pub projection_id: Option<i32>,
    /// The projection's name, for workers of this database.
    pub projection: Option<String>,
    pub since: Option<Ts>,
    pub started: Option<Ts>,
}

fn timestamp(ts: i64) -> Option<Ts> {
    (ts != 0).then(|| Ts::try_from(ts).ok()).flatten()
}

fn age_seconds(ts: i64) -> f64 {
    // SAFETY: reads the clock.
    let now = unsafe { pgrx::pg_sys::GetCurrentTimestamp() };
    (now - ts) as f64 / 1e6
}

/// The worker processes of every database (the `ep.workers` view), with this database's projection
/// names resolved.
pub fn workers() -> Vec<WorkerStatus> {
    let Some(pool) = pool::snapshot() else { return Vec::new() };
    let names = projection_names();
    worker_rows(&pool, &names)
}

fn worker_rows(pool: &Pool, names: &[(i32, String)]) -> Vec<WorkerStatus> {
    let here = my_database();
    pool.slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.doing != pool::Doing::Free)
        .map(|(i, s)| WorkerStatus {
            slot: i as i32 + 1,
            pid: (s.pid != 0).then_some(s.pid),
            database: database_name(s.database),
            doing: s.doing.as_str(),
            projection_id: (s.projection != 0).then_some(s.projection),
            projection: (s.database == here && s.projection != 0)
                .then(|| names.iter().find(|(id, _)| *id == s.projection).map(|(_, n)| n.clone()))
                .flatten(),
            since: timestamp(s.since),
            started: timestamp(s.started),
        })
        .collect()
}

/// Ids and names of the projections the caller may see in `ep.projection_status`, when it may
/// also read those two columns of the registry (the view has no ids); otherwise none, and workers
/// show only ids. Like every query here it runs with the caller's rights, so the caller's
/// search_path can only mislead the caller; operators are named with their schema all the same.
fn projection_names() -> Vec<(i32, String)> {
    let may_read = catalog::lookup().is_some()
        && Spi::get_one::<bool>(
            "SELECT pg_catalog.has_column_privilege('ep.projections', 'id', 'SELECT') \
                AND pg_catalog.has_column_privilege('ep.projections', 'name', 'SELECT')",
        )
        .ok()
        .flatten()
        .unwrap_or(false);
    if !may_read {
        return Vec::new();
    }
    Spi::connect(|c| {
        c.select("SELECT p.id, p.name FROM ep.projections p JOIN ep.projection_status s ON s.name = p.name", None, &[])
            .map(|rows| rows.filter_map(|r| Some((r.get::<i32>(1).ok()??, r.get::<String>(2).ok()??))).collect())
            .unwrap_or_default()
    })
}

fn opt<T: pgrx::IntoDatum + pgrx::FromDatum>(r: &SpiHeapTupleData, col: usize) -> Option<T> {
    r.get::<T>(col).ok().flatten()
}

fn projections() -> Vec<ProjectionStatus> {
    Spi::connect(|c| {
        let rows = c.select(
            "SELECT name, mode, status, position, head_position, lag_events, lag_seconds, attempts, failing_position,
                    last_error, last_applied_at, rebuild_id, rebuild_strategy, rebuild_status, rebuild_phase,
                    rebuild_events_done, rebuild_events_total, rebuild_progress_pct::float8, rebuild_error
               FROM ep.projection_status ORDER BY name",
            None,
            &[],
        );
        let Ok(rows) = rows else { return Vec::new() };
        rows.map(|r| ProjectionStatus {
            name: opt(&r, 1).unwrap_or_default(),
            mode: opt(&r, 2).unwrap_or_default(),
            status: opt(&r, 3).unwrap_or_default(),
            position: opt(&r, 4),
            head_position: opt(&r, 5),
            lag_events: opt(&r, 6),
            lag_seconds: opt(&r, 7),
            attempts: opt(&r, 8),
            failing_position: opt(&r, 9),
            last_error: opt(&r, 10),
            last_applied_at: opt(&r, 11),
            rebuild: opt::<i64>(&r, 12).map(|id| RebuildStatus {
                id,
                strategy: opt(&r, 13),
                status: opt(&r, 14),
                phase: opt(&r, 15),
                events_done: opt(&r, 16),
                events_total: opt(&r, 17),
                progress_pct: opt(&r, 18),
                error: opt(&r, 19),
            }),
        })
        .collect()
    })
}

fn subscriptions() -> Vec<SubscriptionStatus> {
    Spi::connect(|c| {
        let rows = c.select(
            "SELECT subscription, member, members, position, lag_events, lag_seconds::float8,
                    last_poll_at, last_ack_at
               FROM ep.subscription_status ORDER BY subscription, member",
            None,
            &[],
        );
        let Ok(rows) = rows else { return Vec::new() };
        rows.map(|r| SubscriptionStatus {
            subscription: opt(&r, 1).unwrap_or_default(),
            member: opt(&r, 2).unwrap_or_default(),
            members: opt(&r, 3).unwrap_or_default(),
            position: opt(&r, 4).unwrap_or_default(),
            lag_events: opt(&r, 5),
            lag_seconds: opt(&r, 6),
            last_poll_at: opt(&r, 7),
            last_ack_at: opt(&r, 8),
        })
        .collect()
    })
}

fn extension_version() -> Option<String> {
    Spi::get_one::<String>("SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'event_projections'")
        .ok()
        .flatten()
}

/// The whole document (`ep_status()`).
pub fn status() -> Status {
    catalog::require();
    let oldest = inflight::oldest_in_flight();
    let pool = pool::snapshot();
    let names = projection_names();
    Status {
        library_version: env!("CARGO_PKG_VERSION"),
        extension_version: extension_version(),
        database: database_name(my_database()).unwrap_or_default(),
        preloaded: inflight::available(),
        // The mark of the whole database, this session's own open appends included (as the
        // in-flight position below counts them): what holds the workers back.
        high_water: highwater::compute(),
        in_flight: InFlight {
            oldest_position: oldest.map(|o| o.0),
            oldest_since: oldest.and_then(|o| timestamp(o.1)),
            oldest_age_seconds: oldest.map(|o| age_seconds(o.1)),
        },
        projections: projections(),
        subscriptions: subscriptions(),
        launcher: pool
            .filter(|p| p.launcher_pid != 0)
            .map(|p| LauncherStatus { pid: p.launcher_pid, started: timestamp(p.launcher_started) }),
        workers: pool.map(|p| worker_rows(&p, &names)).unwrap_or_default(),
    }
}
