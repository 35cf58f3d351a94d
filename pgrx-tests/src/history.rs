//! Randomized histories (issue 11): several sessions run seeded random sequences of what a user can
//! do, and each history is checked at its end against a replay of the committed log.
//!
//! What a history does. N (3 or 4) sessions of the served database, driven by ONE thread in a
//! seeded random order: single and batch appends with random expected versions (to existing and new
//! streams, some events carrying a poison mark), registrations and unregistrations (inline and
//! async, per-event and batch handlers, all or a subset of the event types, some of them picky:
//! they raise on a poisoned event; the model sometimes created beforehand, the schema sometimes
//! dropped with the unregistration), rebuilds of both strategies (blue-green ones sometimes
//! switching the handler), cancels, `ep_rebuild_wait` and `CALL ep_rebuild_await`, skips and
//! retries of failing async projections, cures of poisoned events, reads of the models through
//! `ep_require_ready` and of streams through `ep_read_stream`, and transactions at READ COMMITTED,
//! REPEATABLE READ and SERIALIZABLE that are held open across the other sessions' operations,
//! committed, rolled back, with savepoints released or rolled back to, failed transactions rolled
//! back (or COMMITted, which rolls them back). Between the sessions' operations: pauses (the worker
//! runs meanwhile), SIGKILL of a worker, an immediate shutdown and restart (the sessions reconnect;
//! their transactions are gone), and races: two sessions' statements run at once on two threads
//! (the only place where 40P01 can arise, and where two writers really contend).
//!
//! A single driver thread cannot wait for a lock that a transaction it would commit later holds,
//! so every session runs with `statement_timeout` (1 s), `lock_timeout` (250 ms) and
//! `deadlock_timeout` (50 ms): a statement that would wait for another session's open transaction
//! fails (57014, 55P03), which the tester records as that transaction's failure. The generator
//! knows which locks each open transaction holds and, most of the time (90 %), picks an operation
//! that does not wait for them; the other 10 % are deliberate conflicts.
//!
//! What the tester knows. It keeps a ledger of what has committed: every event it appended (each
//! carries `{"o": operation, "k": index}` in its data), each stream's version, the registry, the
//! rebuilds queued, the order of the commits. Single-threaded, it knows exactly what each
//! session's view of the registry is and what a stream's version is, so it checks on the spot that
//! an expected version is accepted exactly when it is right (and the error names the actual one),
//! that a poisoned event reaches the log only past a picky inline projection that was not active
//! (invariant 3), that a stream reads back contiguous and as long as it is, and, on every read that
//! `ep_require_ready` lets through, that an inline model equals the log of that statement's snapshot
//! (an async one: exactly what its checkpoint covers, but for recorded skips). Every failure must be
//! one the operation may meet (a lock or statement timeout, a deadlock, a serialization failure, a
//! wrong expected version, a poisoned event, an unknown name when it is one, ...); anything else
//! fails the history.
//!
//! At the end of a history every open transaction ends, every rebuild is waited for, poison is
//! cured and failed projections retried, stale ones rebuilt, async ones waited for up to the head,
//! and then: the log is checked (contiguous streams, `check_log`), it holds exactly the events of
//! the committed transactions, each append's events at the stream version it was decided on; the
//! registry is the ledger's; every projection's model (`applied`: one row per event it received)
//! equals the log's events of its types, except, for async ones, events recorded in
//! `ep.skipped_events`; an unregistered projection received nothing that committed after its
//! unregistration; a never-committed registration received nothing; a blue-green rebuild that did
//! not switch left no copy; no worker logged a failure other than a poisoned event, no process died
//! of anything but our SIGKILLs. The handlers raise when a stream's events arrive out of order or
//! twice (invariant 2; a doubled event also hits the primary key), which shows as a failed append,
//! a logged worker failure or a stuck projection.
//!
//! A failure prints the seed, the configuration, the findings, the whole history and the
//! extension's state, and the command that replays it. The interleaving is the generator's (one
//! thread), so a replay runs the same operations as long as the worker's timing gives the same
//! outcomes; every step draws the same amount of randomness whatever the outcomes, so a replay that
//! diverges somewhere goes on much like the original.
//!
//! Each history of a test runs in a freshly created extension (`Served::fresh`). The soak
//! (`Plan::carry_over`) instead carries the extension, its log and the handlers over from one
//! history to the next: PostgreSQL keeps every dropped PL/pgSQL function compiled in each process
//! that ran it, so re-creating the handlers for every history grows every process by some 200 kB
//! a history, and the memory of long-lived processes would say nothing about the extension.

use crate::served::{self, Served};
use crate::*;
use postgres::Client;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

// ------------------------------------------------------------------------------------------------
// Settings of the sessions and of the histories

/// Every session's `statement_timeout`: a statement that would wait for a transaction the driver
/// thread has not ended yet gives up after this.
pub const STATEMENT_TIMEOUT_MS: u64 = 1000;
/// Every session's `lock_timeout`.
pub const LOCK_TIMEOUT_MS: u64 = 250;
/// Every session's `deadlock_timeout`, below `lock_timeout` so that a real deadlock (in a race)
/// shows as 40P01 rather than as a lock timeout.
pub const DEADLOCK_TIMEOUT_MS: u64 = 50;

const STREAMS: usize = 8;
const TYPES: [&str; 4] = ["A", "B", "C", "D"];
const TYPE_SUBSETS: [&[&str]; 4] = [&["A"], &["A", "B"], &["B", "C"], &["C", "D"]];

struct HandlerDef {
    function: &'static str,
    regprocedure: &'static str,
    batch: bool,
    picky: bool,
}

/// The handlers, all in schema `w_hctl`, all naming the model's tables unqualified. Index =
/// batch + 2 * picky.
const HANDLERS: [HandlerDef; 4] = [
    HandlerDef { function: "apply", regprocedure: "w_hctl.apply(ep.events)", batch: false, picky: false },
    HandlerDef { function: "apply_batch", regprocedure: "w_hctl.apply_batch(ep.events[])", batch: true, picky: false },
    HandlerDef { function: "picky", regprocedure: "w_hctl.picky(ep.events)", batch: false, picky: true },
    HandlerDef { function: "picky_batch", regprocedure: "w_hctl.picky_batch(ep.events[])", batch: true, picky: true },
];

const SETUP_SQL: &str = r#"
CREATE SCHEMA w_hctl;
CREATE TABLE w_hctl.cured (global_position bigint PRIMARY KEY);
CREATE FUNCTION w_hctl.step(e ep.events, picky boolean) RETURNS void LANGUAGE plpgsql AS $f$
DECLARE
    last_seen bigint;
BEGIN
    IF picky AND e.data->>'poison' = 'true'
       AND NOT EXISTS (SELECT 1 FROM w_hctl.cured c WHERE c.global_position = e.global_position) THEN
        RAISE EXCEPTION 'poisoned event % in stream %', e.global_position, e.stream_id;
    END IF;
    SELECT h.last INTO last_seen FROM heads h WHERE h.stream_id = e.stream_id;
    IF last_seen IS NOT NULL AND e.stream_position <= last_seen THEN
        RAISE EXCEPTION 'stream % out of order: stream position % after %', e.stream_id, e.stream_position, last_seen;
    END IF;
    INSERT INTO heads AS h VALUES (e.stream_id, e.stream_position)
        ON CONFLICT (stream_id) DO UPDATE SET last = excluded.last;
    INSERT INTO applied VALUES (e.global_position, e.stream_id, e.stream_position);
END
$f$;
CREATE FUNCTION w_hctl.apply(e ep.events) RETURNS void LANGUAGE plpgsql AS $f$
BEGIN PERFORM w_hctl.step(e, false); END $f$;
CREATE FUNCTION w_hctl.picky(e ep.events) RETURNS void LANGUAGE plpgsql AS $f$
BEGIN PERFORM w_hctl.step(e, true); END $f$;
CREATE FUNCTION w_hctl.apply_batch(es ep.events[]) RETURNS void LANGUAGE plpgsql AS $f$
DECLARE e ep.events;
BEGIN FOREACH e IN ARRAY es LOOP PERFORM w_hctl.step(e, false); END LOOP; END $f$;
CREATE FUNCTION w_hctl.picky_batch(es ep.events[]) RETURNS void LANGUAGE plpgsql AS $f$
DECLARE e ep.events;
BEGIN FOREACH e IN ARRAY es LOOP PERFORM w_hctl.step(e, true); END LOOP; END $f$;
"#;

fn model_ddl(schema: &str) -> String {
    format!(
        "CREATE SCHEMA {schema};
         CREATE TABLE {schema}.applied (global_position bigint PRIMARY KEY, stream_id text NOT NULL, stream_position bigint NOT NULL);
         CREATE TABLE {schema}.heads (stream_id text PRIMARY KEY, last bigint NOT NULL);"
    )
}

/// What a test asks for.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Histories to run (None: until `duration`).
    pub histories: Option<usize>,
    /// Run histories until this much time has passed.
    pub duration: Option<Duration>,
    /// Stop starting histories once this much time has passed (a bound on a test's wall time).
    pub budget: Option<Duration>,
    /// Steps per history.
    pub steps: usize,
    /// Crashes per history at most (0: none).
    pub crashes: usize,
    /// Races (two statements at once on two threads).
    pub races: bool,
    /// Print a progress line this often.
    pub report_every: Option<Duration>,
    /// Keep the extension, its log and the handlers from one history to the next (the soak: the
    /// memory of long-lived processes says nothing while every history re-creates the functions
    /// they run, since PostgreSQL keeps dropped PL/pgSQL functions compiled in each process); the
    /// extension is created afresh once the log holds more than `log_limit` events.
    pub carry_over: bool,
    pub log_limit: i64,
}

impl Plan {
    /// The bounded run of `make test`, adjustable with EP_HISTORIES, EP_HISTORY_STEPS,
    /// EP_HISTORY_CRASHES and EP_HISTORY_BUDGET_SECS.
    pub fn from_env(histories: usize, steps: usize, budget_secs: u64) -> Plan {
        Plan {
            histories: Some(env_num("EP_HISTORIES", histories as u64) as usize),
            duration: None,
            budget: Some(Duration::from_secs(env_num("EP_HISTORY_BUDGET_SECS", budget_secs))),
            steps: env_num("EP_HISTORY_STEPS", steps as u64) as usize,
            crashes: env_num("EP_HISTORY_CRASHES", 1) as usize,
            races: env_num("EP_HISTORY_RACES", 1) != 0,
            report_every: None,
            carry_over: false,
            log_limit: 0,
        }
    }
}

pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One history's parameters, all from its seed.
#[derive(Clone, Debug)]
struct Config {
    sessions: usize,
    steps: usize,
    crashes: usize,
    races: bool,
    batch_size: i32,
    fill: usize,
    initial_projections: usize,
}

impl Config {
    fn for_seed(seed: u64, plan: &Plan) -> Config {
        let mut r = Rng(seed ^ 0x5eed_c0de);
        Config {
            sessions: 3 + (r.next_u64() % 2) as usize,
            steps: plan.steps,
            crashes: plan.crashes,
            races: plan.races,
            batch_size: [1, 3, 10, 1000][(r.next_u64() % 4) as usize],
            fill: (r.next_u64() % 120) as usize,
            initial_projections: 2 + (r.next_u64() % 2) as usize,
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Randomness

/// splitmix64: small, fast, the same everywhere.
pub struct Rng(pub u64);
impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn splitmix(x: u64) -> u64 {
    Rng(x).next_u64()
}

/// The seed of history `i` of a run with seed `master`: history 0 uses the master seed itself, so
/// that `EP_SEED=<a history's seed> EP_HISTORIES=1` replays that history.
pub fn history_seed(master: u64, i: usize) -> u64 {
    if i == 0 {
        master
    } else {
        splitmix(master ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03))
    }
}

/// The randomness of one step: always the same amount, whatever the step turns out to be.
#[derive(Clone, Copy)]
struct Draw([u64; 8]);
impl Draw {
    fn take(r: &mut Rng) -> Draw {
        Draw(std::array::from_fn(|_| r.next_u64()))
    }
    fn pct(&self, i: usize) -> u64 {
        self.0[i] % 100
    }
    fn below(&self, i: usize, n: usize) -> usize {
        (self.0[i] % n.max(1) as u64) as usize
    }
    /// Another value from word `i`, independent enough of `pct(i)` and `below(i, _)`.
    fn sub(&self, i: usize, j: u32, n: usize) -> usize {
        ((splitmix(self.0[i] ^ j as u64) >> 7) % n.max(1) as u64) as usize
    }
    fn derive(&self) -> Draw {
        Draw(self.0.map(splitmix))
    }
}

/// Picks from `(item, weight)` with a roll below the sum of the weights.
fn weighted<T: Copy>(roll: u64, table: &[(T, u64)]) -> T {
    let total: u64 = table.iter().map(|t| t.1).sum();
    let mut x = roll % total.max(1);
    for (item, w) in table {
        if x < *w {
            return *item;
        }
        x -= w;
    }
    table[table.len() - 1].0
}

// ------------------------------------------------------------------------------------------------
// Operations

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    ReadCommitted,
    RepeatableRead,
    Serializable,
}

impl Level {
    fn begin(self) -> &'static str {
        match self {
            Level::ReadCommitted => "BEGIN ISOLATION LEVEL READ COMMITTED",
            Level::RepeatableRead => "BEGIN ISOLATION LEVEL REPEATABLE READ",
            Level::Serializable => "BEGIN ISOLATION LEVEL SERIALIZABLE",
        }
    }
    fn short(self) -> &'static str {
        match self {
            Level::ReadCommitted => "RC",
            Level::RepeatableRead => "RR",
            Level::Serializable => "SER",
        }
    }
}

