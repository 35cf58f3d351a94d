//! Replay handlers (issue 13): a projection's set-based twin of its handler,
//! `(after_position bigint, up_to_position bigint) RETURNS void`, which the extension calls for
//! registration builds, both rebuild strategies and async catch-up, over ranges it guarantees
//! complete; appends keep the per-event handler.

use ep_connection_tests::postgres::error::SqlState;
use ep_connection_tests::postgres::{Client, IsolationLevel};
use ep_connection_tests::served::*;
use ep_connection_tests::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The counts model of `create_counts_model` plus its replay handler `<schema>.replay`, which
/// adds up whole ranges with one GROUP BY and notes each call (range and role) in `calls`. The
/// per-event handler notes nothing, so `calls` says which path applied what.
fn create_replayable_counts(c: &mut Client, schema: &str) {
    create_counts_model(c, schema);
    c.batch_execute(&format!(
        "CREATE TABLE {schema}.calls (after_position bigint, up_to_position bigint, run_as name, path text)"
    ))
    .unwrap_or_else(|e| panic!("creating {schema}.calls: {}", show(&e)));
    define_replay(c, schema);
}

/// (Re)defines `<schema>.replay`, the working replay handler of `create_replayable_counts`.
fn define_replay(c: &mut Client, schema: &str) {
    c.batch_execute(&format!(
        r#"
CREATE OR REPLACE FUNCTION {schema}.replay(after_position bigint, up_to_position bigint) RETURNS void
LANGUAGE plpgsql AS $f$
BEGIN
    INSERT INTO calls VALUES (after_position, up_to_position, current_user, current_setting('search_path'));
    INSERT INTO counts AS c (stream_id, n, last_position)
    SELECT e.stream_id, count(*), max(e.global_position) FROM ep.events e
     WHERE e.global_position > after_position AND e.global_position <= up_to_position
     GROUP BY e.stream_id
    ON CONFLICT (stream_id) DO UPDATE SET n = c.n + excluded.n, last_position = excluded.last_position;
END
$f$;
"#
    ))
    .unwrap_or_else(|e| panic!("creating the replay handler of {schema}: {}", show(&e)));
}

fn register_replayable(c: &mut Client, name: &str, mode: &str, schema: &str) {
    c.execute(
        "SELECT ep_register_projection($1, $2::text::regprocedure, $3, NULL, $4, $5::text::regprocedure)",
        &[
            &name,
            &format!("{schema}.count_event(ep.events)"),
            &mode,
            &schema,
            &format!("{schema}.replay(bigint, bigint)"),
        ],
    )
    .unwrap_or_else(|e| panic!("registering {name}: {}", show(&e)));
}

fn replay_calls(c: &mut Client, schema: &str) -> i64 {
    c.query_one(&format!("SELECT count(*) FROM {schema}.calls"), &[]).unwrap().get(0)
}

fn fill(c: &mut Client, n: usize, streams: usize) -> i64 {
    c.query_one(
        "SELECT max(ep_append('s' || (i % $2), 'T', pg_catalog.jsonb_build_object('i', i))) FROM generate_series(1, $1) i",
        &[&(n as i32), &(streams as i32)],
    )
    .unwrap()
    .get::<_, Option<i64>>(0)
    .unwrap_or(0)
}

/// A registration at READ COMMITTED builds the model through the replay handler (as its owner,
/// with the read-model schema first on its path); appends afterwards use the per-event handler.
#[test]
fn registration_builds_through_the_replay_handler() {
    let db = TestDb::new("replay_register");
    let mut c = db.connect();
    fill(&mut c, 5000, 17);
    create_replayable_counts(&mut c, "w_r");
    register_replayable(&mut c, "r", "inline", "w_r");
    assert_counts_match_log(&mut c, "w_r");
    let calls = replay_calls(&mut c, "w_r");
    assert!(calls >= 1, "the replay handler was not called");
    let row = c.query_one("SELECT run_as::text, path FROM w_r.calls LIMIT 1", &[]).unwrap();
    let (run_as, path): (String, String) = (row.get(0), row.get(1));
    assert_eq!(run_as, "postgres");
    assert!(path.starts_with("\"w_r\""), "the read-model schema is not first on the replay handler's path: {path}");
    assert!(path.ends_with("\"pg_temp\""), "pg_temp is not last: {path}");
    fill(&mut c, 100, 5);
    assert_eq!(replay_calls(&mut c, "w_r"), calls, "an append called the replay handler");
    assert_counts_match_log(&mut c, "w_r");
}

