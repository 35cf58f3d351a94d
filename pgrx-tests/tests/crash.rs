//! Crash recovery: the worker killed with SIGKILL in the middle of a replay or an async delivery,
//! and the whole server stopped with `pg_ctl stop -m immediate`. After the restart the work goes
//! on from its last committed checkpoint, and the read model equals a replay of the log: nothing
//! lost, nothing applied twice (the counts handler raises on an event out of stream order, which
//! is what a doubled or skipped event looks like).
//!
//! Each handler call also takes a value from a sequence (which a rollback does not give back), so
//! the number of calls shows that the work resumed rather than started over.

use ep_connection_tests::postgres::Client;
use ep_connection_tests::retention::*;
use ep_connection_tests::served::*;
use ep_connection_tests::*;
use std::time::Duration;

const EVENTS: i64 = 20_000;
/// event_projections.batch_size (the default).
const BATCH: i64 = 1_000;
/// Slack for values a sequence skips after a crash (it logs 32 ahead).
const SEQUENCE_SLACK: i64 = 64;

/// A counts model whose handler counts its calls and takes a little time in the worker, so that a
/// crash can land in the middle of the work. The call counter lives outside the read-model schema
/// (a blue-green switch replaces that schema's relations).
fn create_slow_counts(c: &mut Client, schema: &str) {
    create_counts_model(c, schema);
    c.batch_execute(&format!(
        "CREATE SCHEMA {schema}_meta;
         CREATE SEQUENCE {schema}_meta.calls;
         CREATE FUNCTION {schema}.slow(e ep.events) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
           PERFORM nextval('{schema}_meta.calls');
           IF current_setting('application_name') LIKE 'event_projections worker%' THEN
             PERFORM pg_sleep(0.0001);
           END IF;
           PERFORM {schema}.count_event(e);
         END $$;"
    ))
    .unwrap_or_else(|e| panic!("{}", show(&e)));
}

fn calls(c: &mut Client, schema: &str) -> i64 {
    c.query_one(&format!("SELECT last_value FROM {schema}_meta.calls"), &[]).unwrap().get(0)
}

fn rebuild_done(c: &mut Client, id: i64) -> i64 {
    c.query_one("SELECT events_done FROM ep.rebuilds WHERE id = $1", &[&id]).map(|r| r.get(0)).unwrap_or(0)
}

fn async_position(c: &mut Client, name: &str) -> i64 {
    c.query_one("SELECT position FROM ep.projections WHERE name = $1", &[&name]).map(|r| r.get(0)).unwrap_or(0)
}

/// SIGKILL to the worker process whose activity starts with `activity`.
fn kill_worker(c: &mut Client, activity: &str) {
    let pattern = format!("{activity}%");
    let pid: i32 = c
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'event_projections worker' AND query LIKE $1 LIMIT 1",
            &[&pattern],
        )
        .unwrap_or_else(|e| panic!("no worker doing {activity}: {}", show(&e)))
        .get(0);
    let status = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().expect("kill");
    assert!(status.success(), "kill -9 {pid}");
    eprintln!("killed worker {pid} ({activity})");
}

enum Crash {
    KillWorker,
    ImmediateStop,
}

fn crash(c: &mut Client, how: &Crash, activity: &str) -> Client {
    match how {
        Crash::KillWorker => {
            kill_worker(c, activity);
            // The postmaster answers a crashed process by terminating every backend and
            // reinitializing; wait until that reached this connection.
            assert!(
                wait_until(Duration::from_secs(30), || Ok(c.batch_execute("SELECT 1").is_err())).unwrap(),
                "the server did not restart after the worker was killed"
            );
        }
        Crash::ImmediateStop => {
            cluster(&["stop", "immediate"]);
            cluster(&["start"]);
        }
    }
    reconnect()
}

