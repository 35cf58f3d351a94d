//! SPI with the snapshot choices the protocol needs, and plans prepared once per backend.
//!
//! pgrx's high-level SPI always runs with the caller's snapshot or assigns a transaction id; the
//! hand-off needs a third mode, a snapshot taken *now* (after a lock was granted) whatever the
//! isolation level, which is what `SPI_execute_snapshot(GetLatestSnapshot())` gives (PostgreSQL's
//! foreign-key triggers do the same). Every call must happen inside `Spi::connect`.

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CString;

/// Which snapshot a statement reads with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Snap {
    /// Read-write execution: at READ COMMITTED a new snapshot per statement, otherwise the
    /// transaction snapshot. Sees this transaction's own writes.
    Fresh,
    /// A snapshot taken now, at any isolation level (after the lock we just waited for).
    Latest,
    /// The calling statement's snapshot (read-only execution): what the query that called us
    /// reads its other tables with.
    Caller,
}

/// A statement with its parameter types, prepared on first use and kept for the backend's life.
pub struct Stmt {
    pub sql: &'static str,
    pub types: &'static [pg_sys::Oid],
}

thread_local! {
    static PLANS: RefCell<HashMap<&'static str, usize>> = RefCell::new(HashMap::new());
}

fn plan_for(stmt: &Stmt) -> pg_sys::SPIPlanPtr {
    if let Some(p) = PLANS.with(|m| m.borrow().get(stmt.sql).copied()) {
        return p as pg_sys::SPIPlanPtr;
    }
    let sql = CString::new(stmt.sql).expect("statement text has no NUL byte");
    let mut types = stmt.types.to_vec();
    // SAFETY: SPI_prepare inside Spi::connect (every caller), with a NUL-terminated statement
    // and `types.len()` parameter types; the plan is kept (SPI_keepplan) before it is cached.
    unsafe {
        let plan = pg_sys::SPI_prepare(sql.as_ptr(), types.len() as i32, types.as_mut_ptr());
        if plan.is_null() {
            error!("event_projections: could not prepare internal statement: {}", stmt.sql);
        }
        pg_sys::SPI_keepplan(plan);
        PLANS.with(|m| m.borrow_mut().insert(stmt.sql, plan as usize));
        plan
    }
}

/// The rows a statement returned. They borrow the SPI connection they came from, so they cannot
/// outlive it (the tuple table is freed when the connection ends).
pub struct Rows<'c> {
    table: *mut pg_sys::SPITupleTable,
    len: usize,
    _client: std::marker::PhantomData<&'c SpiClient<'c>>,
}

impl Rows<'_> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn raw(&self, row: usize, col: usize) -> (pg_sys::Datum, bool, pg_sys::Oid) {
        if row >= self.len {
            return (pg_sys::Datum::from(0), true, pg_sys::Oid::INVALID);
        }
        // SAFETY: `row < len`, the number of tuples in the SPI tuple table, which is valid until the
        // enclosing Spi::connect ends (Rows never outlives it: every caller uses it inside).
        unsafe {
            let t = &*self.table;
            let tuple = *t.vals.add(row);
            let mut isnull = false;
            let d = pg_sys::SPI_getbinval(tuple, t.tupdesc, col as i32, &mut isnull);
            let typ = pg_sys::SPI_gettypeid(t.tupdesc, col as i32);
            (d, isnull, typ)
        }
    }

    /// Column `col` (1-based) of row `row` (0-based), converted; None when NULL or when there is
    /// no such row. A column whose type is not one `T` can hold is an internal error (the
    /// statements are the extension's own), raised rather than misread.
    pub fn get<T: FromDatum + IntoDatum>(&self, row: usize, col: usize) -> Option<T> {
        let (d, isnull, typ) = self.raw(row, col);
        if row < self.len && !T::is_compatible_with(typ) {
            error!(
                "event_projections: internal statement returned type {} in column {col}, not {}",
                typ.to_u32(),
                std::any::type_name::<T>()
            );
        }
        // SAFETY: the datum comes with its own type OID, so T's from_polymorphic_datum can check it.
        unsafe { T::from_polymorphic_datum(d, isnull, typ) }
    }

    /// The raw datum of a column, valid until the enclosing `Spi::connect` ends.
    pub fn datum(&self, row: usize, col: usize) -> Option<pg_sys::Datum> {
        let (d, isnull, _) = self.raw(row, col);
        (!isnull).then_some(d)
    }

    /// The raw datum of a by-reference column, copied into `cxt` so it outlives SPI.
    pub fn datum_in(&self, row: usize, col: usize, cxt: pg_sys::MemoryContext) -> Option<pg_sys::Datum> {
        let (d, isnull, _) = self.raw(row, col);
        if isnull {
            return None;
        }
        // SAFETY: copies a varlena (or passes a by-value datum) from the SPI tuple table into `cxt`,
        // whose lifetime the caller chose.
        unsafe {
            // SPI_datumTransfer copies into the context that was current at SPI_connect; switch so
            // that the copy lands in `cxt` instead.
            let old = pg_sys::MemoryContextSwitchTo(cxt);
            let attr = (*(*self.table).tupdesc).attrs.as_ptr().add(col - 1);
            let copy = if (*attr).attbyval {
                d
            } else {
                debug_assert_eq!((*attr).attlen, -1, "only varlena columns are copied");
                let len = pgrx::varlena::varsize_any(d.cast_mut_ptr());
                let p = pg_sys::palloc(len);
                std::ptr::copy_nonoverlapping(d.cast_mut_ptr::<u8>(), p as *mut u8, len);
                pg_sys::Datum::from(p)
            };
            pg_sys::MemoryContextSwitchTo(old);
            Some(copy)
        }
    }
}

