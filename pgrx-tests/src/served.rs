//! The database the background worker serves. The worker serves one database per cluster
//! (`event_projections.database`), so the tests that need it share that database and take turns;
//! each starts from a freshly created extension, which also exercises the worker noticing
//! DROP/CREATE EXTENSION while it runs. Also the cluster itself, for the crash tests.

use crate::*;
use postgres::Client;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

static TURN: Mutex<()> = Mutex::new(());

/// The database the worker serves: EP_WORKER_DB, default `ep`.
pub fn served_db() -> String {
    std::env::var("EP_WORKER_DB").unwrap_or_else(|_| "ep".into())
}

/// The served database with a fresh extension; holds the turn until dropped.
pub struct Served {
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Served {
    pub fn fresh() -> (Served, Client) {
        let turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
        let mut c = reconnect(); // the server may still be recovering from a crash test
        c.batch_execute(
            "SET client_min_messages = warning;
             DROP EXTENSION IF EXISTS event_projections CASCADE;
             DO $$ DECLARE s text; BEGIN
               FOR s IN SELECT nspname FROM pg_namespace WHERE nspname LIKE 'w\\_%' LOOP
                 EXECUTE format('DROP SCHEMA %I CASCADE', s);
               END LOOP; END $$;
             CREATE EXTENSION event_projections;",
        )
        .unwrap_or_else(|e| panic!("resetting the served database: {}", show(&e)));
        settings(
            &mut c,
            &[
                "ALTER SYSTEM RESET event_projections.max_attempts",
                "ALTER SYSTEM RESET event_projections.retry_backoff",
            ],
        );
        // The launcher starts the workers again once it sees the new extension.
        let serving = wait_until(Duration::from_secs(20), || {
            Ok(c.query_one(
                "SELECT count(*) >= current_setting('event_projections.max_workers')::bigint FROM ep.workers
                  WHERE database = current_database() AND doing NOT IN ('starting', 'yielding')",
                &[],
            )?
            .get::<_, bool>(0))
        });
        assert!(serving.unwrap_or(false), "the workers did not come back after CREATE EXTENSION");
        (Served { _turn: turn }, c)
    }

    pub fn connect(&self) -> Client {
        connect(&served_db())
    }

    /// A connection holding advisory lock `key` exclusively: the handlers of
    /// `create_gated_counts(.., key)` wait at their next event while the worker runs them.
    pub fn closed_gate(&self, key: i64) -> Gate {
        let mut g = Gate { client: self.connect(), key };
        g.close();
        g
    }
}

/// See `Served::closed_gate`.
pub struct Gate {
    client: Client,
    key: i64,
}

impl Gate {
    pub fn close(&mut self) {
        self.client.execute("SELECT pg_advisory_lock($1)", &[&self.key]).expect("closing the gate");
    }

