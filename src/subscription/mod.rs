//! The log for consumers outside the database (DESIGN.md, section 11): `ep_read_all`, which never
//! returns an event above the high-water mark, and durable subscriptions (`ep_subscribe`,
//! `ep_poll`, `ep_ack`), whose state lives in tables so that they survive restarts, dump and
//! restore, and work through a transaction-pooling connection pooler.
//!
//! The guarantee is the async delivery's (section 5): every read is bounded by the high-water mark
//! computed first (H1..H3), and reads with a snapshot taken after it (H4), so a consumer that
//! continues after the last position it received never misses an event that commits late.

use crate::handoff::{highwater, inflight};
use crate::pg::catalog::{self, Catalog};
use crate::pg::error::{required, required_text, ArgError, SqlError};
use crate::pg::spi::{self, Snap, Stmt};
use pgrx::pg_sys;
use pgrx::prelude::*;

#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    #[error(transparent)]
    Arg(#[from] ArgError),
    #[error("subscription \"{0}\" already exists")]
    Exists(String),
    #[error("subscription \"{0}\" does not exist")]
    Unknown(String),
    #[error("must be the owner of subscription \"{0}\" (or a member of its owner role)")]
    NotOwner(String),
    #[error("permission denied for table ep.events: a subscriber must be able to read the log")]
    NoLogAccess,
    #[error("member {member} does not exist: subscription \"{subscription}\" has members 0 to {last}")]
    NoMember { subscription: String, member: i32, last: i32 },
    #[error("cannot acknowledge position {position} for member {member} of subscription \"{subscription}\": the last event delivered to it is {delivered}")]
    BeyondDelivered { subscription: String, member: i32, position: i64, delivered: i64 },
}

impl SqlError for SubscriptionError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            SubscriptionError::Arg(e) => e.sqlstate(),
            SubscriptionError::Exists(_) => ERRCODE_DUPLICATE_OBJECT,
            SubscriptionError::Unknown(_) => ERRCODE_UNDEFINED_OBJECT,
            SubscriptionError::NotOwner(_) | SubscriptionError::NoLogAccess => ERRCODE_INSUFFICIENT_PRIVILEGE,
            SubscriptionError::NoMember { .. } | SubscriptionError::BeyondDelivered { .. } => {
                ERRCODE_INVALID_PARAMETER_VALUE
            }
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            SubscriptionError::Unknown(_) => {
                Some("SELECT * FROM ep.subscription_status lists the subscriptions.".into())
            }
            SubscriptionError::NoLogAccess => {
                Some("GRANT SELECT ON ep.events TO the consumer's role (README, \"Security\").".into())
            }
            SubscriptionError::BeyondDelivered { .. } => {
                Some("Acknowledge the global_position of an event ep_poll returned to this member.".into())
            }
            _ => None,
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Reading the log

static READ_ALL: Stmt = Stmt {
    sql: "SELECT e FROM ep.events e WHERE e.global_position > $1 AND e.global_position <= $2 \
          ORDER BY e.global_position LIMIT $3",
    types: &[pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::INT8OID],
};

/// `READ_ALL` of one correlation id, in the words of the partial index events_correlation_idx.
static READ_CORRELATED: Stmt = Stmt {
    sql: "SELECT e FROM ep.events e WHERE e.global_position > $1 AND e.global_position <= $2 \
          AND e.metadata ? 'correlation_id' AND (e.metadata ->> 'correlation_id') = $4 \
          ORDER BY e.global_position LIMIT $3",
    types: &[pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::TEXTOID],
};

fn check_count(max_count: Option<i32>) -> Result<i64, ArgError> {
    match max_count {
        None => Err(ArgError::Null("max_count")),
        Some(n) if n < 1 => Err(ArgError::Invalid { arg: "max_count", problem: format!("{n} (must be at least 1)") }),
        Some(n) => Ok(n as i64),
    }
}

fn check_log_access(cat: &Catalog) -> Result<(), SubscriptionError> {
    if catalog::may_select(catalog::current_user(), cat.events_rel) {
        Ok(())
    } else {
        Err(SubscriptionError::NoLogAccess)
    }
}

