//! The projection registry: registration (a hand-off, DESIGN.md 3.1), unregistration, and the
//! views of it that appends, rebuilds and the worker read.

pub mod status;

use crate::handoff::{self, Mode};
use crate::pg::catalog::{self, Catalog};
use crate::pg::error::{required, required_text, ArgError, SqlError};
use crate::pg::spi::{self, Snap, Stmt};
use crate::sandbox::handler::Handler;
use crate::sandbox::replay;
use pgrx::pg_sys;
use pgrx::prelude::*;

/// Declares an enum whose variants stand for the SQL values of a status column (or of a view's,
/// like `ep.workers.doing`), with the mapping in one place (the CHECK constraints of
/// sql/schema.sql list the same values).
macro_rules! sql_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident = $sql:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name { $($variant),+ }
        impl $name {
            #[allow(dead_code)] // not every value is read back from SQL
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($sql => Some($name::$variant),)+ _ => None }
            }
            #[allow(dead_code)] // not every column is written from Rust
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $sql),+ }
            }
        }
    };
}
pub(crate) use sql_enum;

sql_enum! {
    /// `ep.projections.mode`.
    ProjectionMode { Inline = "inline", Async = "async" }
}

sql_enum! {
    /// `ep.projections.status`.
    Status { Active = "active", Rebuilding = "rebuilding", Stale = "stale", Failed = "failed" }
}

/// One row of ep.projections, as the code needs it.
#[derive(Clone, Debug)]
pub struct Projection {
    pub id: i32,
    pub name: String,
    pub handler: pg_sys::Oid,
    pub batch: bool,
    /// The set-based replay handler `(after_position bigint, up_to_position bigint)`, if any.
    pub replay: Option<pg_sys::Oid>,
    pub mode: ProjectionMode,
    pub event_types: Option<Vec<String>>,
    pub schema: Option<String>,
    pub owner: pg_sys::Oid,
    pub search_path: String,
    pub status: Status,
    pub generation: i64,
    pub position: i64,
}

impl Projection {
    pub fn is_active(&self) -> bool {
        self.status == Status::Active
    }

    /// The events this projection receives (inline projections never skip).
    pub fn filter(&self) -> replay::Filter<'_> {
        replay::Filter { types: self.event_types.as_ref(), skip: None }
    }

    /// The handler as it runs against the live read model.
    pub fn live_handler(&self) -> Handler {
        self.handler_for(self.handler, self.schema.as_deref())
    }

    /// The handler `function` running against the read model in `schema`. Whether it takes
    /// batches is stored for the live handler (no catalog lookup on the append path) and looked up
    /// for another one (a rebuild's new handler).
    pub fn handler_for(&self, function: pg_sys::Oid, schema: Option<&str>) -> Handler {
        let batch = if function == self.handler { self.batch } else { takes_batch(function).unwrap_or(self.batch) };
        Handler {
            projection: self.name.clone(),
            function,
            batch,
            // The replay handler is the set-based twin of the registered handler only.
            replay: if function == self.handler { self.replay } else { None },
            owner: self.owner,
            search_path: crate::sandbox::handler_path(schema, &self.search_path),
        }
    }
}

/// Statement text with the column list `row_to_projection` reads, in its order. The `v1` form is
/// for a database whose extension is still at 0.1.0 (no `replay_handler` column yet): the library
/// serves it until ALTER EXTENSION ... UPDATE.
macro_rules! with_columns {
    ($head:literal, $tail:literal) => {
        with_columns!(@ $head, "replay_handler::oid", $tail)
    };
    (v1 $head:literal, $tail:literal) => {
        with_columns!(@ $head, "NULL::oid", $tail)
    };
    (@ $head:literal, $replay:literal, $tail:literal) => {
        concat!(
            $head,
            "id, name, handler::oid, batch, mode, event_types, read_model_schema, owner::oid, \
             search_path, status, generation, position, ",
            $replay,
            $tail
        )
    };
}

