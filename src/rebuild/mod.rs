//! Rebuilds: the SQL API that queues and observes them, and the steps the worker runs (DESIGN.md
//! 3.2, 3.3 and 5). Every step is one transaction of the worker; the rebuild's row carries its
//! phase and checkpoint, so a crash at any point resumes from the last committed step.

use crate::catalog::{self, Catalog};
use crate::error::{required, required_text, ArgError, SqlError};
use crate::handler::quote_ident;
use crate::handoff::{self, Mode};
use crate::registry::{self, Projection, ProjectionMode, RegistryError};
use crate::spi::{self, Snap, Stmt};
use crate::{highwater, inflight, replay, settings};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::fmt::Display;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    InPlace,
    BlueGreen,
}

impl Strategy {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "in_place" => Some(Strategy::InPlace),
            "blue_green" => Some(Strategy::BlueGreen),
            _ => None,
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            Strategy::InPlace => "in_place",
            Strategy::BlueGreen => "blue_green",
        }
    }
}

#[derive(Debug)]
pub enum RebuildError {
    Arg(ArgError),
    Registry(RegistryError),
    NotPreloaded,
    OtherDatabase { served: String },
    NoSchema { projection: String },
    UnknownRebuild(i64),
    QueuedHere(i64),
    Timeout { id: i64, waited: String },
}

impl From<ArgError> for RebuildError {
    fn from(e: ArgError) -> Self {
        RebuildError::Arg(e)
    }
}
impl From<RegistryError> for RebuildError {
    fn from(e: RegistryError) -> Self {
        RebuildError::Registry(e)
    }
}

impl Display for RebuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RebuildError::Arg(e) => e.fmt(f),
            RebuildError::Registry(e) => e.fmt(f),
            RebuildError::NotPreloaded => {
                write!(f, "event_projections is not loaded through shared_preload_libraries, so no worker can run rebuilds or async projections")
            }
            RebuildError::OtherDatabase { served } => write!(
                f,
                "the event_projections worker serves database \"{served}\", not this one"
            ),
            RebuildError::NoSchema { projection } => write!(
                f,
                "projection \"{projection}\" has no read_model_schema, so a rebuild does not know which tables to rebuild"
            ),
            RebuildError::UnknownRebuild(id) => write!(f, "rebuild {id} does not exist"),
            RebuildError::QueuedHere(id) => write!(
                f,
                "rebuild {id} was queued or changed by this transaction, so the worker cannot start it before the transaction commits"
            ),
            RebuildError::Timeout { id, waited } => write!(f, "rebuild {id} did not finish within {waited}"),
        }
    }
}

impl SqlError for RebuildError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            RebuildError::Arg(e) => e.sqlstate(),
            RebuildError::Registry(e) => e.sqlstate(),
            RebuildError::NotPreloaded
            | RebuildError::OtherDatabase { .. }
            | RebuildError::NoSchema { .. }
            | RebuildError::QueuedHere(_) => {
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            RebuildError::UnknownRebuild(_) => ERRCODE_UNDEFINED_OBJECT,
            RebuildError::Timeout { .. } => ERRCODE_QUERY_CANCELED,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            RebuildError::NotPreloaded => Some(
                "Add shared_preload_libraries = 'event_projections' and event_projections.database = '<this database>' to postgresql.conf and restart the server.".into(),
            ),
            RebuildError::OtherDatabase { .. } => Some(
                "Set event_projections.database to this database in postgresql.conf and reload (SELECT pg_reload_conf()).".into(),
            ),
            RebuildError::NoSchema { projection } => Some(format!(
                "Register the projection again with read_model_schema naming the schema of its tables (ep_unregister_projection('{projection}') first)."
            )),
            RebuildError::Timeout { .. } => Some("The rebuild goes on; call ep_rebuild_wait again or watch ep.projection_status.".into()),
            RebuildError::QueuedHere(id) => Some(format!(
                "Commit first, then SELECT ep_rebuild_wait({id}) (or CALL ep_rebuild_await({id})) in a new transaction."
            )),
            _ => None,
        }
    }
}