/// Under REPEATABLE READ the replay handler would read with the transaction's older snapshot: the
/// registration replays event by event instead, and the model is still complete.
#[test]
fn a_repeatable_read_registration_replays_event_by_event() {
    let db = TestDb::new("replay_rr");
    let mut c = db.connect();
    fill(&mut c, 500, 7);
    create_replayable_counts(&mut c, "w_rr");
    // An event committed after the RR snapshot, before the registration: the build must see it.
    let mut tx = c.build_transaction().isolation_level(IsolationLevel::RepeatableRead).start().unwrap();
    tx.query_one("SELECT 1", &[]).unwrap();
    let mut other = db.connect();
    fill(&mut other, 50, 3);
    tx.execute(
        "SELECT ep_register_projection('rr', 'w_rr.count_event(ep.events)', 'inline', NULL, 'w_rr', 'w_rr.replay(bigint, bigint)')",
        &[],
    )
    .unwrap();
    tx.commit().unwrap();
    assert_counts_match_log(&mut c, "w_rr");
    assert_eq!(replay_calls(&mut c, "w_rr"), 0, "the replay handler ran under REPEATABLE READ");
}

/// Both rebuild strategies replay through the replay handler while writers append; the models
/// equal a replay of the log. A blue-green rebuild with a new handler drops the replay handler (it
/// was the old handler's twin).
#[test]
fn rebuilds_use_the_replay_handler_under_concurrent_appends() {
    let (served, mut c) = Served::fresh();
    fill(&mut c, 20_000, 31);
    create_replayable_counts(&mut c, "w_rb");
    register_replayable(&mut c, "rb", "inline", "w_rb");
    for strategy in ["in_place", "blue_green"] {
        c.batch_execute("TRUNCATE w_rb.calls").unwrap();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let writers: Vec<_> = (0..2)
                .map(|w| {
                    let stop = &stop;
                    let served = &served;
                    s.spawn(move || {
                        let mut a = served.connect();
                        let mut n = 0;
                        while !stop.load(Ordering::SeqCst) {
                            append(&mut a, &format!("s{}", (n * 2 + w) % 31), "T", &json!({}), None).unwrap();
                            n += 1;
                        }
                    })
                })
                .collect();
            let id = rebuild(&mut c, "rb", strategy);
            assert_eq!(rebuild_wait(&mut c, id), "done", "{strategy}");
            stop.store(true, Ordering::SeqCst);
            for w in writers {
                w.join().unwrap();
            }
        });
        assert!(replay_calls(&mut c, "w_rb") >= 1, "{strategy}: the replay handler was not used");
        assert_counts_match_log(&mut c, "w_rb");
    }
    c.batch_execute(
        "CREATE FUNCTION w_rb.count_event2(e ep.events) RETURNS void LANGUAGE plpgsql AS $$ BEGIN PERFORM w_rb.count_event(e); END $$",
    )
    .unwrap();
    let id: i64 =
        c.query_one("SELECT ep_rebuild('rb', 'blue_green', 'w_rb.count_event2(ep.events)')", &[]).unwrap().get(0);
    assert_eq!(rebuild_wait(&mut c, id), "done");
    let replay: Option<String> =
        c.query_one("SELECT replay_handler::text FROM ep.projections WHERE name = 'rb'", &[]).unwrap().get(0);
    assert_eq!(replay, None, "the old replay handler survived a new handler");
    assert_counts_match_log(&mut c, "w_rb");
}

