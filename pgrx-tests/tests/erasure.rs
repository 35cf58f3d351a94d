//! Erasure by crypto-shredding (README, "Erasure"; DESIGN.md, section 18): events appended with a
//! subject are sealed under the subject's key; ep_forget_subject destroys the key, after which
//! every read and every replay returns `{"$redacted": true}` for them. Read models rebuilt after
//! a forget equal a replay of the log as it now reads, a replay handler (which reads ep.events
//! itself) included; the clear data is never in ep.events; a dump and restore keeps live subjects
//! readable and forgotten ones forgotten; ordinary roles can neither read keys nor forget without
//! the grant, nor open a sealed value they could not read.

use ep_connection_tests::postgres::Client;
use ep_connection_tests::served::*;
use ep_connection_tests::*;
use postgres::error::SqlState;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

fn redacted() -> Value {
    json!({"$redacted": true})
}

/// A read model with one row per event and its data: what a model built from personal data holds.
/// Its replay handler reads ep.events itself, set-based.
fn create_data_model(c: &mut Client, schema: &str) {
    c.batch_execute(&format!(
        r#"
CREATE SCHEMA {schema};
CREATE TABLE {schema}.events (stream_id text, stream_position bigint, data jsonb, PRIMARY KEY (stream_id, stream_position));
CREATE FUNCTION {schema}.apply(e ep.events) RETURNS void LANGUAGE plpgsql AS $f$
BEGIN
    INSERT INTO events VALUES (e.stream_id, e.stream_position, e.data);
END
$f$;
CREATE FUNCTION {schema}.replay(a bigint, b bigint) RETURNS void LANGUAGE plpgsql AS $f$
BEGIN
    INSERT INTO events SELECT e.stream_id, e.stream_position, e.data FROM ep.events e
     WHERE e.global_position > a AND e.global_position <= b;
END
$f$;
"#
    ))
    .unwrap_or_else(|e| panic!("{}", show(&e)));
}

type Model = BTreeMap<(String, i64), Value>;

fn read_model(c: &mut Client, schema: &str) -> Model {
    c.query(&format!("SELECT stream_id, stream_position, data FROM {schema}.events"), &[])
        .unwrap()
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect()
}

/// The log as every read of the extension returns it (unsealed), in global order.
fn read_clear_log(c: &mut Client) -> Vec<Event> {
    c.query(
        "SELECT u.global_position, u.stream_id, u.stream_position, u.event_type, u.data, u.metadata
           FROM ep.events e, LATERAL ep_unseal(e) u ORDER BY e.global_position",
        &[],
    )
    .unwrap_or_else(|e| panic!("{}", show(&e)))
    .iter()
    .map(|r| Event {
        global_position: r.get(0),
        stream_id: r.get(1),
        stream_position: r.get(2),
        event_type: r.get(3),
        data: r.get(4),
        metadata: r.get(5),
    })
    .collect()
}

fn replay_model(log: &[Event]) -> Model {
    log.iter().map(|e| ((e.stream_id.clone(), e.stream_position), e.data.clone())).collect()
}

fn append_as_subject(c: &mut Client, stream: &str, data: &Value, subject: Option<&str>) -> Result<i64> {
    Ok(c.query_one("SELECT ep_append($1, 'T', $2, subject => $3)", &[&stream, data, &subject])?.get(0))
}

