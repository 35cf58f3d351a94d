//! Rebuilds: the SQL API that queues and observes them, and the steps the worker runs (DESIGN.md
//! 3.2, 3.3 and 5). Every step is one transaction of the worker; the rebuild's row carries its
//! phase and checkpoint, so a crash at any point resumes from the last committed step.

use crate::handoff::highwater;
use crate::handoff::inflight::{self, NoWorker};
use crate::handoff::{self, Mode};
use crate::pg::catalog::{self, Catalog};
use crate::pg::error::{required, required_text, ArgError, SqlError};
use crate::pg::settings;
use crate::pg::spi::{self, Snap, Stmt};
use crate::registry::{self, Projection, ProjectionMode, RegistryError, Status};
use crate::sandbox;
use crate::sandbox::replay;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, quote_qualified_identifier};

crate::registry::sql_enum! {
    /// `ep.rebuilds.strategy`.
    Strategy { InPlace = "in_place", BlueGreen = "blue_green" }
}

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(transparent)]
    Arg(#[from] ArgError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    NoWorker(#[from] NoWorker),
    #[error(
        "projection \"{projection}\" has no read_model_schema, so a rebuild does not know which tables to rebuild"
    )]
    NoSchema { projection: String },
    #[error("rebuild {0} does not exist")]
    UnknownRebuild(i64),
    #[error(
        "rebuild {0} was queued or changed by this transaction, so the worker cannot start it before the transaction commits"
    )]
    QueuedHere(i64),
    #[error("rebuild {id} did not finish within {waited}")]
    Timeout { id: i64, waited: String },
    #[error("schema \"{schema}\" already exists, so a blue-green rebuild cannot use that name for its copy")]
    NameTaken { schema: String },
}

impl SqlError for RebuildError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            RebuildError::Arg(e) => e.sqlstate(),
            RebuildError::Registry(e) => e.sqlstate(),
            RebuildError::NoWorker(e) => e.sqlstate(),
            RebuildError::NoSchema { .. } | RebuildError::QueuedHere(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            RebuildError::UnknownRebuild(_) => ERRCODE_UNDEFINED_OBJECT,
            RebuildError::NameTaken { .. } => ERRCODE_DUPLICATE_SCHEMA,
            RebuildError::Timeout { .. } => ERRCODE_QUERY_CANCELED,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            RebuildError::NoWorker(e) => e.hint(),
            RebuildError::NoSchema { projection } => Some(format!(
                "Register the projection again with read_model_schema naming the schema of its tables (ep_unregister_projection('{projection}') first)."
            )),
            RebuildError::Timeout { .. } => Some("The rebuild goes on; call ep_rebuild_wait again or watch ep.projection_status.".into()),
            RebuildError::NameTaken { schema } => Some(format!(
                "The extension never drops a schema it did not create: rename or drop \"{schema}\" yourself, then rebuild again."
            )),
            RebuildError::QueuedHere(id) => Some(format!(
                "Commit first, then SELECT ep_rebuild_wait({id}) (or CALL ep_rebuild_await({id})) in a new transaction."
            )),
            _ => None,
        }
    }
}

static OPEN_REBUILD: Stmt = Stmt {
    sql: "SELECT id FROM ep.rebuilds WHERE projection_id = $1 AND status IN ('queued', 'running')",
    types: &[pg_sys::INT4OID],
};

static QUEUE: Stmt = Stmt {
    sql: "INSERT INTO ep.rebuilds (projection_id, projection, strategy, status, new_handler, setup_function, requested_by) \
          VALUES ($1, $2, $3, 'queued', $4::oid::regprocedure, $5::oid::regprocedure, $6::oid::regrole) \
          ON CONFLICT (projection_id) WHERE status IN ('queued', 'running') DO NOTHING RETURNING id",
    types: &[pg_sys::INT4OID, pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::OIDOID, pg_sys::OIDOID, pg_sys::OIDOID],
};