    pub fn open(&mut self) {
        self.client.execute("SELECT pg_advisory_unlock($1)", &[&self.key]).expect("opening the gate");
    }
}

/// ALTER SYSTEM statements (one per call: they refuse a transaction block), then a reload.
pub fn settings(c: &mut Client, stmts: &[&str]) {
    for sql in stmts.iter().chain(&["SELECT pg_reload_conf()"]) {
        c.batch_execute(sql).unwrap_or_else(|e| panic!("{sql}: {}", show(&e)));
    }
}

/// A counts model whose handler, when run by the worker, first waits on advisory lock `gate`: the
/// test holds that lock exclusively to stop a rebuild mid-replay at a point of its choosing.
pub fn create_gated_counts(c: &mut Client, schema: &str, gate: i64) {
    create_counts_model(c, schema);
    c.batch_execute(&format!(
        "CREATE OR REPLACE FUNCTION {schema}.gate() RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
           IF current_setting('application_name') LIKE 'event_projections worker%' THEN
             PERFORM pg_advisory_xact_lock_shared({gate});
           END IF;
         END $$;
         CREATE FUNCTION {schema}.gated(e ep.events) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN PERFORM {schema}.gate(); PERFORM {schema}.count_event(e); END $$;"
    ))
    .unwrap_or_else(|e| panic!("{}", show(&e)));
}

/// `create_counts_model` and its handler registered as async projection `name`.
pub fn create_async_counts(c: &mut Client, name: &str, schema: &str) {
    create_counts_model(c, schema);
    register(c, name, &format!("{schema}.count_event(ep.events)"), "async", schema);
}

pub fn register(c: &mut Client, name: &str, handler: &str, mode: &str, schema: &str) {
    c.execute(
        "SELECT ep_register_projection($1, $2::text::regprocedure, $3, NULL, $4)",
        &[&name, &handler, &mode, &schema],
    )
    .unwrap_or_else(|e| panic!("registering {name}: {}", show(&e)));
}

pub fn rebuild(c: &mut Client, name: &str, strategy: &str) -> i64 {
    c.query_one("SELECT ep_rebuild($1, $2)", &[&name, &strategy])
        .unwrap_or_else(|e| panic!("ep_rebuild({name}, {strategy}): {}", show(&e)))
        .get(0)
}

pub fn rebuild_wait(c: &mut Client, id: i64) -> String {
    c.query_one("SELECT ep_rebuild_wait($1, '2 minutes')", &[&id])
        .unwrap_or_else(|e| panic!("ep_rebuild_wait({id}): {}", show(&e)))
        .get(0)
}

pub fn status(c: &mut Client, name: &str) -> String {
    c.query_one("SELECT status FROM ep.projections WHERE name = $1", &[&name]).map(|r| r.get(0)).unwrap_or_default()
}

pub fn rebuild_status(c: &mut Client, id: i64) -> (String, String, i64) {
    let r =
        c.query_one("SELECT status, phase, events_done FROM ep.rebuilds WHERE id = $1", &[&id]).expect("rebuild row");
    (r.get(0), r.get(1), r.get(2))
}

/// Waits until rebuild `id` is in its replay phase (a gated handler then holds it there).
pub fn wait_replaying(c: &mut Client, id: i64) {
    let replaying = wait_until(Duration::from_secs(30), || Ok(rebuild_status(c, id).1 == "replaying"));
    assert!(replaying.unwrap(), "rebuild {id} never reached its replay");
}

pub fn wait_for(c: &mut Client, name: &str, position: i64, timeout: &str) -> bool {
    c.query_one(&format!("SELECT ep_wait_for($1, $2, '{timeout}')"), &[&name, &position])
        .unwrap_or_else(|e| panic!("ep_wait_for({name}): {}", show(&e)))
        .get(0)
}

pub fn head(c: &mut Client) -> i64 {
    c.query_one("SELECT coalesce(max(global_position), 0) FROM ep.events", &[]).unwrap().get(0)
}

pub fn fill(c: &mut Client, streams: usize, events: usize) {
    c.batch_execute(&format!(
        "SELECT count(ep_append('s' || (i % {streams}), 'T', jsonb_build_object('i', i))) FROM generate_series(1, {events}) i"
    ))
    .unwrap_or_else(|e| panic!("filling the log: {}", show(&e)));
}

/// Sets the flag when dropped, also while unwinding from a panic.
pub struct StopOnDrop<'a>(pub &'a AtomicBool);
impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A small deterministic generator (the schedule is replayable from EP_SEED).
pub struct Lcg(pub u64);
impl Lcg {
    #[allow(clippy::should_implement_trait)] // a generator of its own, not an Iterator
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// Runs `scripts/cluster.sh` with the test cluster's settings (EP_PORT, EP_DATA from the environment).
pub fn cluster(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/cluster.sh");
    let status = std::process::Command::new("bash").arg(script).args(args).status().expect("running cluster.sh");
    assert!(status.success(), "cluster.sh {args:?} failed");
}

/// A connection to the served database once the server accepts them again (after a crash or a
/// restart).
pub fn reconnect() -> Client {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(mut c) = Client::connect(&conninfo(&served_db()), postgres::NoTls) {
            if c.batch_execute("SELECT 1").is_ok() {
                return c;
            }
        }
        assert!(std::time::Instant::now() < deadline, "the server did not come back");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// While it lives, the workers serve every database of the cluster (`event_projections.database`
/// = '', the default outside the test clusters), `max_workers` of them; dropping it restores the
/// test cluster's settings (only the served database, the configured number of workers), even
/// when the test fails.
/// Tests that change these settings take turns.
pub struct AllDatabases {
    _turn: std::sync::MutexGuard<'static, ()>,
}

static ALL_DATABASES: Mutex<()> = Mutex::new(());

impl AllDatabases {
    pub fn on(max_workers: i32) -> AllDatabases {
        let guard = AllDatabases { _turn: ALL_DATABASES.lock().unwrap_or_else(|p| p.into_inner()) };
        settings(
            &mut connect("postgres"),
            &[
                "ALTER SYSTEM SET event_projections.database = ''",
                &format!("ALTER SYSTEM SET event_projections.max_workers = {max_workers}"),
            ],
        );
        guard
    }
}

impl Drop for AllDatabases {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&conninfo("postgres"), postgres::NoTls) {
            for sql in [
                "ALTER SYSTEM RESET event_projections.database",
                "ALTER SYSTEM RESET event_projections.max_workers",
                "SELECT pg_reload_conf()",
            ] {
                let _ = c.batch_execute(sql);
            }
        }
    }
}

/// Waits until `n` workers serve database `db` (as `ep.workers`, read from `c`, shows).
pub fn wait_for_workers(c: &mut Client, db: &str, n: i64, timeout: Duration) -> bool {
    wait_until(timeout, || {
        Ok(c.query_one(
            "SELECT count(*) FROM ep.workers WHERE database = $1 AND doing NOT IN ('starting', 'yielding')",
            &[&db],
        )?
        .get::<_, i64>(0)
            >= n)
    })
    .unwrap_or(false)
}
