//! The event log: appends (DESIGN.md, section 2, steps A1..A11) and the guard that keeps
//! `ep.events` append-only.

use crate::handoff::inflight;
use crate::handoff::{self, CrossedHandoff, Mode};
use crate::pg::catalog::{self, Catalog};
use crate::pg::error::{raise, required, required_text, ArgError, SqlError};
use crate::pg::spi::{self, Snap, Stmt};
use crate::pg::types::RawJsonb;
use crate::registry::{self, Projection};
use pgrx::pg_sys;
use pgrx::prelude::*;

/// One event to append, as SQL gave it.
pub struct NewEvent {
    pub event_type: String,
    pub data: pg_sys::Datum,
    pub metadata: Option<pg_sys::Datum>,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(transparent)]
    Arg(#[from] ArgError),
    #[error("wrong expected version for stream \"{stream}\": expected {expected}, actual {actual}")]
    WrongExpectedVersion { stream: String, expected: i64, actual: i64 },
}

impl SqlError for LogError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            LogError::Arg(e) => e.sqlstate(),
            // A lost optimistic-concurrency race: re-read the stream and retry, as for any
            // serialization failure.
            LogError::WrongExpectedVersion { .. } => PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
        }
    }
    fn detail(&self) -> Option<String> {
        match self {
            LogError::WrongExpectedVersion { expected: 0, .. } => {
                Some("expected_version 0 means the stream must not exist yet.".into())
            }
            LogError::WrongExpectedVersion { .. } => {
                Some("Another writer appended to the stream since its version was read; nothing was written.".into())
            }
            _ => None,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            LogError::WrongExpectedVersion { .. } => {
                Some("Read the stream again, decide again, and retry with the new version (or pass NULL to append at any version).".into())
            }
            _ => None,
        }
    }
}