#[test]
fn forgetting_among_writers_keeps_models_equal_to_a_replay_and_survives_a_dump() {
    let _all = AllDatabases::on(2);
    let db = TestDb::new("erasure_writers");
    let mut c = db.connect();
    for (name, mode) in [("ei", "inline"), ("ea", "async"), ("er", "inline")] {
        create_data_model(&mut c, name);
        let replay = if name == "er" { "'er.replay(bigint, bigint)'" } else { "NULL" };
        c.batch_execute(&format!(
            "SELECT ep_register_projection('{name}', '{name}.apply(ep.events)', '{mode}', NULL, '{name}', {replay})"
        ))
        .unwrap_or_else(|e| panic!("{}", show(&e)));
    }
    // What the writers appended: position -> (subject, data).
    let written = Mutex::new(BTreeMap::<i64, (Option<String>, Value)>::new());
    let forgotten = Mutex::new(BTreeMap::<String, i64>::new());
    let seed = seed("forgetting_among_writers_keeps_models_equal_to_a_replay_and_survives_a_dump");
    run_parallel(&db, 5, |i, c| {
        let mut rng = Lcg(seed ^ (i as u64 + 1));
        if i == 4 {
            // Forgets five subjects while the writers seal under them.
            for k in 0..5 {
                std::thread::sleep(Duration::from_millis(40 + (rng.next() % 40)));
                let subject = format!("user-{k}");
                let n: i64 = c.query_one("SELECT ep_forget_subject($1)", &[&subject])?.get(0);
                forgotten.lock().unwrap().insert(subject, n);
            }
            return Ok(());
        }
        for n in 0..150 {
            let k = rng.next() % 10;
            let subject = (n % 3 != 0).then(|| format!("user-{k}"));
            let data = json!({ "email": format!("user-{k}@example.com"), "writer": i, "n": n });
            let p = append_as_subject(c, &format!("u-{k}"), &data, subject.as_deref())?;
            written.lock().unwrap().insert(p, (subject, data));
        }
        Ok(())
    });
    let (written, forgotten) = (written.into_inner().unwrap(), forgotten.into_inner().unwrap());
    let p = head(&mut c);
    assert!(wait_for(&mut c, "ea", p, "60 s"));

    // The log as read: clear data for the live keys, the redacted shape for forgotten ones.
    let log = read_clear_log(&mut c);
    assert_eq!(log.len(), written.len());
    let mut redacted_events = 0;
    for e in &log {
        let (subject, data) = &written[&e.global_position];
        if e.data == redacted() {
            redacted_events += 1;
            let s = subject.as_deref().expect("only sealed events are redacted");
            assert!(forgotten.contains_key(s), "event {} of live subject {s} reads redacted", e.global_position);
        } else {
            assert_eq!(&e.data, data, "event {}", e.global_position);
        }
    }
    assert!(redacted_events > 0, "no event was appended before its subject was forgotten");
    assert_eq!(redacted_events, forgotten.values().sum::<i64>(), "ep_forget_subject's counts");
    // ep_read_all and ep_read_stream read the same, and the clear data of a subject's event is
    // nowhere in ep.events.
    let all: Vec<Value> =
        c.query("SELECT data FROM ep_read_all(0, 100000)", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(all, log.iter().map(|e| e.data.clone()).collect::<Vec<_>>());
    let s3: Vec<Value> =
        c.query("SELECT data FROM ep_read_stream('u-3')", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(s3, log.iter().filter(|e| e.stream_id == "u-3").map(|e| e.data.clone()).collect::<Vec<_>>());
    let leaked: i64 = c
        .query_one(
            "SELECT count(*) FROM ep.events WHERE subject_key IS NOT NULL
              AND (data <> '{\"$redacted\": true}' OR position('example.com' in encode(sealed, 'escape')) > 0)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(leaked, 0, "clear data in ep.events");
    let sealed: i64 = c.query_one("SELECT count(*) FROM ep.events WHERE subject_key IS NOT NULL", &[]).unwrap().get(0);
    assert_eq!(sealed as usize, written.values().filter(|w| w.0.is_some()).count());

    // Rebuilt after the forgets, every model equals a replay of the log as it now reads; the
    // replay handler's projection too (ranges with sealed events go event by event).
    for (name, strategy) in [("ei", "in_place"), ("ea", "blue_green"), ("er", "in_place"), ("er", "blue_green")] {
        let id = rebuild(&mut c, name, strategy);
        assert_eq!(rebuild_wait(&mut c, id), "done", "rebuild of {name}");
        let p = head(&mut c);
        assert!(wait_for(&mut c, name, p, "60 s"));
        assert_model_eq(&format!("{name} after a {strategy} rebuild"), &read_model(&mut c, name), &replay_model(&log));
    }

    // Dump and restore: the keys go with the log (live subjects stay readable), forgotten ones
    // stay forgotten, and the record of the forgets stays.
    let restored = dump_restored(&db, "erasure_restored");
    let mut r = restored.connect();
    assert_eq!(read_clear_log(&mut r), log, "the log after a restore");
    let erasures = |c: &mut Client| -> BTreeSet<(i64, i64)> {
        c.query("SELECT key_id, events FROM ep.erasures", &[]).unwrap().iter().map(|r| (r.get(0), r.get(1))).collect()
    };
    assert_eq!(erasures(&mut r), erasures(&mut c));
    assert_eq!(erasures(&mut c).len(), forgotten.values().filter(|n| **n > 0).count());
    let n: i64 = r.query_one("SELECT ep_forget_subject('user-9')", &[]).unwrap().get(0);
    assert!(n > 0);
    let still: i64 = r
        .query_one("SELECT count(*) FROM ep_read_stream('u-9') WHERE data = '{\"$redacted\": true}'", &[])
        .unwrap()
        .get(0);
    assert!(still >= n, "{still} of the {n} events of user-9 read redacted after the forget");
    // ... in the restored copy only.
    let source: i64 = c
        .query_one("SELECT count(*) FROM ep_read_stream('u-9') WHERE data = '{\"$redacted\": true}'", &[])
        .unwrap()
        .get(0);
    assert!(source < still);
}

/// A retried append with a subject is idempotent like any other: same id, stream, type, data and
/// subject returns the first position and writes nothing; any difference, or a retry once the
/// subject is forgotten (nothing left to compare with), is refused with 23505.
#[test]
fn retries_of_sealed_appends_compare_with_what_was_sealed() {
    let db = TestDb::new("erasure_retries");
    let mut c = db.connect();
    let id = "0190f5a4-0000-7000-8000-0000000000e1";
    let append = |c: &mut Client, data: &str, subject: Option<&str>| {
        c.query_one(
            "SELECT ep_append('r-1', 'T', $1::text::jsonb, NULL, NULL, $2::text::uuid, $3)",
            &[&data, &id, &subject],
        )
        .map(|r| r.get::<_, i64>(0))
    };
    let first = append(&mut c, r#"{"name": "Ada", "n": 1.0}"#, Some("ada")).unwrap();
    // jsonb equality: 1.0 = 1, key order does not matter.
    assert_eq!(append(&mut c, r#"{"n": 1, "name": "Ada"}"#, Some("ada")).unwrap(), first);
    for (data, subject, what) in [
        (r#"{"name": "Eve", "n": 1}"#, Some("ada"), "other data"),
        (r#"{"name": "Ada", "n": 1}"#, Some("bob"), "another subject"),
        (r#"{"name": "Ada", "n": 1}"#, None, "no subject"),
    ] {
        expect_sqlstate(append(&mut c, data, subject), &SqlState::UNIQUE_VIOLATION, what);
    }
    // A batch with subjects, retried.
    let batch = json!([
        {"type": "T", "data": {"a": 1}, "id": "0190f5a4-0000-7000-8000-0000000000e2", "subject": "ada"},
        {"type": "T", "data": {"b": 2}, "id": "0190f5a4-0000-7000-8000-0000000000e3"}
    ]);
    let p: i64 = c.query_one("SELECT ep_append_events('r-1', $1)", &[&batch]).unwrap().get(0);
    let again: i64 = c.query_one("SELECT ep_append_events('r-1', $1)", &[&batch]).unwrap().get(0);
    assert_eq!(p, again);
    let events: i64 = c.query_one("SELECT count(*) FROM ep.events WHERE stream_id = 'r-1'", &[]).unwrap().get(0);
    assert_eq!(events, 3);
    let read: Vec<Value> =
        c.query("SELECT data FROM ep_read_stream('r-1')", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(read, vec![json!({"name": "Ada", "n": 1.0}), json!({"a": 1}), json!({"b": 2})]);
    assert_eq!(c.query_one("SELECT ep_forget_subject('ada')", &[]).unwrap().get::<_, i64>(0), 2);
    assert_eq!(c.query_one("SELECT ep_forget_subject('ada')", &[]).unwrap().get::<_, i64>(0), 0, "forgetting again");
    expect_sqlstate(
        append(&mut c, r#"{"name": "Ada", "n": 1}"#, Some("ada")),
        &SqlState::UNIQUE_VIOLATION,
        "a retry after the forget",
    );
    let read: Vec<Value> =
        c.query("SELECT data FROM ep_read_stream('r-1')", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(read, vec![redacted(), redacted(), json!({"b": 2})]);
    // Bad subjects.
    expect_sqlstate(
        c.query_one("SELECT ep_append('r-2', 'T', '{}', subject => '')", &[]),
        &SqlState::INVALID_PARAMETER_VALUE,
        "an empty subject",
    );
    expect_sqlstate(
        c.query_one("SELECT ep_append_events('r-2', '[{\"type\":\"T\",\"data\":{},\"subject\":7}]')", &[]),
        &SqlState::INVALID_PARAMETER_VALUE,
        "a subject that is a number",
    );
    expect_sqlstate(
        c.query_one("SELECT ep_forget_subject(NULL)", &[]),
        &SqlState::NULL_VALUE_NOT_ALLOWED,
        "NULL subject",
    );
}

/// Ordinary roles: a writer seals but cannot read keys, forget, or unseal; a role granted only
/// ep_forget_subject forgets (recorded by name) and reads nothing; a role that may not read the
/// log cannot open a forged row; a reader's forged row with another event's sealed value does
/// not open; a subject is a value, never SQL; a handler cannot forget; nobody became superuser.
#[test]
fn ordinary_roles_cannot_read_keys_forget_or_open_what_they_may_not_read() {
    let _all = AllDatabases::on(2);
    let db = TestDb::new("erasure_security");
    let mut admin = db.connect();
    let writer = Role::create(&db.name, "er_writer", Grants::Writer);
    let reader = Role::create(&db.name, "er_reader", Grants::Reader);
    let mut w = writer.connect();
    let hostile = "x'); DELETE FROM ep.subject_keys; --";
    w.query_one("SELECT ep_append('h-1', 'T', '{\"secret\": \"s1\"}', subject => $1)", &[&hostile]).unwrap();
    w.query_one("SELECT ep_append('h-1', 'T', '{\"secret\": \"s2\"}', subject => 'other')", &[]).unwrap();
    for (sql, what) in [
        ("SELECT * FROM ep.subject_keys", "a writer reading keys"),
        ("SELECT ep_forget_subject('other')", "a writer forgetting"),
        ("SELECT ep_unseal(e) FROM ep.events e", "a writer unsealing"),
        ("SELECT * FROM ep.erasures", "a writer reading erasures"),
    ] {
        expect_sqlstate(w.query(sql, &[]), &SqlState::INSUFFICIENT_PRIVILEGE, what);
    }
    let mut r = reader.connect();
    expect_sqlstate(
        r.query("SELECT * FROM ep.subject_keys", &[]),
        &SqlState::INSUFFICIENT_PRIVILEGE,
        "a reader reading keys",
    );
    // The table itself: the reader sees only redacted data; the reads unseal.
    let stored: Vec<Value> =
        r.query("SELECT data FROM ep.events ORDER BY global_position", &[]).unwrap().iter().map(|x| x.get(0)).collect();
    assert_eq!(stored, vec![redacted(), redacted()]);
    let read: Vec<Value> =
        r.query("SELECT data FROM ep_read_stream('h-1')", &[]).unwrap().iter().map(|x| x.get(0)).collect();
    assert_eq!(read, vec![json!({"secret": "s1"}), json!({"secret": "s2"})]);
    admin.batch_execute("GRANT EXECUTE ON FUNCTION ep_unseal(ep.events) TO er_reader").unwrap();
    // A forged row: event 2's sealed value under event 1's id and key does not open.
    let forged: Value = r
        .query_one(
            "SELECT (ep_unseal(ROW(a.global_position, a.stream_id, a.stream_position, a.event_type, a.data, a.metadata,
                                   a.created_at, a.event_id, a.subject_key, b.sealed)::ep.events)).data
               FROM ep.events a, ep.events b WHERE a.stream_position = 1 AND b.stream_position = 2",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(forged, redacted());
    // A role that may execute ep_unseal but not read the log opens nothing, not even a row copied
    // from elsewhere.
    let outsider = Role::create(&db.name, "er_outsider", Grants::Nothing);
    admin
        .batch_execute(
            "GRANT USAGE ON SCHEMA ep TO er_outsider; GRANT EXECUTE ON FUNCTION ep_unseal(ep.events) TO er_outsider",
        )
        .unwrap();
    let row: String = admin.query_one("SELECT e::text FROM ep.events e WHERE stream_position = 2", &[]).unwrap().get(0);
    expect_sqlstate(
        outsider.connect().query_one("SELECT (ep_unseal($1::text::ep.events)).data", &[&row]),
        &SqlState::INSUFFICIENT_PRIVILEGE,
        "an outsider unsealing a copied row",
    );

    // An eraser: only ep_forget_subject.
    let eraser = Role::create(&db.name, "er_eraser", Grants::Nothing);
    admin.batch_execute("GRANT EXECUTE ON FUNCTION ep_forget_subject(text) TO er_eraser").unwrap();
    let mut e = eraser.connect();
    assert_eq!(e.query_one("SELECT ep_forget_subject($1)", &[&hostile]).unwrap().get::<_, i64>(0), 1);
    expect_sqlstate(
        e.query("SELECT * FROM ep.erasures", &[]),
        &SqlState::INSUFFICIENT_PRIVILEGE,
        "an eraser reading erasures",
    );
    let by: String = admin.query_one("SELECT forgotten_by FROM ep.erasures", &[]).unwrap().get(0);
    assert_eq!(by, "er_eraser");
    let keys: i64 = admin.query_one("SELECT count(*) FROM ep.subject_keys", &[]).unwrap().get(0);
    assert_eq!(keys, 1, "the hostile subject name deleted other keys");
    let read: Vec<Value> =
        r.query("SELECT data FROM ep_read_stream('h-1')", &[]).unwrap().iter().map(|x| x.get(0)).collect();
    assert_eq!(read, vec![redacted(), json!({"secret": "s2"})]);

    // A projection owner's handler that tries to forget: refused, and the append with it.
    let owner = Role::create(&db.name, "er_owner", Grants::ProjectionOwner);
    admin
        .batch_execute("CREATE SCHEMA er_owner AUTHORIZATION er_owner; GRANT EXECUTE ON FUNCTION ep_forget_subject(text) TO er_owner")
        .unwrap();
    let mut o = owner.connect();
    o.batch_execute(
        r#"
CREATE FUNCTION er_owner.h(e ep.events) RETURNS void LANGUAGE plpgsql AS $f$
BEGIN
    IF e.event_type = 'Forget' THEN PERFORM ep_forget_subject('other'); END IF;
END
$f$;
SELECT ep_register_projection('er_h', 'er_owner.h(ep.events)', 'inline', NULL, 'er_owner');
"#,
    )
    .unwrap_or_else(|e| panic!("{}", show(&e)));
    expect_sqlstate(
        w.query_one("SELECT ep_append('h-2', 'Forget', '{}')", &[]),
        &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
        "a forget from inside a handler",
    );
    let read: Vec<Value> =
        r.query("SELECT data FROM ep_read_stream('h-1')", &[]).unwrap().iter().map(|x| x.get(0)).collect();
    assert_eq!(read[1], json!({"secret": "s2"}));
    for role in [&writer, &reader, &outsider, &eraser, &owner] {
        assert!(!role.is_superuser(), "{} became superuser", role.name);
    }
}

/// An append that seals under a subject's key holds it: a concurrent ep_forget_subject waits for
/// the append's commit and then counts (and erases) its event too.
#[test]
fn a_forget_waits_for_the_appends_sealing_under_the_key() {
    let db = TestDb::new("erasure_race");
    let mut a = db.connect();
    let mut f = db.connect();
    // The key exists (a forget cannot see a key still being created: it has nothing to wait for).
    a.batch_execute("SELECT ep_append('c-1', 'T', '{\"x\": 0}', subject => 'carol')").unwrap();
    a.batch_execute("BEGIN; SELECT ep_append('c-1', 'T', '{\"x\": 1}', subject => 'carol')").unwrap();
    let forget =
        std::thread::spawn(move || f.query_one("SELECT ep_forget_subject('carol')", &[]).map(|r| r.get::<_, i64>(0)));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!forget.is_finished(), "the forget did not wait for the append");
    a.batch_execute("COMMIT").unwrap();
    assert_eq!(forget.join().unwrap().unwrap(), 2);
    let read: Vec<Value> =
        a.query("SELECT data FROM ep_read_stream('c-1')", &[]).unwrap().iter().map(|x| x.get(0)).collect();
    assert_eq!(read, vec![redacted(), redacted()]);
    // The subject's next event gets a new key, and reads clear.
    a.query_one("SELECT ep_append('c-1', 'T', '{\"x\": 2}', subject => 'carol')", &[]).unwrap();
    let read: Vec<Value> =
        a.query("SELECT data FROM ep_read_stream('c-1')", &[]).unwrap().iter().map(|x| x.get(0)).collect();
    assert_eq!(read, vec![redacted(), redacted(), json!({"x": 2})]);
}