/// The rows of a read of the log (composite `ep.events` values), unsealed (seal), in the memory
/// context current at the call.
fn rows(stmt: &Stmt, args: &[Option<pg_sys::Datum>], snap: Snap) -> Vec<pg_sys::Datum> {
    // SAFETY: a plain read of the current memory context (the set-returning function's).
    let cxt = unsafe { pg_sys::CurrentMemoryContext };
    let mut rows: Vec<pg_sys::Datum> = catalog::read(|| {
        Spi::connect(|client| {
            let r = spi::exec(client, stmt, args, snap, 0);
            (0..r.len()).filter_map(|i| r.datum_in(i, 1, cxt)).collect()
        })
    });
    crate::seal::unseal_rows(&catalog::require(), &mut rows);
    rows
}

/// A stream's state for a reader: whether it is deleted, and its retention cut.
static STREAM_STATE: Stmt = Stmt {
    sql: "SELECT s.deleted IS NOT NULL, s.truncated_before FROM ep.streams s WHERE s.stream_id = $1",
    types: &[pg_sys::TEXTOID],
};

static READ_STREAM: Stmt = Stmt {
    sql: "SELECT e FROM ep.events e WHERE e.stream_id = $1 AND e.stream_position >= $2 \
          ORDER BY e.stream_position LIMIT $3",
    types: &[pg_sys::TEXTOID, pg_sys::INT8OID, pg_sys::INT8OID],
};

/// `READ_STREAM` of one correlation id.
static READ_STREAM_CORRELATED: Stmt = Stmt {
    sql: "SELECT e FROM ep.events e WHERE e.stream_id = $1 AND e.stream_position >= $2 \
          AND e.metadata ? 'correlation_id' AND (e.metadata ->> 'correlation_id') = $4 \
          ORDER BY e.stream_position LIMIT $3",
    types: &[pg_sys::TEXTOID, pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::TEXTOID],
};

/// `ep_read_stream`: the events of one stream from `from` on, in stream order, at most
/// `max_count`. A deleted stream has none (README, "Deleting streams"); a stream cut by a
/// retention policy starts at its cut, also while the worker is still removing the events below
/// it (README, "Retention"). Read with the calling statement's snapshot, as the SQL function of
/// 0.4.0 read: a stream's order is its writers' order, so no high-water mark bounds this read.
pub fn read_stream(
    stream: Option<&str>,
    from: Option<i64>,
    max_count: Option<i32>,
    correlation_id: Option<&str>,
) -> Result<Vec<pg_sys::Datum>, SubscriptionError> {
    let stream = required(stream, "stream_id")?;
    let from = match from {
        Some(v) if v >= 1 => v,
        v => {
            let shown = v.map_or("NULL".to_string(), |v| v.to_string());
            return Err(ArgError::Invalid {
                arg: "from_position",
                problem: format!("{shown} (stream positions start at 1)"),
            }
            .into());
        }
    };
    let limit = match max_count {
        Some(n) if n >= 1 => n as i64,
        v => {
            let shown = v.map_or("NULL".to_string(), |v| v.to_string());
            return Err(ArgError::Invalid { arg: "max_count", problem: format!("{shown} (must be at least 1)") }.into());
        }
    };
    let cat = catalog::require();
    check_log_access(&cat)?;
    let state = catalog::read(|| {
        Spi::connect(|client| {
            let r = spi::exec(client, &STREAM_STATE, &[spi::text(stream)], Snap::Caller, 0);
            (r.get::<bool>(0, 1).unwrap_or(false), r.get::<i64>(0, 2))
        })
    });
    let (hidden, cut) = state;
    if hidden {
        return Ok(Vec::new());
    }
    let args = [spi::text(stream), spi::int8(from.max(cut.unwrap_or(1))), spi::int8(limit)];
    Ok(match correlation_id {
        None => rows(&READ_STREAM, &args, Snap::Caller),
        Some(id) => rows(&READ_STREAM_CORRELATED, &[args[0], args[1], args[2], spi::text(id)], Snap::Caller),
    })
}

/// `ep_unseal`: one row value, as a read of the log returns it. Only for the roles that may read
/// the log: the keys open what they could read anyway.
pub fn unseal(row: pg_sys::Datum) -> Result<pg_sys::Datum, SubscriptionError> {
    let cat = catalog::require();
    check_log_access(&cat)?;
    let mut rows = [row];
    crate::seal::unseal_rows(&cat, &mut rows);
    Ok(rows[0])
}