/// A projection as the tester registered it.
#[derive(Clone, Debug, PartialEq)]
struct Spec {
    name: String,
    schema: String,
    inline: bool,
    handler: usize,
    types: Option<Vec<String>>,
}

impl Spec {
    fn subscribes(&self, t: &str) -> bool {
        self.types.as_ref().is_none_or(|ts| ts.iter().any(|x| x == t))
    }
    fn mode(&self) -> &'static str {
        if self.inline {
            "inline"
        } else {
            "async"
        }
    }
    fn types_text(&self) -> String {
        match &self.types {
            None => "*".into(),
            Some(t) => t.join(","),
        }
    }
    fn describe(&self) -> String {
        format!(
            "{} {} {} types={} schema={}",
            self.name,
            self.mode(),
            HANDLERS[self.handler].function,
            self.types_text(),
            self.schema
        )
    }
}

#[derive(Clone, Debug)]
struct NewEv {
    etype: String,
    poison: bool,
}

#[derive(Clone, Debug)]
enum Op {
    Begin(Level),
    Append {
        stream: String,
        events: Vec<NewEv>,
        batch: bool,
        expected: Option<i64>,
    },
    Savepoint,
    Release,
    RollbackTo(usize),
    Commit,
    Rollback,
    Register {
        spec: Spec,
        precreate: bool,
    },
    Unregister {
        name: String,
        drop_schema: Option<String>,
    },
    Rebuild {
        name: String,
        strategy: &'static str,
        new_handler: Option<usize>,
    },
    Cancel {
        name: String,
    },
    /// `ep_rebuild_wait`, or (outside a transaction) `CALL ep_rebuild_await`.
    Wait {
        id: i64,
        call: bool,
    },
    /// `ep_read_stream`.
    ReadStream {
        stream: String,
    },
    Skip {
        name: String,
        bogus: bool,
    },
    Retry {
        name: String,
        cure: bool,
    },
    Cure,
    Read {
        spec: Spec,
    },
}

impl Op {
    fn kind(&self) -> &'static str {
        match self {
            Op::Begin(_) => "begin",
            Op::Append { batch: false, .. } => "append",
            Op::Append { batch: true, .. } => "append_events",
            Op::Savepoint => "savepoint",
            Op::Release => "release",
            Op::RollbackTo(_) => "rollback_to_savepoint",
            Op::Commit => "commit",
            Op::Rollback => "rollback",
            Op::Register { .. } => "register",
            Op::Unregister { .. } => "unregister",
            Op::Rebuild { .. } => "rebuild",
            Op::Cancel { .. } => "cancel_rebuild",
            Op::Wait { call: false, .. } => "rebuild_wait",
            Op::Wait { call: true, .. } => "rebuild_await",
            Op::ReadStream { .. } => "read_stream",
            Op::Skip { .. } => "skip_event",
            Op::Retry { .. } => "retry_projection",
            Op::Cure => "cure",
            Op::Read { .. } => "read",
        }
    }

    fn describe(&self) -> String {
        match self {
            Op::Begin(l) => format!("BEGIN {}", l.short()),
            Op::Append { stream, events, batch, expected } => {
                let evs: Vec<String> = events
                    .iter()
                    .map(|e| if e.poison { format!("{}!poison", e.etype) } else { e.etype.clone() })
                    .collect();
                let exp = expected.map(|v| v.to_string()).unwrap_or_else(|| "any".into());
                format!(
                    "{} {stream} [{}] expected={exp}",
                    if *batch { "append_events" } else { "append" },
                    evs.join(" ")
                )
            }
            Op::Savepoint => "SAVEPOINT".into(),
            Op::Release => "RELEASE SAVEPOINT".into(),
            Op::RollbackTo(d) => format!("ROLLBACK TO SAVEPOINT sp{d}"),
            Op::Commit => "COMMIT".into(),
            Op::Rollback => "ROLLBACK".into(),
            Op::Register { spec, precreate } => {
                format!("register {}{}", spec.describe(), if *precreate { " (model created beforehand)" } else { "" })
            }
            Op::Unregister { name, drop_schema } => {
                format!(
                    "unregister {name}{}",
                    drop_schema.as_ref().map(|s| format!(" + DROP SCHEMA {s}")).unwrap_or_default()
                )
            }
            Op::Rebuild { name, strategy, new_handler } => format!(
                "rebuild {name} {strategy}{}",
                new_handler.map(|h| format!(" new_handler={}", HANDLERS[h].function)).unwrap_or_default()
            ),
            Op::Cancel { name } => format!("cancel_rebuild {name}"),
            Op::Wait { id, call: false } => format!("rebuild_wait {id} 100ms"),
            Op::Wait { id, call: true } => format!("CALL rebuild_await {id} 100ms"),
            Op::ReadStream { stream } => format!("read_stream {stream}"),
            Op::Skip { name, bogus } => {
                format!("skip_event {name}{}", if *bogus { " (a position it is not failing on)" } else { "" })
            }
            Op::Retry { name, cure } => {
                format!("retry_projection {name}{}", if *cure { " (after curing its failing event)" } else { "" })
            }
            Op::Cure => "cure every poisoned event".into(),
            Op::Read { spec } => format!("read {} with ep_require_ready", spec.name),
        }
    }
}

/// What the driver does in one step.
enum Step {
    S(usize, Op),
    Race(usize, Op, usize, Op),
    Pause(u64),
    KillWorker,
    Restart,
}

// ------------------------------------------------------------------------------------------------
// Statements: what a session sends for an operation. No access to the tester's state (two of them
// run at once in a race).

#[derive(Debug)]
enum Fail {
    Db { code: String, message: String },
    Lost(String),
}

fn fail(e: postgres::Error) -> Fail {
    match e.as_db_error() {
        Some(d) => Fail::Db { code: d.code().code().to_string(), message: d.message().to_string() },
        None => Fail::Lost(e.to_string()),
    }
}

#[derive(Debug)]
struct ReadResult {
    applied: Vec<i64>,
    log: Vec<i64>,
    position: Option<i64>,
    skipped: Vec<i64>,
}

#[derive(Debug)]
enum Got {
    Nothing,
    /// An append: the last global position, and for each picky inline projection that should
    /// have refused a poisoned event, whether it is active now.
    Appended(i64, Vec<(String, bool)>),
    Id(i64),
    MaybeId(Option<i64>),
    Status(String),
    Skipped {
        failing: Option<i64>,
        skipped: i64,
    },
    Read(ReadResult),
    /// (stream position, global position) of each event of a stream.
    Stream(Vec<(i64, i64)>),
}

impl Got {
    fn text(&self) -> String {
        match self {
            Got::Nothing => "ok".into(),
            Got::Appended(p, ready) if ready.is_empty() => format!("ok at {p}"),
            Got::Appended(p, ready) => format!("ok at {p}; picky inline projections ready: {ready:?}"),
            Got::Id(id) => format!("ok: {id}"),
            Got::MaybeId(id) => format!("ok: {id:?}"),
            Got::Status(s) => format!("ok: {s}"),
            Got::Skipped { failing, skipped } => format!("ok: failing_position {failing:?}, skipped {skipped}"),
            Got::Stream(evs) => format!("ok: {} events", evs.len()),
            Got::Read(r) => format!(
                "ok: model {} events, log {} of its types, position {:?}, {} skipped",
                r.applied.len(),
                r.log.len(),
                r.position,
                r.skipped.len()
            ),
        }
    }
}

/// Context a statement needs that the generator worked out.
#[derive(Default, Clone)]
struct Prep {
    /// Picky inline projections in the session's view that subscribe to a poisoned event of the
    /// append (checked after a successful append in a transaction).
    picky: Vec<String>,
}

fn event_data(tag: usize, k: usize, poison: bool) -> Value {
    if poison {
        json!({"o": tag, "k": k, "poison": true})
    } else {
        json!({"o": tag, "k": k})
    }
}

