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
use std::ffi::CString;

#[derive(Clone, Copy, Debug)]
pub struct Catalog {
    pub namespace: pg_sys::Oid,
    pub events_type: pg_sys::Oid,
    pub position_seq: pg_sys::Oid,
    pub owner: pg_sys::Oid,
}

thread_local! {
    static CACHED: Cell<Option<Catalog>> = const { Cell::new(None) };
}

/// The catalog of the extension in this database, or None when the extension is not installed.
pub fn lookup() -> Option<Catalog> {
    let ns = unsafe { pg_sys::get_namespace_oid(c"ep".as_ptr(), true) };
    if ns == pg_sys::Oid::INVALID {
        return None;
    }
    if let Some(c) = CACHED.with(|c| c.get()) {
        if c.namespace == ns {
            return Some(c);
        }
        // The schema was dropped and created again: plans point at dead objects.
        crate::spi::reset_plans();
    }
    let c = unsafe {
        let events_rel = pg_sys::get_relname_relid(c"events".as_ptr(), ns);
        let events_type = if events_rel == pg_sys::Oid::INVALID {
            pg_sys::Oid::INVALID
        } else {
            pg_sys::get_rel_type_id(events_rel)
        };
        let position_seq = pg_sys::get_relname_relid(c"global_position_seq".as_ptr(), ns);
        let ext = pg_sys::get_extension_oid(c"event_projections".as_ptr(), true);
        if events_type == pg_sys::Oid::INVALID || position_seq == pg_sys::Oid::INVALID || ext == pg_sys::Oid::INVALID {
            return None;
        }
        Catalog { namespace: ns, events_type, position_seq, owner: extension_owner(ext) }
    };
    CACHED.with(|cell| cell.set(Some(c)));
    Some(c)
}

fn extension_owner(ext: pg_sys::Oid) -> pg_sys::Oid {
    Spi::connect(|client| {
        client
            .select(
                "SELECT extowner FROM pg_catalog.pg_extension WHERE oid = $1",
                None,
                &[ext.into()],
            )
            .ok()
            .and_then(|t| t.first().get_one::<pg_sys::Oid>().ok().flatten())
            .unwrap_or(pg_sys::BOOTSTRAP_SUPERUSERID.into())
    })
}

/// The catalog, or an error saying the extension is not installed here.
pub fn require() -> Catalog {
    match lookup() {
        Some(c) => c,
        None => crate::error::raise(&NotInstalled),
    }
}

struct NotInstalled;
impl std::fmt::Display for NotInstalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "extension event_projections is not installed in this database")
    }
}
impl crate::error::SqlError for NotInstalled {
    fn sqlstate(&self) -> PgSqlErrorCode {
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
    }
    fn hint(&self) -> Option<String> {
        Some("Run CREATE EXTENSION event_projections;".into())
    }
}

/// The search_path used while the extension runs privileged.
pub const PINNED_PATH: &str = "pg_catalog, pg_temp";

/// Runs `f` as `role` with `search_path`, restoring both afterwards. On an error the enclosing
/// (sub)transaction's abort restores them, as it does for SECURITY DEFINER functions.
pub fn run_as<R>(role: pg_sys::Oid, search_path: &str, f: impl FnOnce() -> R) -> R {
    let path = CString::new(search_path).unwrap_or_else(|_| CString::new(PINNED_PATH).expect("static"));
    unsafe {
        let mut saved_user = pg_sys::Oid::INVALID;
        let mut saved_sec: i32 = 0;
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_sec);
        let nest = pg_sys::NewGUCNestLevel();
        pg_sys::SetUserIdAndSecContext(role, saved_sec | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
        crate::backend::set_setting(c"search_path", &path, pg_sys::GucAction::GUC_ACTION_SAVE);
        let r = f();
        pg_sys::AtEOXact_GUC(true, nest);
        pg_sys::SetUserIdAndSecContext(saved_user, saved_sec);
        r
    }
}

/// Runs `f` as the extension owner with only `pg_catalog` to resolve names (no caller-defined
/// schema, not even pg_temp). An override search path rather than the search_path setting: it is
/// a pointer push and pop, where setting the GUC parses, validates and later recomputes the path,
/// and this runs on every append. Never call a handler inside: the override would hide the
/// handler's own search_path. On an error, the (sub)transaction's abort pops the override and
/// restores the user, as it does for SECURITY DEFINER functions.
pub fn privileged<R>(cat: &Catalog, f: impl FnOnce() -> R) -> R {
    unsafe {
        let mut saved_user = pg_sys::Oid::INVALID;
        let mut saved_sec: i32 = 0;
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_sec);
        pg_sys::SetUserIdAndSecContext(cat.owner, saved_sec | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
        let path = pg_sys::palloc0(std::mem::size_of::<pg_sys::OverrideSearchPath>()) as *mut pg_sys::OverrideSearchPath;
        (*path).schemas = std::ptr::null_mut();
        (*path).addCatalog = true;
        (*path).addTemp = false;
        pg_sys::PushOverrideSearchPath(path);
        let r = f();
        pg_sys::PopOverrideSearchPath();
        pg_sys::SetUserIdAndSecContext(saved_user, saved_sec);
        r
    }
}

/// The role running the current statement (the caller of an ep_* function).
pub fn current_user() -> pg_sys::Oid {
    unsafe { pg_sys::GetUserId() }
}

/// Whether `role` may execute function `func`.
pub fn may_execute(role: pg_sys::Oid, func: pg_sys::Oid) -> bool {
    unsafe {
        pg_sys::pg_proc_aclcheck(func, role, pg_sys::ACL_EXECUTE as pg_sys::AclMode)
            == pg_sys::AclResult::ACLCHECK_OK
    }
}

/// Whether `role` may use schema `nsp`.
pub fn may_use_schema(role: pg_sys::Oid, nsp: pg_sys::Oid) -> bool {
    unsafe {
        pg_sys::pg_namespace_aclcheck(nsp, role, pg_sys::ACL_USAGE as pg_sys::AclMode)
            == pg_sys::AclResult::ACLCHECK_OK
    }
}

/// Whether `role` is a superuser or a member of `owner` (may act for it).
pub fn acts_for(role: pg_sys::Oid, owner: pg_sys::Oid) -> bool {
    unsafe { pg_sys::superuser_arg(role) || pg_sys::has_privs_of_role(role, owner) }
}
