//! Async delivery (DESIGN.md, section 5): the worker that owns an async projection applies the
//! events below the high-water mark and advances the checkpoint in the same transaction, so each
//! event's effects commit exactly once. Also the async forms of the two rebuild strategies, and
//! the calls that resume a stopped projection.

use crate::handoff::highwater;
use crate::handoff::inflight;
use crate::pg::catalog::{self, Catalog};
use crate::pg::error::{required, required_text, ArgError, SqlError};
use crate::pg::settings;
use crate::pg::spi::{self, Snap, Stmt};
use crate::rebuild::{self, Progress, Rebuild, Strategy};
use crate::registry::{self, Projection, ProjectionMode, RegistryError};
use crate::sandbox::handler::Handler;
use crate::sandbox::replay::{self, Filter};
use pgrx::pg_sys;
use pgrx::prelude::*;

/// What the delivery of one async projection needs beyond its registry row.
struct State {
    attempts: i32,
    failing_position: Option<i64>,
    /// Milliseconds since the last error (None: no error pending).
    since_error_ms: Option<f64>,
    skipped: Vec<i64>,
}

static STATE: Stmt = Stmt {
    sql: "SELECT p.attempts, p.failing_position, \
                 EXTRACT(EPOCH FROM pg_catalog.clock_timestamp() - p.last_error_at) * 1000, \
                 ARRAY(SELECT s.global_position FROM ep.skipped_events s WHERE s.projection = p.name) \
          FROM ep.projections p WHERE p.id = $1",
    types: &[pg_sys::INT4OID],
};

fn state(id: i32) -> State {
    crate::pg::catalog::read(|| {
        Spi::connect(|client| {
            let r = spi::exec(client, &STATE, &[id.into_datum()], Snap::Fresh, 0);
            State {
                attempts: r.get(0, 1).unwrap_or(0),
                failing_position: r.get(0, 2),
                since_error_ms: r.get::<pgrx::AnyNumeric>(0, 3).map(|n| f64::try_from(n).unwrap_or(0.0)),
                skipped: r.get::<Vec<i64>>(0, 4).unwrap_or_default(),
            }
        })
    })
}

/// How long to wait after `attempts` failures before the next attempt.
pub fn backoff_ms(attempts: i32) -> f64 {
    let base = settings::retry_backoff_ms() as f64;
    (base * 2f64.powi(attempts.saturating_sub(1).min(20))).min(300_000.0)
}

static ADVANCE: Stmt = Stmt {
    sql: "UPDATE ep.projections SET position = $2, last_applied_at = pg_catalog.clock_timestamp(), \
                 attempts = CASE WHEN failing_position <= $2 THEN 0 ELSE attempts END, \
                 last_error = CASE WHEN failing_position <= $2 THEN NULL ELSE last_error END, \
                 failing_position = CASE WHEN failing_position <= $2 THEN NULL ELSE failing_position END \
          WHERE id = $1 AND position = $3 RETURNING id",
    types: &[pg_sys::INT4OID, pg_sys::INT8OID, pg_sys::INT8OID],
};

/// One delivery transaction (D1..D2) into the model `h` writes. Returns Busy when events were
/// delivered (or the checkpoint moved), None when there was nothing to do.
fn deliver(cat: &Catalog, p: &Projection, h: &Handler, st: &State) -> Option<Progress> {
    let hw = highwater::compute();
    if hw <= p.position {
        return None;
    }
    let batch = registry::batch_size();
    // After a failure, first deliver everything before the failing event, then that event alone:
    // the error then names the exact event, and the events before it are not held back.
    let (up_to, limit) = match st.failing_position {
        Some(f) if f > p.position + 1 => ((f - 1).min(hw), batch),
        Some(f) if f == p.position + 1 => (f.min(hw), 1),
        _ => (hw, batch),
    };
    let filter = Filter { types: p.event_types.as_ref(), skip: Some(&st.skipped) };
    let a = replay::apply_step(h, filter, cat.events_type, p.position, up_to, limit);
    let position = a.through;
    let advanced = catalog::privileged(cat, || {
        Spi::connect(|client| {
            !spi::exec(
                client,
                &ADVANCE,
                &[p.id.into_datum(), spi::int8(position), spi::int8(p.position)],
                Snap::Fresh,
                0,
            )
            .is_empty()
        })
    });
    if !advanced {
        crate::handoff::raise_overtaken(&p.name);
    }
    Some(Progress::Busy)
}