/// `ep_rebuild`: queues a rebuild (or returns the one already queued or running).
pub fn queue(
    name: Option<&str>,
    strategy: Option<&str>,
    new_handler: Option<pg_sys::Oid>,
    setup: Option<pg_sys::Oid>,
) -> Result<i64, RebuildError> {
    let cat = catalog::require();
    let name = required_text(name, "projection")?;
    let strategy_text = required_text(strategy, "strategy")?;
    let strategy = Strategy::parse(strategy_text).ok_or_else(|| ArgError::Invalid {
        arg: "strategy",
        problem: format!("\"{strategy_text}\" (expected 'in_place' or 'blue_green')"),
    })?;
    let p = registry::by_name(name).ok_or_else(|| RegistryError::Unknown(name.into()))?;
    let caller = catalog::current_user();
    if !catalog::acts_for(caller, p.owner) {
        return Err(RegistryError::NotOwner { projection: name.into() }.into());
    }
    if p.schema.is_none() {
        return Err(RebuildError::NoSchema { projection: name.into() });
    }
    if strategy == Strategy::InPlace && (new_handler.is_some() || setup.is_some()) {
        return Err(ArgError::Invalid {
            arg: "strategy",
            problem: "new_handler and setup are only for 'blue_green' (an in-place rebuild keeps the live handler and tables)".into(),
        }
        .into());
    }
    // The code a rebuild runs is run as the projection's owner: the owner must be able to run it,
    // and so must the caller (who could not otherwise call it either).
    for f in new_handler.iter().chain(setup.iter()) {
        if !catalog::may_execute(caller, *f) {
            return Err(RegistryError::NoExecute { handler: crate::pg::catalog::regprocedure_text(*f) }.into());
        }
    }
    if let Some(h) = new_handler {
        registry::validate_handler(&cat, h, p.owner)?;
    }
    if let Some(f) = setup {
        validate_setup(f, p.owner)?;
    }
    check_model_schema(&p)?;
    inflight::require_worker()?;
    // The projection's row, locked (FOR KEY SHARE) and read again with a snapshot taken after the
    // lock: an unregistration that committed meanwhile leaves nothing to rebuild (42704), and one
    // that comes later waits for this transaction and then deletes the rebuild with the
    // projection (the foreign key cascades).
    let still_there = catalog::read(|| {
        Spi::connect(|client| {
            !spi::exec(
                client,
                &Stmt { sql: "SELECT 1 FROM ep.projections WHERE id = $1 FOR KEY SHARE", types: &[pg_sys::INT4OID] },
                &[p.id.into_datum()],
                // The latest snapshot, not a REPEATABLE READ transaction's: `by_name` read it so too.
                Snap::Latest,
                0,
            )
            .is_empty()
        })
    });
    if !still_there {
        return Err(RegistryError::Unknown(name.into()).into());
    }
    let existing = catalog::read(|| {
        Spi::connect(|client| spi::exec(client, &OPEN_REBUILD, &[p.id.into_datum()], Snap::Latest, 0).get::<i64>(0, 1))
    });
    if let Some(id) = existing.filter(|_| true) {
        return Ok(id);
    }
    let id = catalog::privileged(&cat, || {
        Spi::connect(|client| {
            let rows = spi::exec(
                client,
                &QUEUE,
                &[
                    p.id.into_datum(),
                    spi::text(&p.name),
                    spi::text(strategy.as_str()),
                    new_handler.into_datum(),
                    setup.into_datum(),
                    caller.into_datum(),
                ],
                Snap::Fresh,
                0,
            );
            rows.get::<i64>(0, 1)
        })
    });
    match id {
        Some(id) => {
            inflight::bump_epoch_at_commit(); // wakes the worker at commit
            Ok(id)
        }
        // Lost a race with a concurrent ep_rebuild: return that one.
        None => Ok(catalog::read(|| {
            Spi::connect(|client| {
                spi::exec(client, &OPEN_REBUILD, &[p.id.into_datum()], Snap::Latest, 0).get::<i64>(0, 1)
            })
        })
        .unwrap_or(0)),
    }
}

/// The projection's read-model schema exists and is its owner's (`registry::check_schema_owner`):
/// checked when a rebuild is queued and again by each step that changes the schema.
pub fn check_model_schema(p: &Projection) -> Result<(), RegistryError> {
    let schema = p.schema.as_deref().unwrap_or_default();
    let nsp = namespace_oid(schema);
    if nsp == pg_sys::Oid::INVALID {
        return Err(RegistryError::NoSchema(schema.into()));
    }
    registry::check_schema_owner(nsp, schema, p.owner)
}

/// The OID of schema `name` (InvalidOid when there is none).
fn namespace_oid(name: &str) -> pg_sys::Oid {
    match std::ffi::CString::new(name) {
        // SAFETY: a syscache lookup by name, missing_ok.
        Ok(c) => unsafe { pg_sys::get_namespace_oid(c.as_ptr(), true) },
        Err(_) => pg_sys::Oid::INVALID,
    }
}

fn validate_setup(f: pg_sys::Oid, owner: pg_sys::Oid) -> Result<(), RegistryError> {
    let name = crate::pg::catalog::regprocedure_text(f);
    registry::refuse_temporary(f, &name)?;
    registry::check_function_owner(f, &name, owner)?;
    if !catalog::may_execute(owner, f) {
        return Err(RegistryError::NoExecute { handler: name });
    }
    let ok = Spi::connect(|c| {
        c.select(
            "SELECT pronargs = 1 AND proargtypes[0] = 'pg_catalog.text'::pg_catalog.regtype AND prokind = 'f' \
             FROM pg_catalog.pg_proc WHERE oid = $1",
            None,
            &[f.into()],
        )
        .ok()
        .and_then(|t| t.first().get_one::<bool>().ok().flatten())
        .unwrap_or(false)
    });
    if ok {
        Ok(())
    } else {
        Err(RegistryError::BadHandler {
            handler: crate::pg::catalog::regprocedure_text(f),
            problem: "a setup function takes one text argument (the schema to create the tables in)".into(),
        })
    }
}

static REBUILD_STATUS: Stmt = Stmt {
    sql: "SELECT r.status, r.xmin::text::bigint, r.requested_by::oid, \
                 (SELECT p.owner::oid FROM ep.projections p WHERE p.id = r.projection_id) \
          FROM ep.rebuilds r WHERE r.id = $1",
    types: &[pg_sys::INT8OID],
};

