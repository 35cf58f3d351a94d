//! The event log: appends (DESIGN.md, section 2, steps A1..A11) and the guard that keeps
//! `ep.events` append-only.

pub mod delete;
pub mod erase;
pub mod truncate;

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
    /// The caller's id of the event; one is generated when it gave none.
    pub id: Option<pgrx::Uuid>,
    /// The subject whose key seals the data (README, "Erasure"); None for clear data.
    pub subject: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(transparent)]
    Arg(#[from] ArgError),
    #[error("wrong expected version for stream \"{stream}\": expected {expected}, actual {actual}")]
    WrongExpectedVersion { stream: String, expected: i64, actual: i64 },
    #[error("event id {id} is already in the log with a different stream, type or data")]
    IdReused { id: String },
    #[error("event id {id} is already in the log, but other events of this batch are not")]
    PartlyAppended { id: String },
    #[error("{feature} need the {version} schema of event_projections, and this database has an older one")]
    NeedsUpdate { feature: &'static str, version: &'static str },
    #[error("stream \"{stream}\" is deleted")]
    StreamDeleted { stream: String, hard: bool },
    #[error("stream \"{0}\" does not exist")]
    NoSuchStream(String),
    #[error("stream \"{0}\" is not deleted")]
    NotDeleted(String),
    #[error("cannot delete or undelete stream \"{0}\" from inside a projection handler")]
    InsideHandler(String),
    #[error("some events of the batch have an \"id\" and others do not")]
    SomeIds,
    #[error("cannot forget a subject from inside a projection handler")]
    ForgetInsideHandler,
    #[error(transparent)]
    Seal(#[from] crate::seal::SealError),
}

impl SqlError for LogError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            LogError::Arg(e) => e.sqlstate(),
            // A lost optimistic-concurrency race: re-read the stream and retry, as for any
            // serialization failure.
            LogError::WrongExpectedVersion { .. } => PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
            // The same class as the unique index's own error, which a concurrent append of the
            // same id to another stream gets (README, "Event ids and metadata").
            LogError::IdReused { .. } | LogError::PartlyAppended { .. } => PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION,
            LogError::NeedsUpdate { .. } | LogError::StreamDeleted { .. } | LogError::NotDeleted(_) => {
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            LogError::NoSuchStream(_) => PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            LogError::InsideHandler(_) | LogError::ForgetInsideHandler => {
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            LogError::Seal(e) => e.sqlstate(),
            LogError::SomeIds => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
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
            LogError::IdReused { .. } | LogError::PartlyAppended { .. } => Some("Nothing was written.".into()),
            _ => None,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            LogError::WrongExpectedVersion { .. } => {
                Some("Read the stream again, decide again, and retry with the new version (or pass NULL to append at any version).".into())
            }
            LogError::IdReused { .. } => Some(
                "A retry must send the same stream, type and data as the first attempt; a new event needs a new id.".into(),
            ),
            LogError::PartlyAppended { .. } => {
                Some("Retry a batch with exactly the events (and ids) of the first attempt.".into())
            }
            LogError::NeedsUpdate { .. } => Some("Run ALTER EXTENSION event_projections UPDATE.".into()),
            LogError::ForgetInsideHandler => {
                Some("Call ep_forget_subject from the application, outside any handler.".into())
            }
            LogError::Seal(e) => e.hint(),
            LogError::StreamDeleted { hard: false, .. } => Some(
                "It was soft-deleted: SELECT ep_undelete_stream(...) restores it (ep.stream_deletions says who deleted it).".into(),
            ),
            LogError::StreamDeleted { hard: true, .. } => {
                Some("It was hard-deleted, which is final: use another stream id (ep.stream_deletions says who deleted it).".into())
            }
            _ => None,
        }
    }
}

