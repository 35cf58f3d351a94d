//! Small services of the backend process: settings for a nest level or a transaction, and sleeping
//! on the process latch.

use pgrx::pg_sys;

/// Sets a user-settable setting for the current GUC nest level (`GUC_ACTION_SAVE`) or for the rest
/// of the transaction (`GUC_ACTION_LOCAL`).
pub fn set_setting(name: &std::ffi::CStr, value: &std::ffi::CStr, action: pg_sys::GucAction::Type) {
    // SAFETY: set_config_option with NUL-terminated strings, in a backend with a transaction open;
    // it raises (elevel 0 → ERROR) on a bad value.
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            action,
            true,
            0,
            false,
        );
    }
}

/// Sleeps on the process latch for `ms` milliseconds (a cancel, a shutdown or a wake-up ends the
/// sleep early; interrupts are then processed).
pub fn sleep_ms(ms: i64) {
    wait_on_latch(ms);
    reset_latch();
    pgrx::check_for_interrupts!();
}

fn wait_on_latch(ms: i64) {
    // SAFETY: this process's own latch.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            ms,
            pg_sys::PG_WAIT_EXTENSION,
        );
    }
}

/// Clears the process latch (before looking for what a wake-up would announce).
pub fn reset_latch() {
    // SAFETY: this process's own latch.
    unsafe { pg_sys::ResetLatch(pg_sys::MyLatch) };
}

/// Waits up to `ms` milliseconds for the process latch, without clearing it first (the caller
/// did, before looking: a wake-up since then returns at once); then processes interrupts.
pub fn wait_latch(ms: i64) {
    wait_on_latch(ms);
    pgrx::check_for_interrupts!();
}

/// An interval as microseconds, counting a month as 30 days (as PostgreSQL's interval comparison
/// does). Negative intervals and ones that do not fit in 64 bits are refused, with the reason.
pub fn interval_micros(i: &pgrx::datum::Interval) -> Result<i64, String> {
    const DAY: i64 = 86_400_000_000;
    let days = (i.months() as i64).checked_mul(30).and_then(|d| d.checked_add(i.days() as i64));
    let total = days.and_then(|d| d.checked_mul(DAY)).and_then(|d| d.checked_add(i.micros()));
    match total {
        None => Err(format!("{i} is too long")),
        Some(t) if t < 0 => Err(format!("{i} is negative")),
        Some(t) => Ok(t),
    }
}

/// Runs `f` in an internal subtransaction, as PL/pgSQL's exception blocks do: released when `f`
/// returns (its locks and writes pass to the transaction), rolled back when it raises (what `f`
/// did is undone, the session is left as before), and then the error is the caller's to handle
/// or raise again (`CaughtError::rethrow`). The memory context and resource owner of the caller
/// are put back on both paths.
pub fn in_subtransaction<R>(f: impl FnOnce() -> R) -> Result<R, Box<pg_sys::panic::CaughtError>> {
    // SAFETY: the internal-subtransaction protocol: begin, run, then release or roll back (after
    // the error was caught, as plpgsql does), restoring the caller's context and resource owner.
    unsafe {
        let cxt = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(cxt);
        let f = std::panic::AssertUnwindSafe(f);
        let result = pgrx::PgTryBuilder::new(move || {
            let f = f;
            Ok((f.0)())
        })
        .catch_others(|e| Err(Box::new(e)))
        .execute();
        if result.is_ok() {
            pg_sys::ReleaseCurrentSubTransaction();
        } else {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(cxt);
        pg_sys::CurrentResourceOwner = owner;
        result
    }
}

/// This backend's database.
pub fn my_database() -> u32 {
    // SAFETY: a plain read of a global PostgreSQL sets once, at connection.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// The name of database `oid` (None for one dropped meanwhile); needs a transaction.
pub fn database_name(oid: u32) -> Option<String> {
    // SAFETY: get_database_name reads the shared catalog pg_database and returns a palloc'd
    // NUL-terminated name, or NULL when there is no such database; it is copied at once.
    unsafe {
        let p = pg_sys::get_database_name(pg_sys::Oid::from(oid));
        (!p.is_null()).then(|| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
    }
}
