//! Identity of the extension's catalog in this database, cached per backend, and the two ways code
//! runs under another identity: as the catalog owner (for the extension's own writes) and as a
//! projection owner (for handlers).
//!
//! The ep_* functions are SECURITY INVOKER so that they know who calls them; the catalog tables are
//! writable only by the extension owner, so every write of ours runs as that owner with a pinned
//! search_path (no caller-defined operator or function can be picked up while we are privileged).

use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::Cell;

#[derive(Clone, Copy, Debug)]
pub struct Catalog {
    pub namespace: pg_sys::Oid,
    pub events_rel: pg_sys::Oid,
    pub events_type: pg_sys::Oid,
    pub position_seq: pg_sys::Oid,
    pub owner: pg_sys::Oid,
}

thread_local! {
    static CACHED: Cell<Option<Catalog>> = const { Cell::new(None) };
}

/// The catalog of the extension in this database, or None when the extension is not installed.
pub fn lookup() -> Option<Catalog> {
    // SAFETY: a syscache lookup by name, missing_ok.
    let ns = unsafe { pg_sys::get_namespace_oid(c"ep".as_ptr(), true) };
    if ns == pg_sys::Oid::INVALID {
        return None;
    }
    if let Some(c) = CACHED.with(|c| c.get()) {
        if c.namespace == ns {
            return Some(c);
        }
        // The schema was dropped and created again: plans point at dead objects.
        crate::pg::spi::reset_plans();
    }
    // SAFETY: syscache lookups by name and OID, each returning InvalidOid when missing.
    let c = unsafe {
        let events_rel = pg_sys::get_relname_relid(c"events".as_ptr(), ns);
        let events_type =
            if events_rel == pg_sys::Oid::INVALID { pg_sys::Oid::INVALID } else { pg_sys::get_rel_type_id(events_rel) };
        let position_seq = pg_sys::get_relname_relid(c"global_position_seq".as_ptr(), ns);
        let ext = pg_sys::get_extension_oid(c"event_projections".as_ptr(), true);
        if events_type == pg_sys::Oid::INVALID || position_seq == pg_sys::Oid::INVALID || ext == pg_sys::Oid::INVALID {
            return None;
        }
        Catalog { namespace: ns, events_rel, events_type, position_seq, owner: extension_owner(ext) }
    };
    CACHED.with(|cell| cell.set(Some(c)));
    Some(c)
}

fn extension_owner(ext: pg_sys::Oid) -> pg_sys::Oid {
    Spi::connect(|client| {
        client
            .select("SELECT extowner FROM pg_catalog.pg_extension WHERE oid = $1", None, &[ext.into()])
            .ok()
            .and_then(|t| t.first().get_one::<pg_sys::Oid>().ok().flatten())
            .unwrap_or(pg_sys::BOOTSTRAP_SUPERUSERID.into())
    })
}

