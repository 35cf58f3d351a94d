//! Letting go of a database for the statements that need it to themselves: DROP DATABASE, ALTER
//! DATABASE ... RENAME and CREATE DATABASE ... TEMPLATE wait (5 s, then fail) while another
//! process is connected to it, and a worker is; a database owner who is not a superuser could not
//! even end the worker with `WITH (FORCE)`, since it runs as the bootstrap superuser.
//!
//! A ProcessUtility hook sees such a statement first. When the current user owns the database
//! (the statement's own check, done early, so that nobody else can use this to pause a database's
//! workers), the workers of that database are asked to end and the launcher starts none there for
//! `RELEASE`; the statement waits up to `WAIT` for them to go, then runs as it would have.

use super::pool;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// How long the launcher leaves a released database alone at most (the statement's end lifts it
/// sooner: `end_release`).
pub const RELEASE: Duration = Duration::from_secs(15);
/// How long the statement waits for the workers to end (a worker ends between rounds: a handler
/// running longer keeps it, and the statement then fails as without the hook).
const WAIT: Duration = Duration::from_secs(5);

// The hook that was installed before ours, called instead of standard_ProcessUtility. Written once,
// in _PG_init, while the postmaster loads preloaded libraries, and only read afterwards.
static mut PREV: pg_sys::ProcessUtility_hook_type = None;

/// Installs the hook (from `_PG_init`, while preloading).
pub fn install_hook() {
    // SAFETY: _PG_init during shared_preload_libraries: single-threaded, before any hook runs.
    unsafe {
        PREV = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: PostgreSQL passes a valid PlannedStmt; only its utility statement is read.
    let released = unsafe { database_needed_alone((*pstmt).utilityStmt) }.and_then(|name| release(&name));
    let run = || {
        // SAFETY: the arguments as PostgreSQL gave them, to the previous hook or the standard code.
        unsafe {
            match PREV {
                Some(prev) => prev(pstmt, query, read_only_tree, context, params, query_env, dest, qc),
                None => {
                    pg_sys::standard_ProcessUtility(pstmt, query, read_only_tree, context, params, query_env, dest, qc)
                }
            }
        }
    };
    match released {
        None => run(),
        // Whether the statement succeeds or fails, the launcher may serve the database (again) as
        // soon as it is over: a renamed or copied database is served on.
        Some(oid) => PgTryBuilder::new(run).finally(|| pool::end_release(oid)).execute(),
    }
}

/// The database a statement needs without other connections, if it is one of those statements.
///
/// # Safety
/// `stmt` is a parse node from PostgreSQL (or null).
unsafe fn database_needed_alone(stmt: *mut pg_sys::Node) -> Option<String> {
    if stmt.is_null() {
        return None;
    }
    // SAFETY: each cast matches the node's tag; strings are NUL-terminated parser output.
    unsafe {
        let text = |p: *const std::ffi::c_char| {
            (!p.is_null()).then(|| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
        };
        match (*stmt).type_ {
            pg_sys::NodeTag::T_DropdbStmt => text((*(stmt as *mut pg_sys::DropdbStmt)).dbname),
            pg_sys::NodeTag::T_RenameStmt => {
                let r = stmt as *mut pg_sys::RenameStmt;
                ((*r).renameType == pg_sys::ObjectType::OBJECT_DATABASE).then(|| text((*r).subname)).flatten()
            }
            pg_sys::NodeTag::T_CreatedbStmt => {
                let options = (*(stmt as *mut pg_sys::CreatedbStmt)).options;
                if options.is_null() {
                    return None;
                }
                (0..(*options).length as usize).find_map(|i| {
                    // A List of DefElem pointers: `elements` holds `length` cells.
                    let d = (*(*options).elements.add(i)).ptr_value as *mut pg_sys::DefElem;
                    let is_template = text((*d).defname).as_deref() == Some("template");
                    if is_template && !(*d).arg.is_null() {
                        text(pg_sys::defGetString(d))
                    } else {
                        None
                    }
                })
            }
            _ => None,
        }
    }
}

/// Asks the workers of database `name` to end, if the current user owns it, and waits for them.
/// Returns the database when it did.
fn release(name: &str) -> Option<u32> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: a catalog lookup by name (missing_ok) and an ownership check, in a transaction.
    let (oid, owner) = unsafe {
        let oid = pg_sys::get_database_oid(cname.as_ptr(), true);
        (oid, oid != pg_sys::Oid::INVALID && pg_sys::pg_database_ownercheck(oid, pg_sys::GetUserId()))
    };
    if !owner || !pool::release_database(oid.to_u32(), RELEASE) {
        return None;
    }
    let start = Instant::now();
    while pool::serves(oid.to_u32()) && start.elapsed() < WAIT {
        crate::pg::backend::sleep_ms(20);
    }
    Some(oid.to_u32())
}
