//! Erasure by crypto-shredding (DESIGN.md, section 18; README, "Erasure"): the data of an event
//! appended with a subject is sealed under that subject's key, and forgetting the subject
//! destroys the key.
//!
//! Such an event stores the redacted shape (`REDACTED`) in `ep.events.data`, its data encrypted
//! (AES-256-GCM) in `sealed`, and the key's id in `subject_key`. Every read the extension serves
//! (ep_read_stream, ep_read_all, ep_poll, ep_unseal) and every event it hands to a handler is
//! unsealed here: the data while the key exists, the redacted shape for good once
//! ep_forget_subject deleted it. The keys live in `ep.subject_keys`, which only the extension
//! owner may read; they are read only here, as that owner, and never leave this module.
//!
//! The ciphertext is bound to its event: the additional data is the key id and the event id, so
//! a sealed value copied into another row (or another key id written next to it) does not open.

use crate::pg::catalog::{self, Catalog};
use crate::pg::spi::{self, Snap, Stmt};
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use std::collections::HashMap;

/// What a sealed event's data reads as once its subject is forgotten (and what `ep.events.data`
/// holds for it all along).
pub const REDACTED: &str = r#"{"$redacted": true}"#;

/// The first byte of every sealed value: the layout below, so that a later one can differ.
const FORMAT: u8 = 1;
const NONCE_LEN: usize = 12;
const KEY_LEN: usize = 32;

/// A subject's key, as an append holds it (locked against ep_forget_subject until commit).
pub struct Key {
    pub id: i64,
    bytes: [u8; KEY_LEN],
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("could not take the key of a subject: it was forgotten and created again concurrently")]
    KeyRace,
    #[error("could not generate random bytes for a subject key or a nonce")]
    NoRandom,
}

impl crate::pg::error::SqlError for SealError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            // A lost race with a concurrent ep_forget_subject: retrying the transaction succeeds.
            SealError::KeyRace => PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
            SealError::NoRandom => PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            SealError::KeyRace => Some("Retry the transaction.".into()),
            SealError::NoRandom => None,
        }
    }
}

/// The attribute numbers of the columns of `ep.events` this module reads and writes.
#[derive(Clone, Copy, Debug)]
pub struct Columns {
    data: i16,
    event_id: i16,
    subject_key: i16,
    sealed: i16,
}

/// The columns, or None for a database whose schema predates 0.5.0 (nothing is sealed there).
pub fn columns(cat: &Catalog) -> Option<Columns> {
    let attnum = |name: &std::ffi::CStr| {
        // SAFETY: a syscache lookup by relation OID and attribute name; InvalidAttrNumber if none.
        let n = unsafe { pg_sys::get_attnum(cat.events_rel, name.as_ptr()) };
        (n != pg_sys::InvalidAttrNumber as i16).then_some(n)
    };
    Some(Columns {
        data: attnum(c"data")?,
        event_id: attnum(c"event_id")?,
        subject_key: attnum(c"subject_key")?,
        sealed: attnum(c"sealed")?,
    })
}

fn random(buf: &mut [u8]) -> Result<(), SealError> {
    // SAFETY: pg_strong_random writes exactly `buf.len()` bytes into `buf`.
    if unsafe { pg_sys::pg_strong_random(buf.as_mut_ptr().cast(), buf.len()) } {
        Ok(())
    } else {
        Err(SealError::NoRandom)
    }
}

// ------------------------------------------------------------------------------------------------
// Keys

/// The key of a subject, locked against deletion (FOR KEY SHARE: ep_forget_subject's DELETE waits
/// for the appends that seal with it, and appends after it create a new key).
static KEY_OF: Stmt =
    Stmt { sql: "SELECT key_id, key FROM ep.subject_keys WHERE subject = $1 FOR KEY SHARE", types: &[pg_sys::TEXTOID] };

static NEW_KEY: Stmt = Stmt {
    sql: "INSERT INTO ep.subject_keys (subject, key) VALUES ($1, $2) \
          ON CONFLICT (subject) DO NOTHING RETURNING key_id, key",
    types: &[pg_sys::TEXTOID, pg_sys::BYTEAOID],
};