/// `ep_read_all`: the committed events after `after`, in global order, at most `max_count`, and
/// none above the high-water mark: a reader that continues after the last position it received
/// misses nothing, whatever commits late or rolls back. The events are read with a snapshot taken
/// after the mark was computed, at any isolation level.
pub fn read_all(
    after: Option<i64>,
    max_count: Option<i32>,
    correlation_id: Option<&str>,
) -> Result<Vec<pg_sys::Datum>, SubscriptionError> {
    let after = required(after, "after_position")?;
    if after < 0 {
        return Err(ArgError::Invalid { arg: "after_position", problem: format!("{after} (must be 0 or more)") }.into());
    }
    let limit = check_count(max_count)?;
    let cat = catalog::require();
    check_log_access(&cat)?;
    let hw = highwater::compute_for_reader();
    if hw <= after {
        return Ok(Vec::new());
    }
    let bounds = [spi::int8(after), spi::int8(hw), spi::int8(limit)];
    Ok(match correlation_id {
        None => rows(&READ_ALL, &bounds, Snap::Latest),
        Some(id) => rows(&READ_CORRELATED, &[bounds[0], bounds[1], bounds[2], spi::text(id)], Snap::Latest),
    })
}

/// `ep_high_water`: the high-water mark (every position at or below it is committed and visible,
/// or never will be).
pub fn high_water() -> i64 {
    let cat = catalog::require();
    if let Err(e) = check_log_access(&cat) {
        crate::pg::error::raise(&e);
    }
    highwater::compute_for_reader()
}

// ------------------------------------------------------------------------------------------------
// Subscriptions

/// One subscription, as the functions need it.
struct Subscription {
    name: String,
    event_types: Option<Vec<String>>,
    members: i32,
    owner: pg_sys::Oid,
}

static BY_NAME: Stmt = Stmt {
    sql: "SELECT name, event_types, members, owner::oid FROM ep.subscriptions WHERE name = $1",
    types: &[pg_sys::TEXTOID],
};

fn by_name(name: &str) -> Option<Subscription> {
    catalog::read(|| {
        Spi::connect(|client| {
            let r = spi::exec(client, &BY_NAME, &[spi::text(name)], Snap::Latest, 0);
            (!r.is_empty()).then(|| Subscription {
                name: r.get(0, 1).unwrap_or_default(),
                event_types: r.get(0, 2),
                members: r.get(0, 3).unwrap_or(1),
                owner: r.get(0, 4).unwrap_or(pg_sys::Oid::INVALID),
            })
        })
    })
}

/// The subscription, if the caller may act for its owner and read the log.
fn owned(cat: &Catalog, name: Option<&str>) -> Result<Subscription, SubscriptionError> {
    let name = required_text(name, "subscription")?;
    let s = by_name(name).ok_or_else(|| SubscriptionError::Unknown(name.into()))?;
    if !catalog::acts_for(catalog::current_user(), s.owner) {
        return Err(SubscriptionError::NotOwner(name.into()));
    }
    check_log_access(cat)?;
    Ok(s)
}

fn check_types(types: Option<Vec<Option<String>>>) -> Result<Option<Vec<String>>, ArgError> {
    let Some(types) = types else { return Ok(None) };
    let mut out = Vec::with_capacity(types.len());
    for t in types {
        match t {
            Some(t) if !t.is_empty() => out.push(t),
            _ => return Err(ArgError::Invalid { arg: "event_types", problem: "an element is NULL or empty".into() }),
        }
    }
    if out.is_empty() {
        return Err(ArgError::Invalid {
            arg: "event_types",
            problem: "the array is empty (use NULL to subscribe to every type)".into(),
        });
    }
    Ok(Some(out))
}

fn check_members(members: Option<i32>) -> Result<i32, ArgError> {
    match required(members, "members")? {
        m if (1..=1024).contains(&m) => Ok(m),
        m => Err(ArgError::Invalid { arg: "members", problem: format!("{m} (must be 1 to 1024)") }),
    }
}

static SUBSCRIBE: Stmt = Stmt {
    sql: "WITH s AS (INSERT INTO ep.subscriptions (name, event_types, members, owner) \
                     VALUES ($1, $2, $3, $4::oid::regrole) ON CONFLICT (name) DO NOTHING RETURNING name, members) \
          INSERT INTO ep.subscription_members (subscription, member) \
          SELECT s.name, m FROM s, pg_catalog.generate_series(0, s.members - 1) m RETURNING subscription",
    types: &[pg_sys::TEXTOID, pg_sys::TEXTARRAYOID, pg_sys::INT4OID, pg_sys::OIDOID],
};