/// Async catch-up goes through the replay handler; when it fails on a range, the range is applied
/// again event by event, and the failure names the exact event (not the range's first).
#[test]
fn async_catch_up_and_a_failing_range() {
    let (_served, mut c) = Served::fresh();
    create_replayable_counts(&mut c, "w_as");
    register_replayable(&mut c, "as", "async", "w_as");
    let p = fill(&mut c, 10_000, 13);
    assert!(wait_for(&mut c, "as", p, "60 s"));
    assert!(replay_calls(&mut c, "w_as") >= 1, "async catch-up did not use the replay handler");
    assert_counts_match_log(&mut c, "w_as");

    // A poison event in the middle of the next range: both handlers refuse it.
    c.batch_execute(
        "CREATE OR REPLACE FUNCTION w_as.count_event(e ep.events) RETURNS void LANGUAGE plpgsql AS $f$
         BEGIN
           IF e.event_type = 'Poison' THEN RAISE EXCEPTION 'poison at %', e.global_position; END IF;
           INSERT INTO counts AS c VALUES (e.stream_id, 1, e.global_position)
             ON CONFLICT (stream_id) DO UPDATE SET n = c.n + 1, last_position = excluded.last_position;
         END $f$;
         CREATE OR REPLACE FUNCTION w_as.replay(after_position bigint, up_to_position bigint) RETURNS void LANGUAGE plpgsql AS $f$
         BEGIN
           INSERT INTO calls VALUES (after_position, up_to_position, current_user, current_setting('search_path'));
           IF EXISTS (SELECT 1 FROM ep.events e WHERE e.global_position > after_position
                        AND e.global_position <= up_to_position AND e.event_type = 'Poison') THEN
             RAISE EXCEPTION 'poison in %..%', after_position, up_to_position;
           END IF;
           INSERT INTO counts AS c (stream_id, n, last_position)
           SELECT e.stream_id, count(*), max(e.global_position) FROM ep.events e
            WHERE e.global_position > after_position AND e.global_position <= up_to_position GROUP BY e.stream_id
           ON CONFLICT (stream_id) DO UPDATE SET n = c.n + excluded.n, last_position = excluded.last_position;
         END $f$;",
    )
    .unwrap();
    settings(&mut c, &["ALTER SYSTEM SET event_projections.retry_backoff = 10"]);
    let mut tx = c.transaction().unwrap();
    tx.query_one("SELECT max(ep_append('q' || i % 5, 'T', '{}')) FROM generate_series(1, 300) i", &[]).unwrap();
    let poison: i64 = tx.query_one("SELECT ep_append('q1', 'Poison', '{}')", &[]).unwrap().get(0);
    tx.query_one("SELECT max(ep_append('q' || i % 5, 'T', '{}')) FROM generate_series(1, 300) i", &[]).unwrap();
    tx.commit().unwrap();
    let failed = wait_until(Duration::from_secs(30), || Ok(status(&mut c, "as") == "failed"));
    assert!(failed.unwrap(), "the projection did not stop on the poison event");
    let failing: Option<i64> =
        c.query_one("SELECT failing_position FROM ep.projections WHERE name = 'as'", &[]).unwrap().get(0);
    assert_eq!(failing, Some(poison), "the failure does not name the poison event");
    let position: i64 = c.query_one("SELECT position FROM ep.projections WHERE name = 'as'", &[]).unwrap().get(0);
    assert_eq!(position, poison - 1, "everything before the poison event is delivered");
    c.execute("SELECT ep_skip_event('as', $1)", &[&poison]).unwrap();
    let last: i64 = c.query_one("SELECT max(global_position) FROM ep.events", &[]).unwrap().get(0);
    assert!(wait_for(&mut c, "as", last, "60 s"), "delivery did not go on after the skip");
    let model = read_counts(&mut c, "w_as");
    let log: Vec<Event> = read_log(&mut c).into_iter().filter(|e| e.global_position != poison).collect();
    assert_matches_replay("w_as.counts without the skipped event", &model, &log, count);
    settings(&mut c, &["ALTER SYSTEM RESET event_projections.retry_backoff"]);
}

