//! Invariant 3, atomic inline: an inline handler's error aborts the append, names the projection,
//! and leaves nothing of the append behind (log, stream version, read model).

use ep_connection_tests::*;
use postgres::error::SqlState;
use postgres::Client;

/// Read model `picky.seen`: one row per event it accepted. Its handler refuses type `Poison`.
fn create_picky(c: &mut Client) {
    c.batch_execute(
        r#"
CREATE SCHEMA picky;
CREATE TABLE picky.seen (global_position bigint PRIMARY KEY, stream_id text NOT NULL, event_type text NOT NULL);
CREATE FUNCTION picky.apply(e ep.events) RETURNS void LANGUAGE plpgsql AS $f$
BEGIN
    IF e.event_type = 'Poison' THEN
        RAISE EXCEPTION 'poisoned event in stream %', e.stream_id;
    END IF;
    INSERT INTO seen VALUES (e.global_position, e.stream_id, e.event_type);
END
$f$;
SELECT ep_register_projection('picky', 'picky.apply(ep.events)', 'inline', NULL, 'picky');
"#,
    )
    .unwrap_or_else(|e| panic!("creating projection picky: {}", show(&e)));
}

fn seen(c: &mut Client) -> std::collections::BTreeMap<i64, (String, String)> {
    c.query("SELECT global_position, stream_id, event_type FROM picky.seen", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

/// What `picky` must hold: every event of the log (none of them is a Poison).
fn assert_picky_matches_log(c: &mut Client) -> Vec<Event> {
    let log = check_log(c);
    assert!(log.iter().all(|e| e.event_type != "Poison"), "a Poison event reached the log");
    let model = seen(c);
    assert_matches_replay("picky.seen", &model, &log, |m, e| {
        m.insert(e.global_position, (e.stream_id.clone(), e.event_type.clone()));
    });
    log
}

/// The failed append's error: the handler's SQLSTATE kept, the projection named, the handler's own
/// message kept.
fn assert_handler_error<T: std::fmt::Debug>(r: std::result::Result<T, postgres::Error>, what: &str) {
    let err = expect_sqlstate(r, &SqlState::RAISE_EXCEPTION, what);
    assert!(
        err.message().contains("projection \"picky\""),
        "{what}: the message names the projection: {}",
        err.message()
    );
    assert!(err.message().contains("poisoned event"), "{what}: the handler's message is kept: {}", err.message());
}

#[test]
fn handler_error_aborts_append() {
    let db = TestDb::new("atomic_inline");
    let mut c = db.connect();
    create_picky(&mut c);
    append(&mut c, "s1", "Good", &json!({"n": 1}), None).unwrap();
    let before = assert_picky_matches_log(&mut c);

    // One event, on an existing stream and on a new one.
    assert_handler_error(append(&mut c, "s1", "Poison", &json!({}), None), "ep_append on s1");
    assert_handler_error(append(&mut c, "fresh", "Poison", &json!({}), Some(0)), "ep_append on a new stream");
    // A batch with the poison in the middle: the events before it were inserted and handled
    // already within the call; all of them must be gone.
    let batch =
        [("Good", json!({"n": 2})), ("Good", json!({"n": 3})), ("Poison", json!({})), ("Good", json!({"n": 4}))];
    assert_handler_error(append_events(&mut c, "s1", &batch, Some(1)), "ep_append_events on s1");
    assert_handler_error(append_events(&mut c, "fresh", &batch, None), "ep_append_events on a new stream");

    assert_eq!(assert_picky_matches_log(&mut c), before, "the failed appends left events behind");
    assert_eq!(stream_version(&mut c, "s1").unwrap(), 1);
    assert_eq!(stream_version(&mut c, "fresh").unwrap(), 0, "a failed append must not create its stream");

    // The next good append takes the next stream position, and a position after every burned one.
    let g = append(&mut c, "s1", "Good", &json!({"n": 5}), Some(1)).unwrap();
    let log = assert_picky_matches_log(&mut c);
    assert_eq!((log.len(), log.last().unwrap().stream_position, log.last().unwrap().global_position), (2, 2, g));
}

/// Inside a transaction, a failed append rolled back to a savepoint leaves the transaction's other
/// appends intact, and the stream stays contiguous.
#[test]
fn handler_error_in_savepoint() {
    let db = TestDb::new("atomic_savepoint");
    let mut c = db.connect();
    create_picky(&mut c);
    let mut tx = c.transaction().unwrap();
    append(&mut tx, "s", "Good", &json!({"n": 1}), None).unwrap();
    {
        let mut sp = tx.savepoint("poison").unwrap();
        assert_handler_error(append(&mut sp, "s", "Poison", &json!({}), None), "ep_append in a savepoint");
        sp.rollback().unwrap();
    }
    {
        let mut sp = tx.savepoint("poison_batch").unwrap();
        let batch = [("Good", json!({"n": 2})), ("Poison", json!({}))];
        assert_handler_error(append_events(&mut sp, "s", &batch, Some(1)), "ep_append_events in a savepoint");
        sp.rollback().unwrap();
    }
    append(&mut tx, "s", "Good", &json!({"n": 3}), Some(1)).unwrap();
    tx.commit().unwrap();

    let log = assert_picky_matches_log(&mut c);
    let data: Vec<_> = log.iter().map(|e| (e.stream_position, e.data.clone())).collect();
    assert_eq!(data, vec![(1, json!({"n": 1})), (2, json!({"n": 3}))]);
}