/// `ep_subscribe`: a durable subscription whose members start at the beginning of the log.
pub fn subscribe(
    name: Option<&str>,
    event_types: Option<Vec<Option<String>>>,
    members: Option<i32>,
) -> Result<(), SubscriptionError> {
    let name = required_text(name, "name")?;
    if name.len() > 60 {
        return Err(ArgError::Invalid {
            arg: "name",
            problem: "longer than 60 bytes (its NOTIFY channel is ep:<name>)".into(),
        }
        .into());
    }
    let types = check_types(event_types)?;
    let members = check_members(members)?;
    let cat = catalog::require();
    check_log_access(&cat)?;
    let owner = catalog::current_user(); // the caller, not the extension owner `privileged` runs as
    let created = catalog::privileged(&cat, || {
        Spi::connect(|client| {
            let r = spi::exec(
                client,
                &SUBSCRIBE,
                &[spi::text(name), types.into_datum(), members.into_datum(), owner.into_datum()],
                Snap::Fresh,
                0,
            );
            !r.is_empty()
        })
    });
    if !created {
        return Err(SubscriptionError::Exists(name.into()));
    }
    inflight::bump_epoch_at_commit(); // appends notify the subscriptions of their types
    Ok(())
}

static UNSUBSCRIBE: Stmt = Stmt { sql: "DELETE FROM ep.subscriptions WHERE name = $1", types: &[pg_sys::TEXTOID] };

/// `ep_unsubscribe`.
pub fn unsubscribe(name: Option<&str>) -> Result<(), SubscriptionError> {
    let cat = catalog::require();
    let s = owned(&cat, name)?;
    catalog::privileged(&cat, || {
        Spi::connect(|client| {
            spi::exec(client, &UNSUBSCRIBE, &[spi::text(&s.name)], Snap::Fresh, 0);
        })
    });
    inflight::bump_epoch_at_commit();
    Ok(())
}

/// The steps of a resize, in order (one statement each: a unique index sees the rows a data-modifying
/// CTE deletes as still there).
static RESIZE: [Stmt; 3] = [
    Stmt {
        sql: "UPDATE ep.subscriptions SET members = $2 WHERE name = $1 \
              RETURNING (SELECT pg_catalog.min(m.position) FROM ep.subscription_members m WHERE m.subscription = $1)",
        types: &[pg_sys::TEXTOID, pg_sys::INT4OID],
    },
    Stmt {
        sql: "DELETE FROM ep.subscription_members WHERE subscription = $1 AND $2 >= 0",
        types: &[pg_sys::TEXTOID, pg_sys::INT4OID],
    },
    Stmt {
        sql: "INSERT INTO ep.subscription_members (subscription, member, position, delivered, delivered_through) \
              SELECT $1, m, $3, $3, $3 FROM pg_catalog.generate_series(0, $2 - 1) m",
        types: &[pg_sys::TEXTOID, pg_sys::INT4OID, pg_sys::INT8OID],
    },
];

/// `ep_set_members`: changes how many members share a subscription. Every member, old or new,
/// restarts from the smallest acknowledged position of the old members: a stream that moves to
/// another member is delivered to it from a position its old member had not acknowledged past,
/// in order, so nothing is skipped or reordered (events acknowledged by the old member after that
/// position are delivered again: at least once).
pub fn set_members(name: Option<&str>, members: Option<i32>) -> Result<(), SubscriptionError> {
    let cat = catalog::require();
    let s = owned(&cat, name)?;
    let members = check_members(members)?;
    // The row lock of the subscription orders this against polls and acks of its members.
    catalog::privileged(&cat, || {
        Spi::connect(|client| {
            spi::exec(
                client,
                &Stmt { sql: "SELECT 1 FROM ep.subscriptions WHERE name = $1 FOR UPDATE", types: &[pg_sys::TEXTOID] },
                &[spi::text(&s.name)],
                Snap::Fresh,
                0,
            );
            let args = [spi::text(&s.name), members.into_datum()];
            let low: i64 = spi::exec(client, &RESIZE[0], &args, Snap::Fresh, 0).get(0, 1).unwrap_or(0);
            spi::exec(client, &RESIZE[1], &args, Snap::Fresh, 0);
            spi::exec(client, &RESIZE[2], &[args[0], args[1], spi::int8(low)], Snap::Fresh, 0);
        })
    });
    inflight::bump_epoch_at_commit();
    Ok(())
}