/// The id of a subject's key, if it has one (not locked: for comparing a retried append).
static KEY_ID_OF: Stmt =
    Stmt { sql: "SELECT key_id FROM ep.subject_keys WHERE subject = $1", types: &[pg_sys::TEXTOID] };

fn key_from(rows: &spi::Rows<'_>) -> Option<Key> {
    let id: i64 = rows.get(0, 1)?;
    let bytes: Vec<u8> = rows.get(0, 2)?;
    Some(Key { id, bytes: bytes.try_into().ok()? })
}

/// The key of `subject` for an append, created on first use; the caller runs as the extension
/// owner (inside `catalog::privileged`).
pub fn key_for_append(client: &SpiClient<'_>, subject: &str) -> Result<Key, SealError> {
    // Three tries: a new key can conflict with one a concurrent append inserted (then ours waits
    // for it, and the row is there to lock), and at REPEATABLE READ a key created after our
    // snapshot is neither visible nor insertable.
    for _ in 0..3 {
        if let Some(k) = key_from(&spi::exec(client, &KEY_OF, &[spi::text(subject)], Snap::Fresh, 0)) {
            return Ok(k);
        }
        let mut bytes = [0u8; KEY_LEN];
        random(&mut bytes)?;
        let args = [spi::text(subject), bytes.to_vec().into_datum()];
        if let Some(k) = key_from(&spi::exec(client, &NEW_KEY, &args, Snap::Fresh, 0)) {
            return Ok(k);
        }
    }
    Err(SealError::KeyRace)
}

/// The id of `subject`'s key, None when it has none (never had one, or was forgotten).
pub fn key_id_of(client: &SpiClient<'_>, subject: &str) -> Option<i64> {
    spi::exec(client, &KEY_ID_OF, &[spi::text(subject)], Snap::Fresh, 0).get(0, 1)
}

static KEYS: Stmt =
    Stmt { sql: "SELECT key_id, key FROM ep.subject_keys WHERE key_id = ANY ($1)", types: &[pg_sys::INT8ARRAYOID] };

/// The keys with these ids that still exist, read as the extension owner.
fn fetch_keys(cat: &Catalog, ids: &[i64]) -> HashMap<i64, [u8; KEY_LEN]> {
    catalog::privileged(cat, || {
        Spi::connect(|client| {
            let rows = spi::exec(client, &KEYS, &[ids.to_vec().into_datum()], Snap::Fresh, 0);
            (0..rows.len())
                .filter_map(|i| {
                    let id: i64 = rows.get(i, 1)?;
                    let bytes: Vec<u8> = rows.get(i, 2)?;
                    Some((id, bytes.try_into().ok()?))
                })
                .collect()
        })
    })
}

// ------------------------------------------------------------------------------------------------
// Sealing and opening

fn aad(key_id: i64, event_id: &pgrx::Uuid) -> [u8; 24] {
    let mut a = [0u8; 24];
    a[..8].copy_from_slice(&key_id.to_be_bytes());
    a[8..].copy_from_slice(event_id.as_bytes());
    a
}

/// The bytes of a jsonb datum (its binary form, without the varlena header).
///
/// # Safety
/// `data` must be a jsonb datum valid in the current memory context.
unsafe fn jsonb_bytes<'a>(data: pg_sys::Datum) -> &'a [u8] {
    // SAFETY: per the contract, a varlena; detoasting copies it into the current memory context
    // when it is compressed or external, and the slice covers exactly its payload.
    unsafe {
        let v = pg_sys::pg_detoast_datum_packed(data.cast_mut_ptr());
        std::slice::from_raw_parts(pgrx::varlena::vardata_any(v).cast(), pgrx::varlena::varsize_any_exhdr(v))
    }
}

/// `data` (a jsonb datum) sealed under `key` for the event `event_id`.
pub fn seal(key: &Key, event_id: &pgrx::Uuid, data: pg_sys::Datum) -> Result<Vec<u8>, SealError> {
    let mut nonce = [0u8; NONCE_LEN];
    random(&mut nonce)?;
    // SAFETY: the append's data argument, a jsonb datum of the calling statement.
    let plain = unsafe { jsonb_bytes(data) };
    Ok(seal_bytes(&key.bytes, key.id, event_id, &nonce, plain))
}