fn rebuild_survives(how: Crash, strategy: &str) {
    let (_served, mut c) = Served::fresh();
    create_slow_counts(&mut c, "w_crash");
    register(&mut c, "crash", "w_crash.slow(ep.events)", "inline", "w_crash");
    fill(&mut c, 10, EVENTS as usize);
    c.batch_execute("ALTER SEQUENCE w_crash_meta.calls RESTART").unwrap();
    let id = rebuild(&mut c, "crash", strategy);
    assert!(
        wait_until(Duration::from_secs(120), || Ok(rebuild_done(&mut c, id) >= 3 * BATCH)).unwrap(),
        "the rebuild did not get going"
    );
    let done_before = rebuild_done(&mut c, id);
    assert!(done_before < EVENTS - 2 * BATCH, "the rebuild ran too fast to be interrupted mid-replay");
    let mut c = crash(&mut c, &how, "event_projections: rebuilding crash");
    assert_eq!(rebuild_wait(&mut c, id), "done");
    assert_counts_match_log(&mut c, "w_crash");
    let n = calls(&mut c, "w_crash");
    eprintln!("{strategy}: {done_before} events replayed before the crash; {n} handler calls for {EVENTS} events");
    assert!(
        n <= EVENTS + BATCH + SEQUENCE_SLACK,
        "{n} handler calls for {EVENTS} events: the rebuild started over instead of resuming"
    );
    // And the projection is live again.
    append(&mut c, "s0", "T", &json!({}), None).unwrap();
    assert_counts_match_log(&mut c, "w_crash");
}

#[test]
fn an_in_place_rebuild_resumes_after_the_worker_is_killed() {
    rebuild_survives(Crash::KillWorker, "in_place");
}

#[test]
fn an_in_place_rebuild_resumes_after_an_immediate_shutdown() {
    rebuild_survives(Crash::ImmediateStop, "in_place");
}

#[test]
fn a_blue_green_rebuild_resumes_after_the_worker_is_killed() {
    rebuild_survives(Crash::KillWorker, "blue_green");
}

fn delivery_survives(how: Crash) {
    let (served, mut c) = Served::fresh();
    fill(&mut c, 10, EVENTS as usize);
    create_slow_counts(&mut c, "w_acrash");
    register(&mut c, "acrash", "w_acrash.slow(ep.events)", "async", "w_acrash");
    assert!(
        wait_until(Duration::from_secs(120), || Ok(async_position(&mut c, "acrash") >= 3 * BATCH)).unwrap(),
        "delivery did not get going"
    );
    // An append left open dies with the crash: its position becomes a gap that delivery passes.
    let mut open = served.connect();
    open.batch_execute("BEGIN; SELECT ep_append('doomed', 'T', '{}');").unwrap();
    let before = async_position(&mut c, "acrash");
    assert!(before < EVENTS - 2 * BATCH, "delivery ran too fast to be interrupted");
    let mut c = crash(&mut c, &how, "event_projections: delivering to acrash");
    drop(open);
    let last = append(&mut c, "after", "T", &json!({}), None).unwrap();
    assert!(wait_for(&mut c, "acrash", last, "120 s"), "delivery did not resume");
    let log = assert_counts_match_log(&mut c, "w_acrash");
    assert!(log.iter().all(|e| e.stream_id != "doomed"), "an append that never committed is in the log");
    let n = calls(&mut c, "w_acrash");
    eprintln!("async: position {before} before the crash; {n} handler calls for {} events", log.len());
    assert!(
        n <= log.len() as i64 + BATCH + SEQUENCE_SLACK,
        "{n} handler calls for {} events: delivery started over instead of resuming",
        log.len()
    );
}

#[test]
fn async_delivery_resumes_after_the_worker_is_killed() {
    delivery_survives(Crash::KillWorker);
}

#[test]
fn async_delivery_resumes_after_an_immediate_shutdown() {
    delivery_survives(Crash::ImmediateStop);
}