/// A replay handler is held to the handler's rules, each refusal with its SQLSTATE; an ordinary
/// role cannot make another role's function its projection's replay handler (it would run as the
/// projection's owner on every rebuild).
#[test]
fn replay_handlers_are_checked() {
    let db = TestDb::new("replay_checks");
    let owner = Role::create(&db.name, "rp_owner", Grants::ProjectionOwner);
    let other = Role::create(&db.name, "rp_other", Grants::ProjectionOwner);
    let mut admin = db.connect();
    admin.batch_execute("GRANT CREATE ON DATABASE t_replay_checks TO rp_owner, rp_other").unwrap();
    let mut o = other.connect();
    o.batch_execute(
        "CREATE SCHEMA w_other;
         CREATE FUNCTION w_other.foreign_replay(a bigint, b bigint) RETURNS void LANGUAGE sql AS $$ SELECT $$;
         GRANT USAGE ON SCHEMA w_other TO rp_owner;
         GRANT EXECUTE ON FUNCTION w_other.foreign_replay(bigint, bigint) TO rp_owner;",
    )
    .unwrap();
    let mut c = owner.connect();
    create_replayable_counts(&mut c, "w_ck");
    c.batch_execute(
        "CREATE FUNCTION w_ck.wrong(a int, b int) RETURNS void LANGUAGE sql AS $$ SELECT $$;
         CREATE FUNCTION w_ck.stable(a bigint, b bigint) RETURNS void LANGUAGE sql STABLE AS $$ SELECT $$;
         CREATE FUNCTION w_ck.returns(a bigint, b bigint) RETURNS int LANGUAGE sql AS $$ SELECT 1 $$;",
    )
    .unwrap();
    let register = |c: &mut Client, replay: &str| {
        c.execute(
            "SELECT ep_register_projection('ck', 'w_ck.count_event(ep.events)', 'inline', NULL, 'w_ck', $1::text::regprocedure)",
            &[&replay],
        )
    };
    expect_sqlstate(
        register(&mut c, "w_ck.wrong(int, int)"),
        &SqlState::INVALID_FUNCTION_DEFINITION,
        "wrong arguments",
    );
    expect_sqlstate(
        register(&mut c, "w_ck.returns(bigint, bigint)"),
        &SqlState::INVALID_FUNCTION_DEFINITION,
        "a result",
    );
    expect_sqlstate(register(&mut c, "w_ck.stable(bigint, bigint)"), &SqlState::INVALID_FUNCTION_DEFINITION, "STABLE");
    expect_sqlstate(
        register(&mut c, "w_other.foreign_replay(bigint, bigint)"),
        &SqlState::INSUFFICIENT_PRIVILEGE,
        "another role's function",
    );
    register(&mut c, "w_ck.replay(bigint, bigint)").unwrap();
    assert_counts_match_log(&mut c, "w_ck");
    expect_sqlstate(
        c.batch_execute("DROP FUNCTION w_ck.replay(bigint, bigint)"),
        &SqlState::DEPENDENT_OBJECTS_STILL_EXIST,
        "dropping a registered replay handler",
    );
    c.batch_execute("SELECT ep_unregister_projection('ck')").unwrap();
}

/// A replay handler that failed in a registration rolled back in the same session is used again
/// in that session once its definition is fixed: the process's note of the failure (which makes it
/// replay event by event past the failed range) is tied to the function's definition, and does not
/// keep a fixed handler from running.
#[test]
fn a_fixed_replay_handler_runs_again_in_the_same_session() {
    let db = TestDb::new("replay_fixed");
    let mut c = db.connect();
    fill(&mut c, 3000, 7);
    create_replayable_counts(&mut c, "w_fx");
    c.batch_execute(
        "CREATE OR REPLACE FUNCTION w_fx.replay(after_position bigint, up_to_position bigint) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'broken replay handler'; END $$",
    )
    .unwrap();
    let mut tx = c.transaction().unwrap();
    tx.execute(
        "SELECT ep_register_projection('fx', 'w_fx.count_event(ep.events)', 'inline', NULL, 'w_fx', 'w_fx.replay(bigint, bigint)')",
        &[],
    )
    .unwrap();
    assert_counts_match_log(&mut tx, "w_fx"); // built event by event after the replay handler failed
    tx.rollback().unwrap();
    define_replay(&mut c, "w_fx");
    register_replayable(&mut c, "fx", "inline", "w_fx");
    assert_counts_match_log(&mut c, "w_fx");
    assert!(replay_calls(&mut c, "w_fx") >= 1, "the fixed replay handler was not used in the same session");
}