/// A statement in the current schema's form and in 0.1.0's.
struct Versioned {
    current: Stmt,
    v1: Stmt,
}

impl Versioned {
    /// The form this database's catalog takes.
    fn get(&'static self) -> &'static Stmt {
        if has_replay_column() {
            &self.current
        } else {
            &self.v1
        }
    }
}

/// Whether ep.projections has the `replay_handler` column (0.2.0 on), looked up each time: ALTER
/// EXTENSION ... UPDATE adds it under running backends.
fn has_replay_column() -> bool {
    // SAFETY: syscache lookups by name; get_attnum returns InvalidAttrNumber when there is none.
    unsafe {
        let ns = pg_sys::get_namespace_oid(c"ep".as_ptr(), true);
        let rel = pg_sys::get_relname_relid(c"projections".as_ptr(), ns);
        rel != pg_sys::Oid::INVALID
            && pg_sys::get_attnum(rel, c"replay_handler".as_ptr()) != pg_sys::InvalidAttrNumber as i16
    }
}

fn row_to_projection(rows: &spi::Rows, i: usize) -> Projection {
    Projection {
        id: rows.get(i, 1).unwrap_or(0),
        name: rows.get(i, 2).unwrap_or_default(),
        handler: rows.get(i, 3).unwrap_or(pg_sys::Oid::INVALID),
        batch: rows.get(i, 4).unwrap_or(false),
        mode: rows.get::<String>(i, 5).and_then(|m| ProjectionMode::parse(&m)).unwrap_or(ProjectionMode::Inline),
        event_types: rows.get(i, 6),
        schema: rows.get(i, 7),
        owner: rows.get(i, 8).unwrap_or(pg_sys::Oid::INVALID),
        search_path: rows.get(i, 9).unwrap_or_default(),
        // A value this code does not know is treated as not ready.
        status: rows.get::<String>(i, 10).and_then(|s| Status::parse(&s)).unwrap_or(Status::Stale),
        generation: rows.get(i, 11).unwrap_or(0),
        position: rows.get(i, 12).unwrap_or(0),
        replay: rows.get(i, 13),
    }
}

static BY_NAME: Versioned = Versioned {
    current: Stmt { sql: with_columns!("SELECT ", " FROM ep.projections WHERE name = $1"), types: &[pg_sys::TEXTOID] },
    v1: Stmt { sql: with_columns!(v1 "SELECT ", " FROM ep.projections WHERE name = $1"), types: &[pg_sys::TEXTOID] },
};

static BY_ID: Versioned = Versioned {
    current: Stmt { sql: with_columns!("SELECT ", " FROM ep.projections WHERE id = $1"), types: &[pg_sys::INT4OID] },
    v1: Stmt { sql: with_columns!(v1 "SELECT ", " FROM ep.projections WHERE id = $1"), types: &[pg_sys::INT4OID] },
};

static ALL: Versioned = Versioned {
    current: Stmt { sql: with_columns!("SELECT ", " FROM ep.projections ORDER BY id"), types: &[] },
    v1: Stmt { sql: with_columns!(v1 "SELECT ", " FROM ep.projections ORDER BY id"), types: &[] },
};

fn collect(rows: &spi::Rows) -> Vec<Projection> {
    (0..rows.len()).map(|i| row_to_projection(rows, i)).collect()
}

/// What appends need of the registry: every projection, and the subscriptions to notify.
pub struct View {
    pub projections: Vec<Projection>,
    pub channels: Vec<crate::subscription::Channel>,
}

/// The view as of registry epoch `epoch`, kept per backend.
struct KeptView {
    namespace: pg_sys::Oid,
    epoch: u64,
    view: std::rc::Rc<View>,
}

thread_local! {
    static KEPT_VIEW: std::cell::RefCell<Option<KeptView>> = const { std::cell::RefCell::new(None) };
}

/// A3/A5: the registry as a snapshot taken now would read it, and the registry epoch that view
/// belongs to. Read from the catalog only when the epoch moved since the last read: a change of
/// ep.projections or ep.subscriptions bumps the epoch after its commit is visible and before its
/// locks are released, so a caller holding the registry lock (A2) or a projection lock (A4) that
/// finds the epoch unchanged knows no change committed since the view was read (DESIGN.md 2,
/// "The view of the registry").
pub fn view_for_appends(cat: &Catalog) -> (std::rc::Rc<View>, Option<u64>) {
    // Without shared memory (not preloaded) there is no epoch to trust: None, never equal. A
    // transaction that changed the registry itself reads its own uncommitted change, which the
    // epoch does not show (it moves only at commit) and which a rollback, whole or to a savepoint,
    // takes back: such a view is never kept, and a kept one is not used (DESIGN.md 2).
    let trusted = crate::handoff::inflight::available() && !crate::handoff::inflight::registry_changed_here();
    let epoch = trusted.then(crate::handoff::inflight::registry_epoch);
    if let Some(e) = epoch {
        if let Some(v) = KEPT_VIEW.with(|c| {
            c.borrow().as_ref().filter(|v| v.epoch == e && v.namespace == cat.namespace).map(|v| v.view.clone())
        }) {
            return (v, epoch);
        }
    }
    // The epoch is read before the catalog: a change racing with this read leaves a view that is
    // at least as new as its epoch says, and the next call reads again.
    let view = std::rc::Rc::new(catalog::privileged(cat, || {
        let projections = Spi::connect(|client| collect(&spi::exec(client, ALL.get(), &[], Snap::Latest, 0)));
        View { projections, channels: crate::subscription::channels() }
    }));
    if let Some(epoch) = epoch {
        KEPT_VIEW.with(|c| *c.borrow_mut() = Some(KeptView { namespace: cat.namespace, epoch, view: view.clone() }));
    }
    (view, epoch)
}

/// The trigger function that keeps the kept view honest, in schema `ep` (sql/triggers.sql
/// creates its triggers on ep.projections and ep.subscriptions).
#[pg_schema]
mod ep {
    use pgrx::prelude::*;

