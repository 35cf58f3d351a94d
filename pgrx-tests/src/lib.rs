//! Harness of the connection tests: connection settings, one scratch database per test, N
//! connections driven by N threads, SQLSTATE checks, and the reference every read model is compared
//! with: a replay of the committed log in Rust.
//!
//! The tests need a running cluster with `event_projections` in `shared_preload_libraries`;
//! `scripts/connection-tests.sh` starts one. Settings: EP_HOST (default 127.0.0.1) and EP_PORT
//! (default 55432, the port of `scripts/cluster.sh`); the user is `postgres` with trust auth.

use postgres::error::{DbError, SqlState};
use postgres::{Client, GenericClient, NoTls};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Barrier;
use std::time::{Duration, Instant};

pub mod history;
pub mod retention;
pub mod served;

pub use postgres;
pub use serde_json::json;

/// An error of a worker thread, carried back to the thread that joins it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T = ()> = std::result::Result<T, BoxError>;

// ------------------------------------------------------------------------------------------------
// Connecting

pub fn host() -> String {
    std::env::var("EP_HOST").unwrap_or_else(|_| "127.0.0.1".into())
}

pub fn port() -> u16 {
    std::env::var("EP_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(55432)
}

pub fn conninfo(db: &str) -> String {
    format!(
        "host={} port={} user=postgres dbname={db} connect_timeout=10 application_name=ep-connection-tests",
        host(),
        port()
    )
}

/// A connection to `db`; a test failure that says how to get a cluster if there is none.
pub fn connect(db: &str) -> Client {
    Client::connect(&conninfo(db), NoTls).unwrap_or_else(|e| {
        panic!(
            "cannot connect to database {db} at {}:{}: {e}\n\
             (run the suite with scripts/connection-tests.sh, which starts the cluster)",
            host(),
            port()
        )
    })
}

// ------------------------------------------------------------------------------------------------
// One database per test, so tests can run in parallel and never see each other's events or locks
// (the extension's advisory locks are per database).

pub struct TestDb {
    pub name: String,
}

impl TestDb {
    /// Database `t_<name>` with the extension created in it. A database of that name left by an
    /// earlier (failed) run is dropped first.
    pub fn new(name: &str) -> TestDb {
        let db = TestDb::empty(name);
        db.connect()
            .batch_execute("CREATE EXTENSION event_projections")
            .unwrap_or_else(|e| panic!("CREATE EXTENSION in {}: {}", db.name, show(&e)));
        db
    }

    /// Database `t_<name>` without the extension (a restore target).
    pub fn empty(name: &str) -> TestDb {
        assert!(
            name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "test database names are plain identifiers: {name}"
        );
        let name = format!("t_{name}");
        let mut admin = connect("postgres");
        // Two calls: a multi-statement query is one transaction, which DROP DATABASE refuses.
        for sql in [format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"), format!("CREATE DATABASE {name}")] {
            admin.batch_execute(&sql).unwrap_or_else(|e| panic!("{sql}: {}", show(&e)));
        }
        TestDb { name }
    }

    pub fn connect(&self) -> Client {
        connect(&self.name)
    }
}

impl Drop for TestDb {
    /// Drops the database when the test passed; keeps it for inspection when it failed (the next
    /// run drops it before reusing the name).
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("keeping database {} for inspection", self.name);
            return;
        }
        // A prepared transaction would keep the database from being dropped.
        if let Ok(mut c) = Client::connect(&conninfo(&self.name), NoTls) {
            let gids: Vec<String> = c
                .query("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()", &[])
                .map(|rows| rows.iter().map(|r| r.get(0)).collect())
                .unwrap_or_default();
            for gid in gids {
                let _ = c.batch_execute(&format!("ROLLBACK PREPARED '{gid}'"));
            }
        }
        let mut admin = connect("postgres");
        if let Err(e) = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)) {
            panic!("dropping database {}: {}", self.name, show(&e));
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Threads

/// Opens `n` connections to `db`, then runs `f(i, connection)` for i in 0..n, each on its own
/// thread. The threads are released together by a barrier, so they really contend. Returns the
/// results in thread order. Every thread is joined before anything is reported; then any thread's
/// error or panic fails the calling test, with all of them listed.
///
/// A thread that waits for another (a stop flag, a barrier) must bound its wait: when its partner
/// fails, nothing else will release it.
pub fn run_parallel<T, F>(db: &TestDb, n: usize, f: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize, &mut Client) -> Result<T> + Sync,
{
    let clients: Vec<Client> = (0..n).map(|_| db.connect()).collect();
    let start = Barrier::new(n);
    let outcomes: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(i, mut client)| {
                let (f, start) = (&f, &start);
                s.spawn(move || {
                    start.wait();
                    f(i, &mut client)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    let mut results = Vec::with_capacity(n);
    let mut failures = Vec::new();
    for (i, outcome) in outcomes.into_iter().enumerate() {
        match outcome {
            Ok(Ok(v)) => results.push(v),
            Ok(Err(e)) => failures.push(format!("thread {i}: {e}")),
            Err(panic) => failures.push(format!("thread {i} panicked: {}", panic_text(&*panic))),
        }
    }
    assert!(failures.is_empty(), "{} of {n} threads failed:\n{}", failures.len(), failures.join("\n"));
    results
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into())
}

/// Polls `check` every 10 ms until it returns true; false if `timeout` passed first.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> Result<bool>) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if check()? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A seed per test run, printed so that a failing random schedule can be replayed with EP_SEED.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("EP_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("{test}: EP_SEED={seed}");
    seed
}

// ------------------------------------------------------------------------------------------------
// Errors

/// An error with the server's SQLSTATE, message, detail and hint when it has them.
pub fn show(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!(
            "{} {}{}{}",
            d.code().code(),
            d.message(),
            d.detail().map(|s| format!(" DETAIL: {s}")).unwrap_or_default(),
            d.hint().map(|s| format!(" HINT: {s}")).unwrap_or_default()
        ),
        None => e.to_string(),
    }
}

/// Asserts that `r` failed on the server with SQLSTATE `code`; returns the error so the caller can
/// check its message.
pub fn expect_sqlstate<T: Debug>(r: std::result::Result<T, postgres::Error>, code: &SqlState, what: &str) -> DbError {
    match r {
        Ok(v) => panic!("{what}: expected SQLSTATE {}, but it succeeded ({v:?})", code.code()),
        Err(e) => {
            let d = e.as_db_error().unwrap_or_else(|| panic!("{what}: expected a server error, got: {e}"));
            assert_eq!(d.code(), code, "{what}: wrong SQLSTATE; the error was: {}", show(&e));
            d.clone()
        }
    }
}

/// The error of an append whose expected version was not the stream's version: SQLSTATE 40001
/// (it is a lost optimistic-concurrency race) with a message that says which race.
pub fn is_wrong_expected_version(e: &postgres::Error) -> bool {
    e.as_db_error().is_some_and(|d| {
        d.code() == &SqlState::T_R_SERIALIZATION_FAILURE && d.message().starts_with("wrong expected version for stream")
    })
}

// ------------------------------------------------------------------------------------------------
// The API, typed

/// `ep_append`; returns the event's global position.
pub fn append(
    c: &mut impl GenericClient,
    stream: &str,
    event_type: &str,
    data: &Value,
    expected_version: Option<i64>,
) -> std::result::Result<i64, postgres::Error> {
    c.query_one("SELECT ep_append($1, $2, $3, NULL, $4)", &[&stream, &event_type, data, &expected_version])
        .map(|r| r.get(0))
}

/// `ep_append_events` with `(type, data)` pairs; returns the global position of the last event.
pub fn append_events(
    c: &mut impl GenericClient,
    stream: &str,
    events: &[(&str, Value)],
    expected_version: Option<i64>,
) -> std::result::Result<i64, postgres::Error> {
    let array = Value::Array(events.iter().map(|(t, d)| json!({"type": t, "data": d})).collect());
    c.query_one("SELECT ep_append_events($1, $2, $3)", &[&stream, &array, &expected_version]).map(|r| r.get(0))
}

pub fn stream_version(c: &mut impl GenericClient, stream: &str) -> std::result::Result<i64, postgres::Error> {
    c.query_one("SELECT ep_stream_version($1)", &[&stream]).map(|r| r.get(0))
}

// ------------------------------------------------------------------------------------------------
// The log and its invariants

/// One row of ep.events (created_at left out: nothing here depends on it).
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub global_position: i64,
    pub stream_id: String,
    pub stream_position: i64,
    pub event_type: String,
    pub data: Value,
    pub metadata: Option<Value>,
}