/// Checks that a worker can run work of this database.
pub fn require_worker() -> Result<(), RebuildError> {
    if !inflight::available() {
        return Err(RebuildError::NotPreloaded);
    }
    let served = settings::database();
    let here = unsafe { std::ffi::CStr::from_ptr(pg_sys::get_database_name(pg_sys::MyDatabaseId)) }
        .to_string_lossy()
        .into_owned();
    if served != here {
        return Err(RebuildError::OtherDatabase { served });
    }
    Ok(())
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
    if let Some(h) = new_handler {
        registry::validate_handler(&cat, h, caller)?;
    }
    if let Some(f) = setup {
        validate_setup(f)?;
    }
    require_worker()?;
    let existing = Spi::connect(|_| spi::exec(&OPEN_REBUILD, &[p.id.into_datum()], Snap::Latest, 0).get::<i64>(0, 1));
    if let Some(id) = existing.filter(|_| true) {
        return Ok(id);
    }
    let id = catalog::privileged(&cat, || {
        Spi::connect(|_| {
            let rows = spi::exec(
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
        None => Ok(Spi::connect(|_| spi::exec(&OPEN_REBUILD, &[p.id.into_datum()], Snap::Latest, 0).get::<i64>(0, 1))
            .unwrap_or(0)),
    }
}

fn validate_setup(f: pg_sys::Oid) -> Result<(), RegistryError> {
    let ok = Spi::connect(|c| {
        c.select(
            "SELECT pronargs = 1 AND proargtypes[0] IN ('text'::regtype, 'name'::regtype) AND prokind = 'f' \
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
            handler: crate::handler::regprocedure_text(f),
            problem: "a setup function takes one text argument (the schema to create the tables in)".into(),
        })
    }
}

static REBUILD_STATUS: Stmt =
    Stmt { sql: "SELECT status, xmin::text::bigint FROM ep.rebuilds WHERE id = $1", types: &[pg_sys::INT8OID] };

/// `ep_rebuild_wait`: the final status once the rebuild ends.
pub fn wait(id: Option<i64>, timeout: Option<pgrx::datum::Interval>) -> Result<String, RebuildError> {
    let id = required(id, "rebuild_id")?;
    let timeout = required(timeout, "timeout")?;
    let micros = interval_micros(&timeout);
    if micros < 0 {
        return Err(ArgError::Invalid { arg: "timeout", problem: "it is negative".into() }.into());
    }
    let start = std::time::Instant::now();
    loop {
        let (status, xmin): (Option<String>, Option<i64>) = Spi::connect(|_| {
            let r = spi::exec(&REBUILD_STATUS, &[id.into_datum()], Snap::Latest, 0);
            (r.get(0, 1), r.get(0, 2))
        });
        match status.as_deref() {
            None => return Err(RebuildError::UnknownRebuild(id)),
            Some("done") | Some("failed") | Some("cancelled") => return Ok(status.unwrap_or_default()),
            _ => {}
        }
        // Queued (or cancelled) by this very transaction: the worker cannot see it before the
        // commit, so waiting here would only run out the timeout.
        let mine = xmin.is_some_and(|x| unsafe {
            pg_sys::TransactionIdIsCurrentTransactionId(pg_sys::TransactionId::from_inner(x as u32))
        });
        if mine {
            return Err(RebuildError::QueuedHere(id));
        }
        if start.elapsed().as_micros() as i64 >= micros {
            return Err(RebuildError::Timeout { id, waited: format!("{timeout}") });
        }
        crate::backend::sleep_ms(20);
    }
}

pub fn interval_micros(i: &pgrx::datum::Interval) -> i64 {
    i.micros() + (i.days() as i64) * 86_400_000_000 + (i.months() as i64) * 30 * 86_400_000_000
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
        Spi::connect(|_| spi::exec(&CANCEL, &[p.id.into_datum()], Snap::Fresh, 0).get::<i64>(0, 1))
    });
    inflight::bump_epoch_at_commit();
    Ok(id)
}

// ---------------------------------------------------------------------------------------------
// The steps the worker runs. Each is called inside its own transaction, by the process that holds
// the projection's ownership lock.

/// One open rebuild, as a step needs it.
#[derive(Clone, Debug)]
pub struct Rebuild {
    pub id: i64,
    pub target_position: i64,
    pub behind: Option<i64>,
    pub strategy: Strategy,
    pub phase: String,
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
    Spi::connect(|_| {
        let r = spi::exec(&OPEN, &[id.into_datum()], Snap::Fresh, 0);
        (!r.is_empty()).then(|| Rebuild {
            id: r.get(0, 1).unwrap_or(0),
            strategy: r.get::<String>(0, 2).and_then(|s| Strategy::parse(&s)).unwrap_or(Strategy::InPlace),
            phase: r.get(0, 3).unwrap_or_default(),
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
    catalog::privileged(cat, || Spi::connect(|_| spi::exec(stmt, args, Snap::Fresh, 0).get::<i64>(0, 1)))
}

/// Runs a utility or DDL statement built at run time, as the role that is current.
fn ddl(sql: &str) {
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
          WHERE id = $1",
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

static ADVANCE: Stmt = Stmt {
    sql: "UPDATE ep.rebuilds SET checkpoint = $2, events_done = events_done + $3, \
                 events_total = GREATEST(events_total, events_done + $3), behind = $4 WHERE id = $1",
    types: &[pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::INT8OID],
};

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
    match (r.strategy, r.phase.as_str()) {
        (Strategy::InPlace, "queued") => start_in_place(cat, p, r),
        (Strategy::BlueGreen, "queued") => start_blue_green(cat, p, r),
        _ => replay_or_handoff(cat, p, r),
    }
}

/// The tables of a schema, qualified and quoted.
fn tables_of(schema: &str) -> Vec<String> {
    Spi::connect(|c| {
        c.select(
            "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition ORDER BY c.relname",
            None,
            &[schema.into()],
        )
        .map(|t| t.filter_map(|r| r.get::<String>(1).ok().flatten()).collect())
        .unwrap_or_default()
    })
}

/// Empties the tables of the projection's read-model schema, as the projection's owner (emptying
/// the model is the owner's privilege, not the worker's).
pub fn truncate_model(p: &Projection) {
    let tables = tables_of(p.schema.as_deref().unwrap_or_default());
    if !tables.is_empty() {
        catalog::run_as(p.owner, catalog::PINNED_PATH, || ddl(&format!("TRUNCATE {}", tables.join(", "))));
    }
}

/// Marks the rebuild running, with its build schema and the number of events it will replay.
pub fn mark_started(cat: &Catalog, r: &Rebuild, build: Option<&str>) {
    exec_priv(cat, &START, &[r.id.into_datum(), build.and_then(spi::text)]);
}

/// Fills in the number of events a running rebuild will replay, once (it reads the whole log, so
/// a replay step does it, never a hand-off).
pub fn count_total(cat: &Catalog, p: &Projection, r: &Rebuild) {
    if !r.total_counted {
        exec_priv(cat, &COUNT_TOTAL, &[r.id.into_datum(), p.id.into_datum()]);
    }
}

/// R0: the hand-off that empties the live model and makes appends skip the projection.
fn start_in_place(cat: &Catalog, p: &Projection, r: &Rebuild) -> Progress {
    lock_for_handoff(p);
    exec_priv(cat, &SET_STATUS, &[p.id.into_datum(), spi::text("rebuilding")]);
    truncate_model(p);
    mark_started(cat, r, None);
    inflight::bump_epoch_at_commit();
    Progress::Busy
}

/// B0: a fresh copy of the read model, next to the live one.
fn start_blue_green(cat: &Catalog, p: &Projection, r: &Rebuild) -> Progress {
    create_build_copy(cat, p, r);
    Progress::Busy
}

/// Creates the build schema (tables copied from the live ones, or made by the setup function)
/// and marks the rebuild started.
pub fn create_build_copy(cat: &Catalog, p: &Projection, r: &Rebuild) {
    let live = p.schema.clone().unwrap_or_default();
    let build = build_schema_name(&live, r.id);
    let owner = role_name(p.owner);
    // Creating a schema needs CREATE on the database, which the owner may lack: the worker creates
    // it for the owner. Everything inside is created as the owner.
    catalog::privileged(cat, || {
        ddl(&format!("DROP SCHEMA IF EXISTS {} CASCADE", quote_ident(&build)));
        ddl(&format!("CREATE SCHEMA {} AUTHORIZATION {}", quote_ident(&build), quote_ident(&owner)));
        copy_grants_schema(&live, &build);
    });
    match r.setup {
        // The setup function runs as the owner with the build schema first on its search_path, so
        // an unqualified CREATE TABLE lands in the copy; it also gets the schema's name.
        Some(setup) => {
            let path = crate::handler::search_path_for(Some(&build), &p.search_path);
            catalog::run_as(p.owner, &path, || unsafe {
                pg_sys::OidFunctionCall1Coll(setup, pg_sys::Oid::INVALID, spi::text(&build).unwrap_or(pg_sys::Datum::from(0)));
            });
        }
        None => {
            for t in tables_of(&live) {
                let name = t.rsplit('.').next().unwrap_or_default().to_string();
                let target = format!("{}.{}", quote_ident(&build), name);
                catalog::run_as(p.owner, catalog::PINNED_PATH, || {
                    ddl(&format!("CREATE TABLE {target} (LIKE {t} INCLUDING ALL)"))
                });
                catalog::privileged(cat, || copy_grants_table(&t, &target));
            }
        }
    }
    mark_started(cat, r, Some(&build));
}

fn build_schema_name(live: &str, id: i64) -> String {
    format!("{live}__ep_build_{id}")
}

fn prev_schema_name(live: &str, id: i64) -> String {
    format!("{live}__ep_prev_{id}")
}

fn role_name(role: pg_sys::Oid) -> String {
    unsafe {
        let p = pg_sys::GetUserNameFromId(role, false);
        std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

fn grants(sql: &str, arg: &str) -> Vec<String> {
    Spi::connect(|c| {
        c.select(sql, None, &[arg.into()])
            .map(|t| t.filter_map(|r| r.get::<String>(1).ok().flatten()).collect())
            .unwrap_or_default()
    })
}

/// Readers keep their privileges across the switch: the copy gets the live tables' grants.
fn copy_grants_table(from: &str, to: &str) {
    let stmts = grants(
        &format!(
            "SELECT pg_catalog.format('GRANT %s ON TABLE {to} TO %s', a.privilege_type, \
                    CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(a.grantee)) END) \
             FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a \
             WHERE c.oid = $1::regclass AND a.grantee <> c.relowner"
        ),
        from,
    );
    for s in stmts {
        ddl(&s);
    }
}

fn copy_grants_schema(from: &str, to: &str) {
    let stmts = grants(
        &format!(
            "SELECT pg_catalog.format('GRANT %s ON SCHEMA {} TO %s', a.privilege_type, \
                    CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(a.grantee)) END) \
             FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a \
             WHERE n.nspname = $1 AND a.grantee <> n.nspowner",
            quote_ident(to)
        ),
        from,
    );
    for s in stmts {
        ddl(&s);
    }
}

/// The handler a rebuild runs: the new version if one was given, against the build copy for
/// blue-green, against the live tables for in-place.
fn rebuild_handler(p: &Projection, r: &Rebuild) -> crate::handler::Handler {
    match r.strategy {
        Strategy::InPlace => p.live_handler(),
        Strategy::BlueGreen => p.handler_for(r.new_handler.unwrap_or(p.handler), r.build_schema.as_deref()),
    }
}

/// The distance to the head, in positions, at which a replay hands off: what the hand-off then
/// catches up under its exclusive lock while appends to the projection wait. A twentieth of a
/// batch, at most 50 positions, so that a large `batch_size` (chosen for fast batch-handler
/// replays) does not lengthen the stall.
pub fn handoff_threshold(batch: i64) -> i64 {
    (batch / 20).clamp(1, 50)
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
    if gap > handoff_threshold(batch) && gaining {
        let a = replay::apply(&h, p.filter(), cat.events_type, r.checkpoint, hw, batch, Snap::Fresh);
        let checkpoint = a.through;
        exec_priv(cat, &ADVANCE, &[r.id.into_datum(), spi::int8(checkpoint), spi::int8(a.events), spi::int8(gap)]);
        return Progress::Busy;
    }
    handoff_final(cat, p, r, &h)
}

/// Rf / Bf: under the exclusive lock, every visible event above the checkpoint, then the switch.
fn handoff_final(cat: &Catalog, p: &Projection, r: &Rebuild, h: &crate::handler::Handler) -> Progress {
    lock_for_handoff(p);
    // Statements from here on take their snapshots after the lock was granted (READ COMMITTED).
    let head = highwater::last_value();
    let a = replay::apply_all(h, p.filter(), cat.events_type, r.checkpoint, head, registry::batch_size(), Snap::Fresh);
    exec_priv(cat, &ADVANCE, &[r.id.into_datum(), spi::int8(a.through), spi::int8(a.events), spi::int8(0)]);
    let mut previous = None;
    match r.strategy {
        Strategy::InPlace => {
            exec_priv(cat, &SET_STATUS, &[p.id.into_datum(), spi::text("active")]);
        }
        Strategy::BlueGreen => {
            let prev = switch_schemas(cat, p, r);
            exec_priv(
                cat,
                &Stmt {
                    sql: "UPDATE ep.projections SET handler = COALESCE($2::oid::regprocedure, handler), \
                                 batch = COALESCE($3, batch), generation = generation + 1 WHERE id = $1",
                    types: &[pg_sys::INT4OID, pg_sys::OIDOID, pg_sys::BOOLOID],
                },
                &[p.id.into_datum(), r.new_handler.into_datum(), r.new_handler.and_then(registry::takes_batch).into_datum()],
            );
            previous = Some(prev);
        }
    }
    exec_priv(cat, &FINISH, &[r.id.into_datum(), spi::text("done"), previous.as_deref().and_then(spi::text), None]);
    inflight::bump_epoch_at_commit();
    Progress::Finished
}

/// The switch of a blue-green rebuild: the live schema becomes `<schema>__ep_prev_<id>` and the
/// build schema takes its name. Returns the previous copy's name.
pub fn switch_schemas(cat: &Catalog, p: &Projection, r: &Rebuild) -> String {
    let live = p.schema.clone().unwrap_or_default();
    let build = r.build_schema.clone().unwrap_or_else(|| build_schema_name(&live, r.id));
    let prev = prev_schema_name(&live, r.id);
    let mut tables = tables_of(&live);
    tables.extend(tables_of(&build));
    handoff::set_local_lock_timeout(settings::handoff_lock_timeout_ms());
    catalog::privileged(cat, || {
        // Readers in the middle of a statement on either copy finish first (within the lock
        // timeout); statements that start later resolve the names after the switch commits.
        if !tables.is_empty() {
            ddl(&format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", tables.join(", ")));
        }
        ddl(&format!("DROP SCHEMA IF EXISTS {} CASCADE", quote_ident(&prev)));
        ddl(&format!("ALTER SCHEMA {} RENAME TO {}", quote_ident(&live), quote_ident(&prev)));
        ddl(&format!("ALTER SCHEMA {} RENAME TO {}", quote_ident(&build), quote_ident(&live)));
        // The copy replaces the relations; routines (the handler often lives here) stay in the
        // live schema, so dropping the previous copy never drops them.
        for stmt in grants(
            &format!(
                "SELECT pg_catalog.format('ALTER ROUTINE %s SET SCHEMA %I', p.oid::regprocedure, {live_lit}) \
                 FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
                 WHERE n.nspname = $1 AND NOT EXISTS ( \
                     SELECT 1 FROM pg_catalog.pg_proc q JOIN pg_catalog.pg_namespace m ON m.oid = q.pronamespace \
                      WHERE m.nspname = {live_lit} AND q.proname = p.proname AND q.proargtypes = p.proargtypes)",
                live_lit = pgrx::spi::quote_literal(&live)
            ),
            &prev,
        ) {
            ddl(&stmt);
        }
    });
    prev
}

/// A cancel: blue-green drops its copy; in-place leaves the projection `stale` (its model was
/// emptied and is incomplete; appends keep skipping it until a new rebuild).
fn cancel_running(cat: &Catalog, p: &Projection, r: &Rebuild) -> Progress {
    finish_unsuccessfully(cat, p, r, "cancelled", None)
}

/// Ends a rebuild that will not complete (cancelled, or failed too often).
pub fn finish_unsuccessfully(cat: &Catalog, p: &Projection, r: &Rebuild, status: &str, error: Option<&str>) -> Progress {
    match r.strategy {
        Strategy::BlueGreen => {
            if let Some(b) = &r.build_schema {
                catalog::privileged(cat, || ddl(&format!("DROP SCHEMA IF EXISTS {} CASCADE", quote_ident(b))));
            }
        }
        Strategy::InPlace if r.phase != "queued" && p.mode == ProjectionMode::Inline => {
            // Appends must keep skipping: the model is incomplete. No lock needed: the status was
            // already not `active`, so no append applies the handler either way.
            exec_priv(cat, &SET_STATUS, &[p.id.into_datum(), spi::text("stale")]);
            inflight::bump_epoch_at_commit();
        }
        Strategy::InPlace => {}
    }
    exec_priv(cat, &FINISH, &[r.id.into_datum(), spi::text(status), None, error.and_then(spi::text)]);
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
