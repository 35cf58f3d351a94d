//! Running a projection handler: the same way on every path (inline, registration build, rebuild,
//! async worker), which is invariant 6. A handler runs as the projection's owner, with the
//! projection's read-model schema first on its search_path followed by the search_path recorded at
//! registration, and receives `ep.events` values (or one `ep.events[]` per batch).

use crate::catalog;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;

/// Everything needed to call one projection's handler.
#[derive(Clone, Debug)]
pub struct Handler {
    pub projection: String,
    pub function: pg_sys::Oid,
    pub batch: bool,
    pub owner: pg_sys::Oid,
    /// The full search_path the handler runs with.
    pub search_path: String,
}

/// The search_path of a handler whose read model lives in `schema`.
pub fn search_path_for(schema: Option<&str>, registered_path: &str) -> String {
    match schema {
        Some(s) if !registered_path.trim().is_empty() => format!("{}, {}", quote_ident(s), registered_path),
        Some(s) => quote_ident(s),
        None => registered_path.to_string(),
    }
}

/// Quotes an identifier the way `quote_ident` does.
pub fn quote_ident(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}

thread_local! {
    // FmgrInfo per function, allocated in TopMemoryContext: languages cache their compiled form
    // in fn_extra, and fmgr_info's catalog lookups are not repeated per event.
    static FMGR: RefCell<HashMap<u32, usize>> = RefCell::new(HashMap::new());
}

fn fmgr_for(function: pg_sys::Oid) -> *mut pg_sys::FmgrInfo {
    if let Some(p) = FMGR.with(|m| m.borrow().get(&function.to_u32()).copied()) {
        return p as *mut pg_sys::FmgrInfo;
    }
    unsafe {
        let finfo = pg_sys::MemoryContextAllocZero(
            pg_sys::TopMemoryContext,
            std::mem::size_of::<pg_sys::FmgrInfo>(),
        ) as *mut pg_sys::FmgrInfo;
        pg_sys::fmgr_info_cxt(function, finfo, pg_sys::TopMemoryContext);
        FMGR.with(|m| m.borrow_mut().insert(function.to_u32(), finfo as usize));
        finfo
    }
}

/// Forgets a cached FmgrInfo (after a handler error, in case the function was dropped or replaced).
fn forget(function: pg_sys::Oid) {
    if let Some(p) = FMGR.with(|m| m.borrow_mut().remove(&function.to_u32())) {
        unsafe { pg_sys::pfree(p as *mut std::ffi::c_void) };
    }
}

/// Calls a one-argument function and ignores its result. Unlike `FunctionCall1Coll`, a NULL
/// result is fine: a `RETURNS void` SQL function returns NULL.
unsafe fn call1(finfo: *mut pg_sys::FmgrInfo, arg: pg_sys::Datum) {
    unsafe {
        let size = std::mem::size_of::<pg_sys::FunctionCallInfoBaseData>() + std::mem::size_of::<pg_sys::NullableDatum>();
        let fcinfo = pg_sys::palloc0(size) as *mut pg_sys::FunctionCallInfoBaseData;
        (*fcinfo).flinfo = finfo;
        (*fcinfo).fncollation = pg_sys::Oid::INVALID;
        (*fcinfo).nargs = 1;
        let args = (*fcinfo).args.as_mut_slice(1);
        args[0].value = arg;
        args[0].isnull = false;
        let f = (*finfo).fn_addr.expect("fmgr_info sets fn_addr");
        pg_sys::ffi::pg_guard_ffi_boundary(|| f(fcinfo));
        pg_sys::pfree(fcinfo as *mut std::ffi::c_void);
    }
}

impl Handler {
    /// Calls the handler with each of `args` in order (`ep.events` values, or one `ep.events[]`
    /// per call for batch handlers), under the owner's role and search_path, set once for all of
    /// them. `before(i)` runs before call `i`; `what(i)` describes call `i`'s events for an error
    /// message. A handler error is raised again with the projection named and its SQLSTATE kept.
    pub fn call_all(&self, args: &[pg_sys::Datum], mut before: impl FnMut(usize), what: impl Fn(usize) -> String) {
        let function = self.function;
        let current = std::cell::Cell::new(0usize);
        let result = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
            catalog::run_as(self.owner, &self.search_path, || unsafe {
                let finfo = fmgr_for(function);
                for (i, arg) in args.iter().enumerate() {
                    current.set(i);
                    before(i);
                    call1(finfo, *arg);
                }
            });
            None
        }))
        .catch_others(Some)
        .execute();
        if let Some(e) = result {
            forget(function);
            let (code, message, detail, hint) = match &e {
                pg_sys::panic::CaughtError::PostgresError(r)
                | pg_sys::panic::CaughtError::ErrorReport(r)
                | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => (
                    r.sql_error_code(),
                    r.message().to_string(),
                    r.detail().map(str::to_string),
                    r.hint().map(str::to_string),
                ),
            };
            // Query cancels and shutdowns must stay what they are.
            if matches!(
                code,
                PgSqlErrorCode::ERRCODE_QUERY_CANCELED | PgSqlErrorCode::ERRCODE_ADMIN_SHUTDOWN
            ) {
                e.rethrow();
            }
            let mut report = pg_sys::panic::ErrorReport::new(
                code,
                format!("projection \"{}\" failed on {}: {}", self.projection, what(current.get()), message),
                "event_projections",
            );
            report = report.set_detail(detail.unwrap_or_else(|| {
                format!("The handler {} raised the error.", regprocedure_text(function))
            }));
            if let Some(h) = hint {
                report = report.set_hint(h);
            }
            report.report(PgLogLevel::ERROR);
        }
    }

    /// Calls the handler once with `arg`.
    pub fn call(&self, arg: pg_sys::Datum, what: &dyn Fn() -> String) {
        self.call_all(&[arg], |_| {}, |_| what());
    }
}

/// `func::regprocedure::text`, for messages.
pub fn regprocedure_text(function: pg_sys::Oid) -> String {
    unsafe {
        let p = pg_sys::format_procedure(function);
        let s = std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned();
        pg_sys::pfree(p as *mut std::ffi::c_void);
        s
    }
}