thread_local! {
    /// Set only while our own INSERT (an append) or DELETE (a hard delete) on ep.events runs: the
    /// guard trigger lets exactly that operation through.
    static OWN_WRITE: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

/// Sets OWN_WRITE for its lifetime; an error unwinds through it and clears it.
pub(crate) struct OwnWrite;
impl OwnWrite {
    pub(crate) fn start(op: &'static str) -> Self {
        OWN_WRITE.with(|a| a.set(Some(op)));
        OwnWrite
    }
}
impl Drop for OwnWrite {
    fn drop(&mut self) {
        OWN_WRITE.with(|a| a.set(None));
    }
}

/// A7: the stream row, locked, with its new version and whether it is deleted; in 0.2.0's form
/// (no `deleted` column) for a database not updated yet.
static UPSERT_STREAM: [Stmt; 2] = [
    Stmt {
        sql: "INSERT INTO ep.streams AS s (stream_id, version) VALUES ($1, $2) \
              ON CONFLICT (stream_id) DO UPDATE SET version = s.version + $2 RETURNING version, NULL::text",
        types: &[pg_sys::TEXTOID, pg_sys::INT8OID],
    },
    Stmt {
        sql: "INSERT INTO ep.streams AS s (stream_id, version) VALUES ($1, $2) \
              ON CONFLICT (stream_id) DO UPDATE SET version = s.version + $2 RETURNING version, deleted",
        types: &[pg_sys::TEXTOID, pg_sys::INT8OID],
    },
];

/// The statements of an insert, in the current schema's form and in 0.2.0's (no `event_id`,
/// whose library this one is until ALTER EXTENSION ... UPDATE), each without and with `RETURNING e`.
struct Inserts {
    current: [Stmt; 2],
    v2: [Stmt; 2],
}

impl Inserts {
    /// The insert for this database's schema, returning the rows when `returning`.
    fn get(&'static self, event_ids: bool, returning: bool) -> &'static Stmt {
        let forms = if event_ids { &self.current } else { &self.v2 };
        &forms[usize::from(returning)]
    }
}

macro_rules! insert_stmt {
    ($cols:literal, $rest:literal, $types:expr) => {
        [
            Stmt {
                sql: concat!(
                    "INSERT INTO ep.events AS e (global_position, stream_id, stream_position, event_type, data, metadata",
                    $cols,
                    ") ",
                    $rest
                ),
                types: $types,
            },
            Stmt {
                sql: concat!(
                    "INSERT INTO ep.events AS e (global_position, stream_id, stream_position, event_type, data, metadata",
                    $cols,
                    ") ",
                    $rest,
                    " RETURNING e"
                ),
                types: $types,
            },
        ]
    };
}

const INSERT_ONE_TYPES: &[pg_sys::Oid] = &[
    pg_sys::INT8OID,
    pg_sys::TEXTOID,
    pg_sys::INT8OID,
    pg_sys::TEXTOID,
    pg_sys::JSONBOID,
    pg_sys::JSONBOID,
    pg_sys::UUIDOID,
];

/// The insert of one event, returning the row as the `ep.events` value handlers get (A10), or
/// returning nothing when no handler will run (building the value costs a copy of the row).
static INSERT_ONE: Inserts = Inserts {
    current: insert_stmt!(", event_id", "VALUES ($1, $2, $3, $4, $5, $6, $7)", INSERT_ONE_TYPES),
    v2: insert_stmt!("", "VALUES ($1, $2, $3, $4, $5, $6)", INSERT_ONE_TYPES.split_at(6).0),
};

const INSERT_MANY_TYPES: &[pg_sys::Oid] = &[
    pg_sys::INT8ARRAYOID,
    pg_sys::TEXTOID,
    pg_sys::INT8OID,
    pg_sys::TEXTARRAYOID,
    pg_sys::JSONBARRAYOID,
    pg_sys::JSONBARRAYOID,
    pg_sys::UUIDARRAYOID,
];

/// The insert of several events, as `INSERT_ONE`.
static INSERT_MANY: Inserts = Inserts {
    current: insert_stmt!(
        ", event_id",
        "SELECT u.p, $2, $3 + u.o, u.t, u.d, u.m, u.i \
         FROM unnest($1::bigint[], $4::text[], $5::jsonb[], $6::jsonb[], $7::uuid[]) WITH ORDINALITY AS u(p, t, d, m, i, o)",
        INSERT_MANY_TYPES
    ),
    v2: insert_stmt!(
        "",
        "SELECT u.p, $2, $3 + u.o, u.t, u.d, u.m \
         FROM unnest($1::bigint[], $4::text[], $5::jsonb[], $6::jsonb[]) WITH ORDINALITY AS u(p, t, d, m, o)",
        INSERT_MANY_TYPES.split_at(6).0
    ),
};

const INSERT_SEALED_TYPES: &[pg_sys::Oid] = &[
    pg_sys::INT8ARRAYOID,
    pg_sys::TEXTOID,
    pg_sys::INT8OID,
    pg_sys::TEXTARRAYOID,
    pg_sys::JSONBARRAYOID,
    pg_sys::JSONBARRAYOID,
    pg_sys::UUIDARRAYOID,
    pg_sys::INT8ARRAYOID,
    pg_sys::BYTEAARRAYOID,
];

/// The insert of an append with a subject on some event (0.5.0 schema on): the redacted shape in
/// `data`, and the sealed data with its key's id (seal). Appends without subjects keep the
/// inserts above, which every schema since 0.3.0 takes.
static INSERT_SEALED: [Stmt; 2] = insert_stmt!(
    ", event_id, subject_key, sealed",
    "SELECT u.p, $2, $3 + u.o, u.t, u.d, u.m, u.i, u.k, u.s \
     FROM unnest($1::bigint[], $4::text[], $5::jsonb[], $6::jsonb[], $7::uuid[], $8::bigint[], $9::bytea[]) \
     WITH ORDINALITY AS u(p, t, d, m, i, k, s, o)",
    INSERT_SEALED_TYPES
);

/// The events of a batch whose ids are already in the log: each with its position and whether its
/// stream, type and data are the same. Ids the caller did not give are NULL here and match nothing.
static ALREADY: Stmt = Stmt {
    sql: "SELECT u.o, e.global_position, (e.stream_id = $2 AND e.event_type = u.t AND e.data = u.d) \
          FROM ep.events e, unnest($1::uuid[], $3::text[], $4::jsonb[]) WITH ORDINALITY AS u(i, t, d, o) \
          WHERE e.event_id = ANY ($1::uuid[]) AND e.event_id = u.i ORDER BY u.o",
    types: &[pg_sys::UUIDARRAYOID, pg_sys::TEXTOID, pg_sys::TEXTARRAYOID, pg_sys::JSONBARRAYOID],
};

/// `ALREADY` for one event. A statement of its own because PostgreSQL's plan cache keeps a
/// generic plan only when it is estimated no dearer than the custom ones: for the batch form
/// (ten rows guessed for the unnested arrays) it never is, so every execution was planned again,
/// twice per append (the bench measured 0.38x the appends without ids); this one's generic plan is
/// the unique-index probe its custom plans are.
static ALREADY_ONE: Stmt = Stmt {
    sql: "SELECT 1::bigint, e.global_position, (e.stream_id = $2 AND e.event_type = $3 AND e.data = $4) \
          FROM ep.events e WHERE e.event_id = $1",
    types: &[pg_sys::UUIDOID, pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::JSONBOID],
};

/// Gives back the version an append took when it turns out to be a retry (see `append`).
static UNDO_VERSION: Stmt = Stmt {
    sql: "UPDATE ep.streams SET version = version - $2 WHERE stream_id = $1",
    types: &[pg_sys::TEXTOID, pg_sys::INT8OID],
};

/// Whether ep.events has the `event_id` column (0.3.0 on). ALTER EXTENSION ... UPDATE adds it
/// under running backends, so this takes the lock the insert needs first (RowExclusiveLock, which
/// the update's ALTER TABLE conflicts with) and looks after it: the answer then holds until the
/// append's transaction ends. (Looking without the lock, an append decided on 0.2.0's insert, the
/// update committed, and the insert failed on the new NOT NULL column: upgrade.rs.)
fn has_event_ids(cat: &Catalog) -> bool {
    // SAFETY: locks a relation of ours by OID (held to the end of the transaction, as the insert's
    // own lock would be; acquiring it processes pending invalidations), then a syscache lookup by
    // relation OID and name, InvalidAttrNumber when there is none.
    unsafe {
        pg_sys::LockRelationOid(cat.events_rel, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        pg_sys::get_attnum(cat.events_rel, c"event_id".as_ptr()) != pg_sys::InvalidAttrNumber as i16
    }
}

/// A new event id: a version 7 UUID (48 bits of Unix milliseconds, then 74 random bits), so that
/// ids generated together sit together at the right edge of the unique index instead of
/// touching a random page of it per append.
fn new_event_id() -> pgrx::Uuid {
    let mut b = [0u8; 16];
    // SAFETY: pg_strong_random writes exactly the 10 bytes asked for into the buffer.
    if !unsafe { pg_sys::pg_strong_random(b[6..].as_mut_ptr().cast(), 10) } {
        error!("event_projections: could not generate random bytes for an event id");
    }
    let ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    b[6] = 0x70 | (b[6] & 0x0f);
    b[8] = 0x80 | (b[8] & 0x3f);
    pgrx::Uuid::from_bytes(b)
}

/// An `"id"` member of `ep_append_events`: a UUID in PostgreSQL's text forms (hex digits, with
/// or without hyphens between groups of four, optionally in braces).
fn parse_event_id(text: &str) -> Option<pgrx::Uuid> {
    let inner = text.strip_prefix('{').and_then(|t| t.strip_suffix('}')).unwrap_or(text);
    let mut b = [0u8; 16];
    let mut digits = 0usize;
    let mut last_was_hyphen = true; // no leading hyphen
    for c in inner.chars() {
        if c == '-' {
            if last_was_hyphen || !digits.is_multiple_of(4) {
                return None;
            }
            last_was_hyphen = true;
            continue;
        }
        let v = c.to_digit(16)? as u8;
        if digits == 32 {
            return None;
        }
        b[digits / 2] |= if digits.is_multiple_of(2) { v << 4 } else { v };
        digits += 1;
        last_was_hyphen = false;
    }
    (digits == 32 && !last_was_hyphen).then(|| pgrx::Uuid::from_bytes(b))
}

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
    id: Option<pgrx::Uuid>,
    subject: Option<&str>,
) -> Result<i64, LogError> {
    let stream = required_text(stream, "stream_id")?;
    let event_type = required_text(event_type, "event_type")?;
    check_type(event_type, "event_type")?;
    let data = required(data, "data")?;
    if subject == Some("") {
        return Err(ArgError::Empty("subject").into());
    }
    let ev = NewEvent {
        event_type: event_type.into(),
        data: data.0,
        metadata: metadata.map(|m| m.0),
        id,
        subject: subject.map(str::to_owned),
    };
    append(stream, &[ev], expected)
}

static ELEMENTS: Stmt = Stmt {
    sql: "SELECT a.o, pg_catalog.jsonb_typeof(a.e), pg_catalog.jsonb_typeof(a.e -> 'type'), a.e ->> 'type', a.e -> 'data', \
                 CASE WHEN pg_catalog.jsonb_typeof(a.e -> 'metadata') = 'null' THEN NULL ELSE a.e -> 'metadata' END, \
                 pg_catalog.jsonb_typeof(a.e -> 'id'), a.e ->> 'id', \
                 pg_catalog.jsonb_typeof(a.e -> 'subject'), a.e ->> 'subject' \
          FROM pg_catalog.jsonb_array_elements($1) WITH ORDINALITY AS a(e, o) ORDER BY a.o",
    types: &[pg_sys::JSONBOID],
};

static TYPEOF: Stmt = Stmt { sql: "SELECT pg_catalog.jsonb_typeof($1)", types: &[pg_sys::JSONBOID] };

/// `ep_append_events`: a JSON array of `{"type", "data", "metadata", "id", "subject"}`, all or
/// nothing.
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
            if event_type.starts_with('$') {
                return Err(invalid(format!(
                    "element {n} has type \"{event_type}\" (types beginning with \"$\" are the extension's own markers)"
                )));
            }
            let Some(data) = rows.datum_in(i, 5, cxt) else {
                return Err(invalid(format!("element {n} has no \"data\"")));
            };
            let id = match rows.get::<String>(i, 7).as_deref() {
                None | Some("null") => None,
                Some("string") => {
                    let text: String = rows.get(i, 8).unwrap_or_default();
                    Some(
                        parse_event_id(&text)
                            .ok_or_else(|| invalid(format!("element {n} has an \"id\" that is not a UUID")))?,
                    )
                }
                Some(other) => {
                    return Err(invalid(format!("element {n} has an \"id\" that is a {other}, not a UUID string")))
                }
            };
            let subject = match rows.get::<String>(i, 9).as_deref() {
                None | Some("null") => None,
                Some("string") => match rows.get::<String>(i, 10) {
                    Some(s) if !s.is_empty() => Some(s),
                    _ => return Err(invalid(format!("element {n} has an empty \"subject\""))),
                },
                Some(other) => {
                    return Err(invalid(format!("element {n} has a \"subject\" that is a {other}, not a string")))
                }
            };
            out.push(NewEvent { event_type, data, metadata: rows.datum_in(i, 6, cxt), id, subject });
        }
        Ok(out)
    });
    append(stream, &parsed?, expected)
}