/// The committed log in global order: exactly what a projection replays.
pub fn read_log(c: &mut impl GenericClient) -> Vec<Event> {
    c.query("SELECT * FROM ep.events ORDER BY global_position", &[])
        .unwrap_or_else(|e| panic!("reading ep.events: {}", show(&e)))
        .iter()
        .map(|r| Event {
            global_position: r.get("global_position"),
            stream_id: r.get("stream_id"),
            stream_position: r.get("stream_position"),
            event_type: r.get("event_type"),
            data: r.get("data"),
            metadata: r.get("metadata"),
        })
        .collect()
}

/// Reads the log and asserts what must hold of it after any mix of appends, and returns it:
/// - global positions strictly increase (gaps allowed: rolled-back appends burn positions);
/// - taken in global order, each stream's stream positions are 1, 2, 3, ...: no gap, no duplicate,
///   and stream order agrees with global order;
/// - ep.streams has exactly one row per stream, whose version is the stream's number of events.
pub fn check_log(c: &mut impl GenericClient) -> Vec<Event> {
    let log = read_log(c);
    let mut last_global = 0;
    let mut versions: BTreeMap<String, i64> = BTreeMap::new();
    for e in &log {
        assert!(e.global_position > last_global, "global positions not increasing at {e:?}");
        last_global = e.global_position;
        let v = versions.entry(e.stream_id.clone()).or_insert(0);
        assert_eq!(
            e.stream_position,
            *v + 1,
            "stream {:?}: after {} events in global order, the next has stream position {} (event {e:?})",
            e.stream_id,
            *v,
            e.stream_position
        );
        *v += 1;
    }
    let streams: BTreeMap<String, i64> = c
        .query("SELECT stream_id, version FROM ep.streams", &[])
        .unwrap_or_else(|e| panic!("reading ep.streams: {}", show(&e)))
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_model_eq("ep.streams (stream -> version) against the log", &streams, &versions);
    log
}