fn seal_bytes(
    key: &[u8; KEY_LEN],
    key_id: i64,
    event_id: &pgrx::Uuid,
    nonce: &[u8; NONCE_LEN],
    plain: &[u8],
) -> Vec<u8> {
    let cipher = Aes256Gcm::new(key.into());
    let ct = cipher
        .encrypt(Nonce::from_slice(nonce), Payload { msg: plain, aad: &aad(key_id, event_id) })
        .expect("AES-GCM encrypts any message shorter than 64 GiB (a jsonb is under 1 GiB)");
    let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
    out.push(FORMAT);
    out.extend_from_slice(nonce);
    out.extend_from_slice(&ct);
    out
}

/// The plaintext of a sealed value, None when it does not open under `key` for this event.
fn open_bytes(key: &[u8; KEY_LEN], key_id: i64, event_id: &pgrx::Uuid, sealed: &[u8]) -> Option<Vec<u8>> {
    let (&format, rest) = sealed.split_first()?;
    if format != FORMAT || rest.len() < NONCE_LEN {
        return None;
    }
    let (nonce, ct) = rest.split_at(NONCE_LEN);
    Aes256Gcm::new(key.into()).decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: &aad(key_id, event_id) }).ok()
}

// ------------------------------------------------------------------------------------------------
// Unsealing rows of ep.events

/// The key id of an `ep.events` row value whose data is sealed, None for clear data.
fn sealed_key(row: pg_sys::Datum, cols: Columns) -> Option<i64> {
    let mut isnull = false;
    // SAFETY: `row` is an ep.events composite datum (every caller's contract); GetAttributeByNum
    // detoasts it and reads one attribute by number, which `columns` looked up for this type.
    unsafe {
        let header = pg_sys::pg_detoast_datum(row.cast_mut_ptr()) as pg_sys::HeapTupleHeader;
        pg_sys::GetAttributeByNum(header, cols.sealed, &mut isnull);
        if isnull {
            return None;
        }
        let key = pg_sys::GetAttributeByNum(header, cols.subject_key, &mut isnull);
        (!isnull).then(|| key.value() as i64)
    }
}

/// `row` with its data replaced by `data` (NULL `sealed`): the row as readers and handlers get it.
///
/// # Safety
/// `row` must be an ep.events composite datum and `data` a jsonb datum, both valid in the
/// current memory context, where the new row is built.
unsafe fn with_data(row: pg_sys::Datum, cols: Columns, data: pg_sys::Datum) -> pg_sys::Datum {
    let at = |n: i16| std::num::NonZeroUsize::new(n as usize).expect("attribute numbers start at 1");
    // SAFETY: per the contract; the attributes are the jsonb `data` and the bytea `sealed` of
    // this row type, so the values given are of their types.
    unsafe {
        let mut t = PgHeapTuple::from_composite_datum(row);
        t.set_by_index_unchecked(at(cols.data), Some(data));
        t.set_by_index_unchecked(at(cols.sealed), None);
        t.into_composite_datum().expect("a composite datum")
    }
}

/// A jsonb datum, in the current memory context, holding `bytes` (a jsonb's binary form).
fn jsonb_datum(bytes: &[u8]) -> pg_sys::Datum {
    pg_sys::Datum::from(pgrx::varlena::rust_byte_slice_to_bytea(bytes).into_pg())
}

/// The redacted shape as a jsonb datum in the current memory context.
pub fn redacted() -> pg_sys::Datum {
    let shape = serde_json::from_str(REDACTED).expect("REDACTED is JSON");
    pgrx::JsonB(shape).into_datum().expect("a jsonb datum")
}

