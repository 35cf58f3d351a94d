//! What the extension refuses: two-phase commit of a transaction that appended or registered
//! (DESIGN.md section 4), and any write to ep.events other than an append, even by a superuser.

use ep_connection_tests::*;
use postgres::error::SqlState;
use postgres::Client;

fn prepared(c: &mut Client, gid: &str) -> bool {
    c.query_one("SELECT EXISTS (SELECT FROM pg_prepared_xacts WHERE gid = $1)", &[&gid]).unwrap().get(0)
}

/// Runs `work` in a transaction and PREPAREs it; expects the refusal, with nothing prepared and
/// nothing of the transaction left.
fn assert_prepare_refused(c: &mut Client, work: &str, gid: &str) {
    c.batch_execute("BEGIN").unwrap();
    c.batch_execute(work).unwrap_or_else(|e| panic!("{work}: {}", show(&e)));
    let err = expect_sqlstate(
        c.batch_execute(&format!("PREPARE TRANSACTION '{gid}'")),
        &SqlState::FEATURE_NOT_SUPPORTED,
        work,
    );
    assert!(err.message().starts_with("cannot PREPARE"), "{}", err.message());
    assert!(!prepared(c, gid), "{work}: the transaction was prepared anyway");
    assert!(c.is_closed() || c.simple_query("SELECT 1").is_ok(), "the session is usable after the refusal");
}

#[test]
fn prepare_transaction_refused() {
    let db = TestDb::new("prepare");
    let mut c = db.connect();
    create_counts_model(&mut c, "rm");

    assert_prepare_refused(&mut c, "SELECT ep_append('p', 'T', '{}')", "ep_ctest_append");
    assert_prepare_refused(&mut c, r#"SELECT ep_append_events('p', '[{"type": "T", "data": {}}]')"#, "ep_ctest_batch");
    assert_prepare_refused(
        &mut c,
        "SELECT ep_register_projection('counts', 'rm.count_event(ep.events)', 'inline', NULL, 'rm')",
        "ep_ctest_register",
    );
    assert!(check_log(&mut c).is_empty(), "a refused PREPARE must roll the appends back");
    let projections: i64 = c.query_one("SELECT count(*) FROM ep.projections", &[]).unwrap().get(0);
    assert_eq!(projections, 0);

    // The refusal is about appends only: in the same session, right after the refusals, a
    // transaction that read the log but did not append can be prepared and committed.
    c.batch_execute(
        "BEGIN; SELECT ep_stream_version('p'); SELECT count(*) FROM ep.events; \
         INSERT INTO rm.counts VALUES ('x', 0, 0); PREPARE TRANSACTION 'ep_ctest_plain'",
    )
    .unwrap_or_else(|e| panic!("preparing a transaction that did not append: {}", show(&e)));
    assert!(prepared(&mut c, "ep_ctest_plain"));
    c.batch_execute("COMMIT PREPARED 'ep_ctest_plain'").unwrap();

    // And appending still works.
    append(&mut c, "p", "T", &json!({}), Some(0)).unwrap();
    assert_eq!(check_log(&mut c).len(), 1);
}

/// Every way to write ep.events other than ep_append is refused with 0A000, as the superuser that
/// owns the table, and leaves the log as it was.
#[test]
fn events_are_append_only() {
    let db = TestDb::new("append_only");
    let mut c = db.connect();
    let superuser: bool =
        c.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = current_user", &[]).unwrap().get(0);
    assert!(superuser, "this test is about what even a superuser cannot do");
    for i in 0..3 {
        append(&mut c, "s", "T", &json!({"i": i}), None).unwrap();
    }
    let before = check_log(&mut c);

    let statements = [
        "UPDATE ep.events SET data = '{}'",
        "UPDATE ep.events SET data = data WHERE false", // a statement-level guard fires on no rows too
        "DELETE FROM ep.events",
        "DELETE FROM ep.events WHERE global_position = 1",
        "TRUNCATE ep.events",
        "TRUNCATE ep.events CASCADE",
        "INSERT INTO ep.events (global_position, stream_id, stream_position, event_type, data) VALUES (100, 's', 4, 'T', '{}')",
        "INSERT INTO ep.events SELECT global_position + 100, stream_id, stream_position + 3, event_type, data, metadata, created_at FROM ep.events",
        "INSERT INTO ep.events VALUES (1, 's', 1, 'T', '{}') ON CONFLICT DO NOTHING",
        "MERGE INTO ep.events e USING (SELECT 1 AS g) s ON e.global_position = s.g WHEN MATCHED THEN DELETE",
        "DO $$ BEGIN UPDATE ep.events SET event_type = 'X'; END $$",
    ];
    for sql in statements {
        let err = expect_sqlstate(c.batch_execute(sql), &SqlState::FEATURE_NOT_SUPPORTED, sql);
        assert!(err.message().starts_with("ep.events is"), "{sql}: {}", err.message());
    }
    assert_eq!(check_log(&mut c), before, "a refused statement changed the log");

    // A handler (running inside ep_append) cannot write the log either: only the append's own
    // INSERT passes the guard.
    c.batch_execute(
        r#"
CREATE SCHEMA sneaky;
CREATE FUNCTION sneaky.apply(e ep.events) RETURNS void LANGUAGE plpgsql AS $f$
BEGIN
    UPDATE ep.events SET data = '{"forged": true}' WHERE global_position = e.global_position;
END
$f$;
"#,
    )
    .unwrap();
    c.batch_execute("SELECT ep_register_projection('sneaky', 'sneaky.apply(ep.events)', 'inline', ARRAY['Sneak'])")
        .unwrap();
    let err = expect_sqlstate(
        append(&mut c, "s", "Sneak", &json!({}), None),
        &SqlState::FEATURE_NOT_SUPPORTED,
        "UPDATE in a handler",
    );
    assert!(err.message().contains("projection \"sneaky\""), "{}", err.message());
    assert_eq!(check_log(&mut c), before);
}

/// The guard lets an INSERT through while the active portal is a COPY, so that pg_restore's
/// `COPY ep.events FROM stdin` works. But that holds for any INSERT run during any COPY: here a
/// trigger on an unrelated table, fired by `COPY carrier FROM ...`, forges an event (bypassing
/// stream versions and inline projections).
#[test]
fn no_insert_during_an_unrelated_copy() {
    let db = TestDb::new("copy_hole");
    let mut c = db.connect();
    append(&mut c, "s", "T", &json!({}), None).unwrap();
    c.batch_execute(
        r#"
CREATE TABLE carrier (x int);
CREATE FUNCTION forge() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
    INSERT INTO ep.events (global_position, stream_id, stream_position, event_type, data)
        VALUES (999, 's', 7, 'Forged', '{}');
    RETURN NEW;
END
$f$;
CREATE TRIGGER forge BEFORE INSERT ON carrier FOR EACH ROW EXECUTE FUNCTION forge();
"#,
    )
    .unwrap();
    let copy = c.copy_in("COPY carrier FROM STDIN").and_then(|mut w| {
        std::io::Write::write_all(&mut w, b"1\n").unwrap();
        w.finish()
    });
    expect_sqlstate(copy, &SqlState::FEATURE_NOT_SUPPORTED, "INSERT INTO ep.events from a trigger during COPY carrier");
    check_log(&mut c);
}