// ------------------------------------------------------------------------------------------------
// Read models against a replay

/// Folds the log, in global order, through `apply`: the Rust twin of a projection's handler. This
/// is what invariant 1 says a read model must equal.
pub fn replay<M: Default>(log: &[Event], mut apply: impl FnMut(&mut M, &Event)) -> M {
    let mut m = M::default();
    for e in log {
        apply(&mut m, e);
    }
    m
}

/// Asserts that a read model equals the replay of `log` through `apply`.
pub fn assert_matches_replay<K: Ord + Debug, V: PartialEq + Debug>(
    what: &str,
    read_model: &BTreeMap<K, V>,
    log: &[Event],
    apply: impl FnMut(&mut BTreeMap<K, V>, &Event),
) {
    let expected = replay(log, apply);
    assert_model_eq(&format!("{what} against a replay of {} events", log.len()), read_model, &expected);
}

/// Asserts two keyed models are equal, listing the first keys that differ (a whole-map diff of a
/// few thousand rows is unreadable).
pub fn assert_model_eq<K: Ord + Debug, V: PartialEq + Debug>(
    what: &str,
    actual: &BTreeMap<K, V>,
    expected: &BTreeMap<K, V>,
) {
    if actual == expected {
        return;
    }
    let mut diffs = Vec::new();
    for (k, want) in expected {
        match actual.get(k) {
            Some(got) if got == want => {}
            got => diffs.push(format!("  {k:?}: got {got:?}, expected {want:?}")),
        }
    }
    for (k, got) in actual {
        if !expected.contains_key(k) {
            diffs.push(format!("  {k:?}: got {got:?}, expected nothing"));
        }
    }
    let total = diffs.len();
    diffs.truncate(20);
    panic!("{what}: {total} keys differ (first 20):\n{}", diffs.join("\n"));
}

// ------------------------------------------------------------------------------------------------
// The projection most tests use: per stream, how many events and the position of the last one.

/// stream -> (events seen, global position of the last one).
pub type Counts = BTreeMap<String, (i64, i64)>;

/// The Rust twin of the `count_event` handler.
pub fn count(m: &mut Counts, e: &Event) {
    let row = m.entry(e.stream_id.clone()).or_insert((0, 0));
    row.0 += 1;
    row.1 = e.global_position;
}

/// Creates schema `schema` with table `counts` and handler `<schema>.count_event(ep.events)`, not
/// registered. The handler names `counts` unqualified: it must be found through the read-model
/// schema that the extension puts first on the handler's search_path. It raises when a stream's
/// events do not arrive in stream order, one by one (invariant 2): a skipped, doubled or reordered
/// event fails the append or the replay that delivers it.
pub fn create_counts_model(c: &mut impl GenericClient, schema: &str) {
    let sql = format!(
        r#"
CREATE SCHEMA {schema};
CREATE TABLE {schema}.counts (stream_id text PRIMARY KEY, n bigint NOT NULL, last_position bigint NOT NULL);
CREATE FUNCTION {schema}.count_event(e ep.events) RETURNS void LANGUAGE plpgsql AS $f$
DECLARE
    seen bigint;
BEGIN
    SELECT c.n INTO seen FROM counts c WHERE c.stream_id = e.stream_id;
    IF e.stream_position <> coalesce(seen, 0) + 1 THEN
        RAISE EXCEPTION 'stream % out of order: got stream position % after % events',
            e.stream_id, e.stream_position, coalesce(seen, 0);
    END IF;
    INSERT INTO counts AS c VALUES (e.stream_id, 1, e.global_position)
        ON CONFLICT (stream_id) DO UPDATE SET n = c.n + 1, last_position = excluded.last_position;
END
$f$;
"#
    );
    c.batch_execute(&sql).unwrap_or_else(|e| panic!("creating read model {schema}: {}", show(&e)));
}