/// One step for async projection `p`: a rebuild step if one is open, else a delivery.
pub fn step(cat: &Catalog, p: &Projection) -> Option<Progress> {
    if let Some(r) = rebuild::open(p.id) {
        return Some(rebuild_step(cat, p, &r));
    }
    if p.status == registry::Status::Failed {
        return None;
    }
    let st = state(p.id);
    if let Some(ms) = st.since_error_ms {
        if st.attempts > 0 && ms < backoff_ms(st.attempts) {
            return None;
        }
    }
    deliver(cat, p, &p.live_handler(), &st)
}

// A rebuild replays the whole log, skipped events included: the skips recorded for the projection
// end with it (README.md, "Security", on skips).
static ASYNC_RESET: Stmt = Stmt {
    sql:
        "WITH s AS (DELETE FROM ep.skipped_events WHERE projection = (SELECT name FROM ep.projections WHERE id = $1)) \
          UPDATE ep.projections SET position = 0, status = 'rebuilding', generation = generation + 1, \
                 attempts = 0, failing_position = NULL, last_error = NULL WHERE id = $1",
    types: &[pg_sys::INT4OID],
};

static ASYNC_DONE: Stmt = Stmt {
    sql: "WITH p AS (UPDATE ep.projections SET status = 'active', generation = generation + 1 WHERE id = $1) \
          UPDATE ep.rebuilds SET status = 'done', phase = 'done', finished_at = pg_catalog.now(), \
                 checkpoint = $3, events_total = events_done WHERE id = $2",
    types: &[pg_sys::INT4OID, pg_sys::INT8OID, pg_sys::INT8OID],
};

static PROGRESS: Stmt = Stmt {
    sql:
        "UPDATE ep.rebuilds SET checkpoint = $2, events_done = events_done + $3, \
                 events_total = GREATEST(events_total, events_done + $3) WHERE id = $1 AND checkpoint = $4 RETURNING id",
    types: &[pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::INT8OID],
};

/// Advances a rebuild's checkpoint from `from`, or raises when another process did meanwhile.
fn advance_rebuild(cat: &Catalog, p: &Projection, r: &Rebuild, to: i64, events: i64) {
    let moved = catalog::privileged(cat, || {
        Spi::connect(|client| {
            !spi::exec(
                client,
                &PROGRESS,
                &[r.id.into_datum(), spi::int8(to), spi::int8(events), spi::int8(r.checkpoint)],
                Snap::Fresh,
                0,
            )
            .is_empty()
        })
    });
    if !moved {
        crate::handoff::raise_overtaken(&p.name);
    }
}

static SWITCH: Stmt = Stmt {
    sql: "WITH p AS (UPDATE ep.projections SET position = $3, handler = COALESCE($4::oid::regprocedure, handler), \
                     batch = COALESCE($5, batch), status = 'active', generation = generation + 1, \
                     attempts = 0, failing_position = NULL, last_error = NULL WHERE id = $1), \
               s AS (DELETE FROM ep.skipped_events WHERE projection = (SELECT name FROM ep.projections WHERE id = $1)) \
          UPDATE ep.rebuilds SET status = 'done', phase = 'done', finished_at = pg_catalog.now(), \
                 checkpoint = $3, previous_schema = $6, events_total = events_done WHERE id = $2",
    types: &[pg_sys::INT4OID, pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::OIDOID, pg_sys::BOOLOID, pg_sys::TEXTOID],
};