    /// Any change of ep.projections (or ep.subscriptions) that matters to appends moves the
    /// registry epoch at commit (`registry::view_for_appends` relies on it, whoever makes the
    /// change).
    #[pg_trigger]
    fn projections_changed<'a>(
        _t: &'a PgTrigger<'a>,
    ) -> Result<Option<PgHeapTuple<'a, AllocatedByRust>>, PgHeapTupleError> {
        crate::handoff::inflight::bump_epoch_at_commit();
        Ok(None)
    }
}

/// Whether an append of `types` concerns inline projection `p` (A3).
pub fn inline_subscriber(p: &Projection, types: &[&str]) -> bool {
    p.mode == ProjectionMode::Inline && subscribes(p, types)
}

/// Whether an append of `types` gives async projection `p` something to deliver (then its commit
/// wakes the workers; other commits need not pay for a wake-up).
pub fn async_subscriber(p: &Projection, types: &[&str]) -> bool {
    p.mode == ProjectionMode::Async && p.status != Status::Failed && subscribes(p, types)
}

/// Whether projection `p` receives events of any of `types`.
pub fn subscribes(p: &Projection, types: &[&str]) -> bool {
    p.event_types.as_ref().is_none_or(|t| t.iter().any(|t| types.contains(&t.as_str())))
}

/// A projection by name, read with a snapshot taken now.
pub fn by_name(name: &str) -> Option<Projection> {
    catalog::read(|| {
        Spi::connect(|client| {
            collect(&spi::exec(client, BY_NAME.get(), &[spi::text(name)], Snap::Latest, 0)).into_iter().next()
        })
    })
}

/// A projection by id, read with a snapshot taken now.
pub fn by_id(id: i32) -> Option<Projection> {
    catalog::read(|| {
        Spi::connect(|client| {
            collect(&spi::exec(client, BY_ID.get(), &[id.into_datum()], Snap::Latest, 0)).into_iter().next()
        })
    })
}

