//! No drift across transaction boundaries (issue 11): a session that changed the registry and
//! then rolled the change back, whole or to a savepoint, goes on appending with exactly what a
//! fresh read of the committed registry says. Every case compares the models with a replay of the
//! log, in the same session that rolled back (the per-backend view of the registry lives there).

use ep_connection_tests::*;
use postgres::Client;

/// A session with inline projection `bal` (schema `bal`) active and one event applied.
fn with_bal(name: &str) -> (TestDb, Client) {
    let db = TestDb::new(name);
    let mut c = db.connect();
    create_counts_projection(&mut c, "bal", "bal");
    append(&mut c, "a", "T", &json!({}), None).unwrap();
    (db, c)
}

/// Appends twice in new transactions and checks `bal` against the log.
fn append_twice_and_check(c: &mut Client) {
    append(c, "a", "T", &json!({}), None).unwrap();
    append(c, "a", "T", &json!({}), None).unwrap();
    assert_counts_match_log(c, "bal");
}

#[test]
fn a_rolled_back_unregistration_leaves_no_trace_in_the_session() {
    let (_db, mut c) = with_bal("drift_unregister");
    c.batch_execute("BEGIN; SELECT ep_unregister_projection('bal'); SELECT ep_append('a', 'T', '{}'); ROLLBACK")
        .unwrap();
    append_twice_and_check(&mut c);
}

#[test]
fn a_rolled_back_registration_leaves_no_trace_in_the_session() {
    let (_db, mut c) = with_bal("drift_register");
    create_counts_model(&mut c, "ghost");
    c.batch_execute(
        "BEGIN; SELECT ep_register_projection('ghost', 'ghost.count_event(ep.events)', 'inline', NULL, 'ghost');
         SELECT ep_append('a', 'T', '{}'); ROLLBACK",
    )
    .unwrap();
    append_twice_and_check(&mut c);
    assert!(read_counts(&mut c, "ghost").is_empty(), "the handler of a projection that does not exist ran");
}

#[test]
fn a_registry_change_rolled_back_to_a_savepoint_leaves_no_trace() {
    let (_db, mut c) = with_bal("drift_savepoint");
    create_counts_model(&mut c, "ghost");
    c.batch_execute(
        "BEGIN;
         SAVEPOINT s1; SELECT ep_unregister_projection('bal'); SELECT ep_append('a', 'T', '{}'); ROLLBACK TO SAVEPOINT s1;
         SELECT ep_append('a', 'T', '{}');
         SAVEPOINT s2; SELECT ep_register_projection('ghost', 'ghost.count_event(ep.events)', 'inline', NULL, 'ghost');
         SELECT ep_append('a', 'T', '{}'); ROLLBACK TO SAVEPOINT s2;
         SELECT ep_append('a', 'T', '{}');
         COMMIT",
    )
    .unwrap();
    assert_counts_match_log(&mut c, "bal");
    append_twice_and_check(&mut c);
    assert!(read_counts(&mut c, "ghost").is_empty(), "the handler of a rolled-back registration ran");
}

/// A registry change whose transaction fails (an error, not a ROLLBACK statement).
#[test]
fn a_registry_change_in_a_failed_transaction_leaves_no_trace() {
    let (_db, mut c) = with_bal("drift_error");
    let r =
        c.batch_execute("BEGIN; SELECT ep_unregister_projection('bal'); SELECT ep_append('a', 'T', '{}'); SELECT 1/0");
    assert!(r.is_err());
    c.batch_execute("ROLLBACK").unwrap();
    append_twice_and_check(&mut c);
}

/// The registry change committed: the session follows it (the projection is gone, its model
/// stays as it was), and a second session that kept a view from before follows it too.
#[test]
fn a_committed_change_is_followed_by_every_session() {
    let (db, mut c) = with_bal("drift_commit");
    let mut other = db.connect();
    append(&mut other, "b", "T", &json!({}), None).unwrap(); // `other` keeps a view with bal
    c.batch_execute("BEGIN; SELECT ep_unregister_projection('bal'); SELECT ep_append('a', 'T', '{}'); COMMIT").unwrap();
    let before = read_counts(&mut c, "bal");
    append(&mut c, "a", "T", &json!({}), None).unwrap();
    append(&mut other, "b", "T", &json!({}), None).unwrap();
    assert_eq!(read_counts(&mut c, "bal"), before, "an unregistered projection's handler ran");
}

/// A registration waits for the registry lock while an append transaction is open, one short
/// lock_timeout attempt after another; `statement_timeout` still ends the wait (PostgreSQL drops
/// the statement timeout's indicator when both timers expire together, and the extension checks
/// the clock itself between attempts). The session is usable afterwards.
#[test]
fn a_registration_waiting_for_appends_obeys_statement_timeout() {
    let (db, mut c) = with_bal("drift_reg_timeout");
    create_counts_model(&mut c, "late");
    let mut open = db.connect();
    open.batch_execute("BEGIN").unwrap();
    append(&mut open, "a", "T", &json!({}), None).unwrap(); // holds the registry lock SHARED
    c.batch_execute("SET statement_timeout = '1s'").unwrap();
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let r = register_counts(&mut c, "late", "late");
        expect_sqlstate(r, &postgres::error::SqlState::QUERY_CANCELED, "registration behind an open append");
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "the wait outlived statement_timeout: {:?}",
            t.elapsed()
        );
    }
    open.batch_execute("COMMIT").unwrap();
    c.batch_execute("RESET statement_timeout").unwrap();
    register_counts(&mut c, "late", "late").unwrap();
    append_twice_and_check(&mut c);
    assert_counts_match_log(&mut c, "late");
}