/// Why events are appended: for a client, as the marker of a stream's deletion (section 16), or
/// as the marker of a retention cut (section 17: the stream's events below `before` go).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Purpose {
    Append,
    Delete { hard: bool },
    Undelete,
    Truncate { before: i64 },
}

/// Sets a stream's retention cut, which only ever moves up.
static CUT: Stmt = Stmt {
    sql: "UPDATE ep.streams SET truncated_before = GREATEST(truncated_before, $2) WHERE stream_id = $1",
    types: &[pg_sys::TEXTOID, pg_sys::INT8OID],
};

/// Sets a stream's deletion mark (NULL: live again).
static MARK: Stmt =
    Stmt { sql: "UPDATE ep.streams SET deleted = $2 WHERE stream_id = $1", types: &[pg_sys::TEXTOID, pg_sys::TEXTOID] };

impl Purpose {
    /// The deletion mark this append sets on its stream, if any (`Some(None)` clears it).
    fn mark(self) -> Option<Option<&'static str>> {
        match self {
            Purpose::Append | Purpose::Truncate { .. } => None,
            Purpose::Delete { hard: true } => Some(Some("hard")),
            Purpose::Delete { hard: false } => Some(Some("soft")),
            Purpose::Undelete => Some(None),
        }
    }

    /// Whether this append may go on, given the stream's state under its row lock (A7): `before`
    /// events, and its `deleted` mark.
    fn allowed(self, stream: &str, before: i64, deleted: Option<&str>) -> Result<(), LogError> {
        let gone = |hard: bool| LogError::StreamDeleted { stream: stream.into(), hard };
        match (self, deleted) {
            (Purpose::Append, None) => Ok(()),
            (_, Some("hard")) => Err(gone(true)),
            (Purpose::Append | Purpose::Truncate { .. } | Purpose::Delete { hard: false }, Some(_)) => Err(gone(false)),
            (_, _) if before == 0 => Err(LogError::NoSuchStream(stream.into())),
            (Purpose::Delete { .. } | Purpose::Truncate { .. }, _) => Ok(()),
            (Purpose::Undelete, Some(_)) => Ok(()),
            (Purpose::Undelete, None) => Err(LogError::NotDeleted(stream.into())),
        }
    }
}

