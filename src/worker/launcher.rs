//! The launcher: one background process, connected to no database, that keeps a worker process
//! running for every database with the extension (up to `event_projections.max_workers` in all,
//! shared fairly), the way TimescaleDB's scheduler launcher does.
//!
//! It cannot see another database's catalog, so it learns which databases have the extension from
//! the workers themselves: a database it has not seen yet gets one worker, which connects, looks,
//! and either serves it or says "no extension" and ends. CREATE EXTENSION asks the launcher to
//! look again at the databases it found without it (`pool::request_probe`); a database created
//! from a template that has the extension is new to the launcher, so it is looked at too.
//!
//! Fair share: the slots go round-robin, one at a time, to the databases that want more (a
//! database not yet looked at wants one); with more databases than slots, the starting point
//! rotates every `ROTATION`, and a database over its share has its surplus workers asked to end
//! at their next round (a worker holds no lock between rounds, so ending then loses nothing).

use super::pool::{self, Verdict};
use crate::pg::settings::{self, MAX_WORKERS};
use pgrx::bgworkers::{BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime, DynamicBackgroundWorker};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How long the same databases keep the slots when there are more databases than slots.
const ROTATION: Duration = Duration::from_secs(10);
/// How long a database whose worker ended without saying anything (it could not connect, or
/// crashed) waits before the next try.
const RETRY: Duration = Duration::from_secs(5);
/// How often a database found without the extension is looked at again, for an extension that
/// arrived without CREATE EXTENSION of this version telling the launcher (an older version's
/// install script, say).
const RECHECK: Duration = Duration::from_secs(300);
/// How long every worker must have been idle before the turn passes early.
const IDLE_TURN: Duration = Duration::from_secs(1);