/// The catalog, or an error saying the extension is not installed here.
pub fn require() -> Catalog {
    match lookup() {
        Some(c) => c,
        None => crate::pg::error::raise(&NotInstalled),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("extension event_projections is not installed in this database")]
struct NotInstalled;

impl crate::pg::error::SqlError for NotInstalled {
    fn sqlstate(&self) -> PgSqlErrorCode {
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
    }
    fn hint(&self) -> Option<String> {
        Some("Run CREATE EXTENSION event_projections;".into())
    }
}

/// The search_path of the extension's own DDL on a user's read model (names are qualified;
/// `pg_temp` last so that no temporary object can shadow one).
pub const PINNED_PATH: &str = "pg_catalog, pg_temp";

/// Reads the extension's own catalog as its owner, under the pinned path: callers need no
/// privilege on the tables (PUBLIC has none), and nothing they defined can be resolved.
pub fn read<R>(f: impl FnOnce() -> R) -> R {
    privileged(&require(), f)
}

/// Runs `f` as the extension owner with only `pg_catalog` to resolve names
/// (`spi::with_pinned_path`). Never call user code inside. On an error, the (sub)transaction's
/// abort restores the user, as it does for SECURITY DEFINER functions.
pub fn privileged<R>(cat: &Catalog, f: impl FnOnce() -> R) -> R {
    let mut saved_user = pg_sys::Oid::INVALID;
    let mut saved_sec: i32 = 0;
    // SAFETY: reads and sets the backend's user id inside a transaction; restored below.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_sec);
        pg_sys::SetUserIdAndSecContext(cat.owner, saved_sec | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
    }
    let r = crate::pg::spi::with_pinned_path(f);
    // SAFETY: puts back what was saved above.
    unsafe { pg_sys::SetUserIdAndSecContext(saved_user, saved_sec) };
    r
}

/// The role running the current statement (the caller of an ep_* function).
pub fn current_user() -> pg_sys::Oid {
    // SAFETY: a plain read of the current user id.
    unsafe { pg_sys::GetUserId() }
}

/// Whether `role` may execute function `func`.
pub fn may_execute(role: pg_sys::Oid, func: pg_sys::Oid) -> bool {
    // SAFETY: an ACL check by OIDs (a syscache lookup).
    unsafe {
        pg_sys::pg_proc_aclcheck(func, role, pg_sys::ACL_EXECUTE as pg_sys::AclMode) == pg_sys::AclResult::ACLCHECK_OK
    }
}

/// Whether `role` may use schema `nsp`.
pub fn may_use_schema(role: pg_sys::Oid, nsp: pg_sys::Oid) -> bool {
    // SAFETY: an ACL check by OIDs (a syscache lookup).
    unsafe {
        pg_sys::pg_namespace_aclcheck(nsp, role, pg_sys::ACL_USAGE as pg_sys::AclMode) == pg_sys::AclResult::ACLCHECK_OK
    }
}

/// Whether `role` may SELECT from relation `rel`.
pub fn may_select(role: pg_sys::Oid, rel: pg_sys::Oid) -> bool {
    // SAFETY: an ACL check by OIDs (a syscache lookup).
    unsafe {
        pg_sys::pg_class_aclcheck(rel, role, pg_sys::ACL_SELECT as pg_sys::AclMode) == pg_sys::AclResult::ACLCHECK_OK
    }
}

/// The owner of function `func`, None when there is no such function.
pub fn function_owner(func: pg_sys::Oid) -> Option<pg_sys::Oid> {
    // SAFETY: a syscache lookup; the tuple is read before ReleaseSysCache.
    unsafe {
        let tup = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::PROCOID as i32, func.into());
        if tup.is_null() {
            return None;
        }
        let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_proc>(tup);
        let owner = (*form).proowner;
        pg_sys::ReleaseSysCache(tup);
        Some(owner)
    }
}

/// The owner of schema `nsp`, None when there is no such schema.
pub fn namespace_owner(nsp: pg_sys::Oid) -> Option<pg_sys::Oid> {
    // SAFETY: a syscache lookup; the tuple is read before ReleaseSysCache.
    unsafe {
        let tup = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::NAMESPACEOID as i32, nsp.into());
        if tup.is_null() {
            return None;
        }
        let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_namespace>(tup);
        let owner = (*form).nspowner;
        pg_sys::ReleaseSysCache(tup);
        Some(owner)
    }
}

/// Whether `role` is a superuser or a member of `owner` (may act for it).
pub fn acts_for(role: pg_sys::Oid, owner: pg_sys::Oid) -> bool {
    // SAFETY: role membership checks by OID (catalog lookups).
    unsafe { pg_sys::superuser_arg(role) || pg_sys::has_privs_of_role(role, owner) }
}

/// `func::regprocedure::text`, for messages.
pub fn regprocedure_text(function: pg_sys::Oid) -> String {
    // SAFETY: format_procedure returns a palloc'd string (for a missing function, its OID).
    unsafe {
        let p = pg_sys::format_procedure(function);
        let s = std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned();
        pg_sys::pfree(p as *mut std::ffi::c_void);
        s
    }
}