/// Every projection, read with a snapshot taken now.
pub fn all() -> Vec<Projection> {
    catalog::read(|| Spi::connect(|client| collect(&spi::exec(client, ALL.get(), &[], Snap::Latest, 0))))
}

/// Whether the handler takes `ep.events[]` (Some(true)), `ep.events` (Some(false)), or neither.
pub fn takes_batch(function: pg_sys::Oid) -> Option<bool> {
    let cat = catalog::lookup()?;
    let (args, _, _, _) = signature(function)?;
    // SAFETY: a syscache lookup by type OID.
    let events_array = unsafe { pg_sys::get_array_type(cat.events_type) };
    match args.as_slice() {
        [t] if *t == cat.events_type => Some(false),
        [t] if *t == events_array => Some(true),
        _ => None,
    }
}

/// (argument types, return type, volatility, kind) of a function.
fn signature(function: pg_sys::Oid) -> Option<(Vec<pg_sys::Oid>, pg_sys::Oid, u8, u8)> {
    Spi::connect(|c| {
        let t = c
            .select(
                "SELECT proargtypes::oid[], prorettype, provolatile::text, prokind::text \
                 FROM pg_catalog.pg_proc WHERE oid = $1",
                None,
                &[function.into()],
            )
            .ok()?;
        let row = t.first();
        let args: Vec<pg_sys::Oid> = row.get::<Vec<pg_sys::Oid>>(1).ok().flatten()?;
        let ret: pg_sys::Oid = row.get(2).ok().flatten()?;
        let vol: String = row.get(3).ok().flatten()?;
        let kind: String = row.get(4).ok().flatten()?;
        Some((args, ret, vol.bytes().next()?, kind.bytes().next()?))
    })
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Arg(#[from] ArgError),
    #[error("projection \"{0}\" already exists")]
    Exists(String),
    #[error("projection \"{0}\" does not exist")]
    Unknown(String),
    #[error("function {handler} cannot be a projection handler: {problem}")]
    BadHandler { handler: String, problem: String },
    #[error("permission denied for function {handler}")]
    NoExecute { handler: String },
    #[error("schema \"{0}\" does not exist")]
    NoSchema(String),
    #[error("permission denied for schema {0}")]
    NoSchemaUsage(String),
    #[error(
        "a projection's read-model schema must be owned by its owner: schema \"{schema}\" is owned by \"{owner}\""
    )]
    NotSchemaOwner { schema: String, owner: String },
    #[error("a projection's code must be its owner's: function {function} is owned by \"{owner}\"")]
    NotFunctionOwner { function: String, owner: String },
    #[error("permission denied for table ep.events: a projection's owner must be able to read the log")]
    NoLogAccess,
    #[error("must be the owner of projection \"{projection}\" (or a member of its owner role)")]
    NotOwner { projection: String },
}

