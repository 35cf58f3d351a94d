//! Running a projection handler: the same way on every path (inline, registration build, rebuild,
//! async worker), which is invariant 6 of DESIGN.md. A handler runs as the projection's owner,
//! with the projection's read-model schema first on its search_path followed by the search_path
//! recorded at registration, and receives `ep.events` values (or one `ep.events[]` per batch).

use crate::pg::catalog;
use crate::sandbox;
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
    /// The projection's replay handler, `(after_position bigint, up_to_position bigint)`, which
    /// applies a whole range of the log set-based (`sandbox::replay` decides when it may).
    pub replay: Option<pg_sys::Oid>,
    pub owner: pg_sys::Oid,
    /// The full search_path the handler runs with.
    pub search_path: String,
}

thread_local! {
    // FmgrInfo per function, each in a memory context of its own under TopMemoryContext:
    // languages cache their compiled form in fn_extra, and fmgr_info's catalog lookups are not
    // repeated per event. Keyed by the function's OID *and* the version of its pg_proc row, so an
    // entry never outlives the definition it was made from: a CREATE OR REPLACE, committed or
    // rolled back, gives the row another version and the next call another entry.
    static FMGR: RefCell<HashMap<u32, Cached>> = RefCell::new(HashMap::new());
}

struct Cached {
    version: (u32, u64),
    cxt: pg_sys::MemoryContext,
    finfo: *mut pg_sys::FmgrInfo,
}

/// The version of a function's pg_proc row: its xmin and its tuple id. None when there is none.
pub fn proc_version(function: pg_sys::Oid) -> Option<(u32, u64)> {
    // SAFETY: a syscache lookup; the tuple is only read before ReleaseSysCache.
    unsafe {
        let tup = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::PROCOID as i32, function.into());
        if tup.is_null() {
            return None;
        }
        let xmin = pg_sys::HeapTupleHeaderGetXmin((*tup).t_data);
        let tid = (*tup).t_self;
        let block = ((tid.ip_blkid.bi_hi as u64) << 16) | tid.ip_blkid.bi_lo as u64;
        pg_sys::ReleaseSysCache(tup);
        Some((xmin.into_inner(), (block << 16) | tid.ip_posid as u64))
    }
}

fn fmgr_for(function: pg_sys::Oid) -> *mut pg_sys::FmgrInfo {
    let version = proc_version(function).unwrap_or_default();
    let key = function.to_u32();
    if let Some(p) = FMGR.with(|m| m.borrow().get(&key).filter(|c| c.version == version).map(|c| c.finfo)) {
        return p;
    }
    forget(function);
    // SAFETY: a new memory context under TopMemoryContext holds the FmgrInfo and whatever the
    // language keeps in fn_extra; fmgr_info_cxt fills it (and raises if the function is gone,
    // which may_run has checked just before).
    unsafe {
        let cxt = pg_sys::AllocSetContextCreateExtended(
            pg_sys::TopMemoryContext,
            c"event_projections handler".as_ptr(),
            pg_sys::ALLOCSET_SMALL_MINSIZE as usize,
            pg_sys::ALLOCSET_SMALL_INITSIZE as usize,
            pg_sys::ALLOCSET_SMALL_MAXSIZE as usize,
        );
        let finfo =
            pg_sys::MemoryContextAllocZero(cxt, std::mem::size_of::<pg_sys::FmgrInfo>()) as *mut pg_sys::FmgrInfo;
        pg_sys::fmgr_info_cxt(function, finfo, cxt);
        FMGR.with(|m| m.borrow_mut().insert(key, Cached { version, cxt, finfo }));
        finfo
    }
}

/// Forgets a cached FmgrInfo (replaced, or after a handler error).
fn forget(function: pg_sys::Oid) {
    if let Some(c) = FMGR.with(|m| m.borrow_mut().remove(&function.to_u32())) {
        // SAFETY: the context was made by fmgr_for and nothing else points into it once the
        // entry is gone (a call in progress holds no entry: forget runs between calls).
        unsafe { pg_sys::MemoryContextDelete(c.cxt) };
    }
}