/// The status of rebuild `id` and whether this transaction wrote it, if the caller may see it:
/// the role that requested it and the projection's owner may (and whoever acts for them).
fn status_of(id: i64) -> Result<(String, bool), RebuildError> {
    let (status, xmin, requester, owner): (Option<String>, Option<i64>, Option<pg_sys::Oid>, Option<pg_sys::Oid>) =
        catalog::read(|| {
            Spi::connect(|client| {
                let r = spi::exec(client, &REBUILD_STATUS, &[id.into_datum()], Snap::Latest, 0);
                (r.get(0, 1), r.get(0, 2), r.get(0, 3), r.get(0, 4))
            })
        });
    let caller = catalog::current_user();
    let visible = requester.iter().chain(owner.iter()).any(|r| catalog::acts_for(caller, *r));
    match status {
        Some(status) if visible => {
            // SAFETY: a check of an xid against this backend's transaction state.
            let mine = xmin.is_some_and(|x| unsafe {
                pg_sys::TransactionIdIsCurrentTransactionId(pg_sys::TransactionId::from_inner(x as u32))
            });
            Ok((status, mine))
        }
        // Someone else's rebuild is as unknown as a rebuild that does not exist.
        _ => Err(RebuildError::UnknownRebuild(id)),
    }
}

/// `ep_rebuild_status`: the status of a rebuild the caller may see.
pub fn status(id: Option<i64>) -> Result<String, RebuildError> {
    Ok(status_of(required(id, "rebuild_id")?)?.0)
}

/// `ep_rebuild_wait`: the final status once the rebuild ends.
pub fn wait(id: Option<i64>, timeout: Option<pgrx::datum::Interval>) -> Result<String, RebuildError> {
    let id = required(id, "rebuild_id")?;
    let timeout = required(timeout, "timeout")?;
    let micros = crate::pg::backend::interval_micros(&timeout)
        .map_err(|problem| ArgError::Invalid { arg: "timeout", problem })?;
    let start = std::time::Instant::now();
    loop {
        let (status, mine) = status_of(id)?;
        if matches!(
            RebuildStatus::parse(&status),
            Some(RebuildStatus::Done | RebuildStatus::Failed | RebuildStatus::Cancelled)
        ) {
            return Ok(status);
        }
        // Queued (or cancelled) by this very transaction: the worker cannot see it before the
        // commit, so waiting here would only run out the timeout.
        if mine {
            return Err(RebuildError::QueuedHere(id));
        }
        if start.elapsed().as_micros() as i64 >= micros {
            return Err(RebuildError::Timeout { id, waited: format!("{timeout}") });
        }
        crate::pg::backend::sleep_ms(20);
    }
}

static CANCEL: Stmt = Stmt {
    sql: "UPDATE ep.rebuilds SET cancel_requested = true, \
                 status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END, \
                 finished_at = CASE WHEN status = 'queued' THEN pg_catalog.now() ELSE finished_at END \
          WHERE projection_id = $1 AND status IN ('queued', 'running') RETURNING id",
    types: &[pg_sys::INT4OID],
};

/// `ep_cancel_rebuild`: a queued rebuild is cancelled at once; a running one at its next step.
/// Returns the id of the rebuild cancelled, or NULL when none was queued or running.
pub fn cancel(name: Option<&str>) -> Result<Option<i64>, RebuildError> {
    let cat = catalog::require();
    let name = required_text(name, "projection")?;
    let p = registry::by_name(name).ok_or_else(|| RegistryError::Unknown(name.into()))?;
    if !catalog::acts_for(catalog::current_user(), p.owner) {
        return Err(RegistryError::NotOwner { projection: name.into() }.into());
    }
    let id = catalog::privileged(&cat, || {
        Spi::connect(|client| spi::exec(client, &CANCEL, &[p.id.into_datum()], Snap::Fresh, 0).get::<i64>(0, 1))
    });
    inflight::bump_epoch_at_commit();
    Ok(id)
}

// ---------------------------------------------------------------------------------------------
// The steps the worker runs. Each is called inside its own transaction, by the process that holds
// the projection's ownership lock.

crate::registry::sql_enum! {
    /// `ep.rebuilds.status`.
    RebuildStatus { Queued = "queued", Running = "running", Done = "done", Failed = "failed", Cancelled = "cancelled" }
}

crate::registry::sql_enum! {
    /// `ep.rebuilds.phase`: queued, then replaying (the model emptied or the copy created), then
    /// the final status.
    Phase { Queued = "queued", Replaying = "replaying", Done = "done", Failed = "failed", Cancelled = "cancelled" }
}

/// One open rebuild, as a step needs it.
#[derive(Clone, Debug)]
pub struct Rebuild {
    pub id: i64,
    pub target_position: i64,
    pub behind: Option<i64>,
    pub strategy: Strategy,
    pub phase: Phase,
    pub new_handler: Option<pg_sys::Oid>,
    pub setup: Option<pg_sys::Oid>,
    pub build_schema: Option<String>,
    pub checkpoint: i64,
    pub cancel_requested: bool,
    /// Whether `events_total` has been counted (once, by the first replay step).
    pub total_counted: bool,
}

static OPEN: Stmt = Stmt {
    sql: "SELECT id, strategy, phase, new_handler::oid, setup_function::oid, build_schema, checkpoint, cancel_requested, \
                 coalesce(target_position, 0), behind, events_total IS NOT NULL \
          FROM ep.rebuilds WHERE projection_id = $1 AND status IN ('queued', 'running')",
    types: &[pg_sys::INT4OID],
};

