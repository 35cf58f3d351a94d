//! event_projections: an event store in PostgreSQL whose read models can be trusted.
//!
//! Module map (DESIGN.md explains the protocol these implement):
//! - `log`: appends and the append-only guard;
//! - `registry`: projections, their registration hand-off and the views others read;
//! - `handoff`: the advisory locks and the REPEATABLE READ check;
//! - `inflight`: which positions are still uncommitted (shared memory) and worker wake-ups;
//! - `handler`: running a handler as its owner with its search_path;
//! - `replay`: applying a range of the log through a handler;
//! - `highwater`: the position below which nothing is in flight;
//! - `rebuild`: the rebuild API and the steps of both strategies;
//! - `delivery`: async projections;
//! - `worker`: the background processes that run rebuilds and deliveries;
//! - `status`: the fail-fast readiness check;
//! - `catalog`, `spi`, `types`, `error`, `settings`, `backend`: plumbing.

use pgrx::prelude::*;

mod api;
mod backend;
mod catalog;
mod delivery;
mod error;
mod handler;
mod handoff;
mod highwater;
mod inflight;
mod log;
mod rebuild;
mod registry;
mod replay;
mod settings;
mod spi;
mod status;
mod types;
mod worker;

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../sql/api.sql", name = "api", finalize);

#[allow(non_snake_case)]
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    let preloaded = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    settings::define(preloaded);
    if preloaded {
        inflight::install_hooks();
        worker::register();
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    // #[pg_schema] needs the module inline.
    include!("tests.rs");
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'event_projections'", "event_projections.database = 'pgrx_tests'"]
    }
}