/// The clear form of one sealed row, given the keys that exist: its data when the key opens it,
/// the redacted shape otherwise.
fn unsealed(row: pg_sys::Datum, cols: Columns, key_id: i64, keys: &HashMap<i64, [u8; KEY_LEN]>) -> pg_sys::Datum {
    // SAFETY: `row` is an ep.events composite datum (the callers' contract).
    let t = unsafe { PgHeapTuple::from_composite_datum(row) };
    let at = |n: i16| std::num::NonZeroUsize::new(n as usize).expect("attribute numbers start at 1");
    let event_id: Option<pgrx::Uuid> = t.get_by_index(at(cols.event_id)).ok().flatten();
    let sealed: Option<&[u8]> = t.get_by_index(at(cols.sealed)).ok().flatten();
    let plain = match (keys.get(&key_id), event_id, sealed) {
        (Some(key), Some(id), Some(s)) => open_bytes(key, key_id, &id, s),
        _ => None,
    };
    let data = plain.map(|p| jsonb_datum(&p)).unwrap_or_else(redacted);
    // SAFETY: `row` as above; `data` is a jsonb datum made here, in the current memory context.
    unsafe { with_data(row, cols, data) }
}

/// Replaces every sealed row of `rows` (ep.events composite datums) by its clear form, built in
/// the current memory context; clear rows are left as they are. One read of the keys in all.
pub fn unseal_rows(cat: &Catalog, rows: &mut [pg_sys::Datum]) {
    let Some(cols) = columns(cat) else { return };
    let sealed: Vec<(usize, i64)> =
        rows.iter().enumerate().filter_map(|(i, r)| sealed_key(*r, cols).map(|k| (i, k))).collect();
    if sealed.is_empty() {
        return;
    }
    let mut ids: Vec<i64> = sealed.iter().map(|s| s.1).collect();
    ids.sort_unstable();
    ids.dedup();
    let keys = fetch_keys(cat, &ids);
    for (i, key_id) in sealed {
        rows[i] = unsealed(rows[i], cols, key_id, &keys);
    }
}

/// The row an append just inserted (sealed) with its clear data put back, for its inline
/// handlers: no need to open what was sealed a moment ago.
pub fn with_clear_data(cat: &Catalog, row: pg_sys::Datum, data: pg_sys::Datum) -> pg_sys::Datum {
    match columns(cat) {
        // SAFETY: `row` is the ep.events value the insert returned and `data` the append's
        // jsonb argument, both in the append's memory context.
        Some(cols) => unsafe { with_data(row, cols, data) },
        None => row,
    }
}

/// Whether `row` (an ep.events value) is sealed under `key_id` and holds this stream, type and
/// data: a retried append of a sealed event compares with what it sealed (its `data` column is
/// the redacted shape). False once the key is gone: nothing can be compared then.
pub fn holds(
    cat: &Catalog,
    row: pg_sys::Datum,
    key_id: i64,
    stream: &str,
    event_type: &str,
    data: pg_sys::Datum,
) -> bool {
    let Some(cols) = columns(cat) else { return false };
    if sealed_key(row, cols) != Some(key_id) {
        return false;
    }
    let keys = fetch_keys(cat, &[key_id]);
    if !keys.contains_key(&key_id) {
        return false;
    }
    let clear = unsealed(row, cols, key_id, &keys);
    // SAFETY: `clear` is the ep.events value built just above.
    let t = unsafe { PgHeapTuple::from_composite_datum(clear) };
    let same_place = t.get_by_name::<String>("stream_id").ok().flatten().as_deref() == Some(stream)
        && t.get_by_name::<String>("event_type").ok().flatten().as_deref() == Some(event_type);
    let mut isnull = false;
    // SAFETY: reads the jsonb `data` attribute of the row built above, then compares two jsonb
    // datums with jsonb's own equality (what the clear comparison uses).
    same_place
        && unsafe {
            let header = pg_sys::pg_detoast_datum(clear.cast_mut_ptr()) as pg_sys::HeapTupleHeader;
            let stored = pg_sys::GetAttributeByNum(header, cols.data, &mut isnull);
            !isnull && pgrx::direct_function_call::<bool>(pg_sys::jsonb_eq, &[Some(stored), Some(data)]) == Some(true)
        }
}