thread_local! {
    /// True only while our own INSERT into ep.events runs: the guard trigger lets exactly that through.
    static APPENDING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Sets APPENDING for its lifetime; an error unwinds through it and clears the flag.
struct Appending;
impl Appending {
    fn start() -> Self {
        APPENDING.with(|a| a.set(true));
        Appending
    }
}
impl Drop for Appending {
    fn drop(&mut self) {
        APPENDING.with(|a| a.set(false));
    }
}

static UPSERT_STREAM: Stmt = Stmt {
    sql: "INSERT INTO ep.streams AS s (stream_id, version) VALUES ($1, $2) \
          ON CONFLICT (stream_id) DO UPDATE SET version = s.version + $2 RETURNING version",
    types: &[pg_sys::TEXTOID, pg_sys::INT8OID],
};

/// The insert of one event, returning the row as the `ep.events` value handlers get (A10), or
/// returning nothing when no handler will run (building the value costs a copy of the row).
static INSERT_ONE: [Stmt; 2] = [
    Stmt {
        sql: "INSERT INTO ep.events AS e (global_position, stream_id, stream_position, event_type, data, metadata) \
              VALUES ($1, $2, $3, $4, $5, $6)",
        types: &[
            pg_sys::INT8OID,
            pg_sys::TEXTOID,
            pg_sys::INT8OID,
            pg_sys::TEXTOID,
            pg_sys::JSONBOID,
            pg_sys::JSONBOID,
        ],
    },
    Stmt {
        sql: "INSERT INTO ep.events AS e (global_position, stream_id, stream_position, event_type, data, metadata) \
              VALUES ($1, $2, $3, $4, $5, $6) RETURNING e",
        types: &[
            pg_sys::INT8OID,
            pg_sys::TEXTOID,
            pg_sys::INT8OID,
            pg_sys::TEXTOID,
            pg_sys::JSONBOID,
            pg_sys::JSONBOID,
        ],
    },
];

const INSERT_MANY_TYPES: &[pg_sys::Oid] = &[
    pg_sys::INT8ARRAYOID,
    pg_sys::TEXTOID,
    pg_sys::INT8OID,
    pg_sys::TEXTARRAYOID,
    pg_sys::JSONBARRAYOID,
    pg_sys::JSONBARRAYOID,
];

/// The insert of several events, as `INSERT_ONE`.
static INSERT_MANY: [Stmt; 2] = [
    Stmt {
        sql: "INSERT INTO ep.events AS e (global_position, stream_id, stream_position, event_type, data, metadata) \
              SELECT u.p, $2, $3 + u.o, u.t, u.d, u.m \
              FROM unnest($1::bigint[], $4::text[], $5::jsonb[], $6::jsonb[]) WITH ORDINALITY AS u(p, t, d, m, o)",
        types: INSERT_MANY_TYPES,
    },
    Stmt {
        sql: "INSERT INTO ep.events AS e (global_position, stream_id, stream_position, event_type, data, metadata) \
              SELECT u.p, $2, $3 + u.o, u.t, u.d, u.m \
              FROM unnest($1::bigint[], $4::text[], $5::jsonb[], $6::jsonb[]) WITH ORDINALITY AS u(p, t, d, m, o) \
              RETURNING e",
        types: INSERT_MANY_TYPES,
    },
];

fn next_position(cat: &Catalog) -> i64 {
    // SAFETY: nextval_oid with the OID of our sequence, which exists (the catalog was looked up).
    unsafe {
        pgrx::direct_function_call::<i64>(pg_sys::nextval_oid, &[cat.position_seq.into_datum()])
            .expect("nextval never returns NULL")
    }
}

/// `ep_append`: one event.
pub fn append_one(
    stream: Option<&str>,
    event_type: Option<&str>,
    data: Option<RawJsonb>,
    metadata: Option<RawJsonb>,
    expected: Option<i64>,
) -> Result<i64, LogError> {
    let stream = required_text(stream, "stream_id")?;
    let event_type = required_text(event_type, "event_type")?;
    let data = required(data, "data")?;
    let ev = NewEvent { event_type: event_type.into(), data: data.0, metadata: metadata.map(|m| m.0) };
    append(stream, &[ev], expected)
}

static ELEMENTS: Stmt = Stmt {
    sql: "SELECT a.o, pg_catalog.jsonb_typeof(a.e), pg_catalog.jsonb_typeof(a.e -> 'type'), a.e ->> 'type', a.e -> 'data', \
                 CASE WHEN pg_catalog.jsonb_typeof(a.e -> 'metadata') = 'null' THEN NULL ELSE a.e -> 'metadata' END \
          FROM pg_catalog.jsonb_array_elements($1) WITH ORDINALITY AS a(e, o) ORDER BY a.o",
    types: &[pg_sys::JSONBOID],
};

static TYPEOF: Stmt = Stmt { sql: "SELECT pg_catalog.jsonb_typeof($1)", types: &[pg_sys::JSONBOID] };

/// `ep_append_events`: a JSON array of `{"type", "data", "metadata"}`, all or nothing.
pub fn append_many(stream: Option<&str>, events: Option<RawJsonb>, expected: Option<i64>) -> Result<i64, LogError> {
    let stream = required_text(stream, "stream_id")?;
    let events = required(events, "events")?;
    let invalid = |problem: String| LogError::Arg(ArgError::Invalid { arg: "events", problem });
    // SAFETY: a plain read of the current memory context.
    let cxt = unsafe { pg_sys::CurrentMemoryContext };
    let parsed: Result<Vec<NewEvent>, LogError> = Spi::connect(|client| {
        let top: Option<String> = spi::exec(client, &TYPEOF, &[Some(events.0)], Snap::Fresh, 0).get(0, 1);
        if top.as_deref() != Some("array") {
            return Err(invalid(format!("expected a JSON array, got {}", top.unwrap_or_default())));
        }
        let rows = spi::exec(client, &ELEMENTS, &[Some(events.0)], Snap::Fresh, 0);
        if rows.is_empty() {
            return Err(invalid("the array is empty".into()));
        }
        let mut out = Vec::with_capacity(rows.len());
        for i in 0..rows.len() {
            let n: i64 = rows.get(i, 1).unwrap_or(0);
            if rows.get::<String>(i, 2).as_deref() != Some("object") {
                return Err(invalid(format!("element {n} is not an object")));
            }
            if rows.get::<String>(i, 3).as_deref() != Some("string") {
                return Err(invalid(format!("element {n} has no \"type\" string")));
            }
            let event_type: String = rows.get(i, 4).unwrap_or_default();
            if event_type.is_empty() {
                return Err(invalid(format!("element {n} has an empty \"type\"")));
            }
            let Some(data) = rows.datum_in(i, 5, cxt) else {
                return Err(invalid(format!("element {n} has no \"data\"")));
            };
            out.push(NewEvent { event_type, data, metadata: rows.datum_in(i, 6, cxt) });
        }
        Ok(out)
    });
    append(stream, &parsed?, expected)
}

fn check_expected(expected: Option<i64>) -> Result<(), ArgError> {
    match expected {
        Some(v) if v < 0 => Err(ArgError::Invalid {
            arg: "expected_version",
            problem: format!("{v} (expected NULL for any version, 0 for a new stream, or the stream's version)"),
        }),
        _ => Ok(()),
    }
}

/// A2..A11 for validated input. Returns the global position of the last event.
fn append(stream: &str, events: &[NewEvent], expected: Option<i64>) -> Result<i64, LogError> {
    check_expected(expected)?;
    let cat = catalog::require();
    let mut types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    types.sort_unstable();
    types.dedup();

    // A2..A5: the registry lock, the subscribed inline projections, their locks, their status.
    handoff::lock(handoff::REGISTRY, Mode::Shared);
    let (mut view, epoch) = registry::view_for_appends(&cat);
    if view.projections.iter().any(|p| registry::async_subscriber(p, &types)) {
        inflight::wake_at_commit();
    }
    let subscribed = |p: &&Projection| registry::inline_subscriber(p, &types);
    if view.projections.iter().any(|p| subscribed(&p)) {
        for p in view.projections.iter().filter(subscribed) {
            handoff::lock(p.id as u32, Mode::Shared);
        }
        // A5: read again unless no change committed since the view was read (same epoch). The set
        // of projections cannot change while we hold the registry lock; their status can.
        let (again, now) = registry::view_for_appends(&cat);
        if now.is_none() || now != epoch {
            view = again;
        }
    }
    let projections: Vec<&Projection> = view.projections.iter().filter(subscribed).filter(|p| p.is_active()).collect();
    // A6: a handler must not run on a snapshot that cannot see the hand-off it crossed.
    if handoff::uses_transaction_snapshot() {
        let latest: Vec<(i32, i64, &str)> = projections.iter().map(|p| (p.id, p.generation, p.name.as_str())).collect();
        if let Some(name) = handoff::first_crossed(&latest) {
            raise(&CrossedHandoff { projection: name.into() });
        }
    }

    let n = events.len() as i64;
    let returning = usize::from(!projections.is_empty());
    // SAFETY: a plain read of the current memory context.
    let cxt = unsafe { pg_sys::CurrentMemoryContext };
    let written: Result<(Vec<pg_sys::Datum>, Vec<i64>), LogError> = catalog::privileged(&cat, || {
        Spi::connect(|client| {
            // A7: the stream row lock, then the expected version, before any position is taken.
            let version: i64 = spi::exec(client, &UPSERT_STREAM, &[spi::text(stream), spi::int8(n)], Snap::Fresh, 0)
                .get(0, 1)
                .unwrap_or(n);
            let before = version - n;
            if let Some(exp) = expected {
                if exp != before {
                    return Err(LogError::WrongExpectedVersion {
                        stream: stream.into(),
                        expected: exp,
                        actual: before,
                    });
                }
            }
            // A8: announce, take the positions, publish the smallest.
            inflight::begin_allocation();
            let positions: Vec<i64> = (0..n).map(|_| next_position(&cat)).collect();
            inflight::end_allocation(positions[0]);
            // A9.
            let appending = Appending::start();
            let rows = if events.len() == 1 {
                let e = &events[0];
                spi::exec(
                    client,
                    &INSERT_ONE[returning],
                    &[
                        spi::int8(positions[0]),
                        spi::text(stream),
                        spi::int8(before + 1),
                        spi::text(&e.event_type),
                        Some(e.data),
                        e.metadata,
                    ],
                    Snap::Fresh,
                    0,
                )
            } else {
                let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
                let data: Vec<pg_sys::Datum> = events.iter().map(|e| e.data).collect();
                let meta = metadata_array(events);
                spi::exec(
                    client,
                    &INSERT_MANY[returning],
                    &[
                        positions.clone().into_datum(),
                        spi::text(stream),
                        spi::int8(before),
                        types.into_datum(),
                        spi::varlena_array(&data, pg_sys::JSONBOID),
                        meta,
                    ],
                    Snap::Fresh,
                    0,
                )
            };
            drop(appending);
            let datums = (0..rows.len()).map(|i| rows.datum_in(i, 1, cxt).expect("RETURNING e")).collect();
            Ok((datums, positions))
        })
    });
    let (rows, positions) = written?;
    let last = positions[positions.len() - 1];
    // The subscriptions of these types hear of it at commit (NOTIFY is transactional).
    crate::subscription::notify(&view.channels, &types, last);

    // A10: each active subscribed handler, in the append's transaction.
    for p in &projections {
        let mine: Vec<(pg_sys::Datum, &NewEvent, i64)> = rows
            .iter()
            .zip(events)
            .zip(&positions)
            .filter(|((_, e), _)| registry::subscribes(p, &[e.event_type.as_str()]))
            .map(|((d, e), pos)| (*d, e, *pos))
            .collect();
        if mine.is_empty() {
            continue;
        }
        let h = p.live_handler();
        if h.batch {
            let arr = spi::composite_array(&mine.iter().map(|m| m.0).collect::<Vec<_>>(), cat.events_type);
            let (first, lastp) = (mine[0].2, mine[mine.len() - 1].2);
            h.call(arr, &|| format!("events {first}..{lastp} of stream \"{stream}\""));
        } else {
            let datums: Vec<pg_sys::Datum> = mine.iter().map(|m| m.0).collect();
            h.call_all(
                &datums,
                |_| {},
                |i| format!("event {} (stream \"{stream}\", type \"{}\")", mine[i].2, mine[i].1.event_type),
            );
        }
    }
    Ok(last)
}

fn metadata_array(events: &[NewEvent]) -> Option<pg_sys::Datum> {
    let datums: Vec<pg_sys::Datum> = events.iter().map(|e| e.metadata.unwrap_or(pg_sys::Datum::from(0))).collect();
    let mut nulls: Vec<bool> = events.iter().map(|e| e.metadata.is_none()).collect();
    let mut dims = [datums.len() as i32];
    let mut lbs = [1i32];
    // SAFETY: a one-dimensional array of `datums.len()` jsonb values with a matching null bitmap,
    // built in the current memory context; construct_md_array copies the elements.
    unsafe {
        let arr = pg_sys::construct_md_array(
            datums.as_ptr() as *mut pg_sys::Datum,
            nulls.as_mut_ptr(),
            1,
            dims.as_mut_ptr(),
            lbs.as_mut_ptr(),
            pg_sys::JSONBOID,
            -1,
            false,
            pg_sys::TYPALIGN_INT as std::ffi::c_char,
        );
        Some(pg_sys::Datum::from(arr))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{}", self.describe())]
pub struct AppendOnly {
    op: &'static str,
}

impl AppendOnly {
    /// The message: an INSERT is refused for who wrote it, anything else for what it is.
    fn describe(&self) -> String {
        match self.op {
            "INSERT" => "ep.events is written only by ep_append and ep_append_events".into(),
            op => format!("ep.events is append-only: {op} is not allowed"),
        }
    }
}

impl SqlError for AppendOnly {
    fn sqlstate(&self) -> PgSqlErrorCode {
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED
    }
    fn hint(&self) -> Option<String> {
        Some(match self.op {
            "INSERT" => "Call ep_append(stream_id, event_type, data) instead.".into(),
            _ => "Events are facts: append a compensating event instead. To start over, DROP EXTENSION event_projections.".into(),
        })
    }
}

/// The guard trigger (BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE, FOR EACH STATEMENT).
/// An INSERT passes only from ep_append itself, or as the COPY of a restore: pg_dump writes the log
/// as `COPY ep.events (...) FROM stdin;`, and only the table owner may COPY into it.
pub fn guard(op: &'static str) {
    if op == "INSERT" && (APPENDING.with(|a| a.get()) || restoring()) {
        return;
    }
    raise(&AppendOnly { op });
}

/// The trigger function of the guard, in schema `ep` (sql/triggers.sql creates the trigger).
#[pg_schema]
mod ep {
    use pgrx::prelude::*;

    /// The guard of ep.events (statement level): see `log::guard`.
    #[pg_trigger]
    fn events_guard<'a>(t: &'a PgTrigger<'a>) -> Result<Option<PgHeapTuple<'a, AllocatedByRust>>, PgHeapTupleError> {
        let op = match t.op() {
            Ok(PgTriggerOperation::Insert) => "INSERT",
            Ok(PgTriggerOperation::Update) => "UPDATE",
            Ok(PgTriggerOperation::Delete) => "DELETE",
            Ok(PgTriggerOperation::Truncate) => "TRUNCATE",
            Err(_) => "this operation",
        };
        super::guard(op);
        Ok(None)
    }
}

/// Whether the statement being executed is a `COPY ep.events ... FROM` sent by the client (not
/// an INSERT that some trigger runs during a COPY into another table).
fn restoring() -> bool {
    // SAFETY: reads of the active portal and the query string, which live at least as long as the
    // statement that fires this trigger.
    unsafe {
        let portal = pg_sys::ActivePortal;
        if portal.is_null() || (*portal).commandTag != pg_sys::CommandTag::CMDTAG_COPY {
            return false;
        }
        if pg_sys::debug_query_string.is_null() {
            return false;
        }
        let q = std::ffi::CStr::from_ptr(pg_sys::debug_query_string).to_string_lossy();
        is_copy_into_events(&q)
    }
}

/// `COPY ep.events` followed by a column list or FROM, in the spelling pg_dump uses.
fn is_copy_into_events(query: &str) -> bool {
    let words: Vec<String> = query.split_whitespace().take(3).map(str::to_ascii_lowercase).collect();
    matches!(words.as_slice(), [copy, table, next]
        if copy == "copy" && table == "ep.events" && (next.starts_with('(') || next == "from"))
}