/// Registers the launcher (from `_PG_init`, during shared_preload_libraries).
pub fn register() {
    BackgroundWorkerBuilder::new("event_projections launcher")
        .set_type("event_projections launcher")
        .set_library("event_projections")
        .set_function("ep_launcher_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Known {
    /// Not looked at yet (or to be looked at again): wants one worker.
    Unknown,
    HasExtension,
    NoExtension,
}

struct Database {
    known: Known,
    /// When `known` was last learnt.
    learnt: Instant,
    /// No new worker before this (after a worker ended without a verdict).
    not_before: Instant,
}

struct Launcher {
    /// Per slot (the serving ones, then `pool::PROBE`): the running process and its database.
    running: Vec<Option<(DynamicBackgroundWorker, u32)>>,
    yielding: Vec<bool>,
    /// Slots still held by processes an earlier launcher started (they end at their next round).
    orphans: Vec<bool>,
    databases: BTreeMap<u32, Database>,
    probes_seen: u64,
    rotation: usize,
    rotated_at: Instant,
    start_failed_logged: bool,
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn ep_launcher_main(_arg: pg_sys::Datum) {
    super::install_signal_handlers();
    // No database: the launcher reads only the shared catalog pg_database.
    pgrx::bgworkers::BackgroundWorker::connect_worker_to_spi(None, None);
    let held = pool::launcher_started();
    let mut l = Launcher {
        running: (0..=MAX_WORKERS).map(|_| None).collect(),
        yielding: vec![false; MAX_WORKERS + 1],
        orphans: (0..=MAX_WORKERS).map(|i| held.contains(&i)).collect(),
        databases: BTreeMap::new(),
        probes_seen: 0,
        rotation: 0,
        rotated_at: Instant::now(),
        start_failed_logged: false,
    };
    if !held.is_empty() {
        log!("event_projections launcher started; {} worker(s) of the previous launcher are asked to end", held.len());
    } else {
        log!("event_projections launcher started");
    }
    loop {
        pgrx::check_for_interrupts!();
        super::reload_config_if_asked();
        crate::pg::backend::reset_latch();
        l.reap();
        l.refresh_databases();
        l.balance();
        l.probe();
        crate::pg::backend::wait_latch(settings::naptime_ms() as i64);
    }
}

impl Launcher {
    /// Empties the slots whose process ended and learns what the workers found.
    fn reap(&mut self) {
        let now = Instant::now();
        for i in 0..=MAX_WORKERS {
            if self.orphans[i] && pool::orphan_gone(i, 10_000_000) {
                self.orphans[i] = false;
                pool::release(i);
            }
            let Some((handle, db)) = &self.running[i] else { continue };
            let db = *db;
            let ended =
                matches!(handle.pid(), Err(BackgroundWorkerStatus::Stopped | BackgroundWorkerStatus::PostmasterDied));
            let verdict = if ended {
                self.running[i] = None;
                self.yielding[i] = false;
                pool::release(i)
            } else {
                pool::verdict(i)
            };
            let Some(d) = self.databases.get_mut(&db) else { continue };
            match verdict {
                Verdict::Serving => d.known = Known::HasExtension,
                // Only from an ended process (it ends right after saying so), and not stale.
                Verdict::NoExtension if ended => (d.known, d.learnt) = (Known::NoExtension, now),
                Verdict::NoExtension => {}
                Verdict::Unknown if ended => d.not_before = now + RETRY,
                Verdict::Unknown => {}
            }
        }
    }

    /// Starts the probe for the database not looked at for longest, if it is free.
    fn probe(&mut self) {
        if self.running[pool::PROBE].is_some() || self.orphans[pool::PROBE] {
            return;
        }
        let now = Instant::now();
        let hint = pool::snapshot().map(|p| p.probe_hint).unwrap_or(0);
        // The database that just ran CREATE EXTENSION first, then the one not looked at longest.
        let next = self
            .databases
            .iter()
            .filter(|(oid, d)| d.known == Known::Unknown && d.not_before <= now && !pool::is_released(**oid))
            .min_by_key(|(oid, d)| (**oid != hint, d.learnt))
            .map(|(oid, _)| *oid);
        if let Some(oid) = next {
            if let Some(d) = self.databases.get_mut(&oid) {
                d.learnt = now; // the others come first next time, whatever this one finds
            }
            self.start(pool::PROBE, oid);
        }
    }

    /// Follows pg_database (and the `event_projections.database` filter) and probe requests.
    fn refresh_databases(&mut self) {
        let listed = connectable_databases(&settings::database());
        self.databases.retain(|oid, _| listed.contains(oid));
        for oid in listed {
            let now = Instant::now();
            self.databases.entry(oid).or_insert(Database { known: Known::Unknown, learnt: now, not_before: now });
        }
        let probes = pool::snapshot().map(|p| p.probe_requests).unwrap_or(0);
        let asked = probes != self.probes_seen;
        self.probes_seen = probes;
        for d in self.databases.values_mut() {
            if d.known == Known::NoExtension && (asked || d.learnt.elapsed() >= RECHECK) {
                d.known = Known::Unknown;
            }
        }
    }

    /// Asks surplus workers to end and starts the missing ones.
    fn balance(&mut self) {
        let max = settings::max_workers().min(MAX_WORKERS);
        // Only databases known to have the extension share the slots; the others are looked at
        // by the probe, outside them.
        let wanting: Vec<(u32, usize)> =
            self.databases.iter().filter(|(_, d)| d.known == Known::HasExtension).map(|(oid, _)| (*oid, max)).collect();
        // With more databases than slots the turn passes every ROTATION, or sooner once every
        // worker has found nothing to do for a while (an idle database should not keep a slot
        // that another one may need).
        let turn_over = self.rotated_at.elapsed() >= ROTATION
            || (self.rotated_at.elapsed() >= IDLE_TURN && self.all_idle_for(IDLE_TURN));
        if wanting.len() > max && turn_over {
            self.rotation = self.rotation.wrapping_add(1);
            self.rotated_at = Instant::now();
        }
        let shares = fair_shares(&wanting, max, self.rotation);
        // Slots past a lowered max_workers are surplus wherever they are.
        for i in max..MAX_WORKERS {
            self.ask_to_yield(i);
        }
        for (oid, share) in shares {
            let mine: Vec<usize> = (0..max)
                .filter(|i| !self.yielding[*i] && matches!(&self.running[*i], Some((_, db)) if *db == oid))
                .collect();
            for &i in mine.iter().skip(share) {
                self.ask_to_yield(i);
            }
            let ready =
                self.databases.get(&oid).is_some_and(|d| d.not_before <= Instant::now()) && !pool::is_released(oid);
            for _ in mine.len()..share {
                if !ready {
                    break;
                }
                let Some(i) = self.free_slot(oid, max) else { break };
                self.start(i, oid);
            }
        }
        // Workers of databases that want none (dropped, filtered out, no extension) end too.
        for i in 0..MAX_WORKERS {
            if let Some((_, db)) = &self.running[i] {
                let wanted = wanting.iter().any(|(oid, _)| oid == db);
                if !wanted {
                    self.ask_to_yield(i);
                }
            }
        }
    }

    /// Whether every running worker has been idle for at least `d`.
    fn all_idle_for(&self, d: Duration) -> bool {
        let Some(pool) = pool::snapshot() else { return false };
        // SAFETY: reads the clock.
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        (0..MAX_WORKERS).filter(|i| self.running[*i].is_some()).all(|i| {
            let s = &pool.slots[i];
            s.doing == pool::Doing::Idle && now - s.since >= d.as_micros() as i64
        })
    }

    fn ask_to_yield(&mut self, i: usize) {
        if self.running[i].is_some() && !self.yielding[i] {
            self.yielding[i] = true;
            pool::request_yield(i);
        }
    }

    /// A free slot below `max`, preferring one whose previous process left a note for `oid`'s
    /// workers (a projection that ran past the handler timeout) and avoiding those with a note
    /// for another database.
    fn free_slot(&self, oid: u32, max: usize) -> Option<usize> {
        (0..max).filter(|i| self.running[*i].is_none() && !self.orphans[*i]).min_by_key(|i| {
            match crate::handoff::inflight::timed_out_database(*i) {
                Some(db) if db == oid => 0,
                None => 1,
                Some(_) => 2,
            }
        })
    }

    fn start(&mut self, i: usize, oid: u32) {
        pool::assign(i, oid);
        // SAFETY: a plain read of this process's pid.
        let me = unsafe { pg_sys::MyProcPid };
        let started = BackgroundWorkerBuilder::new(&format!("event_projections worker {}", i + 1))
            .set_type("event_projections worker")
            .set_library("event_projections")
            .set_function("ep_worker_main")
            .set_argument((i as i32).into_datum())
            .set_extra(&oid.to_string())
            .enable_spi_access()
            .set_start_time(BgWorkerStartTime::RecoveryFinished)
            .set_restart_time(None)
            .set_notify_pid(me)
            .load_dynamic();
        match started {
            Ok(handle) => {
                self.running[i] = Some((handle, oid));
                self.start_failed_logged = false;
            }
            Err(_) => {
                pool::release(i);
                if !self.start_failed_logged {
                    warning!("event_projections launcher: could not start a worker; raise max_worker_processes (it must leave room for event_projections.max_workers + 2: the workers, the launcher and its probe)");
                    self.start_failed_logged = true;
                }
            }
        }
    }
}

/// Hands `max` slots out one at a time, round-robin from `rotation`, to the databases below what
/// they want. Every database that wants any gets one before any gets a second.
pub fn fair_shares(wanting: &[(u32, usize)], max: usize, rotation: usize) -> Vec<(u32, usize)> {
    let n = wanting.len();
    let mut shares: Vec<(u32, usize)> = wanting.iter().map(|(oid, _)| (*oid, 0)).collect();
    let mut left = max;
    while left > 0 {
        let mut gave = false;
        for k in 0..n {
            let i = (k + rotation) % n;
            if left > 0 && shares[i].1 < wanting[i].1 {
                shares[i].1 += 1;
                left -= 1;
                gave = true;
            }
        }
        if !gave {
            break;
        }
    }
    shares
}

/// The databases workers may connect to: not templates, connections allowed, not half-dropped,
/// and the one `event_projections.database` names when it is set.
fn connectable_databases(only: &str) -> Vec<u32> {
    let mut found = Vec::new();
    // SAFETY: the way PostgreSQL's autovacuum launcher lists databases: a catalog scan of the
    // shared catalog pg_database in a transaction of its own; every tuple is read while the scan
    // holds it and copied out before the transaction ends.
    unsafe {
        pg_sys::StartTransactionCommand();
        pg_sys::GetTransactionSnapshot();
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as i32);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let form = &*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
            let name = std::ffi::CStr::from_ptr(form.datname.data.as_ptr()).to_string_lossy();
            if form.datallowconn
                && !form.datistemplate
                && form.datconnlimit != pg_sys::DATCONNLIMIT_INVALID_DB
                && (only.is_empty() || only == name)
            {
                found.push(form.oid.to_u32());
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
        pg_sys::CommitTransactionCommand();
    }
    found
}

#[cfg(test)]
mod tests {
    use super::fair_shares;
    use proptest::prelude::*;

    proptest! {
        /// Never more than `max` in all, never more than a database wants; every database gets
        /// one before any gets two; no slot is left idle while someone wants more; and over
        /// `n` rotations every database gets a turn.
        #[test]
        fn shares_are_fair(wants in proptest::collection::vec(1usize..20, 0..10), max in 1usize..17, rotation in 0usize..50) {
            let wanting: Vec<(u32, usize)> = wants.iter().enumerate().map(|(i, w)| (i as u32, *w)).collect();
            let shares = fair_shares(&wanting, max, rotation);
            let total: usize = shares.iter().map(|s| s.1).sum();
            prop_assert!(total <= max);
            prop_assert_eq!(total, max.min(wants.iter().sum()));
            for (s, w) in shares.iter().zip(&wants) {
                prop_assert!(s.1 <= *w);
            }
            for (short, w) in shares.iter().zip(&wants) {
                if short.1 < *w {
                    // Whoever is short has at most one less than anyone.
                    prop_assert!(shares.iter().all(|s| s.1 <= short.1 + 1), "{:?}", shares);
                }
            }
            if !wants.is_empty() {
                let n = wants.len();
                let mut served = vec![false; n];
                for r in rotation..rotation + n {
                    for (i, s) in fair_shares(&wanting, max, r).iter().enumerate() {
                        served[i] |= s.1 > 0;
                    }
                }
                prop_assert!(served.iter().all(|x| *x));
            }
        }
    }
}
