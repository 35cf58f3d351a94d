//! The harness checks themselves: each must fail on a broken log or read model, or the other tests
//! could pass without checking anything. The log is broken here the only way it can be: as the
//! superuser, with the append-only guard switched off (session_replication_role = replica skips
//! ordinary triggers).

use ep_connection_tests::*;
use postgres::error::SqlState;
use postgres::Client;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Asserts that `f` panics with a message containing `needle`.
fn assert_fails(what: &str, needle: &str, f: impl FnOnce()) {
    let err = catch_unwind(AssertUnwindSafe(f)).err().unwrap_or_else(|| panic!("{what}: the check passed"));
    let msg = err
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(msg.contains(needle), "{what}: failed, but not for the expected reason: {msg}");
}

fn tamper(c: &mut Client, sql: &str) {
    c.batch_execute(&format!("SET session_replication_role = replica; {sql}; RESET session_replication_role"))
        .unwrap_or_else(|e| panic!("{sql}: {}", show(&e)));
}

#[test]
fn checks_catch_broken_logs_and_models() {
    let db = TestDb::new("harness");
    let mut c = db.connect();
    create_counts_projection(&mut c, "counts", "rm");
    for i in 0..6 {
        append(&mut c, &format!("s{}", i % 2), "T", &json!({"i": i}), None).unwrap();
    }
    assert_counts_match_log(&mut c, "rm");

    // The read model: a count off by one, a missing row, an extra row.
    tamper(&mut c, "UPDATE rm.counts SET n = n + 1 WHERE stream_id = 's0'");
    assert_fails("n off by one", "\"s0\": got Some((4, 5)), expected (3, 5)", || {
        assert_counts_match_log(&mut c, "rm");
    });
    tamper(&mut c, "DELETE FROM rm.counts WHERE stream_id = 's0'");
    assert_fails("missing row", "\"s0\": got None, expected (3, 5)", || {
        assert_counts_match_log(&mut c, "rm");
    });
    tamper(&mut c, "INSERT INTO rm.counts VALUES ('s0', 3, 5), ('ghost', 1, 1)");
    assert_fails("extra row", "\"ghost\": got (1, 1), expected nothing", || {
        assert_counts_match_log(&mut c, "rm");
    });
    tamper(&mut c, "DELETE FROM rm.counts WHERE stream_id = 'ghost'");
    assert_counts_match_log(&mut c, "rm");

    // The log: a stream version that disagrees, a gap, stream order against global order.
    tamper(&mut c, "UPDATE ep.streams SET version = 4 WHERE stream_id = 's1'");
    assert_fails("stream version", "\"s1\": got Some(4), expected 3", || {
        check_log(&mut c);
    });
    tamper(&mut c, "UPDATE ep.streams SET version = 3 WHERE stream_id = 's1'");
    tamper(&mut c, "DELETE FROM ep.events WHERE stream_id = 's1' AND stream_position = 2");
    assert_fails("gap", "stream \"s1\": after 1 events in global order, the next has stream position 3", || {
        check_log(&mut c);
    });
    tamper(&mut c, "UPDATE ep.events SET stream_position = 2 WHERE stream_id = 's1' AND stream_position = 3");
    tamper(&mut c, "UPDATE ep.streams SET version = 2 WHERE stream_id = 's1'");
    check_log(&mut c);
    tamper(&mut c, "UPDATE ep.events SET global_position = 100 WHERE stream_id = 's1' AND stream_position = 1");
    assert_fails(
        "stream order",
        "stream \"s1\": after 0 events in global order, the next has stream position 2",
        || {
            check_log(&mut c);
        },
    );
}

#[test]
fn threads_and_errors_are_reported() {
    let db = TestDb::new("harness_threads");
    assert_fails("a thread's error", "thread 2: boom", || {
        run_parallel(&db, 3, |i, _| if i == 2 { Err("boom".into()) } else { Ok(()) });
    });
    assert_fails("a thread's panic", "thread 1 panicked: bang", || {
        run_parallel(&db, 3, |i, _| if i == 1 { panic!("bang") } else { Ok(()) });
    });
    let mut c = db.connect();
    assert_fails("a statement that succeeds", "expected SQLSTATE 0A000, but it succeeded", || {
        expect_sqlstate(c.batch_execute("SELECT 1"), &SqlState::FEATURE_NOT_SUPPORTED, "select");
    });
    assert_fails("another SQLSTATE", "wrong SQLSTATE", || {
        expect_sqlstate(c.batch_execute("SELECT 1/0"), &SqlState::FEATURE_NOT_SUPPORTED, "division");
    });
    append(&mut c, "s", "T", &json!({}), None).unwrap();
    let stale = append(&mut c, "s", "T", &json!({}), Some(0)).unwrap_err();
    assert!(is_wrong_expected_version(&stale), "{}", show(&stale));
    let other = c.batch_execute("SELECT 1/0").unwrap_err();
    assert!(!is_wrong_expected_version(&other));
}