/// The open rebuild of projection `id`, if any.
pub fn open(id: i32) -> Option<Rebuild> {
    Spi::connect(|client| {
        let r = spi::exec(client, &OPEN, &[id.into_datum()], Snap::Fresh, 0);
        (!r.is_empty()).then(|| Rebuild {
            id: r.get(0, 1).unwrap_or(0),
            strategy: r.get::<String>(0, 2).and_then(|s| Strategy::parse(&s)).unwrap_or(Strategy::InPlace),
            phase: r.get::<String>(0, 3).and_then(|s| Phase::parse(&s)).unwrap_or(Phase::Queued),
            new_handler: r.get(0, 4),
            setup: r.get(0, 5),
            build_schema: r.get(0, 6),
            checkpoint: r.get(0, 7).unwrap_or(0),
            cancel_requested: r.get(0, 8).unwrap_or(false),
            target_position: r.get(0, 9).unwrap_or(0),
            behind: r.get(0, 10),
            total_counted: r.get(0, 11).unwrap_or(false),
        })
    })
}

/// What a step did, for the worker's scheduling.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// Did work; more remains.
    Busy,
    /// The rebuild ended (done, cancelled).
    Finished,
    /// Could not take the hand-off lock within the timeout; try again after a pause.
    LockBusy,
}

fn exec_priv(cat: &Catalog, stmt: &Stmt, args: &[Option<pg_sys::Datum>]) -> Option<i64> {
    catalog::privileged(cat, || Spi::connect(|client| spi::exec(client, stmt, args, Snap::Fresh, 0).get::<i64>(0, 1)))
}