/// Event types beginning with `$` are the extension's own markers, which projections act on
/// (`$stream_deleted`): a client cannot append them.
fn check_type(event_type: &str, arg: &'static str) -> Result<(), ArgError> {
    if event_type.starts_with('$') {
        return Err(ArgError::Invalid {
            arg,
            problem: format!("\"{event_type}\" (types beginning with \"$\" are the extension's own markers)"),
        });
    }
    Ok(())
}

/// What an append writes: its events, or nothing because they were in the log already.
enum Written {
    Now(Vec<pg_sys::Datum>, Vec<i64>),
    Before(i64),
}

/// The ids of the events of one append.
struct EventIds {
    /// Every event's id, the generated ones included.
    all: Vec<pgrx::Uuid>,
    /// Whether the caller gave any (only then can the append be a retry).
    given: bool,
    /// Whether this database's log stores them (not before ALTER EXTENSION ... UPDATE to 0.3.0).
    stored: bool,
}

impl EventIds {
    fn of(cat: &Catalog, events: &[NewEvent]) -> Result<EventIds, LogError> {
        let given = events.iter().any(|e| e.id.is_some());
        let stored = has_event_ids(cat);
        if given && !stored {
            return Err(LogError::NeedsUpdate { feature: "event ids", version: "0.3.0" });
        }
        // A batch with ids on some events only could never be retried (the others would get new
        // ids): all or none.
        if given && events.iter().any(|e| e.id.is_none()) {
            return Err(LogError::SomeIds);
        }
        let all: Vec<pgrx::Uuid> = events.iter().map(|e| e.id.unwrap_or_else(new_event_id)).collect();
        if given {
            let mut seen = std::collections::HashSet::with_capacity(all.len());
            if let Some(dup) = all.iter().find(|id| !seen.insert(id.as_bytes())) {
                return Err(LogError::Arg(ArgError::Invalid {
                    arg: "events",
                    problem: format!("event id {dup} is given to more than one event"),
                }));
            }
        }
        Ok(EventIds { all, given, stored })
    }
}