fn statement(c: &mut Client, op: &Op, tag: usize, prep: &Prep) -> std::result::Result<Got, Fail> {
    let r: std::result::Result<Got, postgres::Error> = (|| {
        Ok(match op {
            Op::Begin(l) => {
                c.batch_execute(l.begin())?;
                Got::Nothing
            }
            Op::Append { stream, events, batch, expected } => {
                let pos: i64 = if *batch {
                    let array = Value::Array(
                        events
                            .iter()
                            .enumerate()
                            .map(|(k, e)| json!({"type": e.etype, "data": event_data(tag, k, e.poison)}))
                            .collect(),
                    );
                    c.query_one("SELECT ep_append_events($1, $2, $3)", &[stream, &array, expected])?.get(0)
                } else {
                    let e = &events[0];
                    c.query_one(
                        "SELECT ep_append($1, $2, $3, NULL, $4)",
                        &[stream, &e.etype, &event_data(tag, 0, e.poison), expected],
                    )?
                    .get(0)
                };
                let mut ready = Vec::new();
                for name in &prep.picky {
                    ready.push((name.clone(), c.query_one("SELECT ep_projection_ready($1)", &[name])?.get(0)));
                }
                Got::Appended(pos, ready)
            }
            Op::Savepoint | Op::Release | Op::RollbackTo(_) => {
                unreachable!("savepoint statements are built by the caller")
            }
            Op::Commit => {
                c.batch_execute("COMMIT")?;
                Got::Nothing
            }
            Op::Rollback => {
                c.batch_execute("ROLLBACK")?;
                Got::Nothing
            }
            Op::Register { spec, precreate } => {
                let types = match &spec.types {
                    None => "NULL".to_string(),
                    Some(t) => format!("ARRAY[{}]", t.iter().map(|x| format!("'{x}'")).collect::<Vec<_>>().join(",")),
                };
                let mut sql = if *precreate { String::new() } else { model_ddl(&spec.schema) };
                write!(
                    sql,
                    "SELECT ep_register_projection('{}', '{}', '{}', {types}, '{}');",
                    spec.name,
                    HANDLERS[spec.handler].regprocedure,
                    spec.mode(),
                    spec.schema
                )
                .unwrap();
                c.batch_execute(&sql)?;
                Got::Nothing
            }
            Op::Unregister { name, drop_schema } => {
                let mut sql = format!("SELECT ep_unregister_projection('{name}');");
                if let Some(s) = drop_schema {
                    write!(sql, " DROP SCHEMA {s} CASCADE;").unwrap();
                }
                c.batch_execute(&sql)?;
                Got::Nothing
            }
            Op::Rebuild { name, strategy, new_handler } => {
                let h: Option<&str> = new_handler.map(|h| HANDLERS[h].regprocedure);
                Got::Id(c.query_one("SELECT ep_rebuild($1, $2, $3::text::regprocedure)", &[name, strategy, &h])?.get(0))
            }
            Op::Cancel { name } => Got::MaybeId(c.query_one("SELECT ep_cancel_rebuild($1)", &[name])?.get(0)),
            Op::Wait { id, call: false } => {
                Got::Status(c.query_one("SELECT ep_rebuild_wait($1, '100 ms')", &[id])?.get(0))
            }
            Op::Wait { id, call: true } => {
                let rows = c.simple_query(&format!("CALL ep_rebuild_await({id}, '100 ms')"))?;
                let status = rows.iter().find_map(|m| match m {
                    postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                    _ => None,
                });
                Got::Status(status.unwrap_or_default())
            }
            Op::ReadStream { stream } => {
                let rows =
                    c.query("SELECT stream_position, global_position FROM ep_read_stream($1, 1, 100000)", &[stream])?;
                Got::Stream(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
            }
            Op::Skip { name, bogus } => {
                let failing: Option<i64> = c
                    .query_opt("SELECT failing_position FROM ep.projections WHERE name = $1", &[name])?
                    .and_then(|r| r.get(0));
                let position = match failing {
                    Some(f) if !bogus => f,
                    Some(f) => f + 1,
                    None => 1,
                };
                c.execute("SELECT ep_skip_event($1, $2)", &[name, &position])?;
                Got::Skipped { failing, skipped: position }
            }
            Op::Retry { name, cure } => {
                if *cure {
                    c.execute(
                        "INSERT INTO w_hctl.cured SELECT failing_position FROM ep.projections \
                         WHERE name = $1 AND failing_position IS NOT NULL ON CONFLICT DO NOTHING",
                        &[name],
                    )?;
                }
                c.execute("SELECT ep_retry_projection($1)", &[name])?;
                Got::Nothing
            }
            Op::Cure => {
                c.execute(
                    "INSERT INTO w_hctl.cured SELECT global_position FROM ep.events \
                     WHERE data->>'poison' = 'true' ON CONFLICT DO NOTHING",
                    &[],
                )?;
                Got::Nothing
            }
            Op::Read { spec } => {
                let sql = format!(
                    "SELECT ep_require_ready($1), \
                            ARRAY(SELECT global_position FROM {}.applied ORDER BY 1), \
                            ARRAY(SELECT global_position FROM ep.events WHERE $2::text[] IS NULL OR event_type = ANY ($2) ORDER BY 1), \
                            (SELECT position FROM ep.projections WHERE name = $1), \
                            ARRAY(SELECT global_position FROM ep.skipped_events WHERE projection = $1 ORDER BY 1)",
                    spec.schema
                );
                let row = c.query_one(&sql, &[&spec.name, &spec.types])?;
                Got::Read(ReadResult {
                    applied: row.get(1),
                    log: row.get(2),
                    position: row.get(3),
                    skipped: row.get(4),
                })
            }
        })
    })();
    r.map_err(fail)
}

fn savepoint_statement(c: &mut Client, sql: &str) -> std::result::Result<Got, Fail> {
    c.batch_execute(sql).map(|_| Got::Nothing).map_err(fail)
}

// ------------------------------------------------------------------------------------------------
// The tester's knowledge

/// A change an open transaction made (or, `Attempt`, tried to make: a failed statement may hold
/// its locks until the rollback).
#[derive(Clone, Debug)]
enum Change {
    Append { op: usize, stream: String, events: Vec<NewEv>, believed: Option<i64> },
    Register(Spec),
    Unregister { name: String, dropped: bool },
    Rebuild { id: i64, name: String, new_handler: Option<usize> },
    Cancel(String),
    Touch(String),
    Cure,
    Read(String),
    Attempt(Box<Change>),
}

struct Txn {
    level: Level,
    depth: usize,
    /// (savepoint depth when made, change)
    changes: Vec<(usize, Change)>,
    aborted: bool,
    begun: usize,
}

struct Session {
    client: Client,
    txn: Option<Txn>,
    /// The last statement that failed, for the diagnosis of a session left in a failed
    /// transaction it did not begin.
    last_failure: Option<String>,
}

/// A model's `applied` rows: global position -> (stream, stream position).
type Applied = BTreeMap<i64, (String, i64)>;

#[derive(Clone, Debug)]
struct CommittedEvent {
    stream: String,
    etype: String,
    poison: bool,
    csn: u64,
}

#[derive(Clone, Debug)]
struct CommittedAppend {
    op: usize,
    stream: String,
    n: usize,
    believed: Option<i64>,
}

#[derive(Default)]
struct Ledger {
    registry: BTreeMap<String, Spec>,
    /// Handlers a projection may have now (the registered one, and the new ones of its
    /// blue-green rebuilds).
    handlers: BTreeMap<String, BTreeSet<usize>>,
    versions: BTreeMap<String, i64>,
    events: BTreeMap<(usize, usize), CommittedEvent>,
    appends: Vec<CommittedAppend>,
    rebuilds: BTreeMap<i64, String>,
    /// Unregistered projections, with the commit (csn) that unregistered them, and whether their
    /// schema was dropped.
    unregistered: Vec<(Spec, u64, bool)>,
    /// Model schemas created (committed) before a registration that may not commit.
    precreated: BTreeMap<String, Spec>,
    csn: u64,
}

impl Ledger {
    fn commit(&mut self, changes: Vec<Change>, stats: &mut Stats) {
        self.csn += 1;
        let csn = self.csn;
        for c in changes {
            match c {
                Change::Append { op, stream, events, believed } => {
                    for (k, e) in events.iter().enumerate() {
                        self.events.insert(
                            (op, k),
                            CommittedEvent { stream: stream.clone(), etype: e.etype.clone(), poison: e.poison, csn },
                        );
                    }
                    stats.events += events.len() as u64;
                    *self.versions.entry(stream.clone()).or_insert(0) += events.len() as i64;
                    self.appends.push(CommittedAppend { op, stream, n: events.len(), believed });
                }
                Change::Register(spec) => {
                    stats.registered += 1;
                    self.handlers.insert(spec.name.clone(), BTreeSet::from([spec.handler]));
                    self.registry.insert(spec.name.clone(), spec);
                }
                Change::Unregister { name, dropped } => {
                    stats.unregistered += 1;
                    if let Some(spec) = self.registry.remove(&name) {
                        self.unregistered.push((spec, csn, dropped));
                    }
                }
                Change::Rebuild { id, name, new_handler } => {
                    if let Some(h) = new_handler {
                        self.handlers.entry(name.clone()).or_default().insert(h);
                    }
                    self.rebuilds.insert(id, name);
                }
                _ => {}
            }
        }
    }
}

/// The locks other sessions' open transactions hold, as far as the generator cares.
#[derive(Default)]
struct Holds {
    streams: BTreeSet<String>,
    registry_shared: bool,
    registry_exclusive: bool,
    projection_exclusive: BTreeSet<String>,
    rebuild_queued: BTreeSet<String>,
    cancelled: BTreeSet<String>,
    touched: BTreeSet<String>,
    cure: bool,
    read: BTreeSet<String>,
    dropped: BTreeSet<String>,
}

impl Holds {
    fn add(&mut self, c: &Change) {
        match c {
            Change::Append { stream, .. } => {
                self.streams.insert(stream.clone());
                self.registry_shared = true;
            }
            Change::Register(_) => self.registry_exclusive = true,
            Change::Unregister { name, dropped } => {
                self.registry_exclusive = true;
                self.projection_exclusive.insert(name.clone());
                self.touched.insert(name.clone());
                if *dropped {
                    self.dropped.insert(name.clone());
                }
            }
            Change::Rebuild { name, .. } => {
                self.rebuild_queued.insert(name.clone());
            }
            Change::Cancel(n) => {
                self.cancelled.insert(n.clone());
            }
            Change::Touch(n) => {
                self.touched.insert(n.clone());
            }
            Change::Cure => self.cure = true,
            Change::Read(n) => {
                self.read.insert(n.clone());
            }
            Change::Attempt(c) => self.add(c),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Figures

#[derive(Default, Clone, Debug)]
pub struct Stats {
    pub histories: u64,
    pub steps: u64,
    pub operations: u64,
    pub by_kind: BTreeMap<String, u64>,
    pub committed: u64,
    pub autocommit_ok: u64,
    pub rolled_back: u64,
    pub rolled_back_aborted: u64,
    pub commit_failed: u64,
    pub lost_in_crash: u64,
    pub savepoint_rollbacks: u64,
    pub kills: u64,
    pub restarts: u64,
    pub races: u64,
    pub expected_failures: BTreeMap<String, u64>,
    pub events: u64,
    pub registered: u64,
    pub unregistered: u64,
    pub rebuilds: BTreeMap<String, u64>,
    pub skipped: u64,
    pub reads_checked: u64,
    pub poison_refused: u64,
    pub seconds: f64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.histories += o.histories;
        self.steps += o.steps;
        self.operations += o.operations;
        for (k, v) in &o.by_kind {
            *self.by_kind.entry(k.clone()).or_default() += v;
        }
        self.committed += o.committed;
        self.autocommit_ok += o.autocommit_ok;
        self.rolled_back += o.rolled_back;
        self.rolled_back_aborted += o.rolled_back_aborted;
        self.commit_failed += o.commit_failed;
        self.lost_in_crash += o.lost_in_crash;
        self.savepoint_rollbacks += o.savepoint_rollbacks;
        self.kills += o.kills;
        self.restarts += o.restarts;
        self.races += o.races;
        for (k, v) in &o.expected_failures {
            *self.expected_failures.entry(k.clone()).or_default() += v;
        }
        self.events += o.events;
        self.registered += o.registered;
        self.unregistered += o.unregistered;
        for (k, v) in &o.rebuilds {
            *self.rebuilds.entry(k.clone()).or_default() += v;
        }
        self.skipped += o.skipped;
        self.reads_checked += o.reads_checked;
        self.poison_refused += o.poison_refused;
        self.seconds += o.seconds;
    }

    pub fn report(&self, test: &str, wall: Duration) -> String {
        let mut s = String::new();
        let kinds: Vec<String> = self.by_kind.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let fails: Vec<String> = self.expected_failures.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let rebuilds: Vec<String> = self.rebuilds.iter().map(|(k, v)| format!("{k} {v}")).collect();
        writeln!(
            s,
            "== {test}: {} histories, {} operations ({} steps) in {:.1} s",
            self.histories,
            self.operations,
            self.steps,
            wall.as_secs_f64()
        )
        .unwrap();
        writeln!(s, "   operations by kind: {}", kinds.join(", ")).unwrap();
        writeln!(
            s,
            "   transactions: {} committed, {} rolled back ({} by ROLLBACK or a COMMIT of a failed transaction, of which {} had failed; {} failed at COMMIT; {} lost in crashes); {} rollbacks to a savepoint; {} autocommit statements succeeded",
            self.committed,
            self.rolled_back + self.commit_failed + self.lost_in_crash,
            self.rolled_back,
            self.rolled_back_aborted,
            self.commit_failed,
            self.lost_in_crash,
            self.savepoint_rollbacks,
            self.autocommit_ok
        )
        .unwrap();
        writeln!(
            s,
            "   crashes: {} ({} worker SIGKILL, {} immediate shutdowns); races (two statements at once): {}",
            self.kills + self.restarts,
            self.kills,
            self.restarts,
            self.races
        )
        .unwrap();
        writeln!(s, "   expected failures: {}", fails.join(", ")).unwrap();
        writeln!(
            s,
            "   events committed: {}; registrations committed: {}, unregistrations committed: {}; rebuilds ended: {}; events skipped: {}; poisoned appends refused inline: {}; reads checked against the log: {}",
            self.events,
            self.registered,
            self.unregistered,
            rebuilds.join(", "),
            self.skipped,
            self.poison_refused,
            self.reads_checked
        )
        .unwrap();
        s
    }
}

// ------------------------------------------------------------------------------------------------
// One history

struct Rec {
    idx: usize,
    who: String,
    what: String,
    out: String,
    ms: u128,
}

struct History {
    seed: u64,
    cfg: Config,
    rng: Rng,
    sessions: Vec<Session>,
    chk: Client,
    ledger: Ledger,
    recs: Vec<Rec>,
    notes: Vec<String>,
    stats: Stats,
    next_projection: usize,
    crashes: usize,
    findings: Vec<String>,
    log: Option<(std::path::PathBuf, u64)>,
    /// Offset of this history's operation numbers (the `o` of its events): 0 unless histories
    /// carry the log over, then 100000 * the history's index.
    base: usize,
    /// Whether the history starts from the log and extension the previous one left.
    carried: bool,
    /// Prefix of projection names (schemas are `w_h` + the rest).
    prefix: String,
    /// How to replay this history.
    replay: String,
}

fn session_setup(c: &mut Client) {
    c.batch_execute(&format!(
        "SET application_name = 'ep-history'; SET statement_timeout = '{STATEMENT_TIMEOUT_MS}ms'; \
         SET lock_timeout = '{LOCK_TIMEOUT_MS}ms'; SET deadlock_timeout = '{DEADLOCK_TIMEOUT_MS}ms';"
    ))
    .unwrap_or_else(|e| panic!("setting up a session: {}", show(&e)));
}

fn checker_setup(c: &mut Client) {
    c.batch_execute("SET application_name = 'ep-history-check'; SET statement_timeout = '180s';")
        .unwrap_or_else(|e| panic!("setting up the checker: {}", show(&e)));
}

/// The server log of the cluster (EP_DATA as scripts/cluster.sh has it), if readable.
fn server_log() -> Option<std::path::PathBuf> {
    let data = std::env::var("EP_DATA").unwrap_or_else(|_| format!("/var/tmp/event_projections/{}", port()));
    let p = std::path::PathBuf::from(data).join("server.log");
    std::fs::metadata(&p).ok().map(|_| p)
}

fn kill_a_worker(c: &mut Client, pick: usize) -> Option<i32> {
    let pids: Vec<i32> = c
        .query("SELECT pid FROM pg_stat_activity WHERE backend_type = 'event_projections worker' ORDER BY pid", &[])
        .ok()?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let pid = *pids.get(pick % pids.len().max(1))?;
    let ok = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok.then_some(pid)
}

impl History {
    #[allow(clippy::too_many_arguments)]
    fn new(
        seed: u64,
        cfg: Config,
        chk: Client,
        clients: &mut Vec<Client>,
        index: usize,
        carry_over: bool,
        carried: bool,
        replay: String,
    ) -> History {
        while clients.len() < cfg.sessions {
            let mut c = served::reconnect();
            session_setup(&mut c);
            clients.push(c);
        }
        let sessions = clients
            .drain(..cfg.sessions)
            .map(|mut client| {
                // A session kept from an earlier history is idle outside any transaction, unless a
                // crash in a history that did not use it closed it.
                if client.is_closed() || client.batch_execute("SELECT 1").is_err() {
                    client = served::reconnect();
                    session_setup(&mut client);
                }
                Session { client, txn: None, last_failure: None }
            })
            .collect();
        History {
            seed,
            rng: Rng(seed),
            cfg,
            sessions,
            chk,
            ledger: Ledger::default(),
            recs: Vec::new(),
            notes: Vec::new(),
            stats: Stats::default(),
            next_projection: 0,
            crashes: 0,
            findings: Vec::new(),
            log: server_log().map(|p| {
                let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                (p, len)
            }),
            base: if carry_over { index * 100_000 } else { 0 },
            carried,
            prefix: if carry_over { format!("{index}_") } else { String::new() },
            replay,
        }
    }

    fn give_back(&mut self, clients: &mut Vec<Client>) {
        let mine: Vec<Client> = self.sessions.drain(..).map(|s| s.client).collect();
        clients.splice(0..0, mine);
    }

    fn note(&mut self, s: String) {
        self.notes.push(format!("[after step {}] {s}", self.recs.len()));
    }

    // --------------------------------------------------------------------------------------------
    // Views

    /// The projections session `s` sees: committed, plus its own transaction's changes.
    fn view(&self, s: usize) -> BTreeMap<String, Spec> {
        let mut v = self.ledger.registry.clone();
        if let Some(t) = &self.sessions[s].txn {
            for (_, c) in &t.changes {
                match c {
                    Change::Register(spec) => {
                        v.insert(spec.name.clone(), spec.clone());
                    }
                    Change::Unregister { name, .. } => {
                        v.remove(name);
                    }
                    _ => {}
                }
            }
        }
        v
    }

    /// The version of `stream` as session `s` sees it (exact: every commit is the driver's).
    fn believed(&self, s: usize, stream: &str) -> i64 {
        let mut v = self.ledger.versions.get(stream).copied().unwrap_or(0);
        if let Some(t) = &self.sessions[s].txn {
            for (_, c) in &t.changes {
                if let Change::Append { stream: st, events, .. } = c {
                    if st == stream {
                        v += events.len() as i64;
                    }
                }
            }
        }
        v
    }

    fn others(&self, s: usize) -> Holds {
        let mut h = Holds::default();
        for (i, sess) in self.sessions.iter().enumerate() {
            if i == s {
                continue;
            }
            if let Some(t) = &sess.txn {
                for (_, c) in &t.changes {
                    h.add(c);
                }
            }
        }
        h
    }

    /// Whether projection `name` may have a picky handler now / surely has one (a blue-green
    /// rebuild with a new handler switches it when it completes).
    fn maybe_picky(&self, p: &Spec) -> bool {
        HANDLERS[p.handler].picky
            || self.ledger.handlers.get(&p.name).is_some_and(|hs| hs.iter().any(|h| HANDLERS[*h].picky))
    }
    fn surely_picky(&self, p: &Spec) -> bool {
        HANDLERS[p.handler].picky
            && self.ledger.handlers.get(&p.name).is_none_or(|hs| hs.iter().all(|h| HANDLERS[*h].picky))
    }

    fn own_rebuild(&self, s: usize, id: i64) -> bool {
        let Some(t) = &self.sessions[s].txn else { return false };
        let name = self.ledger.rebuilds.get(&id);
        t.changes.iter().any(|(_, c)| match c {
            Change::Rebuild { id: i, .. } => *i == id,
            Change::Cancel(n) => Some(n) == name,
            Change::Unregister { name: n, .. } => Some(n) == name,
            _ => false,
        })
    }

    fn pending_rebuild_ids(&self, s: usize) -> Vec<i64> {
        let mut ids: Vec<i64> = self.ledger.rebuilds.keys().copied().collect();
        if let Some(t) = &self.sessions[s].txn {
            for (_, c) in &t.changes {
                if let Change::Rebuild { id, .. } = c {
                    ids.push(*id);
                }
            }
        }
        ids
    }

    // --------------------------------------------------------------------------------------------
    // The generator

    fn new_spec(&mut self, d: &Draw, w: usize) -> Spec {
        self.next_projection += 1;
        let n = self.next_projection;
        let batch = d.sub(w, 1, 100) < 40;
        let picky = d.sub(w, 2, 100) < 30;
        let t = d.sub(w, 3, 100);
        Spec {
            name: format!("p{}{n}", self.prefix),
            schema: format!("w_h{}{n}", self.prefix),
            inline: d.sub(w, 4, 100) < 50,
            handler: batch as usize + 2 * picky as usize,
            types: if t < 40 { None } else { Some(TYPE_SUBSETS[t % 4].iter().map(|x| x.to_string()).collect()) },
        }
    }

    fn pick_projection(&self, s: usize, d: &Draw, w: usize, async_only: bool) -> Option<Spec> {
        let v: Vec<Spec> = self.view(s).into_values().filter(|p| !async_only || !p.inline).collect();
        (!v.is_empty()).then(|| v[d.below(w, v.len())].clone())
    }

    /// An async projection for a skip or a retry: a picky one when there is one (only those fail).
    fn pick_failing_candidate(&self, s: usize, d: &Draw) -> Option<Spec> {
        let all: Vec<Spec> = self.view(s).into_values().filter(|p| !p.inline).collect();
        let picky: Vec<Spec> = all.iter().filter(|p| self.maybe_picky(p)).cloned().collect();
        let v = if picky.is_empty() || d.sub(4, 7, 100) < 20 { all } else { picky };
        (!v.is_empty()).then(|| v[d.below(4, v.len())].clone())
    }

    fn gen_append(&self, s: usize, d: &Draw, batch: bool, avoid: bool, step: usize) -> Option<Op> {
        let holds = self.others(s);
        let view = self.view(s);
        let n = if batch { 2 + d.sub(4, 9, 3) } else { 1 };
        let events: Vec<NewEv> = (0..n)
            .map(|k| NewEv {
                etype: weighted(d.sub(4, k as u32, 100) as u64, &[("A", 40), ("B", 30), ("C", 20), ("D", 10)])
                    .to_string(),
                poison: d.sub(5, k as u32, 100) < 4,
            })
            .collect();
        if avoid {
            if holds.registry_exclusive {
                return None;
            }
            let blocked = view.values().any(|p| {
                p.inline
                    && holds.projection_exclusive.contains(&p.name)
                    && events.iter().any(|e| p.subscribes(&e.etype))
            });
            if blocked {
                return None;
            }
        }
        let c = d.below(3, STREAMS + 1);
        let mut stream = if c == STREAMS { format!("n{step}") } else { format!("s{c}") };
        if avoid && holds.streams.contains(&stream) {
            stream = (0..STREAMS)
                .map(|k| format!("s{}", (c + k) % STREAMS))
                .find(|st| !holds.streams.contains(st))
                .unwrap_or_else(|| format!("n{step}"));
        }
        let believed = self.believed(s, &stream);
        let e = d.pct(6);
        let expected = if e < 35 {
            None
        } else if e < 93 {
            Some(believed)
        } else if e < 96 {
            Some(believed + 1)
        } else if e < 99 {
            Some((believed - 1).max(0))
        } else {
            Some(0)
        };
        Some(Op::Append { stream, events, batch, expected })
    }

    fn gen_session(&mut self, s: usize, d: &Draw, step: usize) -> Option<Op> {
        #[derive(Clone, Copy, PartialEq)]
        enum K {
            Begin,
            Append,
            Batch,
            Savepoint,
            Release,
            RollbackTo,
            Commit,
            Rollback,
            Register,
            Unregister,
            Rebuild,
            Cancel,
            Wait,
            Skip,
            Retry,
            Cure,
            Read,
        }
        use K::*;
        let avoid = d.pct(7) < 90;
        let (in_txn, aborted, depth) = match &self.sessions[s].txn {
            None => (false, false, 0),
            Some(t) => (true, t.aborted, t.depth),
        };
        let k = if !in_txn {
            weighted(
                d.0[1],
                &[
                    (Begin, 30),
                    (Append, 25),
                    (Batch, 10),
                    (Register, 7),
                    (Unregister, 2),
                    (Rebuild, 7),
                    (Cancel, 2),
                    (Wait, 2),
                    (Skip, 3),
                    (Retry, 3),
                    (Cure, 1),
                    (Read, 6),
                ],
            )
        } else if aborted {
            weighted(d.0[1], &[(Rollback, 55), (RollbackTo, if depth > 0 { 35 } else { 0 }), (Commit, 10)])
        } else {
            weighted(
                d.0[1],
                &[
                    (Append, 30),
                    (Batch, 11),
                    (Savepoint, 6),
                    (Release, if depth > 0 { 3 } else { 0 }),
                    (RollbackTo, if depth > 0 { 4 } else { 0 }),
                    (Commit, 12),
                    (Rollback, 5),
                    (Register, 3),
                    (Unregister, 2),
                    (Rebuild, 4),
                    (Cancel, 1),
                    (Wait, 2),
                    (Skip, 2),
                    (Retry, 2),
                    (Cure, 1),
                    (Read, 7),
                ],
            )
        };
        let holds = self.others(s);
        // When the operation drawn has no target or would wait for another session: an append,
        // else a read.
        let read_instead = |h: &History| -> Option<Op> {
            if !matches!(k, Append | Batch) {
                if let Some(op) = h.gen_append(s, d, false, avoid, step) {
                    return Some(op);
                }
            }
            let p = h.pick_projection(s, d, 5, false)?;
            (!holds.dropped.contains(&p.name)).then_some(Op::Read { spec: p })
        };
        let op = match k {
            Begin => Some(Op::Begin(weighted(
                d.0[3],
                &[(Level::ReadCommitted, 40), (Level::RepeatableRead, 30), (Level::Serializable, 30)],
            ))),
            Append => self.gen_append(s, d, false, avoid, step).or_else(|| read_instead(self)),
            Batch => self.gen_append(s, d, true, avoid, step).or_else(|| read_instead(self)),
            Savepoint => Some(Op::Savepoint),
            Release => Some(Op::Release),
            RollbackTo => Some(Op::RollbackTo(1 + d.below(3, depth))),
            Commit => Some(Op::Commit),
            Rollback => Some(Op::Rollback),
            Register => {
                if avoid && (holds.registry_shared || holds.registry_exclusive) {
                    read_instead(self)
                } else {
                    let spec = self.new_spec(d, 4);
                    Some(Op::Register { spec, precreate: d.pct(6) < 40 })
                }
            }
            Unregister => {
                let unknown = d.pct(6) < 8;
                match self.pick_projection(s, d, 4, false) {
                    Some(p) if !unknown => {
                        let drop = d.sub(6, 1, 100) < 30;
                        let blocked = holds.registry_shared
                            || holds.registry_exclusive
                            || holds.touched.contains(&p.name)
                            || holds.cancelled.contains(&p.name)
                            || (drop && holds.read.contains(&p.name));
                        if avoid && blocked {
                            read_instead(self)
                        } else {
                            Some(Op::Unregister { name: p.name.clone(), drop_schema: drop.then(|| p.schema.clone()) })
                        }
                    }
                    _ => Some(Op::Unregister { name: format!("nosuch{step}"), drop_schema: None }),
                }
            }
            Rebuild => match self.pick_projection(s, d, 4, false) {
                Some(p) => {
                    if avoid && (holds.rebuild_queued.contains(&p.name) || holds.projection_exclusive.contains(&p.name))
                    {
                        read_instead(self)
                    } else {
                        let blue = d.pct(6) < 50;
                        let new_handler = (blue && d.sub(6, 1, 100) < 25).then(|| d.sub(6, 2, 4));
                        Some(Op::Rebuild {
                            name: p.name,
                            strategy: if blue { "blue_green" } else { "in_place" },
                            new_handler,
                        })
                    }
                }
                None => None,
            },
            Cancel => match self.pick_projection(s, d, 4, false) {
                Some(p) => {
                    if avoid && (holds.cancelled.contains(&p.name) || holds.projection_exclusive.contains(&p.name)) {
                        read_instead(self)
                    } else {
                        Some(Op::Cancel { name: p.name })
                    }
                }
                None => None,
            },
            Wait => {
                let ids = self.pending_rebuild_ids(s);
                if ids.is_empty() {
                    read_instead(self)
                } else {
                    Some(Op::Wait { id: ids[d.below(4, ids.len())], call: !in_txn && d.pct(6) < 40 })
                }
            }
            Skip | Retry => match self.pick_failing_candidate(s, d) {
                Some(p) => {
                    let cure = k == Retry && d.pct(6) < 50;
                    if avoid
                        && (holds.touched.contains(&p.name)
                            || holds.projection_exclusive.contains(&p.name)
                            || (cure && holds.cure))
                    {
                        read_instead(self)
                    } else if k == Skip {
                        Some(Op::Skip { name: p.name, bogus: d.pct(6) < 15 })
                    } else {
                        Some(Op::Retry { name: p.name, cure })
                    }
                }
                None => read_instead(self),
            },
            Cure => {
                if avoid && holds.cure {
                    read_instead(self)
                } else {
                    Some(Op::Cure)
                }
            }
            Read if d.pct(6) < 30 => Some(Op::ReadStream { stream: format!("s{}", d.below(3, STREAMS)) }),
            Read => match self.pick_projection(s, d, 5, false) {
                Some(p) if !holds.dropped.contains(&p.name) => Some(Op::Read { spec: p }),
                _ => read_instead(self),
            },
        };
        op
    }

    /// An operation for one side of a race: no avoidance, the same stream as the other side half
    /// the time.
    fn gen_race_side(&mut self, s: usize, d: &Draw, step: usize, stream: Option<&str>) -> Option<Op> {
        let t = self.sessions[s].txn.as_ref();
        if t.is_some_and(|t| t.aborted) {
            return None;
        }
        let in_txn = t.is_some();
        let table: &[(u8, u64)] = if in_txn {
            &[(0, 40), (1, 15), (2, 15), (3, 10), (4, 20)]
        } else {
            &[(0, 60), (1, 20), (2, 0), (3, 0), (4, 20)]
        };
        match weighted(d.0[1], table) {
            k @ (0 | 1) => {
                let mut op = self.gen_append(s, d, k == 1, false, step)?;
                if let (Some(st), Op::Append { stream, expected, .. }) = (stream, &mut op) {
                    *stream = st.to_string();
                    *expected = expected.map(|_| self.believed(s, st));
                }
                Some(op)
            }
            2 => {
                let spec = self.new_spec(d, 4);
                Some(Op::Register { spec, precreate: false })
            }
            3 => {
                let p = self.pick_projection(s, d, 4, false)?;
                Some(Op::Unregister { name: p.name, drop_schema: None })
            }
            _ => {
                let p = self.pick_projection(s, d, 5, false)?;
                Some(Op::Read { spec: p })
            }
        }
    }

    fn generate(&mut self, d: &Draw, step: usize) -> Step {
        let g = d.0[0] % 1000;
        let n = self.sessions.len();
        if self.crashes < self.cfg.crashes && step > 10 && g < 7 {
            return if d.pct(1) < 50 { Step::KillWorker } else { Step::Restart };
        }
        if self.cfg.races && (10..45).contains(&g) {
            let a = d.below(2, n);
            let b = (a + 1 + d.sub(2, 1, n - 1)) % n;
            let shared_stream = (d.pct(3) < 60).then(|| format!("s{}", d.sub(3, 1, STREAMS)));
            let da = d.derive();
            let db = da.derive();
            let oa = self.gen_race_side(a, &da, step, shared_stream.as_deref());
            let ob = self.gen_race_side(b, &db, step + 1, shared_stream.as_deref());
            if let (Some(oa), Some(ob)) = (oa, ob) {
                return Step::Race(a, oa, b, ob);
            }
        }
        if (45..75).contains(&g) {
            return Step::Pause(10 + d.0[1] % 150);
        }
        let s = d.below(2, n);
        match self.gen_session(s, d, step) {
            Some(op) => Step::S(s, op),
            None => Step::Pause(5),
        }
    }

    // --------------------------------------------------------------------------------------------
    // Executing

    fn record(&mut self, who: String, what: String, out: String, ms: u128) {
        let idx = self.recs.len() + 1;
        self.recs.push(Rec { idx, who, what, out, ms });
    }

    fn count(&mut self, kind: &str) {
        *self.stats.by_kind.entry(kind.to_string()).or_default() += 1;
        self.stats.operations += 1;
    }

    fn prepare(&mut self, s: usize, op: &Op, race: bool) -> Prep {
        let mut prep = Prep::default();
        match op {
            Op::Register { spec, precreate: true } => {
                let r = self.chk.batch_execute(&model_ddl(&spec.schema));
                match r {
                    Ok(()) => {
                        self.ledger.precreated.insert(spec.schema.clone(), spec.clone());
                    }
                    Err(e) => {
                        self.findings.push(format!("creating the model {} beforehand: {}", spec.schema, show(&e)))
                    }
                }
            }
            Op::Append { events, .. } if !race && self.sessions[s].txn.is_some() => {
                let view = self.view(s);
                prep.picky = view
                    .values()
                    .filter(|p| {
                        p.inline && self.surely_picky(p) && events.iter().any(|e| e.poison && p.subscribes(&e.etype))
                    })
                    .map(|p| p.name.clone())
                    .collect();
            }
            _ => {}
        }
        prep
    }

    fn run_statement(&mut self, s: usize, op: &Op, tag: usize, prep: &Prep) -> std::result::Result<Got, Fail> {
        let depth = self.sessions[s].txn.as_ref().map(|t| t.depth).unwrap_or(0);
        let c = &mut self.sessions[s].client;
        match op {
            Op::Savepoint => savepoint_statement(c, &format!("SAVEPOINT sp{}", depth + 1)),
            Op::Release => savepoint_statement(c, &format!("RELEASE SAVEPOINT sp{depth}")),
            Op::RollbackTo(d) => savepoint_statement(c, &format!("ROLLBACK TO SAVEPOINT sp{d}")),
            _ => statement(c, op, tag, prep),
        }
    }

    fn step(&mut self, step: Step) {
        let t0 = Instant::now();
        match step {
            Step::S(s, op) => {
                let tag = self.base + self.recs.len() + 1;
                let prep = self.prepare(s, &op, false);
                let out = self.run_statement(s, &op, tag, &prep);
                let ms = t0.elapsed().as_millis();
                let text = self.settle(s, &op, tag, out, false);
                self.count(op.kind());
                self.record(format!("s{s}"), op.describe(), text, ms);
            }
            Step::Race(a, oa, b, ob) => {
                let (ta, tb) = (self.base + self.recs.len() + 1, self.base + self.recs.len() + 2);
                let (pa, pb) = (self.prepare(a, &oa, true), self.prepare(b, &ob, true));
                let (lo, hi) = self.sessions.split_at_mut(a.max(b));
                let (ca, cb) =
                    if a < b { (&mut lo[a].client, &mut hi[0].client) } else { (&mut hi[0].client, &mut lo[b].client) };
                let (ra, rb) = std::thread::scope(|sc| {
                    let ha = sc.spawn(|| statement(ca, &oa, ta, &pa));
                    let hb = sc.spawn(|| statement(cb, &ob, tb, &pb));
                    (ha.join().expect("race thread"), hb.join().expect("race thread"))
                });
                let ms = t0.elapsed().as_millis();
                let xa = self.settle(a, &oa, ta, ra, true);
                self.count(oa.kind());
                self.record(format!("s{a} race"), oa.describe(), xa, ms);
                let xb = self.settle(b, &ob, tb, rb, true);
                self.count(ob.kind());
                self.record(format!("s{b} race"), ob.describe(), xb, ms);
                self.count("race");
                self.stats.races += 1;
            }
            Step::Pause(ms) => {
                std::thread::sleep(Duration::from_millis(ms));
                self.count("pause");
                self.record("-".into(), format!("pause {ms} ms"), "ok".into(), t0.elapsed().as_millis());
            }
            Step::KillWorker => {
                self.crashes += 1;
                let pick = self.rng.next_u64() as usize;
                match kill_a_worker(&mut self.chk, pick) {
                    Some(pid) => {
                        self.stats.kills += 1;
                        // The postmaster ends every backend and reinitializes: wait until that
                        // reached every session, so that no statement of ours runs before it.
                        for s in &mut self.sessions {
                            let gone =
                                wait_until(Duration::from_secs(30), || Ok(s.client.batch_execute("SELECT 1").is_err()));
                            if !gone.unwrap_or(false) {
                                self.findings.push(format!("the server did not restart after worker {pid} was killed"));
                            }
                        }
                        self.after_crash();
                        self.count("kill_worker");
                        self.record(
                            "-".into(),
                            format!("SIGKILL worker {pid}"),
                            "server restarted".into(),
                            t0.elapsed().as_millis(),
                        );
                    }
                    None => {
                        self.count("kill_worker");
                        self.record(
                            "-".into(),
                            "SIGKILL a worker".into(),
                            "no worker to kill".into(),
                            t0.elapsed().as_millis(),
                        );
                    }
                }
            }
            Step::Restart => {
                self.crashes += 1;
                self.stats.restarts += 1;
                served::cluster(&["stop", "immediate"]);
                served::cluster(&["start"]);
                self.after_crash();
                self.count("immediate_shutdown");
                self.record(
                    "-".into(),
                    "pg_ctl stop -m immediate; start".into(),
                    "server restarted".into(),
                    t0.elapsed().as_millis(),
                );
            }
        }
    }

    /// Every session's transaction died with the server: reconnect them all.
    fn after_crash(&mut self) {
        for s in &mut self.sessions {
            if s.txn.take().is_some() {
                self.stats.lost_in_crash += 1;
            }
            let mut c = served::reconnect();
            session_setup(&mut c);
            s.client = c;
        }
        self.chk = served::reconnect();
        checker_setup(&mut self.chk);
    }

    fn end_txn(&mut self, s: usize, commit: bool) {
        let Some(t) = self.sessions[s].txn.take() else { return };
        if commit {
            let changes = t.changes.into_iter().map(|(_, c)| c).filter(|c| !matches!(c, Change::Attempt(_))).collect();
            self.ledger.commit(changes, &mut self.stats);
            self.stats.committed += 1;
        }
    }

    /// What an operation changes (also what a failed statement may still hold locks for).
    fn changes_of(op: &Op, tag: usize, believed: Option<i64>) -> Vec<Change> {
        match op {
            Op::Append { stream, events, .. } => {
                vec![Change::Append { op: tag, stream: stream.clone(), events: events.clone(), believed }]
            }
            Op::Register { spec, .. } => vec![Change::Register(spec.clone())],
            Op::Unregister { name, drop_schema } => {
                vec![Change::Unregister { name: name.clone(), dropped: drop_schema.is_some() }]
            }
            // The real id replaces -1 when the statement succeeds.
            Op::Rebuild { name, new_handler, .. } => {
                vec![Change::Rebuild { id: -1, name: name.clone(), new_handler: *new_handler }]
            }
            Op::Cancel { name } => vec![Change::Cancel(name.clone())],
            Op::Skip { name, .. } => vec![Change::Touch(name.clone())],
            Op::Retry { name, cure: true } => vec![Change::Touch(name.clone()), Change::Cure],
            Op::Retry { name, cure: false } => vec![Change::Touch(name.clone())],
            Op::Cure => vec![Change::Cure],
            Op::Read { spec } => vec![Change::Read(spec.name.clone())],
            _ => vec![],
        }
    }

    /// Whether a failure is one the operation may meet; Err says why not.
    fn allowed(&self, s: usize, op: &Op, code: &str, message: &str, race: bool) -> std::result::Result<String, String> {
        let contention = matches!(code, "40001" | "40P01" | "55P03" | "57014");
        let in_view = |name: &str| self.view(s).contains_key(name);
        let class = |what: &str| Ok(format!("{code} {what}"));
        let contention_class = || -> std::result::Result<String, String> {
            match code {
                "40001" if message.starts_with("wrong expected version") => class("wrong expected version"),
                "40001" if message.contains("handed off") => class("crossed hand-off"),
                "40001" if message.contains("concurrent update") => class("concurrent update"),
                "40001" if message.contains("read/write dependencies") => class("serializable conflict"),
                "40001" => class("serialization failure"),
                "40P01" => class("deadlock"),
                "55P03" => class("lock timeout"),
                "57014" => class("statement timeout"),
                _ => Err(format!("unexpected error {code} {message}")),
            }
        };
        match op {
            Op::Append { stream, events, expected, .. } => {
                if code == "40001" && message.starts_with("wrong expected version") {
                    let Some(v) = expected else {
                        return Err("a wrong expected version without an expected version".into());
                    };
                    if !race {
                        let b = self.believed(s, stream);
                        let actual = message.rsplit("actual ").next().and_then(|x| x.trim().parse::<i64>().ok());
                        if *v == b {
                            return Err(format!("expected version {v} refused, but the stream's version is {b}"));
                        }
                        if actual != Some(b) {
                            return Err(format!("the error names version {actual:?}, but the stream's version is {b}"));
                        }
                    }
                    return class("wrong expected version");
                }
                if contention {
                    return contention_class();
                }
                if code == "P0001" && message.contains("poisoned event") {
                    if !events.iter().any(|e| e.poison) {
                        return Err("a poisoned-event error for an append without poison".into());
                    }
                    let view = self.view(s);
                    let named = view.values().any(|p| {
                        p.inline
                            && self.maybe_picky(p)
                            && message.contains(&format!("projection \"{}\"", p.name))
                            && events.iter().any(|e| e.poison && p.subscribes(&e.etype))
                    });
                    if !race && !named {
                        return Err(
                            "the error does not name a picky inline projection that subscribes to the poisoned event"
                                .into(),
                        );
                    }
                    return class("poisoned event refused inline");
                }
                Err(format!("unexpected error {code} {message}"))
            }
            Op::Register { spec, .. } => {
                if contention {
                    contention_class()
                } else if code == "P0001" && message.contains("poisoned event") && HANDLERS[spec.handler].picky {
                    class("registration replayed a poisoned event")
                } else {
                    Err(format!("unexpected error {code} {message}"))
                }
            }
            Op::Unregister { name, .. } | Op::Rebuild { name, .. } | Op::Cancel { name } | Op::Retry { name, .. } => {
                if contention {
                    contention_class()
                } else if code == "42704" && !in_view(name) {
                    class("unknown projection")
                } else {
                    Err(format!("unexpected error {code} {message}"))
                }
            }
            Op::Skip { name, .. } => {
                if contention {
                    contention_class()
                } else if code == "42704" && !in_view(name) {
                    class("unknown projection")
                } else if code == "55000" && message.contains("is not the event") {
                    class("not the failing event")
                } else {
                    Err(format!("unexpected error {code} {message}"))
                }
            }
            Op::ReadStream { .. } => {
                if contention {
                    contention_class()
                } else {
                    Err(format!("unexpected error {code} {message}"))
                }
            }
            Op::Wait { id, .. } => {
                let gone = self.ledger.rebuilds.get(id).is_none_or(|n| !in_view(n));
                if code == "57014" && message.contains("did not finish") {
                    class("rebuild still running")
                } else if contention {
                    contention_class()
                } else if code == "55000" && self.own_rebuild(s, *id) {
                    class("rebuild queued by this transaction")
                } else if code == "42704" && gone {
                    class("rebuild of an unregistered projection")
                } else {
                    Err(format!("unexpected error {code} {message}"))
                }
            }
            Op::Cure => {
                if contention {
                    contention_class()
                } else {
                    Err(format!("unexpected error {code} {message}"))
                }
            }
            Op::Read { spec } => {
                if contention {
                    contention_class()
                } else if code == "55000" && message.contains("is not ready") {
                    class("not ready")
                } else if code == "42704" && !in_view(&spec.name) {
                    class("unknown projection")
                } else {
                    Err(format!("unexpected error {code} {message}"))
                }
            }
            Op::Commit => {
                if code == "40001" {
                    class("at COMMIT")
                } else {
                    Err(format!("unexpected error at COMMIT: {code} {message}"))
                }
            }
            _ => Err(format!("unexpected error {code} {message}")),
        }
    }

    /// Updates the sessions and the ledger after a statement, and checks what can be checked on
    /// the spot. Returns the outcome as recorded.
    fn settle(&mut self, s: usize, op: &Op, tag: usize, out: std::result::Result<Got, Fail>, race: bool) -> String {
        let believed = match op {
            Op::Append { stream, .. } if !race => Some(self.believed(s, stream)),
            _ => None,
        };
        let got = match out {
            Err(Fail::Lost(m)) => {
                self.findings.push(format!("session s{s} lost its connection (did a backend crash?): {m}"));
                return format!("connection lost: {m}");
            }
            Err(Fail::Db { code, message }) => {
                let text = format!("{code} {message}");
                match self.allowed(s, op, &code, &message, race) {
                    Ok(class) => {
                        *self.stats.expected_failures.entry(class).or_default() += 1;
                        if code == "P0001" && matches!(op, Op::Append { .. }) {
                            self.stats.poison_refused += 1;
                        }
                    }
                    Err(why) => {
                        let mut f = format!("step {tag} (s{s} {}): {why}", op.describe());
                        if code == "25P02" && self.sessions[s].txn.is_none() {
                            write!(
                                f,
                                " -- the session began no transaction: its last failed statement left it inside a failed transaction block ({})",
                                self.sessions[s].last_failure.clone().unwrap_or_else(|| "none recorded".into())
                            )
                            .unwrap();
                        }
                        self.findings.push(f);
                    }
                }
                self.sessions[s].last_failure = Some(format!(
                    "step {tag} {}{}: {code} {message}",
                    op.describe(),
                    if self.sessions[s].txn.is_some() { " in a transaction" } else { " outside a transaction" }
                ));
                match op {
                    Op::Commit => {
                        self.sessions[s].txn = None;
                        self.stats.commit_failed += 1;
                    }
                    _ => {
                        if let Some(t) = &mut self.sessions[s].txn {
                            t.aborted = true;
                            let d = t.depth;
                            for c in Self::changes_of(op, tag, None) {
                                t.changes.push((d, Change::Attempt(Box::new(c))));
                            }
                        }
                    }
                }
                return text;
            }
            Ok(got) => got,
        };
        let text = got.text();
        let in_txn = self.sessions[s].txn.is_some();
        match op {
            Op::Begin(level) => {
                self.sessions[s].txn =
                    Some(Txn { level: *level, depth: 0, changes: Vec::new(), aborted: false, begun: tag });
            }
            Op::Savepoint => {
                if let Some(t) = &mut self.sessions[s].txn {
                    t.depth += 1;
                }
            }
            Op::Release => {
                if let Some(t) = &mut self.sessions[s].txn {
                    let d = t.depth;
                    for (cd, _) in &mut t.changes {
                        if *cd == d {
                            *cd = d - 1;
                        }
                    }
                    t.depth -= 1;
                }
            }
            Op::RollbackTo(d) => {
                self.stats.savepoint_rollbacks += 1;
                if let Some(t) = &mut self.sessions[s].txn {
                    t.changes.retain(|(cd, _)| cd < d);
                    t.depth = *d;
                    t.aborted = false;
                }
            }
            Op::Commit => {
                let aborted = self.sessions[s].txn.as_ref().is_some_and(|t| t.aborted);
                if aborted {
                    // PostgreSQL answers COMMIT of a failed transaction with a rollback.
                    self.sessions[s].txn = None;
                    self.stats.rolled_back += 1;
                    self.stats.rolled_back_aborted += 1;
                } else {
                    self.end_txn(s, true);
                }
            }
            Op::Rollback => {
                if self.sessions[s].txn.take().is_some_and(|t| t.aborted) {
                    self.stats.rolled_back_aborted += 1;
                }
                self.stats.rolled_back += 1;
            }
            _ => {
                // Checks of the outcome.
                match (op, &got) {
                    (Op::Append { expected: Some(v), .. }, _) if believed.is_some_and(|b| b != *v) => {
                        self.findings.push(format!(
                            "step {tag} (s{s} {}): accepted expected version {v}, but the stream's version was {}",
                            op.describe(),
                            believed.unwrap()
                        ));
                    }
                    (Op::Append { .. }, Got::Appended(_, ready)) => {
                        for (name, active) in ready {
                            if *active {
                                self.findings.push(format!(
                                    "step {tag} (s{s} {}): a poisoned event was appended while picky inline projection {name} was active (invariant 3)",
                                    op.describe()
                                ));
                            }
                        }
                    }
                    (Op::Read { spec }, Got::Read(r)) => self.check_read(s, tag, spec, r),
                    (Op::Skip { .. }, Got::Skipped { .. }) => self.stats.skipped += 1,
                    (Op::ReadStream { stream }, Got::Stream(evs)) => {
                        let b = self.believed(s, stream);
                        let level = self.sessions[s].txn.as_ref().map(|t| t.level).unwrap_or(Level::ReadCommitted);
                        let ordered = evs.iter().enumerate().all(|(k, e)| e.0 == k as i64 + 1)
                            && evs.windows(2).all(|w| w[0].1 < w[1].1);
                        let n = evs.len() as i64;
                        // READ COMMITTED sees every commit (the driver's) and its own appends; a
                        // snapshot of an older transaction may see fewer.
                        let count_ok = if level == Level::ReadCommitted || race { n == b || race } else { n <= b };
                        if !ordered || !count_ok {
                            self.findings.push(format!(
                                "step {tag} (s{s} read_stream {stream}): {n} events {evs:?}; the stream's version is {b} for this session"
                            ));
                        }
                    }
                    _ => {}
                }
                let mut changes = Self::changes_of(op, tag, believed);
                for c in &mut changes {
                    if let (Change::Rebuild { id, .. }, Got::Id(real)) = (c, &got) {
                        *id = *real;
                    }
                }
                if in_txn {
                    let t = self.sessions[s].txn.as_mut().unwrap();
                    let d = t.depth;
                    t.changes.extend(changes.into_iter().map(|c| (d, c)));
                } else {
                    self.ledger.commit(changes, &mut self.stats);
                    self.stats.autocommit_ok += 1;
                }
            }
        }
        text
    }

    /// A read that `ep_require_ready` let through: the model against the log of the same
    /// statement's snapshot.
    fn check_read(&mut self, s: usize, tag: usize, spec: &Spec, r: &ReadResult) {
        self.stats.reads_checked += 1;
        let applied: BTreeSet<i64> = r.applied.iter().copied().collect();
        let log: BTreeSet<i64> = r.log.iter().copied().collect();
        let what = format!("step {tag} (s{s} read {})", spec.name);
        // A transaction that registered the projection itself built its model with snapshots newer
        // than its own (REPEATABLE READ, SERIALIZABLE): the model may hold events committed after
        // the transaction's snapshot, which the same transaction cannot see in the log.
        let own_registration = self.sessions[s].txn.as_ref().is_some_and(|t| {
            t.level != Level::ReadCommitted
                && t.changes.iter().any(|(_, c)| matches!(c, Change::Register(p) if p.name == spec.name))
        });
        if spec.inline && own_registration {
            let missing: Vec<_> = log.difference(&applied).take(10).collect();
            if !missing.is_empty() {
                self.findings.push(format!(
                    "{what}: the model of a projection this transaction registered lacks events of its snapshot: {missing:?}"
                ));
            }
        } else if spec.inline {
            if applied != log {
                let missing: Vec<_> = log.difference(&applied).take(10).collect();
                let extra: Vec<_> = applied.difference(&log).take(10).collect();
                self.findings.push(format!(
                    "{what}: ep_require_ready let the read through, but the inline model differs from the log of the same snapshot: missing {missing:?}, extra {extra:?} ({} vs {} events)",
                    applied.len(),
                    log.len()
                ));
            }
        } else {
            let position = r.position.unwrap_or(0);
            let covered: BTreeSet<i64> = log.iter().copied().filter(|p| *p <= position).collect();
            let skipped: BTreeSet<i64> = r.skipped.iter().copied().collect();
            let extra: Vec<_> = applied.difference(&covered).take(10).collect();
            let missing: Vec<_> = covered.difference(&applied).filter(|p| !skipped.contains(p)).take(10).collect();
            if !extra.is_empty() || !missing.is_empty() {
                self.findings.push(format!(
                    "{what}: the async model differs from the log up to its checkpoint {position} in the same snapshot: missing {missing:?}, extra {extra:?}"
                ));
            }
        }
    }

    // --------------------------------------------------------------------------------------------
    // A whole history

    fn setup(&mut self) {
        checker_setup(&mut self.chk);
        let batch = format!("ALTER SYSTEM SET event_projections.batch_size = {}", self.cfg.batch_size);
        served::settings(
            &mut self.chk,
            &[
                &batch,
                "ALTER SYSTEM SET event_projections.max_attempts = 3",
                "ALTER SYSTEM SET event_projections.retry_backoff = '10ms'",
            ],
        );
        if self.carried {
            self.carry_over();
        } else {
            self.fresh_setup();
        }
    }

    /// A fresh extension: the handlers, and a log of `fill` events.
    fn fresh_setup(&mut self) {
        let c = &mut self.chk;
        c.batch_execute(SETUP_SQL).unwrap_or_else(|e| panic!("creating the handlers: {}", show(&e)));
        let o = self.base;
        if self.cfg.fill > 0 {
            c.batch_execute(&format!(
                "SELECT count(ep_append('s' || (j % {STREAMS}), (ARRAY['A','B','C','D'])[1 + j % 4], jsonb_build_object('o', {o}, 'k', j))) \
                 FROM generate_series(0, {}) j",
                self.cfg.fill - 1
            ))
            .unwrap_or_else(|e| panic!("filling the log: {}", show(&e)));
            // One commit; the events' (o, k) tags are (base, j).
            self.ledger.csn += 1;
            for j in 0..self.cfg.fill {
                let stream = format!("s{}", j % STREAMS);
                self.ledger.events.insert(
                    (o, j),
                    CommittedEvent {
                        stream: stream.clone(),
                        etype: TYPES[j % 4].into(),
                        poison: false,
                        csn: self.ledger.csn,
                    },
                );
                *self.ledger.versions.entry(stream).or_insert(0) += 1;
            }
            self.stats.events += self.cfg.fill as u64;
        }
        self.record(
            "-".into(),
            format!("setup: config {:?}", self.cfg),
            format!("fresh extension; log filled with {} events", self.cfg.fill),
            0,
        );
    }

    /// The log and the handlers of the previous history, its projections unregistered and their
    /// models dropped: the ledger starts from the log as it is.
    fn carry_over(&mut self) {
        let c = &mut self.chk;
        c.batch_execute(
            "SELECT ep_unregister_projection(name) FROM ep.projections;
             DO $$ DECLARE s text; BEGIN
               FOR s IN SELECT nspname FROM pg_namespace WHERE nspname LIKE 'w\\_h%' AND nspname <> 'w_hctl' LOOP
                 EXECUTE format('DROP SCHEMA %I CASCADE', s);
               END LOOP; END $$;",
        )
        .unwrap_or_else(|e| panic!("clearing the previous history's projections: {}", show(&e)));
        let rows = c
            .query("SELECT stream_id, event_type, data FROM ep.events", &[])
            .unwrap_or_else(|e| panic!("reading the log: {}", show(&e)));
        for r in &rows {
            let data: Value = r.get(2);
            let o = data.get("o").and_then(Value::as_u64).unwrap_or(u64::MAX) as usize;
            let k = data.get("k").and_then(Value::as_u64).unwrap_or(u64::MAX) as usize;
            let ev = CommittedEvent { stream: r.get(0), etype: r.get(1), poison: data.get("poison").is_some(), csn: 0 };
            *self.ledger.versions.entry(ev.stream.clone()).or_insert(0) += 1;
            self.ledger.events.insert((o, k), ev);
        }
        self.record(
            "-".into(),
            format!("setup: config {:?}", self.cfg),
            format!("carried over the previous history's log of {} events", rows.len()),
            0,
        );
    }

    fn run(&mut self) {
        self.setup();
        for i in 0..self.cfg.initial_projections {
            let d = Draw::take(&mut self.rng);
            let mut spec = self.new_spec(&d, 4);
            // At least one of each mode from the start.
            if i < 2 {
                spec.inline = i == 0;
            }
            self.step(Step::S(0, Op::Register { spec, precreate: false }));
        }
        for _ in 0..self.cfg.steps {
            let d = Draw::take(&mut self.rng);
            let st = self.generate(&d, self.base + self.recs.len() + 1);
            self.step(st);
            self.stats.steps += 1;
            if !self.findings.is_empty() {
                return;
            }
        }
        // End every open transaction.
        for s in 0..self.sessions.len() {
            let Some(t) = &self.sessions[s].txn else { continue };
            let op = if t.aborted || self.rng.next_u64() % 10 < 3 { Op::Rollback } else { Op::Commit };
            self.step(Step::S(s, op));
        }
        if self.findings.is_empty() {
            self.check_end();
        }
    }

    // --------------------------------------------------------------------------------------------
    // The end of a history

    fn chk_rows(&mut self, sql: &str) -> Vec<postgres::Row> {
        match self.chk.query(sql, &[]) {
            Ok(r) => r,
            Err(e) => {
                self.findings.push(format!("checker: {sql}: {}", show(&e)));
                Vec::new()
            }
        }
    }

    fn wait_rebuilds(&mut self) {
        for _ in 0..4 {
            let open = self.chk_rows(
                "SELECT r.id, r.projection, p.id IS NULL FROM ep.rebuilds r LEFT JOIN ep.projections p ON p.id = r.projection_id \
                 WHERE r.status IN ('queued', 'running') ORDER BY r.id",
            );
            let mut waited = false;
            for row in open {
                let (id, name, orphan): (i64, String, bool) = (row.get(0), row.get(1), row.get(2));
                if orphan {
                    let f = format!("rebuild {id} of projection {name}, which is not registered, stays open (ep_rebuild_wait({id}) never returns)");
                    if !self.findings.contains(&f) {
                        self.findings.push(f);
                    }
                    continue;
                }
                waited = true;
                let t = Instant::now();
                match self.chk.query_one("SELECT ep_rebuild_wait($1, '120 s')", &[&id]) {
                    Ok(r) => {
                        let st: String = r.get(0);
                        self.note(format!("rebuild {id} of {name}: {st} after waiting {} ms", t.elapsed().as_millis()));
                    }
                    Err(e) => self.findings.push(format!("waiting for rebuild {id} of {name}: {}", show(&e))),
                }
            }
            if !waited {
                return;
            }
        }
    }

    fn check_end(&mut self) {
        let t0 = Instant::now();
        // 1. Every rebuild ends.
        self.wait_rebuilds();
        // Failures during the history, before the recovery below clears them.
        for row in self.chk_rows("SELECT name, status, last_error FROM ep.projections WHERE last_error IS NOT NULL") {
            let (name, status, err): (String, String, String) = (row.get(0), row.get(1), row.get(2));
            if !err.contains("poisoned event") {
                self.findings.push(format!(
                    "projection {name} ({status}) failed with something else than a poisoned event: {err}"
                ));
            } else {
                self.note(format!("projection {name} was {status} on: {err}"));
            }
        }
        for row in
            self.chk_rows("SELECT id, projection, strategy, status, coalesce(error, '') FROM ep.rebuilds ORDER BY id")
        {
            let (id, name, strategy, status, err): (i64, String, String, String, String) =
                (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
            *self.stats.rebuilds.entry(status.clone()).or_default() += 1;
            if status == "failed" && !err.contains("poisoned event") {
                self.findings.push(format!(
                    "rebuild {id} of {name} ({strategy}) failed with something else than a poisoned event: {err}"
                ));
            }
        }
        // 2. Recovery: cure the poison, retry what failed, rebuild what is stale.
        if let Err(e) = self.chk.batch_execute(
            "INSERT INTO w_hctl.cured SELECT global_position FROM ep.events WHERE data->>'poison' = 'true' ON CONFLICT DO NOTHING",
        ) {
            self.findings.push(format!("curing: {}", show(&e)));
        }
        let rows = self.chk_rows(
            "SELECT p.name, p.mode, p.status, \
                    (SELECT r.status || ' ' || r.strategy FROM ep.rebuilds r WHERE r.projection_id = p.id ORDER BY r.id DESC LIMIT 1) \
             FROM ep.projections p ORDER BY p.id",
        );
        let mut rebuild_again = Vec::new();
        for row in rows {
            let (name, mode, status, last): (String, String, String, Option<String>) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            match (mode.as_str(), status.as_str()) {
                ("async", "failed") => {
                    if let Err(e) = self.chk.execute("SELECT ep_retry_projection($1)", &[&name]) {
                        self.findings.push(format!("retrying {name}: {}", show(&e)));
                    }
                    self.note(format!("{name} was failed: retried"));
                }
                ("inline", "stale") => {
                    self.note(format!("{name} was stale (last rebuild: {last:?}): rebuilt in place"));
                    rebuild_again.push(name);
                }
                ("async", "rebuilding") => {
                    self.findings.push(format!(
                        "async projection {name} stays 'rebuilding' with no rebuild open (its last rebuild: {}): ep_wait_for never returns true and ep_require_ready always fails",
                        last.unwrap_or_default()
                    ));
                    rebuild_again.push(name);
                }
                (_, "active") => {}
                _ => self.findings.push(format!("projection {name} ({mode}) is {status} once every rebuild ended")),
            }
        }
        for name in rebuild_again {
            // Queued in a statement of its own: the worker sees it once that commits.
            let waited = self
                .chk
                .query_one("SELECT ep_rebuild($1, 'in_place')", &[&name])
                .and_then(|r| self.chk.query_one("SELECT ep_rebuild_wait($1, '120 s')", &[&r.get::<_, i64>(0)]));
            match waited {
                Ok(r) if r.get::<_, String>(0) == "done" => {}
                Ok(r) => self
                    .findings
                    .push(format!("the rebuild of {name} after the history ended {}", r.get::<_, String>(0))),
                Err(e) => self.findings.push(format!("rebuilding {name} after the history: {}", show(&e))),
            }
        }
        // 3. Every async projection catches up to the head; every projection is active.
        let head: i64 = self
            .chk
            .query_one("SELECT coalesce(max(global_position), 0) FROM ep.events", &[])
            .map(|r| r.get(0))
            .unwrap_or(0);
        let asyncs: Vec<String> = self
            .chk_rows("SELECT name FROM ep.projections WHERE mode = 'async' ORDER BY id")
            .iter()
            .map(|r| r.get(0))
            .collect();
        for name in asyncs {
            // A delivery attempt that began before the cure committed can still fail and stop the
            // projection after it: retry then (at most a few times).
            for attempt in 0.. {
                match self.chk.query_one("SELECT ep_wait_for($1, $2, '60 s')", &[&name, &head]) {
                    Ok(r) if r.get::<_, bool>(0) => break,
                    Ok(_) => {
                        let (status, st) = self
                            .chk
                            .query_one(
                                "SELECT status, status || ' at ' || position || coalesce(' failing on ' || failing_position || ': ' || last_error, '') \
                                 FROM ep.projections WHERE name = $1",
                                &[&name],
                            )
                            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                            .unwrap_or_default();
                        if status == "failed" && attempt < 3 {
                            self.note(format!("{name} stopped again after the cure ({st}): retried"));
                            if let Err(e) = self.chk.execute("SELECT ep_retry_projection($1)", &[&name]) {
                                self.findings.push(format!("retrying {name}: {}", show(&e)));
                                break;
                            }
                            continue;
                        }
                        self.findings.push(format!("async projection {name} did not reach the head {head}: {st}"));
                        break;
                    }
                    Err(e) => {
                        self.findings.push(format!("ep_wait_for({name}): {}", show(&e)));
                        break;
                    }
                }
            }
        }
        for row in self.chk_rows("SELECT name, status, coalesce(last_error, '') FROM ep.projections WHERE status <> 'active' OR last_error IS NOT NULL") {
            let (name, status, err): (String, String, String) = (row.get(0), row.get(1), row.get(2));
            self.findings.push(format!("projection {name} is {status} after the recovery {err}"));
        }
        self.note(format!("quiesced in {} ms (head {head})", t0.elapsed().as_millis()));
        // 4. The log.
        let log = {
            let chk = &mut self.chk;
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check_log(chk))) {
                Ok(l) => l,
                Err(p) => {
                    self.findings.push(format!("check_log: {}", panic_message(&*p)));
                    read_log(&mut self.chk)
                }
            }
        };
        self.check_log_against_ledger(&log);
        // 5. The registry.
        self.check_registry();
        // 6. The models.
        self.check_models(&log);
        // 7. What the server logged.
        self.check_server_log();
    }

    fn check_log_against_ledger(&mut self, log: &[Event]) {
        let mut seen: BTreeMap<(usize, usize), &Event> = BTreeMap::new();
        for e in log {
            let o = e.data.get("o").and_then(Value::as_u64);
            let k = e.data.get("k").and_then(Value::as_u64);
            let (Some(o), Some(k)) = (o, k) else {
                self.findings.push(format!("an event the tester did not append: {e:?}"));
                continue;
            };
            if seen.insert((o as usize, k as usize), e).is_some() {
                self.findings.push(format!("event o={o} k={k} is in the log twice"));
            }
        }
        for (key, c) in &self.ledger.events {
            match seen.get(key) {
                None => self.findings.push(format!(
                    "event o={} k={} ({} {}) committed (transaction {} in commit order) but is not in the log",
                    key.0, key.1, c.stream, c.etype, c.csn
                )),
                Some(e) => {
                    let poison = e.data.get("poison").is_some();
                    if e.stream_id != c.stream || e.event_type != c.etype || poison != c.poison {
                        self.findings.push(format!(
                            "event o={} k={} is {e:?} in the log; the tester appended {c:?}",
                            key.0, key.1
                        ));
                    }
                }
            }
        }
        for (key, e) in &seen {
            if !self.ledger.events.contains_key(key) {
                self.findings.push(format!(
                    "event o={} k={} at {} is in the log, but its transaction did not commit (rolled back, failed or lost in a crash): {e:?}",
                    key.0, key.1, e.global_position
                ));
            }
        }
        // Each append's events: consecutive in their stream, from the version it was decided on.
        for a in &self.ledger.appends {
            let evs: Vec<&&Event> = (0..a.n).filter_map(|k| seen.get(&(a.op, k))).collect();
            if evs.len() != a.n {
                continue; // reported above
            }
            let first = evs[0].stream_position;
            if let Some(b) = a.believed {
                if first != b + 1 {
                    self.findings.push(format!(
                        "the append of step {} to {} was made at version {b}, but its first event has stream position {first}",
                        a.op, a.stream
                    ));
                }
            }
            for (k, e) in evs.iter().enumerate() {
                if e.stream_position != first + k as i64 || (k > 0 && e.global_position <= evs[k - 1].global_position) {
                    self.findings
                        .push(format!("the events of the append of step {} are not consecutive: {evs:?}", a.op));
                    break;
                }
            }
        }
    }

    fn check_registry(&mut self) {
        let rows = self.chk_rows(
            "SELECT name, mode, handler::text, batch, event_types, read_model_schema FROM ep.projections ORDER BY name",
        );
        let mut actual = BTreeSet::new();
        for row in rows {
            let (name, mode, handler, batch, types, schema): (
                String,
                String,
                String,
                bool,
                Option<Vec<String>>,
                Option<String>,
            ) = (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4), row.get(5));
            actual.insert(name.clone());
            let Some(spec) = self.ledger.registry.get(&name).cloned() else {
                self.findings.push(format!("projection {name} is registered, but no registration of it committed"));
                continue;
            };
            let allowed = self.ledger.handlers.get(&name).cloned().unwrap_or_default();
            let h = HANDLERS.iter().position(|h| h.regprocedure == handler);
            if mode != spec.mode() || types != spec.types || schema.as_deref() != Some(&spec.schema) {
                self.findings.push(format!(
                    "projection {name} is registered as {mode} {types:?} {schema:?}; the tester registered {}",
                    spec.describe()
                ));
            }
            match h {
                Some(h) if allowed.contains(&h) && HANDLERS[h].batch == batch => {}
                _ => self
                    .findings
                    .push(format!("projection {name} has handler {handler} (batch {batch}); allowed: {allowed:?}")),
            }
        }
        for name in self.ledger.registry.keys() {
            if !actual.contains(name) {
                self.findings.push(format!("projection {name} was registered (committed) but is not in the registry"));
            }
        }
    }

    fn read_model(&mut self, schema: &str) -> Option<(Applied, BTreeMap<String, i64>)> {
        let exists: bool = self
            .chk
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&format!("{schema}.applied")])
            .map(|r| r.get(0))
            .unwrap_or(false);
        if !exists {
            return None;
        }
        let applied = self
            .chk_rows(&format!("SELECT global_position, stream_id, stream_position FROM {schema}.applied"))
            .iter()
            .map(|r| (r.get::<_, i64>(0), (r.get::<_, String>(1), r.get::<_, i64>(2))))
            .collect();
        let heads = self
            .chk_rows(&format!("SELECT stream_id, last FROM {schema}.heads"))
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        Some((applied, heads))
    }

    fn check_models(&mut self, log: &[Event]) {
        let skipped: BTreeMap<String, BTreeSet<i64>> = {
            let mut m: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
            for r in self.chk_rows("SELECT projection, global_position FROM ep.skipped_events") {
                m.entry(r.get(0)).or_default().insert(r.get(1));
            }
            m
        };
        let csn_of = |e: &Event, ledger: &Ledger| -> u64 {
            let o = e.data.get("o").and_then(Value::as_u64).unwrap_or(0) as usize;
            let k = e.data.get("k").and_then(Value::as_u64).unwrap_or(0) as usize;
            ledger.events.get(&(o, k)).map(|c| c.csn).unwrap_or(u64::MAX)
        };
        let specs: Vec<Spec> = self.ledger.registry.values().cloned().collect();
        for spec in specs {
            let Some((applied, heads)) = self.read_model(&spec.schema) else {
                self.findings.push(format!("the model of {} ({}) does not exist", spec.name, spec.schema));
                continue;
            };
            let expected: BTreeMap<i64, (String, i64)> = log
                .iter()
                .filter(|e| spec.subscribes(&e.event_type))
                .map(|e| (e.global_position, (e.stream_id.clone(), e.stream_position)))
                .collect();
            let skips = skipped.get(&spec.name).cloned().unwrap_or_default();
            let missing: Vec<i64> = expected
                .keys()
                .filter(|p| !applied.contains_key(p) && (spec.inline || !skips.contains(p)))
                .copied()
                .collect();
            let extra: Vec<i64> = applied.keys().filter(|p| !expected.contains_key(p)).copied().collect();
            let wrong: Vec<i64> =
                applied.iter().filter(|(p, v)| expected.get(p).is_some_and(|x| x != *v)).map(|(p, _)| *p).collect();
            if !missing.is_empty() || !extra.is_empty() || !wrong.is_empty() {
                self.findings.push(format!(
                    "the model of {} differs from a replay of the log ({} events of its types, {} in the model, {} skipped): missing {:?}, not in the log {:?}, wrong {:?}",
                    spec.describe(),
                    expected.len(),
                    applied.len(),
                    skips.len(),
                    &missing[..missing.len().min(20)],
                    &extra[..extra.len().min(20)],
                    &wrong[..wrong.len().min(20)]
                ));
            }
            self.check_heads(&spec.name, &applied, &heads);
        }
        // Unregistered projections received nothing that committed after the unregistration.
        let gone: Vec<(Spec, u64, bool)> = self.ledger.unregistered.clone();
        for (spec, csn, dropped) in gone {
            if dropped {
                continue;
            }
            let Some((applied, _)) = self.read_model(&spec.schema) else { continue };
            let late: Vec<i64> = log
                .iter()
                .filter(|e| applied.contains_key(&e.global_position) && csn_of(e, &self.ledger) > csn)
                .map(|e| e.global_position)
                .collect();
            let unknown: Vec<i64> =
                applied.keys().filter(|p| !log.iter().any(|e| e.global_position == **p)).copied().collect();
            if !late.is_empty() || !unknown.is_empty() {
                self.findings.push(format!(
                    "unregistered projection {} received events that committed after its unregistration {late:?}, or that are not in the log {unknown:?}",
                    spec.describe()
                ));
            }
        }
        // A registration that never committed received nothing.
        let ghosts: Vec<Spec> = self
            .ledger
            .precreated
            .values()
            .filter(|p| {
                !self.ledger.registry.contains_key(&p.name)
                    && !self.ledger.unregistered.iter().any(|u| u.0.name == p.name)
            })
            .cloned()
            .collect();
        for g in ghosts {
            if let Some((applied, _)) = self.read_model(&g.schema) {
                if !applied.is_empty() {
                    self.findings.push(format!(
                        "the handler of {}, whose registration never committed, received {} events",
                        g.describe(),
                        applied.len()
                    ));
                }
            }
        }
        // A blue-green rebuild that ended without switching dropped its copy.
        for r in self.chk_rows(
            "SELECT id, projection, build_schema FROM ep.rebuilds WHERE strategy = 'blue_green' AND status IN ('cancelled', 'failed') \
             AND build_schema IS NOT NULL AND EXISTS (SELECT FROM pg_namespace WHERE nspname = build_schema)",
        ) {
            let (id, name, schema): (i64, String, String) = (r.get(0), r.get(1), r.get(2));
            self.findings.push(format!("blue-green rebuild {id} of {name} ended without switching, but its copy {schema} is still there"));
        }
    }

    fn check_heads(&mut self, name: &str, applied: &BTreeMap<i64, (String, i64)>, heads: &BTreeMap<String, i64>) {
        let mut derived: BTreeMap<String, i64> = BTreeMap::new();
        for (stream, position) in applied.values() {
            let h = derived.entry(stream.clone()).or_insert(0);
            *h = (*h).max(*position);
        }
        if &derived != heads {
            self.findings
                .push(format!("the heads of {name}'s model do not agree with its events: {heads:?} vs {derived:?}"));
        }
    }

    fn check_server_log(&mut self) {
        let Some((path, offset)) = self.log.clone() else {
            self.note("server log not readable: not checked".into());
            return;
        };
        let Ok(bytes) = std::fs::read(&path) else { return };
        let text = String::from_utf8_lossy(&bytes[(offset as usize).min(bytes.len())..]).into_owned();
        let mut poisoned = 0;
        for line in text.lines() {
            if line.contains("WARNING:  event_projections: projection") {
                if line.contains("poisoned event") {
                    poisoned += 1;
                } else if !line.contains("deadlock detected") {
                    self.findings.push(format!("a worker logged a failure: {line}"));
                }
            }
            if line.contains("terminated by signal") && !line.contains("signal 9") {
                self.findings.push(format!("a server process died: {line}"));
            }
            if line.contains("PANIC:") || line.contains("TRAP:") {
                self.findings.push(format!("the server logged: {line}"));
            }
        }
        self.note(format!("server log: {poisoned} worker failures on poisoned events"));
    }

    // --------------------------------------------------------------------------------------------
    // Reporting

    fn state_dump(&mut self) -> String {
        let mut s = String::new();
        for sql in [
            "SELECT name, mode, status, handler::text, event_types, read_model_schema, position, attempts, failing_position, last_error FROM ep.projections ORDER BY id",
            "SELECT id, projection, strategy, status, phase, checkpoint, target_position, cancel_requested, attempts, error FROM ep.rebuilds ORDER BY id",
            "SELECT projection, global_position, error FROM ep.skipped_events ORDER BY 1, 2",
        ] {
            writeln!(s, "  {sql}").unwrap();
            match self.chk.simple_query(sql) {
                Ok(msgs) => {
                    for m in msgs {
                        if let postgres::SimpleQueryMessage::Row(r) = m {
                            let cols: Vec<&str> = (0..r.len()).map(|i| r.get(i).unwrap_or("NULL")).collect();
                            writeln!(s, "    {}", cols.join(" | ")).unwrap();
                        }
                    }
                }
                Err(e) => writeln!(s, "    ({})", show(&e)).unwrap(),
            }
        }
        s
    }

    fn failure_report(&mut self, test: &str, findings: &str) -> String {
        let mut s = String::new();
        writeln!(s, "\n==== {test}: a history failed: EP_SEED={}", self.seed).unwrap();
        writeln!(s, "replay: {}", self.replay).unwrap();
        writeln!(s, "config: {:?}", self.cfg).unwrap();
        writeln!(s, "findings:").unwrap();
        for f in findings.lines() {
            writeln!(s, "  - {f}").unwrap();
        }
        writeln!(s, "history ({} steps):", self.recs.len()).unwrap();
        for r in &self.recs {
            writeln!(s, "  {:>4} {:<8} {:<64} -> {} ({} ms)", r.idx, r.who, r.what, r.out, r.ms).unwrap();
        }
        writeln!(s, "open transactions at the end:").unwrap();
        for (i, sess) in self.sessions.iter().enumerate() {
            if let Some(t) = &sess.txn {
                writeln!(
                    s,
                    "  s{i}: {} since step {}, savepoint depth {}, aborted {}, {} changes",
                    t.level.short(),
                    t.begun,
                    t.depth,
                    t.aborted,
                    t.changes.len()
                )
                .unwrap();
            }
        }
        writeln!(s, "notes:").unwrap();
        for n in &self.notes {
            writeln!(s, "  {n}").unwrap();
        }
        writeln!(s, "state of the extension:").unwrap();
        if self.chk.is_closed() {
            self.chk = served::reconnect();
        }
        let dump = self.state_dump();
        s.push_str(&dump);
        writeln!(s, "==== replay: {}", self.replay).unwrap();
        s
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into())
}

