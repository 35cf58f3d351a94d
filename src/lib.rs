//! event_projections: an event store in PostgreSQL whose read models can be trusted.
//!
//! Module map, one folder per subsystem (DESIGN.md explains the protocol these implement).
//! Dependencies point down this list: a module uses only those below it.
//! - `api`: the SQL entry points (argument mapping only);
//! - `worker`: the background processes that run rebuilds (`worker`) and async projections
//!   (`worker::delivery`);
//! - `retention`: retention policies and the worker's cuts and removals;
//! - `rebuild`: the rebuild API and the steps of both strategies;
//! - `log`: appends (A1..A11), stream deletion, retention cuts, forgetting subjects and the
//!   append-only guard;
//! - `registry`: projections, their registration hand-off, the per-backend view of the registry
//!   appends use, and the readiness checks (`registry::status`);
//! - `subscription`: the log for consumers outside the database: reads bounded by the high-water
//!   mark and durable subscriptions;
//! - `sandbox`: running user code as its owner with a pinned path, call-time checks and the
//!   worker's timeout (`sandbox`), calling handlers (`sandbox::handler`), applying a range of the
//!   log through one (`sandbox::replay`);
//! - `seal`: erasure by crypto-shredding: subject keys, sealing an event's data, unsealing the
//!   rows every read and replay hands out, forgetting a subject;
//! - `handoff`: the advisory locks and the REPEATABLE READ check (`handoff`), which positions are
//!   still in flight in shared memory and the worker wake-ups (`handoff::inflight`), the
//!   high-water mark (`handoff::highwater`);
//! - `pg`: PostgreSQL plumbing: SPI, the catalog identity and privileged execution, settings,
//!   errors, backend services, argument types.

use pgrx::prelude::*;

mod api;
mod handoff;
mod log;
mod monitor;
mod pg;
mod rebuild;
mod registry;
mod retention;
mod sandbox;
mod seal;
mod subscription;
mod worker;

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
// The triggers on the catalog's tables, once the tables (schema) and the trigger functions exist.
// pgrx matches a `requires` path against where the function is defined: the last segment is the
// function's name, the rest a suffix of its module path (`event_projections::log::ep`), so a path
// may not start with `crate::` (`cargo pgrx schema` fails on a path that matches nothing).
extension_sql_file!(
    "../sql/triggers.sql",
    name = "triggers",
    requires = ["schema", log::ep::events_guard, registry::ep::projections_changed]
);
extension_sql_file!("../sql/api.sql", name = "api", finalize);

#[allow(non_snake_case)]
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // No Rust backtrace ever reaches a client, whatever RUST_BACKTRACE the server was started
    // with: pgrx puts a captured backtrace into the DETAIL of a panic's error, and the standard
    // library reads RUST_LIB_BACKTRACE (before RUST_BACKTRACE) once, at the first capture.
    // SAFETY: _PG_init runs before any thread of ours exists and before the first capture.
    unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    // SAFETY: a plain read of a flag PostgreSQL sets while it loads preloaded libraries.
    let preloaded = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    pg::settings::define();
    if preloaded {
        handoff::inflight::install_hooks();
        worker::pool::init();
        worker::release::install_hook();
        worker::register();
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'event_projections'", "event_projections.database = 'pgrx_tests'"]
    }
}