impl SqlError for RegistryError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            RegistryError::Arg(e) => e.sqlstate(),
            RegistryError::Exists(_) => ERRCODE_DUPLICATE_OBJECT,
            RegistryError::Unknown(_) => ERRCODE_UNDEFINED_OBJECT,
            RegistryError::BadHandler { .. } => ERRCODE_INVALID_FUNCTION_DEFINITION,
            RegistryError::NoExecute { .. }
            | RegistryError::NoSchemaUsage(_)
            | RegistryError::NotSchemaOwner { .. }
            | RegistryError::NotFunctionOwner { .. }
            | RegistryError::NoLogAccess
            | RegistryError::NotOwner { .. } => ERRCODE_INSUFFICIENT_PRIVILEGE,
            RegistryError::NoSchema(_) => ERRCODE_INVALID_SCHEMA_NAME,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            RegistryError::Exists(n) => Some(format!(
                "Choose another name, or SELECT ep_unregister_projection('{}') first.",
                n.replace('\'', "''")
            )),
            RegistryError::NotSchemaOwner { .. } => Some(
                "Use a schema you own (CREATE SCHEMA ... AUTHORIZATION you), or register as a member of the schema's owner role.".into(),
            ),
            RegistryError::NoLogAccess => Some("GRANT SELECT ON ep.events TO the registering role (README, \"Security\").".into()),
            RegistryError::NotFunctionOwner { .. } => Some(
                "Write a function of your own that calls it (a registered function cannot be dropped by its owner while it is used).".into(),
            ),
            RegistryError::Unknown(_) => Some("SELECT name FROM ep.projections lists the registered projections.".into()),
            RegistryError::BadHandler { .. } => Some(
                "A handler is a VOLATILE function (ep.events) RETURNS void, or (ep.events[]) RETURNS void to receive batches.".into(),
            ),
            RegistryError::NoSchema(s) => Some(format!("CREATE SCHEMA {} and its read-model tables first.", pgrx::spi::quote_identifier(s))),
            _ => None,
        }
    }
}

/// Checks that `function` can be a handler run as `runner` (the projection's owner), returning
/// whether it takes batches.
pub fn validate_handler(cat: &Catalog, function: pg_sys::Oid, runner: pg_sys::Oid) -> Result<bool, RegistryError> {
    // SAFETY: a syscache lookup by type OID.
    let events_array = unsafe { pg_sys::get_array_type(cat.events_type) };
    validate_code(function, runner, |args, ret| {
        let batch = match args {
            [t] if *t == cat.events_type => false,
            [t] if *t == events_array => true,
            _ => return Err("it must take exactly one argument of type ep.events or ep.events[]"),
        };
        if ret != pg_sys::VOIDOID {
            return Err("it must return void");
        }
        Ok(batch)
    })
}

/// A replay handler is `(after_position bigint, up_to_position bigint) RETURNS void`, held to the
/// handler's other rules (`validate_code`).
pub fn validate_replay_handler(function: pg_sys::Oid, runner: pg_sys::Oid) -> Result<(), RegistryError> {
    validate_code(function, runner, |args, ret| {
        if args != [pg_sys::INT8OID, pg_sys::INT8OID] || ret != pg_sys::VOIDOID {
            return Err("a replay handler takes (after_position bigint, up_to_position bigint) and returns void");
        }
        Ok(())
    })
}

/// The rules for a projection's code that `runner` registers: a plain function of the shape
/// `shape` accepts (given its argument types and result type), VOLATILE (a STABLE or IMMUTABLE
/// function reads with the caller's snapshot, taken before the hand-off lock was granted, and may
/// not write at all), not temporary, the runner's own, and executable by it.
fn validate_code<R>(
    function: pg_sys::Oid,
    runner: pg_sys::Oid,
    shape: impl FnOnce(&[pg_sys::Oid], pg_sys::Oid) -> Result<R, &'static str>,
) -> Result<R, RegistryError> {
    let name = catalog::regprocedure_text(function);
    let bad = |problem: &str| RegistryError::BadHandler { handler: name.clone(), problem: problem.into() };
    let (args, ret, volatility, kind) = signature(function).ok_or_else(|| bad("it does not exist"))?;
    if kind != b'f' {
        return Err(bad("it is not a plain function"));
    }
    let shaped = shape(&args, ret).map_err(bad)?;
    if volatility != b'v' {
        return Err(bad("it must be VOLATILE"));
    }
    refuse_temporary(function, &name)?;
    check_function_owner(function, &name, runner)?;
    if !catalog::may_execute(runner, function) {
        return Err(RegistryError::NoExecute { handler: name });
    }
    Ok(shaped)
}