/// Without event_projections in `shared_preload_libraries` (another library instead), appends and inline projections work, and the calls that
/// need the worker say how to enable it.
#[test]
fn without_the_preload_the_worker_calls_say_how_to_enable_it() {
    let (_served, mut c) = Served::fresh();
    create_counts_projection(&mut c, "np", "w_np");
    c.batch_execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'").unwrap();
    cluster(&["restart"]);
    let result = std::panic::catch_unwind(|| {
        let mut c = reconnect();
        append(&mut c, "s", "T", &json!({}), None).expect("appends work without the preload");
        assert_counts_match_log(&mut c, "w_np");
        let err = expect_sqlstate(
            c.query_one("SELECT ep_rebuild('np')", &[]),
            &ep_connection_tests::postgres::error::SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
            "ep_rebuild without the preload",
        );
        assert!(err.hint().unwrap_or_default().contains("shared_preload_libraries"), "{:?}", err.hint());
        c.batch_execute(
            "CREATE SCHEMA w_np2; CREATE TABLE w_np2.counts (stream_id text, n bigint, last_position bigint);",
        )
        .unwrap();
        let r = c.execute(
            "SELECT ep_register_projection('np2', 'w_np.count_event(ep.events)', 'async', NULL, 'w_np2')",
            &[],
        );
        expect_sqlstate(
            r,
            &ep_connection_tests::postgres::error::SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
            "async without the preload",
        );
    });
    let mut c = reconnect();
    c.batch_execute("ALTER SYSTEM RESET shared_preload_libraries").unwrap();
    cluster(&["restart"]);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

/// The worker killed (SIGKILL) while it removes what a cut left: after the restart it goes on,
/// and what the record says was removed is exactly what left the log.
#[test]
fn a_worker_killed_mid_removal_loses_nothing() {
    let _interval = Settings::set(&["event_projections.retention_interval = 50"]);
    let (_served, mut c) = Served::fresh();
    settings(&mut c, &["ALTER SYSTEM SET event_projections.batch_size = 20"]);
    create_copy_model(&mut c, "w_rc");
    register(&mut c, "w_rc", "w_rc.apply(ep.events)", "inline", "w_rc");
    const EVENTS: i64 = 8_000;
    c.batch_execute(&format!(
        "SELECT ep_append_events('big', (SELECT jsonb_agg(jsonb_build_object('type', 'T', 'data', jsonb_build_object('i', i)))
                                           FROM generate_series(1, {EVENTS}) i))"
    ))
    .unwrap();
    c.batch_execute("SELECT ep_set_stream_policy('big', max_count => 10)").unwrap();
    let going = wait_until(Duration::from_secs(60), || Ok(removed_total(&mut c) >= 500));
    assert!(going.unwrap(), "the removal did not get going");
    let before = removed_total(&mut c);
    assert!(before < EVENTS - 2_000, "the removal ran too fast to be interrupted ({before} removed)");
    // The worker whose activity is the retention step (it may be between steps: try again).
    let mut killed = false;
    for _ in 0..200 {
        let pid: Option<i32> = c
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'event_projections worker'
                    AND query LIKE 'event_projections: retention%' AND state = 'active' LIMIT 1",
                &[],
            )
            .unwrap()
            .map(|r| r.get(0));
        if let Some(pid) = pid {
            let ok = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().expect("kill");
            assert!(ok.success());
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(killed, "no worker was seen removing");
    assert!(
        wait_until(Duration::from_secs(30), || Ok(c.batch_execute("SELECT 1").is_err())).unwrap(),
        "the server did not restart after the worker was killed"
    );
    let mut c = reconnect();
    let done = wait_until(Duration::from_secs(120), || {
        Ok(c.query_one("SELECT NOT pending FROM ep.stream_truncations WHERE stream_id = 'big'", &[])?.get::<_, bool>(0))
    });
    assert!(done.unwrap(), "the removal did not finish after the crash");
    let log = read_log(&mut c);
    let left: Vec<&Event> = log.iter().filter(|e| e.stream_id == "big").collect();
    let t: Vec<i64> = left.iter().filter(|e| e.event_type == "T").map(|e| e.stream_position).collect();
    assert_eq!(t, ((EVENTS - 9)..=EVENTS).collect::<Vec<_>>(), "what the cut keeps");
    assert_eq!(left.len(), 11, "the 10 kept events and the marker");
    assert_eq!(removed_total(&mut c), EVENTS - 10, "the record of what was removed ({before} before the crash)");
    assert_eq!(read_copy(&mut c, "w_rc"), replay_copy(&log), "the inline model is not a replay of the log");
}