/// Rebuilds of an async projection need no lock: only the owning process writes its model.
fn rebuild_step(cat: &Catalog, p: &Projection, r: &Rebuild) -> Progress {
    if r.cancel_requested {
        return rebuild::finish_unsuccessfully(cat, p, r, rebuild::RebuildStatus::Cancelled, None);
    }
    match (r.strategy, r.phase) {
        (Strategy::InPlace, rebuild::Phase::Queued) => {
            rebuild::truncate_model(p);
            exec(cat, &ASYNC_RESET, &[p.id.into_datum()]);
            rebuild::mark_started(cat, p, r, None);
            inflight::bump_epoch_at_commit();
            Progress::Busy
        }
        (Strategy::InPlace, _) => {
            // Re-delivery from position 0; done once past the head of the log at the start.
            rebuild::count_total(cat, p, r);
            let st = state(p.id);
            let progress = deliver(cat, p, &p.live_handler(), &st);
            let now = registry::by_id(p.id).map(|q| q.position).unwrap_or(p.position);
            if now >= r.target_position {
                exec(cat, &ASYNC_DONE, &[p.id.into_datum(), r.id.into_datum(), spi::int8(now)]);
                inflight::bump_epoch_at_commit();
                return Progress::Finished;
            }
            // Progress in events, or in log positions through a replay handler (`count_total`).
            let applied = if p.replay.is_some() { now - r.checkpoint } else { replay_count(p, r.checkpoint, now) };
            advance_rebuild(cat, p, r, now, applied);
            progress.unwrap_or(Progress::Busy)
        }
        (Strategy::BlueGreen, rebuild::Phase::Queued) => {
            rebuild::create_build_copy(cat, p, r);
            Progress::Busy
        }
        (Strategy::BlueGreen, _) => {
            // The live copy keeps being delivered to, and the copy is built up to the high-water
            // mark in the same step; it is switched in once it has reached the live checkpoint.
            rebuild::count_total(cat, p, r);
            let st = state(p.id);
            deliver(cat, p, &p.live_handler(), &st);
            let live = registry::by_id(p.id).map(|q| q.position).unwrap_or(p.position);
            let h = rebuild::rebuild_handler(p, r);
            let hw = highwater::compute();
            let mut checkpoint = r.checkpoint;
            if checkpoint < hw {
                let filter = Filter { types: p.event_types.as_ref(), skip: None };
                let a = replay::apply_step(&h, filter, cat.events_type, checkpoint, hw, registry::batch_size());
                checkpoint = a.through;
                advance_rebuild(cat, p, r, checkpoint, a.events);
            }
            if checkpoint < live {
                return Progress::Busy;
            }
            let r = &Rebuild { checkpoint, ..r.clone() };
            // The copy holds every event up to its checkpoint, which is at or past the live one.
            let prev = rebuild::switch_schemas(cat, p, r);
            let new_batch = r.new_handler.and_then(registry::takes_batch);
            exec(
                cat,
                &SWITCH,
                &[
                    p.id.into_datum(),
                    r.id.into_datum(),
                    spi::int8(r.checkpoint),
                    r.new_handler.into_datum(),
                    new_batch.into_datum(),
                    spi::text(&prev),
                ],
            );
            inflight::bump_epoch_at_commit();
            Progress::Finished
        }
    }
}

fn exec(cat: &Catalog, stmt: &Stmt, args: &[Option<pg_sys::Datum>]) {
    catalog::privileged(cat, || {
        Spi::connect(|client| {
            spi::exec(client, stmt, args, Snap::Fresh, 0);
        })
    });
}

static COUNT: Stmt = Stmt {
    sql: "SELECT pg_catalog.count(*) FROM ep.events e WHERE e.global_position > $1 AND e.global_position <= $2 \
          AND ($3::text[] IS NULL OR e.event_type = ANY ($3))",
    types: &[pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::TEXTARRAYOID],
};

static EVENT_AT: Stmt = Stmt { sql: "SELECT 1 FROM ep.events WHERE global_position = $1", types: &[pg_sys::INT8OID] };

/// Whether the event at `position` is visible here (on a standby: replayed).
fn replayed(position: i64) -> bool {
    crate::pg::catalog::read(|| {
        Spi::connect(|client| !spi::exec(client, &EVENT_AT, &[spi::int8(position)], Snap::Latest, 0).is_empty())
    })
}

fn replay_count(p: &Projection, from: i64, to: i64) -> i64 {
    crate::pg::catalog::read(|| {
        Spi::connect(|client| {
            spi::exec(
                client,
                &COUNT,
                &[spi::int8(from), spi::int8(to), p.event_types.clone().and_then(|t| t.into_datum())],
                Snap::Fresh,
                0,
            )
            .get(0, 1)
            .unwrap_or(0)
        })
    })
}

static FAILURE: Stmt = Stmt {
    sql: "UPDATE ep.projections SET attempts = attempts + 1, last_error = $2, last_error_at = pg_catalog.clock_timestamp(), \
                 failing_position = $3, \
                 status = CASE WHEN attempts + 1 >= $4 THEN 'failed' ELSE status END \
          WHERE id = $1 RETURNING attempts",
    types: &[pg_sys::INT4OID, pg_sys::TEXTOID, pg_sys::INT8OID, pg_sys::INT4OID],
};

/// Records a failed delivery of async projection `p` at `position`.
pub fn record_failure(cat: &Catalog, p: &Projection, error: &str, position: i64, stop: bool) {
    let max = if stop { 1 } else { settings::max_attempts() };
    exec(cat, &FAILURE, &[p.id.into_datum(), spi::text(error), spi::int8(position), max.into_datum()]);
    inflight::bump_epoch_at_commit();
}

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error(transparent)]
    Arg(#[from] ArgError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("projection \"{0}\" is not an async projection")]
    NotAsync(String),
    #[error("event {position} is not the event projection \"{projection}\" is failing on")]
    NotFailing { projection: String, position: i64 },
}