/// A projection's code (handler, new handler, setup function) must be owned by the projection's
/// owner (or a role whose privileges it has): otherwise registering it would keep that function's
/// owner from dropping it (the drop guard), and its owner could change what the projection runs.
pub fn check_function_owner(function: pg_sys::Oid, name: &str, runner: pg_sys::Oid) -> Result<(), RegistryError> {
    match catalog::function_owner(function) {
        Some(owner) if catalog::acts_for(runner, owner) => Ok(()),
        owner => Err(RegistryError::NotFunctionOwner {
            function: name.into(),
            owner: owner.and_then(crate::sandbox::role_name).unwrap_or_default(),
        }),
    }
}

/// A function in a temporary schema vanishes with its session: it can be no projection's code.
pub fn refuse_temporary(function: pg_sys::Oid, name: &str) -> Result<(), RegistryError> {
    // SAFETY: syscache lookups by OID.
    let temp = unsafe { pg_sys::isAnyTempNamespace(pg_sys::get_func_namespace(function)) };
    if temp {
        return Err(RegistryError::BadHandler { handler: name.into(), problem: "it is a temporary function".into() });
    }
    Ok(())
}

/// Checks that `role` may read the log (every projection's code receives its events).
pub fn validate_log_access(cat: &Catalog, role: pg_sys::Oid) -> Result<(), RegistryError> {
    if catalog::may_select(role, cat.events_rel) {
        Ok(())
    } else {
        Err(RegistryError::NoLogAccess)
    }
}

fn validate_schema(schema: &str, caller: pg_sys::Oid) -> Result<(), RegistryError> {
    let cname = std::ffi::CString::new(schema)
        .map_err(|_| ArgError::Invalid { arg: "read_model_schema", problem: "contains a NUL byte".into() })?;
    // SAFETY: a syscache lookup by a NUL-terminated name, missing_ok.
    let nsp = unsafe { pg_sys::get_namespace_oid(cname.as_ptr(), true) };
    if nsp == pg_sys::Oid::INVALID {
        return Err(RegistryError::NoSchema(schema.into()));
    }
    if !catalog::may_use_schema(caller, nsp) {
        return Err(RegistryError::NoSchemaUsage(schema.into()));
    }
    check_schema_owner(nsp, schema, caller)
}

/// A rebuild empties, copies and renames the read-model schema as the projection's owner: it must
/// be that owner's (or a role whose privileges the owner has), never someone else's that the owner
/// may merely use.
pub fn check_schema_owner(nsp: pg_sys::Oid, schema: &str, owner: pg_sys::Oid) -> Result<(), RegistryError> {
    let schema_owner = catalog::namespace_owner(nsp);
    if schema_owner.is_some_and(|o| catalog::acts_for(owner, o)) {
        return Ok(());
    }
    Err(RegistryError::NotSchemaOwner {
        schema: schema.into(),
        owner: schema_owner.and_then(crate::sandbox::role_name).unwrap_or_default(),
    })
}

fn validate_event_types(types: &Option<Vec<Option<String>>>) -> Result<Option<Vec<String>>, ArgError> {
    let Some(types) = types else { return Ok(None) };
    let mut out = Vec::with_capacity(types.len());
    for t in types {
        match t {
            None => return Err(ArgError::Invalid { arg: "event_types", problem: "an element is NULL".into() }),
            Some(s) if s.is_empty() => {
                return Err(ArgError::Invalid { arg: "event_types", problem: "an element is empty".into() })
            }
            Some(s) => out.push(s.clone()),
        }
    }
    if out.is_empty() {
        return Err(ArgError::Invalid {
            arg: "event_types",
            problem: "the array is empty (use NULL to subscribe to every type)".into(),
        });
    }
    Ok(Some(out))
}