/// The position of the last event when every event of the batch is in the log already with the
/// same stream, type and data (a retry); None when none of them is; an error otherwise.
fn already_appended(
    client: &pgrx::spi::SpiClient<'_>,
    stream: &str,
    events: &[NewEvent],
    ids: &EventIds,
) -> Result<Option<i64>, LogError> {
    let rows = if let [e] = events {
        let args = [e.id.into_datum(), spi::text(stream), spi::text(&e.event_type), Some(e.data)];
        spi::exec(client, &ALREADY_ONE, &args, Snap::Fresh, 0)
    } else {
        let given: Vec<Option<pgrx::Uuid>> = events.iter().map(|e| e.id).collect();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let data: Vec<pg_sys::Datum> = events.iter().map(|e| e.data).collect();
        let args =
            [given.into_datum(), spi::text(stream), types.into_datum(), spi::varlena_array(&data, pg_sys::JSONBOID)];
        spi::exec(client, &ALREADY, &args, Snap::Fresh, 0)
    };
    if rows.is_empty() {
        return Ok(None);
    }
    let index = |i: usize| (rows.get::<i64>(i, 1).unwrap_or(1) - 1) as usize;
    let id_of = |i: usize| ids.all[index(i)].to_string();
    let mut last = 0;
    for i in 0..rows.len() {
        let position = rows.get::<i64>(i, 2).unwrap_or(0);
        let same = match &events[index(i)].subject {
            None => rows.get::<bool>(i, 3) == Some(true),
            // The original's data column is the redacted shape: compare with what it sealed, and
            // its key with the subject's (the subject is part of what was appended).
            Some(subject) => same_sealed(client, stream, &events[index(i)], subject, position),
        };
        if !same {
            return Err(LogError::IdReused { id: id_of(i) });
        }
        last = last.max(position);
    }
    if rows.len() < events.len() {
        return Err(LogError::PartlyAppended { id: id_of(0) });
    }
    Ok(Some(last))
}