/// Calls a one-argument function and ignores its result. Unlike `FunctionCall1Coll`, a NULL
/// result is fine: a `RETURNS void` SQL function returns NULL.
///
/// # Safety
/// `finfo` must come from `fmgr_for` for a function taking one argument of `arg`'s type.
pub unsafe fn call1(finfo: *mut pg_sys::FmgrInfo, arg: pg_sys::Datum) {
    // SAFETY: a FunctionCallInfo with room for one argument, as fmgr.h's LOCAL_FCINFO makes one;
    // the caller guarantees the function and the argument's type.
    unsafe {
        let size =
            std::mem::size_of::<pg_sys::FunctionCallInfoBaseData>() + std::mem::size_of::<pg_sys::NullableDatum>();
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

/// Calls a two-argument function and ignores its result (see `call1`).
///
/// # Safety
/// `finfo` must come from `fmgr_for` for a function taking two arguments of the datums' types.
pub unsafe fn call2(finfo: *mut pg_sys::FmgrInfo, a: pg_sys::Datum, b: pg_sys::Datum) {
    // SAFETY: as in call1, with room for two arguments.
    unsafe {
        let size =
            std::mem::size_of::<pg_sys::FunctionCallInfoBaseData>() + 2 * std::mem::size_of::<pg_sys::NullableDatum>();
        let fcinfo = pg_sys::palloc0(size) as *mut pg_sys::FunctionCallInfoBaseData;
        (*fcinfo).flinfo = finfo;
        (*fcinfo).fncollation = pg_sys::Oid::INVALID;
        (*fcinfo).nargs = 2;
        let args = (*fcinfo).args.as_mut_slice(2);
        args[0] = pg_sys::NullableDatum { value: a, isnull: false };
        args[1] = pg_sys::NullableDatum { value: b, isnull: false };
        let f = (*finfo).fn_addr.expect("fmgr_info sets fn_addr");
        pg_sys::ffi::pg_guard_ffi_boundary(|| f(fcinfo));
        pg_sys::pfree(fcinfo as *mut std::ffi::c_void);
    }
}

/// Calls `function` with `arg` as user code of `projection`: checked (`sandbox::may_run`), as
/// `owner` with `search_path`, in the sandbox, with the worker's timeout.
pub fn call_checked(
    function: pg_sys::Oid,
    what: &str,
    owner: pg_sys::Oid,
    projection: &str,
    search_path: &str,
    arg: pg_sys::Datum,
) {
    if let Err(e) = sandbox::may_run(function, what, owner, projection) {
        crate::pg::error::raise(&e);
    }
    sandbox::run_as(owner, search_path, || {
        let finfo = fmgr_for(function);
        // SAFETY: the function was checked to exist; the caller passes the argument it takes.
        sandbox::with_timeout(|| unsafe { call1(finfo, arg) });
    });
}

impl Handler {
    /// Calls the handler with each of `args` in order (`ep.events` values, or one `ep.events[]`
    /// per call for batch handlers), under the owner's role and search_path, set once for all of
    /// them. `before(i)` runs before call `i`; `what(i)` describes call `i`'s events for an error
    /// message. A handler error is raised again with the projection named and its SQLSTATE kept.
    pub fn call_all(&self, args: &[pg_sys::Datum], before: impl FnMut(usize), what: impl Fn(usize) -> String) {
        self.call_until(args, None, before, what);
    }

    /// `call_all`, but stops before a call (other than the first) once `deadline` has passed;
    /// returns how many calls were made. A worker step uses it so that a slow handler holds a
    /// worker for one step's budget, not for a whole batch.
    pub fn call_until(
        &self,
        args: &[pg_sys::Datum],
        deadline: Option<std::time::Instant>,
        mut before: impl FnMut(usize),
        what: impl Fn(usize) -> String,
    ) -> usize {
        let function = self.function;
        let current = std::cell::Cell::new(0usize);
        let made = std::cell::Cell::new(0usize);
        self.guarded(function, "handler", &|| what(current.get()), || {
            let finfo = fmgr_for(function);
            for (i, arg) in args.iter().enumerate() {
                if i > 0 && deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                    break;
                }
                current.set(i);
                made.set(i + 1);
                before(i);
                // SAFETY: fmgr_for made `finfo` for the handler, which takes `ep.events` (or
                // `ep.events[]` for a batch handler, and then `args` are arrays).
                sandbox::with_timeout(|| unsafe { call1(finfo, *arg) });
            }
        });
        made.get()
    }

    /// Calls the replay handler once for the range `after < global_position <= up_to`.
    pub fn call_range(&self, replay: pg_sys::Oid, after: i64, up_to: i64) {
        self.guarded(replay, "replay handler", &|| format!("events {}..{}", after + 1, up_to), || {
            let finfo = fmgr_for(replay);
            // SAFETY: validate_replay_handler checked that the function takes (bigint, bigint).
            sandbox::with_timeout(|| unsafe { call2(finfo, after.into(), up_to.into()) });
        });
    }

    /// Runs `body`, which calls `function`, checked and as the owner in the sandbox; an error is
    /// raised again with the projection and `what()` named and its SQLSTATE kept.
    fn guarded(&self, function: pg_sys::Oid, kind: &str, what: &dyn Fn() -> String, body: impl FnOnce()) {
        if let Err(e) = sandbox::may_run(function, kind, self.owner, &self.projection) {
            crate::pg::error::raise(&e);
        }
        let result = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
            sandbox::run_as(self.owner, &self.search_path, body);
            None
        }))
        .catch_others(Some)
        .execute();
        let Some(e) = result else { return };
        forget(function);
        let r = crate::pg::error::caught_report(&e);
        let (code, message, detail, hint) =
            (r.sql_error_code(), r.message().to_string(), r.detail().map(str::to_string), r.hint().map(str::to_string));
        if sandbox::take_timed_out() {
            let report = pg_sys::panic::ErrorReport::new(
                PgSqlErrorCode::ERRCODE_QUERY_CANCELED,
                format!(
                    "projection \"{}\" failed on {}: its {kind} ran longer than event_projections.handler_timeout ({} ms)",
                    self.projection,
                    what(),
                    crate::pg::settings::handler_timeout_ms()
                ),
                "event_projections",
            )
            .set_detail(format!("The {kind} {} was cancelled.", catalog::regprocedure_text(function)))
            .set_hint("Fix the handler, or raise event_projections.handler_timeout; then ep_retry_projection or ep_rebuild.");
            report.report(PgLogLevel::ERROR);
        }
        // Query cancels and shutdowns must stay what they are.
        if matches!(code, PgSqlErrorCode::ERRCODE_QUERY_CANCELED | PgSqlErrorCode::ERRCODE_ADMIN_SHUTDOWN) {
            e.rethrow();
        }
        let mut report = pg_sys::panic::ErrorReport::new(
            code,
            format!("projection \"{}\" failed on {}: {}", self.projection, what(), message),
            "event_projections",
        );
        report = report.set_detail(
            detail.unwrap_or_else(|| format!("The {kind} {} raised the error.", catalog::regprocedure_text(function))),
        );
        if let Some(h) = hint {
            report = report.set_hint(h);
        }
        report.report(PgLogLevel::ERROR);
    }

    /// Calls the handler once with `arg`.
    pub fn call(&self, arg: pg_sys::Datum, what: &dyn Fn() -> String) {
        self.call_all(&[arg], |_| {}, |_| what());
    }
}