/// Registers `<schema>.count_event` as inline projection `name` over every event type.
pub fn register_counts(
    c: &mut impl GenericClient,
    name: &str,
    schema: &str,
) -> std::result::Result<(), postgres::Error> {
    let handler = format!("{schema}.count_event(ep.events)");
    c.execute(
        "SELECT ep_register_projection($1, $2::text::regprocedure, 'inline', NULL, $3)",
        &[&name, &handler, &schema],
    )
    .map(|_| ())
}

/// `create_counts_model` and `register_counts` in one.
pub fn create_counts_projection(c: &mut impl GenericClient, name: &str, schema: &str) {
    create_counts_model(c, schema);
    register_counts(c, name, schema).unwrap_or_else(|e| panic!("registering {name}: {}", show(&e)));
}

pub fn read_counts(c: &mut impl GenericClient, schema: &str) -> Counts {
    c.query(&format!("SELECT stream_id, n, last_position FROM {schema}.counts"), &[])
        .unwrap_or_else(|e| panic!("reading {schema}.counts: {}", show(&e)))
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

/// Asserts the log's invariants and that the counts model in `schema` equals its replay.
pub fn assert_counts_match_log(c: &mut impl GenericClient, schema: &str) -> Vec<Event> {
    let log = check_log(c);
    let model = read_counts(c, schema);
    assert_matches_replay(&format!("read model {schema}.counts"), &model, &log, count);
    log
}

// ------------------------------------------------------------------------------------------------
// Roles: the security suite connects as ordinary roles that hold exactly the grants README.md,
// "Security", gives each kind of user.

/// What a role may do with the extension (README.md, "Security").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grants {
    /// Nothing at all: what PUBLIC has after CREATE EXTENSION.
    Nothing,
    /// Appends events.
    Writer,
    /// Reads the log.
    Reader,
    /// Registers and runs projections: also a writer and a reader.
    ProjectionOwner,
    /// Consumes the log from outside the database: reads it, and owns durable subscriptions.
    Consumer,
}

impl Grants {
    /// The statements, with `{r}` for the role, exactly as README.md lists them.
    pub fn statements(self) -> &'static [&'static str] {
        const WRITER: &[&str] = &[
            "GRANT USAGE ON SCHEMA ep TO {r}",
            "GRANT SELECT ON ep.streams TO {r}",
            "GRANT EXECUTE ON FUNCTION ep_append(text, text, jsonb, jsonb, bigint, uuid, text), ep_append_events(text, jsonb, bigint), ep_stream_version(text) TO {r}",
        ];
        const READER: &[&str] = &[
            "GRANT USAGE ON SCHEMA ep TO {r}",
            "GRANT SELECT ON ep.events, ep.streams TO {r}",
            "GRANT EXECUTE ON FUNCTION ep_read_stream(text, bigint, int, text), ep_read_all(bigint, int, text), ep_unseal(ep.events), ep_stream_version(text) TO {r}",
        ];
        const OWNER: &[&str] = &[
            "GRANT USAGE ON SCHEMA ep TO {r}",
            "GRANT SELECT ON ep.events, ep.streams, ep.projection_status TO {r}",
            "GRANT EXECUTE ON FUNCTION ep_append(text, text, jsonb, jsonb, bigint, uuid, text), ep_append_events(text, jsonb, bigint), \
             ep_stream_version(text), ep_read_stream(text, bigint, int, text), ep_read_all(bigint, int, text), ep_unseal(ep.events), \
             ep_register_projection(text, regprocedure, text, text[], text, regprocedure), ep_unregister_projection(text), \
             ep_rebuild(text, text, regprocedure, regprocedure), ep_rebuild_wait(bigint, interval), ep_rebuild_status(bigint), \
             ep_cancel_rebuild(text), ep_retry_projection(text), ep_skip_event(text, bigint), \
             ep_wait_for(text, bigint, interval), ep_require_ready(text), ep_projection_ready(text) TO {r}",
            "GRANT EXECUTE ON PROCEDURE ep_rebuild_await(bigint, interval, text) TO {r}",
        ];
        const CONSUMER: &[&str] = &[
            "GRANT USAGE ON SCHEMA ep TO {r}",
            "GRANT SELECT ON ep.events, ep.subscription_status TO {r}",
            "GRANT EXECUTE ON FUNCTION ep_read_all(bigint, int, text), ep_unseal(ep.events), ep_high_water(), ep_subscribe(text, text[], int), \
             ep_unsubscribe(text), ep_set_members(text, int), ep_poll(text, int, int, interval), ep_ack(text, int, bigint) TO {r}",
        ];
        match self {
            Grants::Nothing => &[],
            Grants::Consumer => CONSUMER,
            Grants::Writer => WRITER,
            Grants::Reader => READER,
            Grants::ProjectionOwner => OWNER,
        }
    }
}