static SEALED_BETWEEN: Stmt = Stmt {
    sql: "SELECT EXISTS (SELECT FROM ep.events e WHERE e.subject_key IS NOT NULL \
          AND e.global_position > $1 AND e.global_position <= $2)",
    types: &[pg_sys::INT8OID, pg_sys::INT8OID],
};

/// Whether the log has a sealed event with `after < position <= bound`: a replay handler reads
/// `ep.events` itself, where such an event's data is the redacted shape, so the extension
/// applies such a range event by event instead (sandbox::replay).
pub fn sealed_between(cat: &Catalog, after: i64, bound: i64) -> bool {
    if columns(cat).is_none() {
        return false;
    }
    catalog::privileged(cat, || {
        Spi::connect(|client| {
            spi::exec(client, &SEALED_BETWEEN, &[spi::int8(after), spi::int8(bound)], Snap::Fresh, 0)
                .get::<bool>(0, 1)
                .unwrap_or(true)
        })
    })
}

// ------------------------------------------------------------------------------------------------
// Forgetting

static DROP_KEY: Stmt =
    Stmt { sql: "DELETE FROM ep.subject_keys WHERE subject = $1 RETURNING key_id", types: &[pg_sys::TEXTOID] };

/// Recorded after the DELETE, in a statement of its own: at READ COMMITTED its snapshot then
/// counts the events of the appends the DELETE waited for.
static RECORD: Stmt = Stmt {
    sql: "INSERT INTO ep.erasures (key_id, events, forgotten_by) \
          SELECT $1, pg_catalog.count(*), $2 FROM ep.events e WHERE e.subject_key = $1 RETURNING events",
    types: &[pg_sys::INT8OID, pg_sys::TEXTOID],
};

/// Destroys `subject`'s key and records it in ep.erasures (by key id: the subject's name is not
/// kept); returns how many events were sealed under it, 0 when the subject had no key.
pub fn forget(cat: &Catalog, subject: &str, by: &str) -> i64 {
    catalog::privileged(cat, || {
        Spi::connect(|client| {
            let Some(key_id) = spi::exec(client, &DROP_KEY, &[spi::text(subject)], Snap::Fresh, 0).get::<i64>(0, 1)
            else {
                return 0;
            };
            spi::exec(client, &RECORD, &[spi::int8(key_id), spi::text(by)], Snap::Fresh, 0)
                .get::<i64>(0, 1)
                .unwrap_or(0)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> pgrx::Uuid {
        pgrx::Uuid::from_bytes([n; 16])
    }

    #[test]
    fn a_sealed_value_opens_only_under_its_key_and_event() {
        let key = [7u8; KEY_LEN];
        let sealed = seal_bytes(&key, 5, &id(1), &[9u8; NONCE_LEN], b"{\"a\": 1}");
        assert_eq!(open_bytes(&key, 5, &id(1), &sealed).as_deref(), Some(&b"{\"a\": 1}"[..]));
        // Another key, another key id, another event, a flipped bit, a cut value: nothing opens.
        assert_eq!(open_bytes(&[8u8; KEY_LEN], 5, &id(1), &sealed), None);
        assert_eq!(open_bytes(&key, 6, &id(1), &sealed), None);
        assert_eq!(open_bytes(&key, 5, &id(2), &sealed), None);
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert_eq!(open_bytes(&key, 5, &id(1), &bad), None, "bit flipped in byte {i}");
        }
        assert_eq!(open_bytes(&key, 5, &id(1), &sealed[..sealed.len() - 1]), None);
        assert_eq!(open_bytes(&key, 5, &id(1), &[]), None);
    }

    #[test]
    fn the_plaintext_does_not_appear_in_the_sealed_value() {
        let plain = b"alice@example.com alice@example.com";
        let sealed = seal_bytes(&[1u8; KEY_LEN], 1, &id(3), &[2u8; NONCE_LEN], plain);
        assert!(!sealed.windows(5).any(|w| w == b"alice"));
        assert_eq!(sealed.len(), 1 + NONCE_LEN + plain.len() + 16);
    }
}