/// A member's state, locked for this transaction (one consumer per member at a time).
static MEMBER: Stmt = Stmt {
    sql: "SELECT m.position FROM ep.subscriptions s JOIN ep.subscription_members m ON m.subscription = s.name \
          WHERE s.name = $1 AND m.member = $2 FOR SHARE OF s FOR UPDATE OF m",
    types: &[pg_sys::TEXTOID, pg_sys::INT4OID],
};

static SHARE: Stmt = Stmt {
    sql: "SELECT e, e.global_position FROM ep.events e \
          WHERE e.global_position > $1 AND e.global_position <= $2 \
            AND ($3::text[] IS NULL OR e.event_type = ANY ($3)) \
            AND (pg_catalog.hashtextextended(e.stream_id, 0) & 9223372036854775807) % $4 = $5 \
          ORDER BY e.global_position LIMIT $6",
    types: &[pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::TEXTARRAYOID, pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::INT8OID],
};

static DELIVERED: Stmt = Stmt {
    sql: "UPDATE ep.subscription_members SET delivered = $3, delivered_through = $4, \
                 position = CASE WHEN $5 THEN GREATEST(position, $4) ELSE position END, \
                 last_poll_at = pg_catalog.clock_timestamp() \
          WHERE subscription = $1 AND member = $2",
    types: &[pg_sys::TEXTOID, pg_sys::INT4OID, pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::BOOLOID],
};

/// The position `member` of `s` has acknowledged, with its row locked.
fn member_position(s: &Subscription, member: i32) -> Result<i64, SubscriptionError> {
    if !(0..s.members).contains(&member) {
        return Err(SubscriptionError::NoMember { subscription: s.name.clone(), member, last: s.members - 1 });
    }
    let position: Option<i64> = catalog::read(|| {
        Spi::connect(|client| {
            spi::exec(client, &MEMBER, &[spi::text(&s.name), member.into_datum()], Snap::Fresh, 0).get(0, 1)
        })
    });
    // Gone between the two reads: unsubscribed or resized concurrently.
    position.ok_or_else(|| SubscriptionError::Unknown(s.name.clone()))
}

/// `ep_poll`: the next events of `member`'s share after its acknowledged position, in global
/// order, at or below the high-water mark. With `wait`, blocks until some arrive (woken at the
/// commit of an append) or the time passes. Polling again without an ack returns the same events.
pub fn poll(
    name: Option<&str>,
    member: Option<i32>,
    max_count: Option<i32>,
    wait: Option<pgrx::datum::Interval>,
) -> Result<Vec<pg_sys::Datum>, SubscriptionError> {
    let cat = catalog::require();
    let s = owned(&cat, name)?;
    let member = required(member, "member")?;
    let limit = check_count(max_count)?;
    let wait = required(wait, "wait")?;
    let wait_us =
        crate::pg::backend::interval_micros(&wait).map_err(|problem| ArgError::Invalid { arg: "wait", problem })?;
    let after = member_position(&s, member)?;
    // SAFETY: a plain read of the current memory context (the set-returning function's).
    let cxt = unsafe { pg_sys::CurrentMemoryContext };
    let deadline = std::time::Instant::now() + std::time::Duration::from_micros(wait_us as u64);
    let _waiting = (wait_us > 0).then(inflight::Waiting::start);
    loop {
        // Registered as waiting before looking: a commit after the look sets the latch, and the
        // sleep below returns at once (the latch protocol).
        crate::pg::backend::reset_latch();
        let hw = highwater::compute_for_reader();
        let (events, last) = if hw > after {
            let types = s.event_types.clone().and_then(|t| t.into_datum());
            catalog::read(|| {
                Spi::connect(|client| {
                    let r = spi::exec(
                        client,
                        &SHARE,
                        &[
                            spi::int8(after),
                            spi::int8(hw),
                            types,
                            spi::int8(s.members as i64),
                            spi::int8(member as i64),
                            spi::int8(limit),
                        ],
                        Snap::Latest,
                        0,
                    );
                    let events: Vec<pg_sys::Datum> = (0..r.len()).filter_map(|i| r.datum_in(i, 1, cxt)).collect();
                    let last: i64 = if r.is_empty() { after } else { r.get(r.len() - 1, 2).unwrap_or(after) };
                    (events, last)
                })
            })
        } else {
            (Vec::new(), after)
        };
        let full = events.len() as i64 >= limit;
        let now = std::time::Instant::now();
        if !events.is_empty() || now >= deadline {
            // `through`: how far this poll read the share. Nothing of it lies between `last` and
            // `through`, so acknowledging `last` acknowledges up to `through`; an empty poll
            // moves the position itself (there is nothing to process below the mark).
            let through = if full { last } else { hw.max(after) };
            catalog::privileged(&cat, || {
                Spi::connect(|client| {
                    spi::exec(
                        client,
                        &DELIVERED,
                        &[
                            spi::text(&s.name),
                            member.into_datum(),
                            spi::int8(last),
                            spi::int8(through),
                            events.is_empty().into_datum(),
                        ],
                        Snap::Fresh,
                        0,
                    );
                })
            });
            let mut events = events;
            crate::seal::unseal_rows(&cat, &mut events);
            return Ok(events);
        }
        let left = deadline.saturating_duration_since(now).as_millis().clamp(1, 1000) as i64;
        crate::pg::backend::wait_latch(left);
    }
}