static EVENT_AT: Stmt =
    Stmt { sql: "SELECT e FROM ep.events e WHERE e.global_position = $1", types: &[pg_sys::INT8OID] };

/// Whether the event at `position` is `ev` sealed under `subject`'s key (see `already_appended`).
fn same_sealed(client: &pgrx::spi::SpiClient<'_>, stream: &str, ev: &NewEvent, subject: &str, position: i64) -> bool {
    let cat = catalog::require();
    let Some(key_id) = crate::seal::key_id_of(client, subject) else { return false };
    let rows = spi::exec(client, &EVENT_AT, &[spi::int8(position)], Snap::Fresh, 0);
    match rows.datum(0, 1) {
        Some(row) => crate::seal::holds(&cat, row, key_id, stream, &ev.event_type, ev.data),
        None => false,
    }
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
    append_as(stream, events, expected, Purpose::Append)
}

/// `append`, for one of the purposes the extension appends for.
pub(crate) fn append_as(
    stream: &str,
    events: &[NewEvent],
    expected: Option<i64>,
    purpose: Purpose,
) -> Result<i64, LogError> {
    check_expected(expected)?;
    let cat = catalog::require();
    let ids = EventIds::of(&cat, events)?;
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
    let returning = !projections.is_empty();
    let sealing = events.iter().any(|e| e.subject.is_some());
    // The columns are looked up after has_event_ids locked ep.events (EventIds::of): the answer
    // holds until this transaction ends.
    if sealing && crate::seal::columns(&cat).is_none() {
        return Err(LogError::NeedsUpdate { feature: "subjects", version: "0.5.0" });
    }
    // SAFETY: a plain read of the current memory context.
    let cxt = unsafe { pg_sys::CurrentMemoryContext };
    let written: Result<Written, LogError> = catalog::privileged(&cat, || {
        Spi::connect(|client| {
            // A retry of an append that committed writes nothing: looked for before the stream
            // lock, and again once it is held (a first attempt may have committed meanwhile).
            if ids.given {
                if let Some(p) = already_appended(client, stream, events, &ids)? {
                    return Ok(Written::Before(p));
                }
            }
            // The subjects' keys, locked against ep_forget_subject until this transaction ends
            // (before the stream lock: forgetting takes no stream lock, so no cycle).
            let mut keys = Vec::new();
            if sealing {
                for e in events {
                    keys.push(e.subject.as_deref().map(|s| crate::seal::key_for_append(client, s)).transpose()?);
                }
            }
            // A7: the stream row lock, then the expected version, before any position is taken.
            let row = spi::exec(
                client,
                &UPSERT_STREAM[usize::from(ids.stored)],
                &[spi::text(stream), spi::int8(n)],
                Snap::Fresh,
                0,
            );
            let version: i64 = row.get(0, 1).unwrap_or(n);
            let deleted: Option<String> = row.get(0, 2);
            let before = version - n;
            if ids.given {
                if let Some(p) = already_appended(client, stream, events, &ids)? {
                    spi::exec(client, &UNDO_VERSION, &[spi::text(stream), spi::int8(n)], Snap::Fresh, 0);
                    return Ok(Written::Before(p));
                }
            }
            purpose.allowed(stream, before, deleted.as_deref())?;
            // The mark, under the row lock and before any handler runs: an append from inside the
            // marker's handlers (same transaction, lock already held) reads it and is refused.
            if let Some(mark) = purpose.mark() {
                spi::exec(client, &MARK, &[spi::text(stream), mark.and_then(spi::text)], Snap::Fresh, 0);
            }
            if let Purpose::Truncate { before: cut } = purpose {
                spi::exec(client, &CUT, &[spi::text(stream), spi::int8(cut)], Snap::Fresh, 0);
            }
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
            let appending = OwnWrite::start("INSERT");
            let rows = if sealing {
                let mut stored = Vec::with_capacity(events.len());
                let mut sealed: Vec<Option<Vec<u8>>> = Vec::with_capacity(events.len());
                let redacted = crate::seal::redacted();
                for (i, (e, k)) in events.iter().zip(&keys).enumerate() {
                    match k {
                        Some(key) => {
                            sealed.push(Some(crate::seal::seal(key, &ids.all[i], e.data)?));
                            stored.push(redacted);
                        }
                        None => {
                            sealed.push(None);
                            stored.push(e.data);
                        }
                    }
                }
                let key_ids: Vec<Option<i64>> = keys.iter().map(|k| k.as_ref().map(|k| k.id)).collect();
                let args = vec![
                    positions.clone().into_datum(),
                    spi::text(stream),
                    spi::int8(before),
                    types_of(events).into_datum(),
                    spi::varlena_array(&stored, pg_sys::JSONBOID),
                    metadata_array(events),
                    ids.all.clone().into_datum(),
                    key_ids.into_datum(),
                    sealed.into_datum(),
                ];
                spi::exec(client, &INSERT_SEALED[usize::from(returning)], &args, Snap::Fresh, 0)
            } else if events.len() == 1 {
                let e = &events[0];
                let mut args = vec![
                    spi::int8(positions[0]),
                    spi::text(stream),
                    spi::int8(before + 1),
                    spi::text(&e.event_type),
                    Some(e.data),
                    e.metadata,
                ];
                if ids.stored {
                    args.push(ids.all[0].into_datum());
                }
                spi::exec(client, INSERT_ONE.get(ids.stored, returning), &args, Snap::Fresh, 0)
            } else {
                let data: Vec<pg_sys::Datum> = events.iter().map(|e| e.data).collect();
                let mut args = vec![
                    positions.clone().into_datum(),
                    spi::text(stream),
                    spi::int8(before),
                    types_of(events).into_datum(),
                    spi::varlena_array(&data, pg_sys::JSONBOID),
                    metadata_array(events),
                ];
                if ids.stored {
                    args.push(ids.all.clone().into_datum());
                }
                spi::exec(client, INSERT_MANY.get(ids.stored, returning), &args, Snap::Fresh, 0)
            };
            drop(appending);
            let datums = (0..rows.len()).map(|i| rows.datum_in(i, 1, cxt).expect("RETURNING e")).collect();
            Ok(Written::Now(datums, positions))
        })
    });
    let (rows, positions) = match written? {
        Written::Now(rows, positions) => (rows, positions),
        // Nothing of this call was written, so no handler runs and nobody is told.
        Written::Before(position) => return Ok(position),
    };
    // Handlers get the clear data of what was just sealed (built here, in the call's context).
    let rows: Vec<pg_sys::Datum> = rows
        .into_iter()
        .zip(events)
        .map(|(row, e)| if e.subject.is_some() { crate::seal::with_clear_data(&cat, row, e.data) } else { row })
        .collect();
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

fn types_of(events: &[NewEvent]) -> Vec<&str> {
    events.iter().map(|e| e.event_type.as_str()).collect()
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
    if OWN_WRITE.with(|a| a.get()) == Some(op) || (op == "INSERT" && restoring()) {
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
