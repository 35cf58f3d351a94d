//! Dump and restore: pg_dump -Fc of a database with events, streams and a registered inline
//! projection, restored with pg_restore into a fresh database, must give back the same catalog and
//! a working store (the log's position sequence, the guard letting the restore's COPY through, the
//! handler and its read model).

use ep_connection_tests::*;
use postgres::Client;

/// The rows of a table as text, in a fixed order: what must survive the round trip unchanged.
fn rows(c: &mut Client, table: &str, order: &str) -> Vec<String> {
    c.query(&format!("SELECT t::text FROM {table} t ORDER BY {order}"), &[])
        .unwrap_or_else(|e| panic!("reading {table}: {}", show(&e)))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

const TABLES: [(&str, &str); 7] = [
    ("ep.events", "global_position"),
    ("ep.streams", "stream_id"),
    ("ep.projections", "id"),
    ("ep.subscriptions", "name"),
    ("ep.subscription_members", "subscription, member"),
    ("rm.counts", "stream_id"),
    ("ep.stream_deletions", "id"),
];

#[test]
fn dump_and_restore() {
    let source = TestDb::new("dump_source");
    let mut c = source.connect();
    create_counts_projection(&mut c, "counts", "rm");
    for i in 0..40 {
        append(&mut c, &format!("acct-{}", i % 7), "Deposited", &json!({"amount": i}), None).unwrap();
    }
    c.execute(
        "SELECT ep_append_events('acct-0', '[{\"type\": \"Renamed\", \"data\": {\"to\": \"x\"}, \"metadata\": {\"by\": \"me\"}}, {\"type\": \"Closed\", \"data\": {}}]')",
        &[],
    )
    .unwrap();
    // An append with a caller's id: its retry after the restore is still a retry.
    let with_id: i64 = c
        .query_one(
            "SELECT ep_append('acct-2', 'Tagged', '{}', NULL, NULL, '0190f5a4-0000-7000-8000-0000000d0001')",
            &[],
        )
        .unwrap()
        .get(0);
    // A soft-deleted stream (hard deletes: tests/streams.rs, whose model expects them).
    c.batch_execute("SELECT ep_delete_stream('acct-5')").unwrap();
    // A rolled-back append burns positions: the restored sequence must be past them too, not just
    // past the last event.
    let mut tx = c.transaction().unwrap();
    append(&mut tx, "acct-1", "Deposited", &json!({"amount": -1}), None).unwrap();
    tx.rollback().unwrap();
    let burned: i64 = c.query_one("SELECT last_value FROM ep.global_position_seq", &[]).unwrap().get(0);
    // A durable subscription with a member part-way through the log.
    c.batch_execute("SELECT ep_subscribe('sub', NULL, 2)").unwrap();
    let polled: Vec<i64> =
        c.query("SELECT global_position FROM ep_poll('sub', 0, 5)", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    c.execute("SELECT ep_ack('sub', 0, $1)", &[polled.last().unwrap()]).unwrap();
    let source_log = assert_counts_match_log(&mut c, "rm");
    assert!(burned > source_log.last().unwrap().global_position);

    let target = dump_restored(&source, "dump_target");

    let mut r = target.connect();
    for (table, order) in TABLES {
        assert_eq!(rows(&mut r, table, order), rows(&mut c, table, order), "{table} after restore");
    }
    let restored_log = assert_counts_match_log(&mut r, "rm");
    // The subscription goes on from its acknowledged position.
    let next = |c: &mut Client| -> Vec<i64> {
        c.query("SELECT global_position FROM ep_poll('sub', 0, 5)", &[]).unwrap().iter().map(|r| r.get(0)).collect()
    };
    assert_eq!(next(&mut r), next(&mut c), "the restored subscription does not continue where it was");

    let retried: i64 = r
        .query_one(
            "SELECT ep_append('acct-2', 'Tagged', '{}', NULL, NULL, '0190f5a4-0000-7000-8000-0000000d0001')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(retried, with_id, "a retry after the restore appended again");
    // The deleted stream stays deleted: refused appends, hidden from ep_read_stream.
    expect_sqlstate(
        append(&mut r, "acct-5", "Deposited", &json!({}), None),
        &postgres::error::SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
        "an append to a deleted stream after the restore",
    );
    let hidden: i64 = r.query_one("SELECT count(*) FROM ep_read_stream('acct-5')", &[]).unwrap().get(0);
    assert_eq!(hidden, 0);
    assert_eq!(read_log(&mut r), restored_log);

    // New appends continue the log: positions past everything the source handed out, the stream
    // versions continued, the inline projection applied.
    let g = append(&mut r, "acct-0", "Deposited", &json!({"amount": 100}), Some(8)).unwrap();
    assert!(g > burned, "new position {g} must be greater than the source's last position {burned}");
    append(&mut r, "new-stream", "Opened", &json!({}), Some(0)).unwrap();
    let log = assert_counts_match_log(&mut r, "rm");
    assert_eq!(log.len(), restored_log.len() + 2);
    assert_eq!(read_counts(&mut r, "rm")["acct-0"], (9, g));

    // The registry's id sequence came along: a new projection gets a fresh id, and is built.
    create_counts_projection(&mut r, "counts2", "rm2");
    assert_counts_match_log(&mut r, "rm2");
    // The source is untouched by all this.
    assert_eq!(read_log(&mut c), source_log);
}