fn current_search_path() -> String {
    // SAFETY: GetConfigOptionByName returns a palloc'd copy of the value (or NULL).
    unsafe {
        let p = pg_sys::GetConfigOptionByName(c"search_path".as_ptr(), std::ptr::null_mut(), false);
        if p.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

static INSERT: Versioned = Versioned {
    current: Stmt {
        sql: "INSERT INTO ep.projections (name, handler, batch, mode, event_types, read_model_schema, owner, search_path, status, replay_handler) \
              VALUES ($1, $2::oid::regprocedure, $3, $4, $5, $6, $7::oid::regrole, $8, 'active', $9::oid::regprocedure) RETURNING id",
        types: &INSERT_TYPES,
    },
    // 0.1.0 has no replay handlers (its ep_register_projection cannot pass one): $9 is NULL.
    v1: Stmt {
        sql: "INSERT INTO ep.projections (name, handler, batch, mode, event_types, read_model_schema, owner, search_path, status) \
              SELECT $1, $2::oid::regprocedure, $3, $4, $5, $6, $7::oid::regrole, $8, 'active' WHERE $9 IS NULL RETURNING id",
        types: &INSERT_TYPES,
    },
};

const INSERT_TYPES: [pg_sys::Oid; 9] = [
    pg_sys::TEXTOID,
    pg_sys::OIDOID,
    pg_sys::BOOLOID,
    pg_sys::TEXTOID,
    pg_sys::TEXTARRAYOID,
    pg_sys::TEXTOID,
    pg_sys::OIDOID,
    pg_sys::TEXTOID,
    pg_sys::OIDOID,
];

/// The batch size of replays and async delivery (`event_projections.batch_size`).
pub fn batch_size() -> i64 {
    crate::pg::settings::batch_size() as i64
}

/// `ep_register_projection`. For an inline projection this is the hand-off G1..G3: the registry
/// lock EXCLUSIVE, then the whole committed log replayed through the handler.
pub fn register(
    name: Option<&str>,
    function: Option<pg_sys::Oid>,
    mode: Option<&str>,
    event_types: Option<Vec<Option<String>>>,
    schema: Option<&str>,
    replay_handler: Option<pg_sys::Oid>,
) -> Result<(), RegistryError> {
    let cat = catalog::require();
    let name = required_text(name, "name")?;
    let function = required(function, "handler")?;
    let mode_text = required_text(mode, "mode")?;
    let mode = ProjectionMode::parse(mode_text).ok_or_else(|| ArgError::Invalid {
        arg: "mode",
        problem: format!("\"{mode_text}\" (expected 'inline' or 'async')"),
    })?;
    let event_types = validate_event_types(&event_types)?;
    if let Some("") = schema {
        return Err(ArgError::Empty("read_model_schema").into());
    }
    let caller = catalog::current_user();
    validate_log_access(&cat, caller)?;
    let batch = validate_handler(&cat, function, caller)?;
    if let Some(r) = replay_handler {
        validate_replay_handler(r, caller)?;
    }
    if mode == ProjectionMode::Async {
        if let Err(e) = crate::handoff::inflight::require_worker() {
            crate::pg::error::raise(&e);
        }
    }
    if let Some(s) = schema {
        validate_schema(s, caller)?;
    }

    if by_name(name).is_some() {
        return Err(RegistryError::Exists(name.into()));
    }
    // G1: the projection row. Nobody else sees it before the commit, so no append applies the
    // handler yet, and whatever this transaction builds is not exposed half-done.
    let search_path = current_search_path();
    let id: i32 = catalog::privileged(&cat, || {
        Spi::connect(|client| {
            let rows = spi::exec(
                client,
                INSERT.get(),
                &[
                    spi::text(name),
                    function.into_datum(),
                    batch.into_datum(),
                    spi::text(mode.as_str()),
                    event_types.clone().into_datum(),
                    schema.and_then(spi::text),
                    caller.into_datum(),
                    spi::text(&search_path),
                    replay_handler.into_datum(),
                ],
                Snap::Fresh,
                0,
            );
            rows.get(0, 1).unwrap_or(0)
        })
    });
    crate::handoff::inflight::bump_epoch_at_commit();
    if mode == ProjectionMode::Inline {
        let p = by_id(id).ok_or_else(|| RegistryError::Unknown(name.into()))?;
        build_for_registration(&cat, &p);
    }
    Ok(())
}

/// G2..G3: builds a newly registered inline projection from the whole log. G2 replays what has
/// committed below the high-water mark, without any lock: appends go on meanwhile. G3 is the
/// hand-off: the registry lock EXCLUSIVE waits for every append that read the projection list
/// (none of them saw this projection, which is not committed), and the events above the
/// checkpoint, all committed or gone by then, are applied before the commit. Appends stall only
/// for G3's catch-up. Without the preload there is no high-water mark: the whole build is G3.
fn build_for_registration(cat: &Catalog, p: &Projection) {
    // No retention removal while this reads the log (a removal waits for the commit).
    handoff::lock(handoff::LOG_BUILD, Mode::Shared);
    let h = p.live_handler();
    let batch = batch_size();
    let mut after = 0;
    if crate::handoff::inflight::available() {
        let mut previous_gap = i64::MAX;
        loop {
            let hw = crate::handoff::highwater::compute();
            let gap = hw - after;
            if gap <= replay::handoff_threshold(batch) || gap >= previous_gap {
                break;
            }
            previous_gap = gap;
            after = replay::apply_all(&h, p.filter(), cat.events_type, after, hw, batch, Snap::Latest).through;
        }
    }
    // G3. While we wait, appends are held back at most the hand-off lock timeout at a time.
    handoff::lock_patiently(handoff::REGISTRY, Mode::Exclusive, crate::pg::settings::handoff_lock_timeout_ms());
    let head = crate::handoff::highwater::last_value();
    replay::apply_all(&h, p.filter(), cat.events_type, after, head, batch, Snap::Latest);
}

/// `ep_unregister_projection`: the projection's handler never runs again once this commits.
pub fn unregister(name: Option<&str>) -> Result<(), RegistryError> {
    let cat = catalog::require();
    let name = required_text(name, "name")?;
    let p = by_name(name).ok_or_else(|| RegistryError::Unknown(name.into()))?;
    if !catalog::acts_for(catalog::current_user(), p.owner) {
        return Err(RegistryError::NotOwner { projection: name.into() });
    }
    // The registry lock orders this against appends reading the list; the projection lock waits
    // for appends that are running its handler right now.
    let timeout = crate::pg::settings::handoff_lock_timeout_ms();
    handoff::lock_patiently(handoff::REGISTRY, Mode::Exclusive, timeout);
    handoff::lock_patiently(p.id as u32, Mode::Exclusive, timeout);
    catalog::privileged(&cat, || {
        Spi::connect(|client| {
            // The projection's skips go with it: they are decisions about its events, and must
            // not apply to whoever registers the name next.
            let deleted = spi::exec(
                client,
                &Stmt {
                    sql: "WITH s AS (DELETE FROM ep.skipped_events WHERE projection = (SELECT name FROM ep.projections WHERE id = $1)) \
                          DELETE FROM ep.projections WHERE id = $1 RETURNING id",
                    types: &[pg_sys::INT4OID],
                },
                &[p.id.into_datum()],
                Snap::Fresh,
                0,
            );
            // `by_name` found the row with a snapshot taken now; a REPEATABLE READ transaction
            // whose snapshot predates the registration sees no row to delete (the randomized
            // histories found such an unregistration that deleted nothing and said ok).
            if deleted.is_empty() {
                crate::pg::error::raise(&crate::handoff::CrossedHandoff { projection: p.name.clone() });
            }
            // Its rebuilds, in a statement of its own, with a snapshot taken after the row was
            // deleted: an ep_rebuild that held the row (FOR KEY SHARE) made that DELETE wait
            // for its commit, and its rebuild is visible now (at any isolation level).
            spi::exec(
                client,
                &Stmt { sql: "DELETE FROM ep.rebuilds WHERE projection_id = $1", types: &[pg_sys::INT4OID] },
                &[p.id.into_datum()],
                Snap::Latest,
                0,
            );
        })
    });
    crate::handoff::inflight::bump_epoch_at_commit();
    Ok(())
}
