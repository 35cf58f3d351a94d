//! Deleting streams (README, "Deleting streams"; DESIGN.md, section 16): soft and hard deletes
//! and undeletes among concurrent writers leave an inline and an async read model equal to a
//! replay of what remains of the log, before and after rebuilds; ordinary roles can neither delete
//! without the grant nor fake the markers projections act on.

use ep_connection_tests::served::*;
use ep_connection_tests::*;
use postgres::error::SqlState;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A read model of stream sizes that forgets a hard-deleted stream and flags a soft-deleted one,
/// as README's example handler.
fn create_lifecycle_model(c: &mut postgres::Client, schema: &str) {
    c.batch_execute(&format!(
        r#"
CREATE SCHEMA {schema};
CREATE TABLE {schema}.sizes (stream_id text PRIMARY KEY, n bigint NOT NULL, deleted boolean NOT NULL DEFAULT false);
CREATE FUNCTION {schema}.apply(e ep.events) RETURNS void LANGUAGE plpgsql AS $f$
BEGIN
    IF e.event_type = '$stream_deleted' THEN
        IF (e.data ->> 'hard')::boolean THEN
            DELETE FROM sizes WHERE stream_id = e.stream_id;
        ELSE
            UPDATE sizes SET deleted = true WHERE stream_id = e.stream_id;
        END IF;
    ELSIF e.event_type = '$stream_undeleted' THEN
        UPDATE sizes SET deleted = false WHERE stream_id = e.stream_id;
    ELSE
        INSERT INTO sizes AS s VALUES (e.stream_id, 1, false)
            ON CONFLICT (stream_id) DO UPDATE SET n = s.n + 1;
    END IF;
END
$f$;
"#
    ))
    .unwrap_or_else(|e| panic!("{}", show(&e)));
}

type Sizes = BTreeMap<String, (i64, bool)>;