impl SqlError for DeliveryError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            DeliveryError::Arg(e) => e.sqlstate(),
            DeliveryError::Registry(e) => e.sqlstate(),
            DeliveryError::NotAsync(_) | DeliveryError::NotFailing { .. } => {
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            DeliveryError::NotFailing { projection, .. } => Some(format!(
                "SELECT failing_position FROM ep.projection_status WHERE name = '{projection}' shows the event to skip."
            )),
            _ => None,
        }
    }
}

fn owned_async(name: Option<&str>) -> Result<Projection, DeliveryError> {
    let name = required_text(name, "projection")?;
    let p = registry::by_name(name).ok_or_else(|| RegistryError::Unknown(name.into()))?;
    if p.mode != ProjectionMode::Async {
        return Err(DeliveryError::NotAsync(name.into()));
    }
    if !catalog::acts_for(catalog::current_user(), p.owner) {
        return Err(RegistryError::NotOwner { projection: name.into() }.into());
    }
    Ok(p)
}

static RETRY: Stmt = Stmt {
    sql: "UPDATE ep.projections SET status = CASE WHEN status = 'failed' THEN 'active' ELSE status END, \
                 attempts = 0, last_error_at = NULL WHERE id = $1",
    types: &[pg_sys::INT4OID],
};

/// `ep_retry_projection`: a stopped (or backing-off) async projection tries again now.
pub fn retry(name: Option<&str>) -> Result<(), DeliveryError> {
    let cat = catalog::require();
    let p = owned_async(name)?;
    exec(&cat, &RETRY, &[p.id.into_datum()]);
    inflight::bump_epoch_at_commit();
    Ok(())
}

static SKIP: Stmt = Stmt {
    sql: "WITH s AS (INSERT INTO ep.skipped_events (projection, global_position, error, skipped_by) \
                     SELECT name, $2, last_error, $3::oid::regrole FROM ep.projections WHERE id = $1 \
                     ON CONFLICT DO NOTHING) \
          UPDATE ep.projections SET status = CASE WHEN status = 'failed' THEN 'active' ELSE status END, \
                 attempts = 0, failing_position = NULL, last_error = NULL, last_error_at = NULL WHERE id = $1",
    types: &[pg_sys::INT4OID, pg_sys::INT8OID, pg_sys::OIDOID],
};

/// `ep_skip_event`: the failing event is skipped on purpose, recorded in ep.skipped_events.
pub fn skip(name: Option<&str>, position: Option<i64>) -> Result<(), DeliveryError> {
    let cat = catalog::require();
    let p = owned_async(name)?;
    let position = required(position, "global_position")?;
    let failing = state(p.id).failing_position;
    if failing != Some(position) {
        return Err(DeliveryError::NotFailing { projection: p.name, position });
    }
    exec(&cat, &SKIP, &[p.id.into_datum(), spi::int8(position), catalog::current_user().into_datum()]);
    inflight::bump_epoch_at_commit();
    Ok(())
}

/// `ep_wait_for`: read-your-writes. True once every event up to `position` has been applied to
/// the projection (at once for an active inline projection), false after `timeout`.
pub fn wait_for(
    name: Option<&str>,
    position: Option<i64>,
    timeout: Option<pgrx::datum::Interval>,
) -> Result<bool, DeliveryError> {
    let name = required_text(name, "projection")?;
    let position = required(position, "global_position")?;
    let timeout = required(timeout, "timeout")?;
    let micros = crate::pg::backend::interval_micros(&timeout)
        .map_err(|problem| ArgError::Invalid { arg: "timeout", problem })?;
    let start = std::time::Instant::now();
    // SAFETY: a plain read of shared state: whether this server is a standby still replaying.
    let standby = unsafe { pg_sys::RecoveryInProgress() };
    loop {
        let p = registry::by_name(name).ok_or_else(|| RegistryError::Unknown(name.into()))?;
        let reached = match p.mode {
            // On the primary an inline projection has every committed event; a standby has them
            // once it has replayed the commit of `position` (the model's writes were in the same
            // transaction): read-your-writes for a client that appended on the primary.
            ProjectionMode::Inline => p.is_active() && (!standby || replayed(position)),
            // The checkpoint commits with the model's writes, on the primary and so on a standby.
            ProjectionMode::Async => p.position >= position && p.status != registry::Status::Rebuilding,
        };
        if reached {
            return Ok(true);
        }
        if start.elapsed().as_micros() as i64 >= micros {
            return Ok(false);
        }
        crate::pg::backend::sleep_ms(2);
    }
}
