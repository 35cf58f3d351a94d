//! How every module reports a failure: a Rust error enum per module, each variant mapped to a
//! documented SQLSTATE (the table is in README.md, "Errors") and a message that names the object
//! and, where there is one, the fix.
//!
//! Only standard SQLSTATEs are used: pgrx 0.18 cannot raise a custom code, and maps any unknown
//! code that passes through it to XX000.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use std::fmt::Display;

/// A failure that knows its SQLSTATE.
pub trait SqlError: Display {
    fn sqlstate(&self) -> PgSqlErrorCode;
    fn detail(&self) -> Option<String> {
        None
    }
    fn hint(&self) -> Option<String> {
        None
    }
}

/// Raises `e` as an ERROR. Never returns.
pub fn raise(e: &dyn SqlError) -> ! {
    let mut report = ErrorReport::new(e.sqlstate(), e.to_string(), "event_projections");
    if let Some(d) = e.detail() {
        report = report.set_detail(d);
    }
    if let Some(h) = e.hint() {
        report = report.set_hint(h);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("an ERROR report returns control to PostgreSQL")
}

/// `result.or_raise()`: the value, or the error raised with its SQLSTATE.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T, E: SqlError> OrRaise<T> for Result<T, E> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => raise(&e),
        }
    }
}

/// Errors of argument checking shared by every SQL entry point.
#[derive(Debug, thiserror::Error)]
pub enum ArgError {
    /// A required argument was NULL.
    #[error("{0} must not be NULL")]
    Null(&'static str),
    /// An argument that must not be empty was.
    #[error("{0} must not be empty")]
    Empty(&'static str),
    /// Any other invalid value, with what was expected.
    #[error("invalid {arg}: {problem}")]
    Invalid { arg: &'static str, problem: String },
}

impl SqlError for ArgError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            ArgError::Null(_) => PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            _ => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        }
    }
}

/// The argument, or an `ArgError::Null` naming it.
pub fn required<T>(v: Option<T>, arg: &'static str) -> Result<T, ArgError> {
    v.ok_or(ArgError::Null(arg))
}

/// A text argument that must be present and non-empty.
pub fn required_text<'a>(v: Option<&'a str>, arg: &'static str) -> Result<&'a str, ArgError> {
    match v {
        None => Err(ArgError::Null(arg)),
        Some("") => Err(ArgError::Empty(arg)),
        Some(s) => Ok(s),
    }
}

/// The error report of a caught error, whichever way it was raised.
pub fn caught_report(e: &pgrx::pg_sys::panic::CaughtError) -> &pgrx::pg_sys::panic::ErrorReportWithLevel {
    use pgrx::pg_sys::panic::CaughtError;
    match e {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) | CaughtError::RustPanic { ereport: r, .. } => r,
    }
}