/// Runs `f` with only `pg_catalog` to resolve names: no schema a user controls, not even
/// `pg_temp`. An override search path rather than the search_path setting: a pointer push and
/// pop, where setting the GUC parses, validates and later recomputes the path, and this runs on
/// every append. Never call user code inside (the override would hide its own search_path). On
/// an error the (sub)transaction's abort pops the override.
pub fn with_pinned_path<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: an OverrideSearchPath allocated in the current memory context, pushed and popped
    // in a nested pair; PushOverrideSearchPath copies what it needs.
    unsafe {
        let path =
            pg_sys::palloc0(std::mem::size_of::<pg_sys::OverrideSearchPath>()) as *mut pg_sys::OverrideSearchPath;
        (*path).schemas = std::ptr::null_mut();
        (*path).addCatalog = true;
        (*path).addTemp = false;
        pg_sys::PushOverrideSearchPath(path);
    }
    let r = f();
    // SAFETY: pops the override pushed above.
    unsafe { pg_sys::PopOverrideSearchPath() };
    r
}

/// Executes `stmt` with `args` (None = NULL) under `snap` on the SPI connection `client`, returning
/// at most `limit` rows (0 = all). The statement is prepared and run under the pinned path
/// (`with_pinned_path`), whoever calls.
pub fn exec<'c>(
    client: &'c SpiClient<'_>,
    stmt: &Stmt,
    args: &[Option<pg_sys::Datum>],
    snap: Snap,
    limit: i64,
) -> Rows<'c> {
    let _ = client; // the connection the rows borrow
    with_pinned_path(|| exec_pinned(stmt, args, snap, limit))
}

fn exec_pinned<'c>(stmt: &Stmt, args: &[Option<pg_sys::Datum>], snap: Snap, limit: i64) -> Rows<'c> {
    assert_eq!(args.len(), stmt.types.len(), "argument count of {}", stmt.sql);
    let plan = plan_for(stmt);
    let mut values: Vec<pg_sys::Datum> = args.iter().map(|a| a.unwrap_or(pg_sys::Datum::from(0))).collect();
    let nulls: Vec<std::ffi::c_char> =
        args.iter().map(|a| if a.is_some() { b' ' as std::ffi::c_char } else { b'n' as std::ffi::c_char }).collect();
    // SAFETY: a kept plan with as many values and nulls as its parameter types (asserted above),
    // inside Spi::connect; GetLatestSnapshot is valid until the next snapshot is taken.
    unsafe {
        let rc = match snap {
            Snap::Fresh => pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr(), false, limit),
            Snap::Caller => pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr(), true, limit),
            Snap::Latest => pg_sys::SPI_execute_snapshot(
                plan,
                values.as_mut_ptr(),
                nulls.as_ptr(),
                pg_sys::GetLatestSnapshot(),
                std::ptr::null_mut(),
                false,
                true,
                limit,
            ),
        };
        if rc < 0 {
            error!("event_projections: internal statement failed with SPI code {rc}: {}", stmt.sql);
        }
        let table = pg_sys::SPI_tuptable;
        let len = if table.is_null() { 0 } else { pg_sys::SPI_processed as usize };
        Rows { table, len, _client: std::marker::PhantomData }
    }
}

/// Forgets every kept plan. Called when the extension's catalog changed identity (dropped and
/// created again), so that plans are prepared against the new objects.
pub fn reset_plans() {
    PLANS.with(|m| {
        for (_, p) in m.borrow_mut().drain() {
            // SAFETY: plans made by plan_for with SPI_keepplan, each freed once (drained from the map).
            unsafe { pg_sys::SPI_freeplan(p as pg_sys::SPIPlanPtr) };
        }
    });
}

/// A text datum in the current memory context.
pub fn text(s: &str) -> Option<pg_sys::Datum> {
    s.into_datum()
}

/// A bigint datum.
pub fn int8(v: i64) -> Option<pg_sys::Datum> {
    v.into_datum()
}

/// A one-dimensional array of by-reference `elem` values (no NULLs) built from raw datums.
fn array_of(elems: &[pg_sys::Datum], elem: pg_sys::Oid, align: u8) -> pg_sys::Datum {
    // SAFETY: `elems.len()` datums of type `elem` (by reference, alignment `align`), copied by
    // construct_array into the current memory context.
    unsafe {
        let arr = pg_sys::construct_array(
            elems.as_ptr() as *mut pg_sys::Datum,
            elems.len() as i32,
            elem,
            -1,
            false,
            align as std::ffi::c_char,
        );
        pg_sys::Datum::from(arr)
    }
}

/// An array datum of `elem` (a varlena type such as jsonb) built from raw datums.
pub fn varlena_array(elems: &[pg_sys::Datum], elem: pg_sys::Oid) -> Option<pg_sys::Datum> {
    Some(array_of(elems, elem, pg_sys::TYPALIGN_INT))
}

/// An array of composite values of type `elem` (double aligned).
pub fn composite_array(elems: &[pg_sys::Datum], elem: pg_sys::Oid) -> pg_sys::Datum {
    array_of(elems, elem, pg_sys::TYPALIGN_DOUBLE)
}