/// Runs one utility or DDL statement built at run time (every name in it quoted by
/// `quote_identifier` or `format('%I')`), as the role that is current. Refuses text that parses into
/// more than one statement: whatever a name holds, it cannot add one.
fn ddl(sql: &str) {
    let Ok(c) = std::ffi::CString::new(sql) else { error!("event_projections: a statement with a NUL byte") };
    // SAFETY: the raw parser only reads the string; the list it returns (NIL for no statement)
    // lives in the current memory context and is only measured.
    let statements = unsafe {
        let list = pg_sys::raw_parser(c.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
        if list.is_null() {
            0
        } else {
            (*list).length
        }
    };
    if statements != 1 {
        error!("event_projections: refusing generated text that is not exactly one statement: {sql}");
    }
    Spi::connect_mut(|c| {
        c.update(sql, None, &[]).unwrap_or_else(|e| error!("event_projections: {sql}: {e}"));
    });
}

/// Takes the projection lock EXCLUSIVE within the hand-off lock timeout. On timeout the error
/// (55P03) aborts the step's transaction and the worker tries again after a pause
/// (`Progress::LockBusy`); appends queued behind this request waited at most the timeout.
fn lock_for_handoff(p: &Projection) {
    handoff::set_local_lock_timeout(settings::handoff_lock_timeout_ms());
    handoff::lock(p.id as u32, Mode::Exclusive);
}

static SET_STATUS: Stmt = Stmt {
    sql: "UPDATE ep.projections SET status = $2, generation = generation + 1 WHERE id = $1",
    types: &[pg_sys::INT4OID, pg_sys::TEXTOID],
};

// Counting the events to replay reads the whole log: never under the hand-off lock. R0 leaves
// events_total NULL and the first replay step (no lock) fills it in (`COUNT_TOTAL`).
static START: Stmt = Stmt {
    sql: "UPDATE ep.rebuilds SET status = 'running', phase = 'replaying', checkpoint = 0, events_done = 0, behind = NULL, \
                 started_at = pg_catalog.now(), build_schema = $2, events_total = NULL, \
                 target_position = (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM ep.global_position_seq) \
          WHERE id = $1 AND status = 'queued' AND NOT cancel_requested RETURNING id",
    types: &[pg_sys::INT8OID, pg_sys::TEXTOID],
};

static COUNT_TOTAL: Stmt = Stmt {
    sql: "UPDATE ep.rebuilds r SET events_total = r.events_done + \
                 (SELECT pg_catalog.count(*) FROM ep.events e, ep.projections p \
                   WHERE p.id = $2 AND e.global_position > r.checkpoint \
                     AND (p.event_types IS NULL OR e.event_type = ANY (p.event_types))) \
          WHERE r.id = $1 AND r.events_total IS NULL",
    types: &[pg_sys::INT8OID, pg_sys::INT4OID],
};

// Conditional on the checkpoint the step started from: a step whose process lost the projection
// to another one (user code can release session locks) changes nothing (`advance`).
static ADVANCE: Stmt = Stmt {
    sql: "UPDATE ep.rebuilds SET checkpoint = $2, events_done = events_done + $3, \
                 events_total = GREATEST(events_total, events_done + $3), behind = $4 \
          WHERE id = $1 AND checkpoint = $5 RETURNING id",
    types: &[pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::INT8OID],
};

/// Moves the rebuild's checkpoint from where this step started to `to`, or raises when another
/// process moved it meanwhile (the step then rolls back: nothing applied twice).
fn advance(cat: &Catalog, p: &Projection, r: &Rebuild, to: i64, events: i64, behind: i64) {
    let moved = exec_priv(
        cat,
        &ADVANCE,
        &[r.id.into_datum(), spi::int8(to), spi::int8(events), spi::int8(behind), spi::int8(r.checkpoint)],
    );
    if moved.is_none() {
        handoff::raise_overtaken(&p.name);
    }
}

static FINISH: Stmt = Stmt {
    sql: "UPDATE ep.rebuilds SET status = $2, phase = $2, finished_at = pg_catalog.now(), \
                 previous_schema = COALESCE($3, previous_schema), error = COALESCE($4, error), \
                 events_total = CASE WHEN $2 = 'done' THEN events_done ELSE events_total END \
          WHERE id = $1",
    types: &[pg_sys::INT8OID, pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::TEXTOID],
};

/// Runs one step of `r` for inline projection `p`.
pub fn step_inline(cat: &Catalog, p: &Projection, r: &Rebuild) -> Progress {
    if r.cancel_requested {
        return cancel_running(cat, p, r);
    }
    match (r.strategy, r.phase) {
        (Strategy::InPlace, Phase::Queued) => start_in_place(cat, p, r),
        (Strategy::BlueGreen, Phase::Queued) => start_blue_green(cat, p, r),
        _ => replay_or_handoff(cat, p, r),
    }
}

/// A table of a read model.
struct Table {
    oid: pg_sys::Oid,
    /// The table's name, unquoted.
    name: String,
}

/// The tables of `schema` that `owner` owns (or whose owner's privileges it has): what a rebuild
/// may empty, copy or lock for that owner. Anything else in the schema is left alone.
fn tables_of(schema: &str, owner: pg_sys::Oid) -> Vec<Table> {
    Spi::connect(|c| {
        c.select(
            "SELECT c.oid, c.relname::text FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname OPERATOR(pg_catalog.=) $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition \
               AND pg_catalog.pg_has_role($2, c.relowner, 'USAGE') ORDER BY c.relname",
            None,
            &[schema.into(), owner.into()],
        )
        .map(|t| {
            t.filter_map(|r| {
                Some(Table { oid: r.get::<pg_sys::Oid>(1).ok().flatten()?, name: r.get::<String>(2).ok().flatten()? })
            })
            .collect()
        })
        .unwrap_or_default()
    })
}

/// `schema.table`, quoted.
fn qualified(schema: &str, table: &str) -> String {
    quote_qualified_identifier(schema, table)
}

/// Empties the tables of the projection's read-model schema, as the projection's owner (emptying
/// the model is the owner's privilege, not the worker's), after checking that the schema is still
/// the owner's.
pub fn truncate_model(p: &Projection) {
    if let Err(e) = check_model_schema(p) {
        crate::pg::error::raise(&e);
    }
    let schema = p.schema.as_deref().unwrap_or_default();
    let tables: Vec<String> = tables_of(schema, p.owner).iter().map(|t| qualified(schema, &t.name)).collect();
    if !tables.is_empty() {
        sandbox::run_as(p.owner, catalog::PINNED_PATH, || ddl(&format!("TRUNCATE {}", tables.join(", "))));
    }
}

/// Marks the rebuild running, with its build schema and the number of events it will replay.
/// Marks the rebuild running, with its build schema, in the step that started it; raises (the step
/// rolls back, emptied model and all) when the rebuild was cancelled, or started by another
/// process, since the step read it as queued.
pub fn mark_started(cat: &Catalog, p: &Projection, r: &Rebuild, build: Option<&str>) {
    if exec_priv(cat, &START, &[r.id.into_datum(), build.and_then(spi::text)]).is_none() {
        handoff::raise_overtaken(&p.name);
    }
}

static COUNT_POSITIONS: Stmt = Stmt {
    sql: "UPDATE ep.rebuilds r SET events_total = r.events_done + GREATEST(r.target_position - r.checkpoint, 0) \
          WHERE r.id = $1 AND r.events_total IS NULL",
    types: &[pg_sys::INT8OID],
};

/// Fills in the number of events a running rebuild will replay, once (it reads the whole log, so
/// a replay step does it, never a hand-off). A rebuild through a replay handler counts log
/// positions instead (its steps do: `replay::apply_range`), which needs no read of the log.
pub fn count_total(cat: &Catalog, p: &Projection, r: &Rebuild) {
    if r.total_counted {
        return;
    }
    if rebuild_handler(p, r).replay.is_some() {
        exec_priv(cat, &COUNT_POSITIONS, &[r.id.into_datum()]);
    } else {
        exec_priv(cat, &COUNT_TOTAL, &[r.id.into_datum(), p.id.into_datum()]);
    }
}

/// R0: the hand-off that empties the live model and makes appends skip the projection.
fn start_in_place(cat: &Catalog, p: &Projection, r: &Rebuild) -> Progress {
    lock_for_handoff(p);
    exec_priv(cat, &SET_STATUS, &[p.id.into_datum(), spi::text(Status::Rebuilding.as_str())]);
    truncate_model(p);
    mark_started(cat, p, r, None);
    inflight::bump_epoch_at_commit();
    Progress::Busy
}

/// B0: a fresh copy of the read model, next to the live one.
fn start_blue_green(cat: &Catalog, p: &Projection, r: &Rebuild) -> Progress {
    create_build_copy(cat, p, r);
    Progress::Busy
}

/// Raises unless no schema is called `name`: the extension creates its copies under names nobody
/// uses, and never drops or takes over a schema it did not create.
fn require_free_name(name: &str) {
    if namespace_oid(name) != pg_sys::Oid::INVALID {
        crate::pg::error::raise(&RebuildError::NameTaken { schema: name.into() });
    }
}

/// Creates the build schema (tables copied from the live ones, or made by the setup function)
/// and marks the rebuild started, in one transaction: a crash leaves either nothing or a started
/// rebuild that knows its copy.
pub fn create_build_copy(cat: &Catalog, p: &Projection, r: &Rebuild) {
    if let Err(e) = check_model_schema(p) {
        crate::pg::error::raise(&e);
    }
    let live = p.schema.clone().unwrap_or_default();
    let build = derived_name(&live, "__ep_build_", r.id);
    require_free_name(&build);
    let owner = sandbox::role_name(p.owner).unwrap_or_default();
    // Creating a schema needs CREATE on the database, which the owner may lack: the extension
    // creates it for the owner. Everything inside is created, and granted, as the owner.
    catalog::privileged(cat, || {
        ddl(&format!("CREATE SCHEMA {} AUTHORIZATION {}", quote_identifier(&build), quote_identifier(&owner)))
    });
    sandbox::run_as(p.owner, catalog::PINNED_PATH, || copy_grants_schema(&live, &build));
    match r.setup {
        // The setup function runs as the owner with the build schema first on its search_path, so
        // an unqualified CREATE TABLE lands in the copy; it also gets the schema's name.
        Some(setup) => {
            let path = sandbox::handler_path(Some(&build), &p.search_path);
            let arg = spi::text(&build).unwrap_or(pg_sys::Datum::from(0));
            crate::sandbox::handler::call_checked(setup, "setup function", p.owner, &p.name, &path, arg);
        }
        None => {
            for t in tables_of(&live, p.owner) {
                let (from, to) = (qualified(&live, &t.name), qualified(&build, &t.name));
                sandbox::run_as(p.owner, catalog::PINNED_PATH, || {
                    ddl(&format!("CREATE TABLE {to} (LIKE {from} INCLUDING ALL)"));
                    copy_grants_table(t.oid, &build, &t.name);
                });
            }
        }
    }
    mark_started(cat, p, r, Some(&build));
}

/// `<live><suffix><id>`, shortened so that it fits in a name (63 bytes): the live name is cut, at
/// a character boundary, never the suffix and id, so two rebuilds never derive the same name and
/// PostgreSQL never truncates one into another (a name that is taken anyway is refused).
pub fn derived_name(live: &str, suffix: &str, id: i64) -> String {
    const NAME_BYTES: usize = 63;
    let tail = format!("{suffix}{id}");
    let mut cut = NAME_BYTES.saturating_sub(tail.len()).min(live.len());
    while !live.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{tail}", &live[..cut])
}

/// The privileges of the rows of `acl_sql` (privilege, grantee, grantable), as GRANT statements on
/// `object` (already quoted), run one by one. Grantee names are quoted by `format('%I')`.
fn copy_grants(acl_sql: &str, arg: pg_sys::Oid, object: &str) {
    let grants: Vec<(String, String, bool)> = Spi::connect(|c| {
        c.select(acl_sql, None, &[arg.into()])
            .map(|t| {
                t.filter_map(|r| {
                    Some((
                        r.get::<String>(1).ok().flatten()?,
                        r.get::<String>(2).ok().flatten()?,
                        r.get::<bool>(3).ok().flatten()?,
                    ))
                })
                .collect()
            })
            .unwrap_or_default()
    });
    for (privilege, grantee, grantable) in grants {
        if !privilege.bytes().all(|b| b.is_ascii_uppercase() || b == b' ') {
            continue; // aclexplode yields SQL keywords only; anything else is not ours to paste
        }
        let option = if grantable { " WITH GRANT OPTION" } else { "" };
        ddl(&format!("GRANT {privilege} ON {object} TO {grantee}{option}"));
    }
}

/// Readers keep their privileges across the switch: the copy gets the live table's grants.
fn copy_grants_table(from: pg_sys::Oid, schema: &str, table: &str) {
    copy_grants(
        "SELECT a.privilege_type, CASE WHEN a.grantee OPERATOR(pg_catalog.=) 0 THEN 'PUBLIC' \
                ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(a.grantee)) END, a.is_grantable \
         FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a \
         WHERE c.oid OPERATOR(pg_catalog.=) $1 AND a.grantee OPERATOR(pg_catalog.<>) c.relowner",
        from,
        &format!("TABLE {}", qualified(schema, table)),
    );
}

fn copy_grants_schema(from: &str, to: &str) {
    copy_grants(
        "SELECT a.privilege_type, CASE WHEN a.grantee OPERATOR(pg_catalog.=) 0 THEN 'PUBLIC' \
                ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(a.grantee)) END, a.is_grantable \
         FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a \
         WHERE n.oid OPERATOR(pg_catalog.=) $1 AND a.grantee OPERATOR(pg_catalog.<>) n.nspowner",
        namespace_oid(from),
        &format!("SCHEMA {}", quote_identifier(to)),
    );
}

/// The handler a rebuild runs: the new version if one was given, against the build copy for
/// blue-green, against the live tables for in-place.
pub fn rebuild_handler(p: &Projection, r: &Rebuild) -> crate::sandbox::handler::Handler {
    match r.strategy {
        Strategy::InPlace => p.live_handler(),
        Strategy::BlueGreen => p.handler_for(r.new_handler.unwrap_or(p.handler), r.build_schema.as_deref()),
    }
}

/// R1..Rk / B1..Bk, and the hand-off Rf / Bf once the replay is within a twentieth of a batch of the head, or
/// no longer gaining on it (appends outpacing the replay): then the hand-off catches up the rest
/// under the lock, and appends to this projection wait for that. Without this a rebuild under a
/// sustained write load faster than its handler would never finish.
fn replay_or_handoff(cat: &Catalog, p: &Projection, r: &Rebuild) -> Progress {
    let h = rebuild_handler(p, r);
    let hw = highwater::compute();
    let batch = registry::batch_size();
    count_total(cat, p, r);
    let gap = hw - r.checkpoint;
    let gaining = r.behind.is_none_or(|previous| gap < previous);
    // Hand off only when the catch-up under the lock is small: appends to this projection wait
    // for it. Each replay step takes the distance that built up during the previous one, so the
    // gap shrinks to what arrives during one short step.
    if gap > replay::handoff_threshold(batch) && gaining {
        let a = replay::apply_step(&h, p.filter(), cat.events_type, r.checkpoint, hw, batch);
        let checkpoint = a.through;
        advance(cat, p, r, checkpoint, a.events, gap);
        return Progress::Busy;
    }
    handoff_final(cat, p, r, &h)
}

/// Rf / Bf: under the exclusive lock, every visible event above the checkpoint, then the switch.
fn handoff_final(cat: &Catalog, p: &Projection, r: &Rebuild, h: &crate::sandbox::handler::Handler) -> Progress {
    lock_for_handoff(p);
    // Statements from here on take their snapshots after the lock was granted (READ COMMITTED).
    let head = highwater::last_value();
    let a = replay::apply_all(h, p.filter(), cat.events_type, r.checkpoint, head, registry::batch_size(), Snap::Fresh);
    advance(cat, p, r, a.through, a.events, 0);
    let mut previous = None;
    match r.strategy {
        Strategy::InPlace => {
            exec_priv(cat, &SET_STATUS, &[p.id.into_datum(), spi::text(Status::Active.as_str())]);
        }
        Strategy::BlueGreen => {
            let prev = switch_schemas(cat, p, r);
            exec_priv(
                cat,
                &Stmt {
                    // A new handler leaves the replay handler behind: it was the old one's twin.
                    sql: "UPDATE ep.projections SET handler = COALESCE($2::oid::regprocedure, handler), \
                                 batch = COALESCE($3, batch), generation = generation + 1, \
                                 replay_handler = CASE WHEN $2 IS NULL THEN replay_handler END WHERE id = $1",
                    types: &[pg_sys::INT4OID, pg_sys::OIDOID, pg_sys::BOOLOID],
                },
                &[
                    p.id.into_datum(),
                    r.new_handler.into_datum(),
                    r.new_handler.and_then(registry::takes_batch).into_datum(),
                ],
            );
            previous = Some(prev);
        }
    }
    exec_priv(
        cat,
        &FINISH,
        &[r.id.into_datum(), spi::text(RebuildStatus::Done.as_str()), previous.as_deref().and_then(spi::text), None],
    );
    inflight::bump_epoch_at_commit();
    Progress::Finished
}

/// The switch of a blue-green rebuild: the live schema becomes `<schema>__ep_prev_<id>` and the
/// build schema takes its name. Returns the previous copy's name.
pub fn switch_schemas(cat: &Catalog, p: &Projection, r: &Rebuild) -> String {
    let live = p.schema.clone().unwrap_or_default();
    let build = r.build_schema.clone().unwrap_or_else(|| derived_name(&live, "__ep_build_", r.id));
    let prev = derived_name(&live, "__ep_prev_", r.id);
    // Both copies are the owner's (checked again: this is the step that renames them), and the
    // name for the previous copy is free (never dropped to make room).
    for schema in [&live, &build] {
        let nsp = namespace_oid(schema);
        let owned = if nsp == pg_sys::Oid::INVALID {
            Err(RegistryError::NoSchema(schema.clone()))
        } else {
            registry::check_schema_owner(nsp, schema, p.owner)
        };
        if let Err(e) = owned {
            crate::pg::error::raise(&e);
        }
    }
    require_free_name(&prev);
    let mut tables: Vec<String> = tables_of(&live, p.owner).iter().map(|t| qualified(&live, &t.name)).collect();
    tables.extend(tables_of(&build, p.owner).iter().map(|t| qualified(&build, &t.name)));
    handoff::set_local_lock_timeout(settings::handoff_lock_timeout_ms());
    // Renaming a schema needs CREATE on the database, which the owner may lack: done by the
    // extension, on the two schemas just checked to be the owner's.
    catalog::privileged(cat, || {
        // Readers in the middle of a statement on either copy finish first (within the lock
        // timeout); statements that start later resolve the names after the switch commits.
        if !tables.is_empty() {
            ddl(&format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", tables.join(", ")));
        }
        ddl(&format!("ALTER SCHEMA {} RENAME TO {}", quote_identifier(&live), quote_identifier(&prev)));
        ddl(&format!("ALTER SCHEMA {} RENAME TO {}", quote_identifier(&build), quote_identifier(&live)));
    });
    // The copy replaces the relations; the owner's routines (the handler often lives here) stay
    // in the live schema, so dropping the previous copy never drops them. Moved as the owner.
    sandbox::run_as(p.owner, catalog::PINNED_PATH, || {
        let moves: Vec<String> = Spi::connect(|c| {
            c.select(
                "SELECT pg_catalog.format('ALTER ROUTINE %I.%I(%s) SET SCHEMA %I', n.nspname, p.proname, \
                        pg_catalog.pg_get_function_identity_arguments(p.oid), $2) \
                 FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) p.pronamespace \
                 WHERE n.nspname OPERATOR(pg_catalog.=) $1 AND pg_catalog.pg_has_role($3, p.proowner, 'USAGE') \
                   AND NOT EXISTS ( \
                     SELECT 1 FROM pg_catalog.pg_proc q JOIN pg_catalog.pg_namespace m ON m.oid OPERATOR(pg_catalog.=) q.pronamespace \
                      WHERE m.nspname OPERATOR(pg_catalog.=) $2 AND q.proname OPERATOR(pg_catalog.=) p.proname \
                        AND q.proargtypes OPERATOR(pg_catalog.=) p.proargtypes)",
                None,
                &[prev.as_str().into(), live.as_str().into(), p.owner.into()],
            )
            .map(|t| t.filter_map(|r| r.get::<String>(1).ok().flatten()).collect())
            .unwrap_or_default()
        });
        for stmt in moves {
            ddl(&stmt);
        }
    });
    prev
}

/// A cancel: blue-green drops its copy; in-place leaves the projection `stale` (its model was
/// emptied and is incomplete; appends keep skipping it until a new rebuild).
fn cancel_running(cat: &Catalog, p: &Projection, r: &Rebuild) -> Progress {
    finish_unsuccessfully(cat, p, r, RebuildStatus::Cancelled, None)
}

/// Ends a rebuild that will not complete (cancelled, or failed too often).
pub fn finish_unsuccessfully(
    cat: &Catalog,
    p: &Projection,
    r: &Rebuild,
    status: RebuildStatus,
    error: Option<&str>,
) -> Progress {
    match r.strategy {
        Strategy::BlueGreen => {
            // The copy this rebuild created, dropped as its owner; a schema of that name that is
            // not the owner's any more is left alone.
            if let Some(b) = &r.build_schema {
                let nsp = namespace_oid(b);
                if nsp != pg_sys::Oid::INVALID && registry::check_schema_owner(nsp, b, p.owner).is_ok() {
                    sandbox::run_as(p.owner, catalog::PINNED_PATH, || {
                        ddl(&format!("DROP SCHEMA {} CASCADE", quote_identifier(b)))
                    });
                }
            }
        }
        // An async projection's in-place rebuild only reset its position: delivery goes on from
        // where it is, so the projection is active again (it was `rebuilding` meanwhile).
        Strategy::InPlace if r.phase != Phase::Queued && p.mode == ProjectionMode::Async => {
            exec_priv(cat, &SET_STATUS, &[p.id.into_datum(), spi::text(Status::Active.as_str())]);
            inflight::bump_epoch_at_commit();
        }
        Strategy::InPlace if r.phase != Phase::Queued && p.mode == ProjectionMode::Inline => {
            // Appends must keep skipping: the model is incomplete. No lock needed: the status was
            // already not `active`, so no append applies the handler either way.
            exec_priv(cat, &SET_STATUS, &[p.id.into_datum(), spi::text(Status::Stale.as_str())]);
            inflight::bump_epoch_at_commit();
        }
        Strategy::InPlace => {}
    }
    exec_priv(cat, &FINISH, &[r.id.into_datum(), spi::text(status.as_str()), None, error.and_then(spi::text)]);
    Progress::Finished
}

static RECORD_ATTEMPT: Stmt = Stmt {
    sql: "UPDATE ep.rebuilds SET attempts = attempts + 1, error = $2 WHERE id = $1 RETURNING attempts",
    types: &[pg_sys::INT8OID, pg_sys::TEXTOID],
};

/// Records a failed step; returns the attempts so far.
pub fn record_failure(cat: &Catalog, r: &Rebuild, error: &str) -> i64 {
    exec_priv(cat, &RECORD_ATTEMPT, &[r.id.into_datum(), spi::text(error)]).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A derived name fits in 63 bytes, is valid UTF-8 (a cut never splits a character), keeps
        /// the whole suffix and id, and starts with as much of the live name as fits: two rebuilds
        /// (ids) of one schema never derive the same name.
        #[test]
        fn derived_names_fit_and_never_collide(live in "[a-zé\"' .;\\\\]{1,70}", a in 1i64..10_000_000, b in 1i64..10_000_000) {
            let (x, y) = (derived_name(&live, "__ep_build_", a), derived_name(&live, "__ep_build_", b));
            prop_assert!(x.len() <= 63, "{} is {} bytes", x, x.len());
            let suffix = format!("__ep_build_{a}");
            prop_assert!(x.ends_with(&suffix));
            prop_assert!(live.starts_with(&x[..x.len() - suffix.len()]));
            prop_assert_eq!(a == b, x == y);
            prop_assert_ne!(derived_name(&live, "__ep_prev_", a), x);
        }
    }
}