static ACK: Stmt = Stmt {
    sql: "UPDATE ep.subscription_members SET \
                 position = GREATEST(position, CASE WHEN $3 >= delivered THEN delivered_through ELSE $3 END), \
                 last_ack_at = pg_catalog.clock_timestamp() \
          WHERE subscription = $1 AND member = $2 RETURNING delivered",
    types: &[pg_sys::TEXTOID, pg_sys::INT4OID, pg_sys::INT8OID],
};

static DELIVERED_OF: Stmt = Stmt {
    sql: "SELECT delivered FROM ep.subscription_members WHERE subscription = $1 AND member = $2",
    types: &[pg_sys::TEXTOID, pg_sys::INT4OID],
};

/// `ep_ack`: `member` has processed every event of its share up to `position` (the position of
/// an event a poll returned). Acknowledging the last event of a poll acknowledges everything that
/// poll read. A position beyond what was delivered is refused (22023).
pub fn ack(name: Option<&str>, member: Option<i32>, position: Option<i64>) -> Result<(), SubscriptionError> {
    let cat = catalog::require();
    let s = owned(&cat, name)?;
    let member = required(member, "member")?;
    let position = required(position, "global_position")?;
    member_position(&s, member)?;
    let delivered: i64 = catalog::read(|| {
        Spi::connect(|client| {
            spi::exec(client, &DELIVERED_OF, &[spi::text(&s.name), member.into_datum()], Snap::Fresh, 0)
                .get(0, 1)
                .unwrap_or(0)
        })
    });
    if position > delivered {
        return Err(SubscriptionError::BeyondDelivered { subscription: s.name, member, position, delivered });
    }
    catalog::privileged(&cat, || {
        Spi::connect(|client| {
            spi::exec(client, &ACK, &[spi::text(&s.name), member.into_datum(), spi::int8(position)], Snap::Fresh, 0);
        })
    });
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Appends

/// A subscription as appends see it: the NOTIFY channel of the types it receives.
#[derive(Clone, Debug)]
pub struct Channel {
    pub channel: String,
    pub event_types: Option<Vec<String>>,
}

static CHANNELS: Stmt =
    Stmt { sql: "SELECT 'ep:' || name, event_types FROM ep.subscriptions ORDER BY name", types: &[] };

/// The subscriptions' channels, read with a snapshot taken now (kept by the registry view).
pub fn channels() -> Vec<Channel> {
    Spi::connect(|client| {
        let r = spi::exec(client, &CHANNELS, &[], Snap::Latest, 0);
        (0..r.len()).map(|i| Channel { channel: r.get(i, 1).unwrap_or_default(), event_types: r.get(i, 2) }).collect()
    })
}

/// Notifies, at the commit of the append, the subscriptions that receive one of `types`; the
/// payload is the last position appended.
pub fn notify(channels: &[Channel], types: &[&str], last: i64) {
    let payload = std::ffi::CString::new(last.to_string()).expect("digits");
    for c in channels {
        if c.event_types.as_ref().is_none_or(|t| t.iter().any(|t| types.contains(&t.as_str()))) {
            let Ok(channel) = std::ffi::CString::new(c.channel.as_str()) else { continue };
            // SAFETY: Async_Notify copies both strings; the channel is at most 63 bytes (the
            // name's length is checked at ep_subscribe).
            unsafe { Async_Notify(channel.as_ptr(), payload.as_ptr()) };
        }
    }
}

// commands/async.h, which pgrx does not bind: what NOTIFY and pg_notify() call.
unsafe extern "C-unwind" {
    fn Async_Notify(channel: *const std::ffi::c_char, payload: *const std::ffi::c_char);
}