fn read_sizes(c: &mut postgres::Client, schema: &str) -> Sizes {
    c.query(&format!("SELECT stream_id, n, deleted FROM {schema}.sizes"), &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

/// The Rust twin of `apply`, over what is in the log.
fn replay_sizes(log: &[Event]) -> Sizes {
    let mut m = Sizes::new();
    for e in log {
        match e.event_type.as_str() {
            "$stream_deleted" if e.data["hard"] == Value::Bool(true) => {
                m.remove(&e.stream_id);
            }
            "$stream_deleted" => {
                if let Some(r) = m.get_mut(&e.stream_id) {
                    r.1 = true;
                }
            }
            "$stream_undeleted" => {
                if let Some(r) = m.get_mut(&e.stream_id) {
                    r.1 = false;
                }
            }
            _ => m.entry(e.stream_id.clone()).or_insert((0, false)).0 += 1,
        }
    }
    m
}

/// 4 writers append to 8 streams while a fifth client soft-deletes, undeletes and hard-deletes
/// them. Appends to a deleted stream are refused (55000) and write nothing; both read models
/// equal a replay of the remaining log, and still do after an in-place and a blue-green rebuild;
/// a hard-deleted stream keeps only its marker, and ep.stream_deletions accounts for every event
/// removed.
#[test]
fn deletes_among_concurrent_writers_keep_models_equal_to_a_replay() {
    let _all = AllDatabases::on(2);
    let db = TestDb::new("stream_deletes");
    let mut c = db.connect();
    create_lifecycle_model(&mut c, "lc");
    create_lifecycle_model(&mut c, "lca");
    register(&mut c, "lc", "lc.apply(ep.events)", "inline", "lc");
    register(&mut c, "lca", "lca.apply(ep.events)", "async", "lca");
    let seed = seed("deletes_among_concurrent_writers_keep_models_equal_to_a_replay");
    let stop = AtomicBool::new(false);

    let outcomes = run_parallel(&db, 5, |i, c| {
        let mut rng = Lcg(seed ^ (i as u64 + 1));
        if i == 4 {
            // The deleter: 60 actions, while the writers write.
            let _stop = StopOnDrop(&stop);
            let mut done = BTreeMap::<&str, u64>::new();
            for _ in 0..60 {
                let s = format!("s{}", rng.next() % 8);
                let (sql, what) = match rng.next() % 10 {
                    0 => ("SELECT ep_delete_stream($1, true)", "hard"),
                    1..=4 => ("SELECT ep_delete_stream($1)", "soft"),
                    _ => ("SELECT ep_undelete_stream($1)", "undelete"),
                };
                match c.query_one(sql, &[&s]) {
                    Ok(_) => *done.entry(what).or_default() += 1,
                    Err(e)
                        if e.as_db_error().is_some_and(|d| {
                            d.code() == &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE
                                || d.code() == &SqlState::UNDEFINED_OBJECT
                        }) => {}
                    Err(e) => return Err(format!("{sql} {s}: {}", show(&e)).into()),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            // At least one hard delete while the writers write, whatever the schedule drew.
            match c.query_one("SELECT ep_delete_stream('s0', true)", &[]) {
                Ok(_) => *done.entry("hard").or_default() += 1,
                Err(e) if e.as_db_error().is_some_and(|d| d.code() == &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE) => {}
                Err(e) => return Err(format!("hard delete of s0: {}", show(&e)).into()),
            }
            return Ok(format!("deleter: {done:?}"));
        }
        let (mut ok, mut refused) = (0, 0);
        while !stop.load(Ordering::SeqCst) {
            let s = format!("s{}", rng.next() % 8);
            match append(c, &s, "T", &json!({"w": i}), None) {
                Ok(_) => ok += 1,
                Err(e) if e.as_db_error().is_some_and(|d| d.code() == &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE) => {
                    refused += 1
                }
                Err(e) => return Err(show(&e).into()),
            }
        }
        Ok(format!("writer {i}: {ok} appended, {refused} refused"))
    });
    eprintln!("{}", outcomes.join("; "));

    let check = |c: &mut postgres::Client, when: &str| {
        let log = read_log(c);
        let h = log.last().map(|e| e.global_position).unwrap_or(0);
        assert!(wait_for(c, "lca", h, "60 s"), "{when}: the async projection did not catch up");
        let expected = replay_sizes(&log);
        assert_eq!(read_sizes(c, "lc"), expected, "{when}: the inline model is not a replay of the log");
        assert_eq!(read_sizes(c, "lca"), expected, "{when}: the async model is not a replay of the log");
        log
    };
    let log = check(&mut c, "after the writes");
    // Hard-deleted streams: only the marker is left, and everything before it is accounted for.
    let hard: Vec<(String, i64, i64)> = c
        .query("SELECT stream_id, marker_position, events_removed FROM ep.stream_deletions WHERE action = 'hard'", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert!(!hard.is_empty(), "no hard delete happened");
    for (s, marker, removed) in &hard {
        let left: Vec<&Event> = log.iter().filter(|e| &e.stream_id == s).collect();
        assert_eq!(left.len(), 1, "hard-deleted {s} keeps more than its marker");
        assert_eq!(left[0].global_position, *marker);
        assert_eq!(left[0].stream_position, removed + 1, "{s}: the marker's position minus one is what was removed");
    }
    // Every other stream is whole: stream positions 1, 2, 3, ...
    for s in (0..8).map(|k| format!("s{k}")).filter(|s| !hard.iter().any(|h| &h.0 == s)) {
        let positions: Vec<i64> = log.iter().filter(|e| e.stream_id == s).map(|e| e.stream_position).collect();
        assert_eq!(positions, (1..=positions.len() as i64).collect::<Vec<_>>(), "stream {s}");
        let version = stream_version(&mut c, &s).unwrap();
        assert_eq!(version, positions.len() as i64, "version of {s}");
    }

    for (name, strategy) in [("lc", "in_place"), ("lca", "blue_green"), ("lc", "blue_green")] {
        let id = rebuild(&mut c, name, strategy);
        assert_eq!(rebuild_wait(&mut c, id), "done", "rebuild of {name} ({strategy})");
    }
    check(&mut c, "after the rebuilds");

    // A dump and restore keeps the deletions: the log without the removed events, the marks, the
    // record, and models equal to the replay.
    let target = dump_restored(&db, "stream_deletes_restored");
    let mut r = target.connect();
    assert_eq!(read_log(&mut r), read_log(&mut c));
    for schema in ["lc", "lca"] {
        assert_eq!(read_sizes(&mut r, schema), read_sizes(&mut c, schema), "{schema} after the restore");
    }
    let marks = |c: &mut postgres::Client| -> Vec<String> {
        let sql = "SELECT s::text FROM ep.streams s ORDER BY 1";
        let mut v: Vec<String> = c.query(sql, &[]).unwrap().iter().map(|r| r.get(0)).collect();
        let sql = "SELECT d::text FROM ep.stream_deletions d ORDER BY id";
        v.extend(c.query(sql, &[]).unwrap().iter().map(|r| r.get::<_, String>(0)));
        v
    };
    assert_eq!(marks(&mut r), marks(&mut c));
    for (s, _, _) in &hard {
        expect_sqlstate(
            append(&mut r, s, "T", &json!({}), None),
            &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
            "an append to a hard-deleted stream after the restore",
        );
    }
}

/// A writer with README's grants can neither delete a stream nor append the markers projections
/// act on (which would let it make them forget a stream); a role granted ep_delete_stream deletes
/// without any privilege on the log's tables, and the deletion names it.
#[test]
fn deleting_needs_its_grant_and_markers_cannot_be_faked() {
    let db = TestDb::new("stream_deletes_security");
    let mut admin = db.connect();
    create_lifecycle_model(&mut admin, "lc");
    register(&mut admin, "lc", "lc.apply(ep.events)", "inline", "lc");
    append(&mut admin, "payroll", "Salary", &json!({"amount": 1}), None).unwrap();
    let writer = Role::create(&db.name, "ep_del_writer", Grants::Writer);
    let mut w = writer.connect();
    for sql in [
        "SELECT ep_delete_stream('payroll')",
        "SELECT ep_delete_stream('payroll', true)",
        "SELECT ep_undelete_stream('payroll')",
    ] {
        expect_sqlstate(w.query_one(sql, &[]), &SqlState::INSUFFICIENT_PRIVILEGE, sql);
    }
    for sql in [
        "SELECT ep_append('payroll', '$stream_deleted', '{\"hard\": true}')",
        "SELECT ep_append_events('payroll', '[{\"type\": \"$stream_deleted\", \"data\": {\"hard\": true}}]')",
    ] {
        expect_sqlstate(w.query_one(sql, &[]), &SqlState::INVALID_PARAMETER_VALUE, sql);
    }
    for sql in ["DELETE FROM ep.events", "UPDATE ep.streams SET deleted = 'soft'", "DELETE FROM ep.stream_deletions"] {
        expect_sqlstate(w.batch_execute(sql), &SqlState::INSUFFICIENT_PRIVILEGE, sql);
    }
    assert_eq!(read_sizes(&mut admin, "lc").get("payroll"), Some(&(1, false)));

    let eraser = Role::create(&db.name, "ep_del_eraser", Grants::Nothing);
    admin
        .batch_execute(
            "GRANT USAGE ON SCHEMA ep TO ep_del_eraser;
             GRANT EXECUTE ON FUNCTION ep_delete_stream(text, boolean), ep_undelete_stream(text) TO ep_del_eraser;",
        )
        .unwrap();
    let mut e = eraser.connect();
    e.query_one("SELECT ep_delete_stream('payroll', true)", &[]).unwrap_or_else(|err| panic!("{}", show(&err)));
    let (by, removed): (String, i64) = {
        let r = admin.query_one("SELECT done_by::text, events_removed FROM ep.stream_deletions", &[]).unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((by.as_str(), removed), ("ep_del_eraser", 1));
    assert_eq!(read_sizes(&mut admin, "lc").get("payroll"), None, "the projection did not react");
    let marker_by: String =
        admin.query_one("SELECT metadata ->> 'by' FROM ep.events WHERE stream_id = 'payroll'", &[]).unwrap().get(0);
    assert_eq!(marker_by, "ep_del_eraser");
    // The eraser still cannot touch the log's tables itself.
    expect_sqlstate(
        e.batch_execute("DELETE FROM ep.events"),
        &SqlState::INSUFFICIENT_PRIVILEGE,
        "DELETE as the eraser",
    );
}