/// Resets the settings the histories change, also when a test fails.
struct SettingsGuard;
impl Drop for SettingsGuard {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&conninfo(&served::served_db()), postgres::NoTls) {
            for sql in [
                "ALTER SYSTEM RESET event_projections.batch_size",
                "ALTER SYSTEM RESET event_projections.max_attempts",
                "ALTER SYSTEM RESET event_projections.retry_backoff",
                "SELECT pg_reload_conf()",
            ] {
                let _ = c.batch_execute(sql);
            }
        }
    }
}

/// Runs histories as `plan` says, each in a freshly created extension in the served database, and
/// returns the figures. A failing history panics after printing everything needed to replay it.
pub fn run(test: &str, plan: &Plan) -> Stats {
    let master = seed(test);
    let started = Instant::now();
    let _reset = SettingsGuard;
    let mut clients: Vec<Client> = Vec::new();
    let mut total = Stats::default();
    let mut last_report = Instant::now();
    let mut round = Stats::default();
    // The served database's turn and the checker's connection, kept while histories carry over.
    let mut epoch: Option<(Served, Client)> = None;
    let mut i = 0;
    loop {
        if plan.histories.is_some_and(|n| i >= n) || plan.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        if plan.budget.is_some_and(|b| i > 0 && started.elapsed() >= b) {
            eprintln!("{test}: time budget of {:?} reached after {i} histories", plan.budget.unwrap());
            break;
        }
        let hseed = history_seed(master, i);
        let cfg = Config::for_seed(hseed, plan);
        let t = Instant::now();
        let carried = plan.carry_over
            && epoch.as_mut().is_some_and(|(_, c)| {
                c.query_one("SELECT count(*) FROM ep.events", &[])
                    .map(|r| r.get::<_, i64>(0) <= plan.log_limit)
                    .unwrap_or(false)
            });
        if !carried {
            drop(epoch.take()); // releases the turn before taking it again
            epoch = Some(Served::fresh());
        }
        let (served, chk) = epoch.take().unwrap();
        let replay = if plan.carry_over {
            format!(
                "EP_SEED={master} EP_HISTORIES={} cargo test --release --test histories {test} -- --ignored --nocapture (this history #{i} ran on the log the earlier ones left{})",
                i + 1,
                if carried { "" } else { ": it started a fresh extension" }
            )
        } else {
            format!("EP_SEED={hseed} EP_HISTORIES=1 cargo test --release --test histories {test} -- --nocapture")
        };
        let mut h = History::new(hseed, cfg, chk, &mut clients, i, plan.carry_over, carried, replay);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.run()));
        let failure = match result {
            Ok(()) if h.findings.is_empty() => None,
            Ok(()) => Some(h.findings.join("\n")),
            Err(p) => Some(format!("panic: {}", panic_message(&*p))),
        };
        if let Some(f) = failure {
            let report = h.failure_report(test, &f);
            eprintln!("{report}");
            if let Ok(dir) = std::env::var("EP_HISTORY_FAILURES") {
                let _ = std::fs::create_dir_all(&dir);
                let _ = std::fs::write(format!("{dir}/history-{}.txt", h.seed), &report);
            }
            panic!("{test}: history {i} failed (EP_SEED={}): {}", h.seed, f.lines().next().unwrap_or_default());
        }
        if std::env::var("EP_HISTORY_PRINT").is_ok_and(|v| v == "1") {
            eprintln!("{}", h.failure_report(test, "(none: printed because EP_HISTORY_PRINT=1)"));
        }
        h.stats.histories = 1;
        h.stats.seconds = t.elapsed().as_secs_f64();
        eprintln!(
            "{test}: history {i} EP_SEED={hseed}: {} sessions, {} steps, {} operations, {} events committed, {} crashes, {:.1} s{}",
            h.cfg.sessions,
            h.stats.steps,
            h.stats.operations,
            h.stats.events,
            h.stats.kills + h.stats.restarts,
            h.stats.seconds,
            if carried { " (log carried over)" } else { "" }
        );
        h.give_back(&mut clients);
        total.add(&h.stats);
        round.add(&h.stats);
        epoch = Some((served, h.chk));
        i += 1;
        if let Some(every) = plan.report_every {
            if last_report.elapsed() >= every {
                eprintln!(
                    "{test}: round at {:.0} s: {} histories, {} operations this round; {} histories, {} operations in all",
                    started.elapsed().as_secs_f64(),
                    round.histories,
                    round.operations,
                    total.histories,
                    total.operations
                );
                round = Stats::default();
                last_report = Instant::now();
            }
        }
    }
    eprintln!("{}", total.report(test, started.elapsed()));
    total
}