/// An ordinary LOGIN role (no superuser, no CREATEROLE, no CREATEDB) that owns a schema of its own
/// in `db`, with `grants`. Dropped (with everything it owns in `db`) when the value is dropped.
pub struct Role {
    pub name: String,
    db: String,
}

impl Role {
    /// `name` must be unique across the tests that run at once (roles are cluster-wide).
    pub fn create(db: &str, name: &str, grants: Grants) -> Role {
        let mut admin = connect(db);
        drop_role(&mut admin, name);
        let mut stmts = vec![format!("CREATE ROLE {name} LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB")];
        stmts.extend(grants.statements().iter().map(|s| s.replace("{r}", name)));
        for sql in stmts {
            admin.batch_execute(&sql).unwrap_or_else(|e| panic!("{sql}: {}", show(&e)));
        }
        Role { name: name.into(), db: db.into() }
    }

    /// A connection as this role.
    pub fn connect(&self) -> Client {
        let info = conninfo(&self.db).replace("user=postgres", &format!("user={}", self.name));
        Client::connect(&info, NoTls).unwrap_or_else(|e| panic!("connecting as {}: {e}", self.name))
    }

    /// Whether the role is (now) a superuser.
    pub fn is_superuser(&self) -> bool {
        connect(&self.db)
            .query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&self.name])
            .map(|r| r.get(0))
            .unwrap_or(false)
    }
}

fn drop_role(admin: &mut Client, name: &str) {
    let exists: bool =
        admin.query_one("SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)", &[&name]).unwrap().get(0);
    if exists {
        // Its projections first: what they use cannot be dropped from under them.
        let _ = admin.batch_execute(&format!(
            "DO $$ BEGIN IF to_regclass('ep.projections') IS NOT NULL THEN
                 PERFORM ep_unregister_projection(p.name) FROM ep.projections p WHERE p.owner = '{name}'::regrole;
             END IF; END $$"
        ));
        admin
            .batch_execute(&format!("DROP OWNED BY {name} CASCADE"))
            .unwrap_or_else(|e| panic!("DROP OWNED BY {name}: {}", show(&e)));
        admin.batch_execute(&format!("DROP ROLE {name}")).unwrap_or_else(|e| panic!("DROP ROLE {name}: {}", show(&e)));
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        if let Ok(mut admin) = Client::connect(&conninfo(&self.db), NoTls) {
            let _ = admin.batch_execute(&format!("ALTER ROLE {} NOSUPERUSER", self.name));
            if !std::thread::panicking() {
                drop_role(&mut admin, &self.name);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Client tools

/// The path of a PostgreSQL client tool (EP_PGBIN, default PostgreSQL 15's).
pub fn pg_bin(tool: &str) -> String {
    let dir = std::env::var("EP_PGBIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    format!("{dir}/{tool}")
}

/// Runs a client tool against the test cluster; fails the test with its output if it fails.
pub fn run_tool(tool: &str, args: &[&str]) {
    let port = port().to_string();
    let host = host();
    let out = std::process::Command::new(pg_bin(tool))
        .args(["-h", &host, "-p", &port, "-U", "postgres"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `pg_dump -Fc` of `source`, restored with `pg_restore` into a new database `t_<target>`.
pub fn dump_restored(source: &TestDb, target: &str) -> TestDb {
    let file = std::env::temp_dir().join(format!("ep-ctest-{target}-{}.dump", std::process::id()));
    let file = file.to_str().expect("a temporary path in UTF-8");
    run_tool("pg_dump", &["-Fc", "-f", file, &source.name]);
    let restored = TestDb::empty(target);
    run_tool("pg_restore", &["--exit-on-error", "-d", &restored.name, file]);
    let _ = std::fs::remove_file(file);
    restored
}
