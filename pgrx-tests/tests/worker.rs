//! Rebuilds, async delivery and their hand-offs, from real connections, with the background worker
//! running. The worker serves one database (`event_projections.database`), so these tests share it
//! and take turns; each starts from a freshly created extension (which also exercises the worker
//! noticing DROP/CREATE EXTENSION while it runs).

use ep_connection_tests::postgres::error::SqlState;
use ep_connection_tests::postgres::{Client, IsolationLevel};
use ep_connection_tests::served::*;
use ep_connection_tests::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The seeds' schedule (second seed document), made deterministic with a lock as a barrier:
/// 1. an in-place rebuild is replaying (stopped by the gate);
/// 2. an append inserts event E, reads the projection as `rebuilding` and skips it, and stays open;
/// 3. the rebuild is let go: it reaches its final catch-up and the flip to active;
/// 4. the append commits.
///
/// In the published design the rebuild flips to active before E commits and E is never applied.
/// Here the hand-off waits for the append (it holds the projection lock SHARED), so E is in.
#[test]
fn the_seeds_race_is_closed_for_in_place_rebuilds() {
    let (served, mut c) = Served::fresh();
    create_gated_counts(&mut c, "w_race", 9001);
    register(&mut c, "race", "w_race.gated(ep.events)", "inline", "w_race");
    fill(&mut c, 5, 3000);

    let mut gate = served.closed_gate(9001);
    let id = rebuild(&mut c, "race", "in_place");
    assert!(
        wait_until(Duration::from_secs(30), || Ok(status(&mut c, "race") == "rebuilding")).unwrap(),
        "the rebuild never started (R0)"
    );

    // 2. The append that, in the published design, is lost.
    let mut a = served.connect();
    a.batch_execute("BEGIN").unwrap();
    let e: i64 = a.query_one("SELECT ep_append('late', 'T', '{}')", &[]).unwrap().get(0);
    assert_eq!(
        a.query_one("SELECT count(*) FROM w_race.counts WHERE stream_id = 'late'", &[]).unwrap().get::<_, i64>(0),
        0,
        "the append must skip a rebuilding projection"
    );

    // 3. Let the replay run to its hand-off. It cannot complete while the append is open.
    gate.open();
    std::thread::sleep(Duration::from_millis(1500));
    let (st, _, _) = rebuild_status(&mut c, id);
    assert_eq!(st, "running", "the hand-off completed while an append that skipped the projection was open");
    assert_eq!(status(&mut c, "race"), "rebuilding");

    // 4. Commit: the hand-off goes through and includes E.
    a.batch_execute("COMMIT").unwrap();
    assert_eq!(rebuild_wait(&mut c, id), "done");
    let model = read_counts(&mut c, "w_race");
    assert_eq!(model.get("late"), Some(&(1, e)), "event {e} must be applied exactly once");
    assert_counts_match_log(&mut c, "w_race");
    // After the hand-off, appends apply themselves again.
    append(&mut c, "late", "T", &json!({}), None).unwrap();
    assert_eq!(read_counts(&mut c, "w_race").get("late").map(|r| r.0), Some(2));
}

/// The same schedule against a blue-green rebuild: the append applies E to the live copy; the copy
/// being built must get E too before it is switched in.
#[test]
fn the_seeds_race_is_closed_for_blue_green_rebuilds() {
    let (served, mut c) = Served::fresh();
    create_gated_counts(&mut c, "w_bg", 9002);
    register(&mut c, "bg", "w_bg.gated(ep.events)", "inline", "w_bg");
    fill(&mut c, 5, 3000);

    let mut gate = served.closed_gate(9002);
    let id = rebuild(&mut c, "bg", "blue_green");
    wait_replaying(&mut c, id);

    let mut a = served.connect();
    a.batch_execute("BEGIN").unwrap();
    let e: i64 = a.query_one("SELECT ep_append('late', 'T', '{}')", &[]).unwrap().get(0);
    gate.open();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(rebuild_status(&mut c, id).0, "running", "the switch happened while an append was open");
    // Readers still see the live copy, complete: it has every committed event.
    assert_counts_match_log(&mut c, "w_bg");
    a.batch_execute("COMMIT").unwrap();
    assert_eq!(rebuild_wait(&mut c, id), "done");
    let model = read_counts(&mut c, "w_bg");
    assert_eq!(model.get("late"), Some(&(1, e)));
    assert_counts_match_log(&mut c, "w_bg");
    let prev: i64 = c
        .query_one("SELECT count(*) FROM pg_namespace WHERE nspname = $1", &[&format!("w_bg__ep_prev_{id}")])
        .unwrap()
        .get(0);
    assert_eq!(prev, 1, "the previous copy is kept under its documented name");
    let handler_schema: String = c
        .query_one("SELECT n.nspname::text FROM ep.projections p JOIN pg_proc f ON f.oid = p.handler JOIN pg_namespace n ON n.oid = f.pronamespace WHERE p.name = 'bg'", &[])
        .unwrap()
        .get(0);
    assert_eq!(handler_schema, "w_bg", "the handler stays in the live schema");
}

/// A REPEATABLE READ (or SERIALIZABLE) append whose snapshot predates a hand-off it then crosses
/// gets 40001, never a silent lost update; after a retry its event is applied once.
#[test]
fn a_snapshot_older_than_a_hand_off_gets_a_serialization_failure() {
    let (served, mut c) = Served::fresh();
    create_counts_projection(&mut c, "rr", "w_rr");
    fill(&mut c, 3, 200);
    for level in [IsolationLevel::RepeatableRead, IsolationLevel::Serializable] {
        let mut a = served.connect();
        let mut t = a.build_transaction().isolation_level(level).start().unwrap();
        // Takes the snapshot, without locking the model (an open reader of the model would keep
        // the rebuild from emptying it, by design).
        t.query_one("SELECT 1", &[]).unwrap();
        let id = rebuild(&mut c, "rr", "in_place");
        assert_eq!(rebuild_wait(&mut c, id), "done");
        let r = t.query_one("SELECT ep_append('s0', 'T', '{}')", &[]);
        let err =
            expect_sqlstate(r, &SqlState::T_R_SERIALIZATION_FAILURE, &format!("{level:?} append across a hand-off"));
        assert!(err.message().contains("\"rr\""), "{}", err.message());
        drop(t);
        // The retry, with a new snapshot, goes through.
        let mut t = a.build_transaction().isolation_level(level).start().unwrap();
        t.query_one("SELECT ep_append('s0', 'T', '{}')", &[]).unwrap();
        t.commit().unwrap();
        assert_counts_match_log(&mut c, "w_rr");
        // A reader of that level is told the same through ep_require_ready.
        let mut t = a.build_transaction().isolation_level(level).start().unwrap();
        t.query_one("SELECT 1", &[]).unwrap();
        let id = rebuild(&mut c, "rr", "blue_green");
        assert_eq!(rebuild_wait(&mut c, id), "done");
        let r = t.query_one("SELECT count(*) FROM w_rr.counts WHERE ep_require_ready('rr')", &[]);
        expect_sqlstate(r, &SqlState::T_R_SERIALIZATION_FAILURE, "reader across a blue-green switch");
    }
}

/// At READ COMMITTED every statement sees a complete model: before, during and after a blue-green
/// switch, the model summed in one statement equals the log counted in the same statement.
#[test]
fn readers_never_see_a_partial_blue_green_copy() {
    let (served, mut c) = Served::fresh();
    create_counts_projection(&mut c, "rd", "w_rd");
    fill(&mut c, 20, 20000);
    let stop = AtomicBool::new(false);
    let checks = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut r = served.connect();
            while !stop.load(Ordering::SeqCst) {
                let row = r
                    .query_one(
                        "SELECT (SELECT coalesce(sum(n), 0)::bigint FROM w_rd.counts), (SELECT count(*) FROM ep.events)",
                        &[],
                    )
                    .expect("reader");
                let (model, log): (i64, i64) = (row.get(0), row.get(1));
                assert_eq!(model, log, "a reader saw a model of {model} events while the log had {log}");
                checks.fetch_add(1, Ordering::SeqCst);
            }
        });
        let writer = s.spawn(|| {
            let mut w = served.connect();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                append(&mut w, &format!("s{}", i % 20), "T", &json!({}), None).expect("writer");
                i += 1;
            }
        });
        let _stop = StopOnDrop(&stop);
        for strategy in ["blue_green", "blue_green"] {
            let id = rebuild(&mut c, "rd", strategy);
            assert_eq!(rebuild_wait(&mut c, id), "done");
        }
        stop.store(true, Ordering::SeqCst);
        reader.join().expect("reader thread");
        writer.join().expect("writer thread");
    });
    assert!(checks.load(Ordering::SeqCst) > 10, "the reader barely ran");
    assert_counts_match_log(&mut c, "w_rd");
}

/// Eight writers (READ COMMITTED and REPEATABLE READ, transactions held open for random short
/// times, some rolled back, 40001 retried) while in-place and blue-green rebuilds run back to back
/// and a projection is registered. Afterwards every read model equals a replay of the log, and the
/// handlers (which raise on an event out of stream order) never failed.
#[test]
fn rebuilds_and_registration_under_concurrent_writers() {
    let (served, mut c) = Served::fresh();
    create_counts_projection(&mut c, "a", "w_a");
    create_counts_projection(&mut c, "b", "w_b");
    create_counts_model(&mut c, "w_c");
    fill(&mut c, 16, 4000);
    let seed = seed("rebuilds_and_registration_under_concurrent_writers");
    let stop = AtomicBool::new(false);
    let retries = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let (stop, retries) = (&stop, &retries);
                s.spawn(move || {
                    let mut conn = connect(&served_db());
                    let mut rng = Lcg(seed ^ (w as u64 * 0x9e37_79b9));
                    let level = if w % 2 == 0 { IsolationLevel::ReadCommitted } else { IsolationLevel::RepeatableRead };
                    let mut done = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let stream = format!("s{}", rng.next() % 16);
                        let n = 1 + rng.next() % 3;
                        let hold = Duration::from_micros(rng.next() % 3000);
                        let rollback = rng.next().is_multiple_of(10);
                        let mut t = conn.build_transaction().isolation_level(level).start().expect("begin");
                        let r = (|| -> std::result::Result<(), ep_connection_tests::postgres::Error> {
                            for _ in 0..n {
                                t.query_one("SELECT ep_append($1, 'T', '{}')", &[&stream])?;
                            }
                            std::thread::sleep(hold);
                            Ok(())
                        })();
                        match r {
                            Ok(()) if rollback => t.rollback().expect("rollback"),
                            Ok(()) => match t.commit() {
                                Ok(()) => done += 1,
                                Err(e) if e.code() == Some(&SqlState::T_R_SERIALIZATION_FAILURE) => {
                                    retries.fetch_add(1, Ordering::SeqCst);
                                }
                                Err(e) => panic!("writer {w}: commit: {}", show(&e)),
                            },
                            Err(e)
                                if e.code() == Some(&SqlState::T_R_SERIALIZATION_FAILURE)
                                    || e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED) =>
                            {
                                retries.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(e) => panic!("writer {w}: {}", show(&e)),
                        }
                    }
                    done
                })
            })
            .collect();
        // Whatever happens to the lead below, the writers stop (a panic here would otherwise
        // leave the scope waiting for them forever).
        let _stop = StopOnDrop(&stop);
        let mut lead = served.connect();
        for (name, strategy) in [("a", "in_place"), ("b", "blue_green"), ("a", "blue_green"), ("b", "in_place")] {
            let id = rebuild(&mut lead, name, strategy);
            if name == "b" && strategy == "blue_green" {
                register_counts(&mut lead, "c", "w_c").expect("registering c while writers run");
            }
            assert_eq!(rebuild_wait(&mut lead, id), "done", "rebuild {id} of {name} ({strategy})");
        }
        stop.store(true, Ordering::SeqCst);
        let committed: usize = writers.into_iter().map(|w| w.join().expect("writer thread")).sum();
        assert!(committed > 100, "the writers barely wrote ({committed} transactions)");
        eprintln!("committed transactions: {committed}");
    });
    eprintln!("serialization failures retried: {}", retries.load(Ordering::SeqCst));
    for schema in ["w_a", "w_b", "w_c"] {
        assert_counts_match_log(&mut c, schema);
    }
}

// ------------------------------------------------------------------------------------------------
// Async projections

/// A transaction holds position p1 open while a later append commits: the projection must not
/// pass p1; after p1 commits both arrive, in order. With a rollback instead, delivery continues.
#[test]
fn async_delivery_never_passes_an_uncommitted_position() {
    let (served, mut c) = Served::fresh();
    create_async_counts(&mut c, "ooo", "w_ooo");
    for finish in ["COMMIT", "ROLLBACK"] {
        let mut a = served.connect();
        a.batch_execute("BEGIN").unwrap();
        let p1: i64 = a.query_one("SELECT ep_append('s', 'T', '{}')", &[]).unwrap().get(0);
        let p2 = append(&mut c, "t", "T", &json!({}), None).unwrap();
        assert!(p2 > p1);
        assert!(!wait_for(&mut c, "ooo", p2, "700 ms"), "ep_wait_for passed an uncommitted position");
        let position: i64 = c.query_one("SELECT position FROM ep.projections WHERE name = 'ooo'", &[]).unwrap().get(0);
        assert!(position < p1, "the checkpoint {position} passed the open position {p1}");
        a.batch_execute(finish).unwrap();
        assert!(wait_for(&mut c, "ooo", p2, "10 s"), "delivery did not resume after {finish}");
        assert_counts_match_log(&mut c, "w_ooo");
    }
    // A long transaction that does not append holds nothing back.
    let mut idle = served.connect();
    idle.batch_execute("BEGIN; SELECT txid_current();").unwrap();
    let p = append(&mut c, "u", "T", &json!({}), None).unwrap();
    assert!(wait_for(&mut c, "ooo", p, "5 s"), "an unrelated open transaction held delivery back");
    idle.batch_execute("ROLLBACK").unwrap();
}

/// A failing handler is retried with backoff, stops after max_attempts with the error visible,
/// does not hold other projections back, and resumes by retry or by a recorded skip.
#[test]
fn a_failing_async_handler_stops_and_resumes() {
    let (_served, mut c) = Served::fresh();
    settings(
        &mut c,
        &[
            "ALTER SYSTEM SET event_projections.max_attempts = 3",
            "ALTER SYSTEM SET event_projections.retry_backoff = '20ms'",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    c.batch_execute(
        "CREATE SCHEMA w_fail;
         CREATE TABLE w_fail.seen (global_position bigint PRIMARY KEY);
         CREATE TABLE w_fail.cure (cured boolean);
         CREATE FUNCTION w_fail.picky(e ep.events) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
           IF e.data ? 'poison' AND NOT coalesce((SELECT bool_or(cured) FROM cure), false) THEN
             RAISE EXCEPTION 'cannot digest event %', e.global_position;
           END IF;
           INSERT INTO seen VALUES (e.global_position);
         END $$;",
    )
    .unwrap();
    register(&mut c, "picky", "w_fail.picky(ep.events)", "async", "w_fail");
    create_async_counts(&mut c, "healthy", "w_ok");
    append(&mut c, "s", "T", &json!({}), None).unwrap();
    let poison = append(&mut c, "s", "T", &json!({"poison": true}), None).unwrap();
    let after = append(&mut c, "s", "T", &json!({}), None).unwrap();
    assert!(wait_for(&mut c, "healthy", after, "10 s"), "a failing projection held another one back");
    assert!(
        wait_until(Duration::from_secs(20), || Ok(status(&mut c, "picky") == "failed")).unwrap(),
        "the projection did not stop after max_attempts"
    );
    let row = c
        .query_one(
            "SELECT attempts, failing_position, last_error, position FROM ep.projection_status WHERE name = 'picky'",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 3);
    assert_eq!(row.get::<_, Option<i64>>(1), Some(poison));
    assert!(row.get::<_, String>(2).contains("cannot digest"), "{}", row.get::<_, String>(2));
    assert_eq!(row.get::<_, i64>(3), poison - 1, "the events before the failing one were delivered");
    assert!(!wait_for(&mut c, "picky", after, "300 ms"));

    // Retry without a fix: stops again. Skip: recorded, and delivery goes on past it.
    c.batch_execute("SELECT ep_retry_projection('picky')").unwrap();
    assert!(wait_until(Duration::from_secs(20), || Ok(status(&mut c, "picky") == "failed")).unwrap());
    let r = c.execute("SELECT ep_skip_event('picky', $1)", &[&(poison + 1)]);
    expect_sqlstate(r, &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, "skipping an event that is not failing");
    c.execute("SELECT ep_skip_event('picky', $1)", &[&poison]).unwrap();
    assert!(wait_for(&mut c, "picky", after, "10 s"));
    let skipped: i64 =
        c.query_one("SELECT count(*) FROM ep.skipped_events WHERE projection = 'picky'", &[]).unwrap().get(0);
    assert_eq!(skipped, 1);
    let expected: Vec<i64> = read_log(&mut c).iter().map(|e| e.global_position).filter(|p| *p != poison).collect();
    let seen: Vec<i64> =
        c.query("SELECT global_position FROM w_fail.seen ORDER BY 1", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(seen, expected, "every event but the skipped one, each once");

    // Retry after a fix: a second poison event goes through once cured.
    let p2 = append(&mut c, "u", "T", &json!({"poison": true}), None).unwrap();
    assert!(wait_until(Duration::from_secs(20), || Ok(status(&mut c, "picky") == "failed")).unwrap());
    c.batch_execute("INSERT INTO w_fail.cure VALUES (true); SELECT ep_retry_projection('picky');").unwrap();
    assert!(wait_for(&mut c, "picky", p2, "10 s"));
}

/// Concurrent writers; afterwards each async model (per-event and batch handlers) equals a replay,
/// and every stream arrived in order (the per-event handler raises otherwise).
#[test]
fn async_projections_equal_a_replay_after_concurrent_writers() {
    let (served, mut c) = Served::fresh();
    create_async_counts(&mut c, "one", "w_one");
    c.batch_execute(
        "CREATE SCHEMA w_batch;
         CREATE TABLE w_batch.counts (stream_id text PRIMARY KEY, n bigint NOT NULL, last_position bigint NOT NULL);
         CREATE FUNCTION w_batch.count_batch(es ep.events[]) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO counts AS c
           SELECT e.stream_id, count(*), max(e.global_position) FROM unnest(es) e GROUP BY e.stream_id
           ON CONFLICT (stream_id) DO UPDATE SET n = c.n + excluded.n, last_position = excluded.last_position;
         END $$;",
    )
    .unwrap();
    register(&mut c, "batch", "w_batch.count_batch(ep.events[])", "async", "w_batch");
    let seed = seed("async_projections_equal_a_replay_after_concurrent_writers");
    std::thread::scope(|s| {
        for w in 0..8u64 {
            let served = &served;
            s.spawn(move || {
                let mut conn = served.connect();
                let mut rng = Lcg(seed ^ w);
                for _ in 0..150 {
                    let stream = format!("s{}", rng.next() % 12);
                    conn.batch_execute("BEGIN").unwrap();
                    conn.query_one("SELECT ep_append($1, 'T', '{}')", &[&stream]).unwrap();
                    std::thread::sleep(Duration::from_micros(rng.next() % 2000));
                    conn.batch_execute(if rng.next().is_multiple_of(8) { "ROLLBACK" } else { "COMMIT" }).unwrap();
                }
            });
        }
    });
    let h = head(&mut c);
    for name in ["one", "batch"] {
        assert!(wait_for(&mut c, name, h, "60 s"), "{name} did not catch up");
    }
    for schema in ["w_one", "w_batch"] {
        assert_counts_match_log(&mut c, schema);
    }
    // And an async rebuild of each strategy gives the same.
    for (name, strategy) in [("one", "in_place"), ("batch", "blue_green")] {
        let id = rebuild(&mut c, name, strategy);
        assert_eq!(rebuild_wait(&mut c, id), "done");
    }
    let h = head(&mut c);
    for name in ["one", "batch"] {
        assert!(wait_for(&mut c, name, h, "60 s"));
    }
    for schema in ["w_one", "w_batch"] {
        assert_counts_match_log(&mut c, schema);
    }
}

/// Several async projections progress at once, each owned by one worker process at a time: while
/// one projection's handler is blocked, another projection is delivered by the other worker, and
/// the blocked one never has two processes in it. (A worker step gives up a lock wait after
/// 200 ms and the projection is tried again later, possibly by the other worker: one at a time.)
/// Once released, it catches up, each event applied once.
#[test]
fn async_projections_progress_concurrently_one_owner_each() {
    let (served, mut c) = Served::fresh();
    let workers: i64 =
        c.query_one("SELECT current_setting('event_projections.max_workers')::bigint", &[]).unwrap().get(0);
    assert!(workers >= 2, "this test needs event_projections.max_workers >= 2 (is {workers})");
    create_gated_counts(&mut c, "w_stuck", 9004);
    register(&mut c, "stuck", "w_stuck.gated(ep.events)", "async", "w_stuck");
    create_async_counts(&mut c, "free", "w_free");
    let mut gate = served.closed_gate(9004);

    let first = append(&mut c, "s1", "T", &json!({}), None).unwrap();
    // Workers blocked in the stuck projection's handler (the only lock they can wait on here).
    let in_stuck = "SELECT count(*) FROM pg_stat_activity \
                    WHERE backend_type = 'event_projections worker' AND wait_event_type = 'Lock'";
    assert!(
        wait_until(Duration::from_secs(20), || Ok(c.query_one(in_stuck, &[])?.get::<_, i64>(0) >= 1)).unwrap(),
        "no worker blocked in the stuck projection's handler"
    );
    // Meanwhile the other projection keeps being delivered, by the other worker.
    for i in 0..20 {
        let p = append(&mut c, &format!("s{}", i % 3), "T", &json!({}), None).unwrap();
        assert!(wait_for(&mut c, "free", p, "10 s"), "a blocked projection held another one back");
    }
    assert!(!wait_for(&mut c, "stuck", first, "300 ms"), "the stuck projection advanced past its blocked handler");
    // For 3 s (many retries of `stuck`, by either worker), never two processes in it at once.
    let mut samples = 0;
    let two = wait_until(Duration::from_secs(3), || {
        samples += 1;
        Ok(c.query_one(in_stuck, &[])?.get::<_, i64>(0) >= 2)
    });
    assert!(!two.unwrap(), "two workers were in the same projection at once");
    eprintln!("{samples} samples of the workers, never two in one projection");

    gate.open();
    let h = head(&mut c);
    assert!(wait_for(&mut c, "stuck", h, "30 s"), "the released projection did not catch up");
    assert!(wait_for(&mut c, "free", h, "30 s"));
    assert_counts_match_log(&mut c, "w_stuck");
    assert_counts_match_log(&mut c, "w_free");
}

/// In the worker, a handler runs as the projection's owner: an ordinary role cannot gain the
/// worker's superuser privileges through it.
#[test]
fn worker_handlers_run_as_the_owner() {
    let (_served, mut c) = Served::fresh();
    c.batch_execute("DROP ROLE IF EXISTS w_mallory; CREATE ROLE w_mallory").unwrap();
    for grant in Grants::ProjectionOwner.statements() {
        c.batch_execute(&grant.replace("{r}", "w_mallory")).unwrap();
    }
    c.batch_execute(
        "CREATE SCHEMA w_evil AUTHORIZATION w_mallory;
         SET ROLE w_mallory;
         CREATE TABLE w_evil.seen (who name);
         CREATE FUNCTION w_evil.h(e ep.events) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO seen VALUES (current_user);
           IF e.event_type = 'Escalate' THEN ALTER ROLE w_mallory SUPERUSER; END IF;
         END $$;
         SELECT ep_register_projection('evil', 'w_evil.h(ep.events)', 'async', NULL, 'w_evil');
         RESET ROLE;",
    )
    .unwrap();
    let p = append(&mut c, "s", "Harmless", &json!({}), None).unwrap();
    assert!(wait_for(&mut c, "evil", p, "10 s"));
    let who: String = c.query_one("SELECT who::text FROM w_evil.seen LIMIT 1", &[]).unwrap().get(0);
    assert_eq!(who, "w_mallory");
    append(&mut c, "s", "Escalate", &json!({}), None).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || {
            Ok(c.query_one("SELECT coalesce(last_error, '') FROM ep.projections WHERE name = 'evil'", &[])?
                .get::<_, String>(0)
                .contains("must be superuser"))
        })
        .unwrap(),
        "the escalation attempt should fail for lack of privilege"
    );
    let sup: bool = c.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = 'w_mallory'", &[]).unwrap().get(0);
    assert!(!sup, "an ordinary role became superuser through a worker handler");
    c.batch_execute("SELECT ep_unregister_projection('evil'); DROP OWNED BY w_mallory CASCADE; DROP ROLE w_mallory;")
        .unwrap();
}

/// ep_rebuild without the preload (or for another database) says how to fix it; the worker shows
/// in pg_stat_activity under its name.
#[test]
fn the_worker_is_visible() {
    let (_served, mut c) = Served::fresh();
    let n: i64 = c
        .query_one("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'event_projections worker'", &[])
        .unwrap()
        .get(0);
    assert!(n >= 1, "no worker in pg_stat_activity");
    let started = Instant::now();
    // The extension was dropped and created again by Served::fresh: the worker must serve it.
    create_async_counts(&mut c, "alive", "w_alive");
    let p = append(&mut c, "s", "T", &json!({}), None).unwrap();
    assert!(wait_for(&mut c, "alive", p, "10 s"), "the worker did not pick up the re-created extension");
    eprintln!("delivery after re-creation took {:?}", started.elapsed());
}

/// A running rebuild can be cancelled: blue-green drops its copy and leaves the live model as it
/// was; in-place leaves the projection `stale` (its model was emptied), which readers are told.
#[test]
fn a_running_rebuild_can_be_cancelled() {
    let (served, mut c) = Served::fresh();
    create_gated_counts(&mut c, "w_cancel", 9003);
    register(&mut c, "cancel", "w_cancel.gated(ep.events)", "inline", "w_cancel");
    fill(&mut c, 4, 2000);
    let mut gate = served.closed_gate(9003);

    let id = rebuild(&mut c, "cancel", "blue_green");
    wait_replaying(&mut c, id);
    let build = format!("w_cancel__ep_build_{id}");
    let cancelled: Option<i64> = c.query_one("SELECT ep_cancel_rebuild('cancel')", &[]).unwrap().get(0);
    assert_eq!(cancelled, Some(id));
    gate.open();
    assert_eq!(rebuild_wait(&mut c, id), "cancelled");
    let copies: i64 = c.query_one("SELECT count(*) FROM pg_namespace WHERE nspname = $1", &[&build]).unwrap().get(0);
    assert_eq!(copies, 0, "a cancelled blue-green rebuild must drop its copy");
    assert_eq!(status(&mut c, "cancel"), "active");
    assert_counts_match_log(&mut c, "w_cancel");

    gate.close();
    let id = rebuild(&mut c, "cancel", "in_place");
    assert!(wait_until(Duration::from_secs(30), || Ok(status(&mut c, "cancel") == "rebuilding")).unwrap());
    c.query_one("SELECT ep_cancel_rebuild('cancel')", &[]).unwrap();
    gate.open();
    assert_eq!(rebuild_wait(&mut c, id), "cancelled");
    assert_eq!(status(&mut c, "cancel"), "stale");
    let r = c.query_one("SELECT count(*) FROM w_cancel.counts WHERE ep_require_ready('cancel')", &[]);
    expect_sqlstate(r, &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, "reading a stale projection");
    // Appends skip a stale projection; the next rebuild makes it whole again.
    append(&mut c, "s0", "T", &json!({}), None).unwrap();
    let id = rebuild(&mut c, "cancel", "in_place");
    assert_eq!(rebuild_wait(&mut c, id), "done");
    assert_counts_match_log(&mut c, "w_cancel");
}

/// Batch handlers (`ep.events[]`) in every path of an inline projection: the registration build,
/// appends, and both rebuild strategies; the result equals a replay.
#[test]
fn batch_handlers_in_rebuilds() {
    let (_served, mut c) = Served::fresh();
    fill(&mut c, 7, 2500);
    c.batch_execute(
        "CREATE SCHEMA w_bh;
         CREATE TABLE w_bh.counts (stream_id text PRIMARY KEY, n bigint NOT NULL, last_position bigint NOT NULL);
         CREATE TABLE w_bh.calls (size int NOT NULL);
         CREATE FUNCTION w_bh.count_batch(es ep.events[]) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO calls VALUES (cardinality(es));
           INSERT INTO counts AS c
           SELECT e.stream_id, count(*), max(e.global_position) FROM unnest(es) e GROUP BY e.stream_id
           ON CONFLICT (stream_id) DO UPDATE SET n = c.n + excluded.n, last_position = excluded.last_position;
         END $$;",
    )
    .unwrap();
    register(&mut c, "bh", "w_bh.count_batch(ep.events[])", "inline", "w_bh");
    assert_counts_match_log(&mut c, "w_bh");
    append_events(&mut c, "s1", &[("T", json!({})), ("T", json!({}))], None).unwrap();
    assert_counts_match_log(&mut c, "w_bh");
    for strategy in ["in_place", "blue_green"] {
        let id = rebuild(&mut c, "bh", strategy);
        assert_eq!(rebuild_wait(&mut c, id), "done");
        assert_counts_match_log(&mut c, "w_bh");
    }
    // Rebuilds called it with batches, not once per event.
    let big: i64 = c.query_one("SELECT count(*) FROM w_bh.calls WHERE size > 1", &[]).unwrap().get(0);
    assert!(big > 0, "the rebuild never passed a batch");
}

/// Waiting for a rebuild. In the transaction that queued it, `ep_rebuild_wait` is refused at once
/// (55000): the worker cannot see the rebuild before the commit. `CALL ep_rebuild_await` commits
/// between polls, so the xmin horizon it holds moves on while a rebuild is held up, where
/// `ep_rebuild_wait` (a function, one statement snapshot) pins it for the whole wait; it times out
/// with 57014 and returns the final status.
#[test]
fn waiting_for_a_rebuild_refuses_the_queuing_transaction_and_await_does_not_pin_the_horizon() {
    let (served, mut c) = Served::fresh();
    create_gated_counts(&mut c, "w_wait", 9005);
    register(&mut c, "waited", "w_wait.gated(ep.events)", "inline", "w_wait");
    fill(&mut c, 3, 500);

    let mut t = c.transaction().unwrap();
    let id: i64 = t.query_one("SELECT ep_rebuild('waited')", &[]).unwrap().get(0);
    let started = Instant::now();
    let r = t.query_one("SELECT ep_rebuild_wait($1, '30 s')", &[&id]);
    expect_sqlstate(
        r,
        &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
        "waiting in the transaction that queued the rebuild",
    );
    assert!(started.elapsed() < Duration::from_secs(5), "refused only after {:?}", started.elapsed());
    t.rollback().unwrap();

    let mut gate = served.closed_gate(9005);
    let id = rebuild(&mut c, "waited", "in_place");
    wait_replaying(&mut c, id);
    // With bound parameters (extended protocol) and as plain text (simple protocol).
    let r = c.query_one("CALL ep_rebuild_await($1, '200 ms')", &[&id]);
    expect_sqlstate(r, &SqlState::QUERY_CANCELED, "ep_rebuild_await past its timeout");
    let r = c.batch_execute(&format!("CALL ep_rebuild_await({id}, '200 ms')"));
    expect_sqlstate(r, &SqlState::QUERY_CANCELED, "ep_rebuild_await past its timeout (simple protocol)");

    // backend_xmin of a session waiting with `call`, sampled twice with commits in between.
    let xmins = |call: String| -> (Option<i64>, Option<i64>) {
        let mut w = served.connect();
        let pid: i32 = w.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
        let mut c = served.connect();
        std::thread::scope(|s| {
            let waiter = s.spawn(move || w.batch_execute(&call));
            let xmin = |c: &mut Client| -> Option<i64> {
                c.query_one("SELECT backend_xmin::text::bigint FROM pg_stat_activity WHERE pid = $1", &[&pid])
                    .unwrap()
                    .get(0)
            };
            assert!(
                wait_until(Duration::from_secs(10), || Ok(xmin(&mut c).is_some())).unwrap(),
                "the waiter never started"
            );
            let first = xmin(&mut c);
            for i in 0..20 {
                append(&mut c, "elsewhere", "Other", &json!({ "i": i }), None).unwrap();
                std::thread::sleep(Duration::from_millis(25));
            }
            let later = xmin(&mut c);
            // End the wait: cancel the waiter's statement.
            c.execute("SELECT pg_cancel_backend($1)", &[&pid]).unwrap();
            let _ = waiter.join().unwrap();
            (first, later)
        })
    };
    let (f, l) = xmins(format!("SELECT ep_rebuild_wait({id}, '60 s')"));
    assert_eq!(f, l, "ep_rebuild_wait holds one snapshot for the whole wait (the control of this test)");
    let (f, l) = xmins(format!("CALL ep_rebuild_await({id}, '60 s')"));
    assert_ne!(f, l, "CALL ep_rebuild_await kept the xmin horizon pinned while it waited");

    gate.open();
    let rows = c.simple_query(&format!("CALL ep_rebuild_await({id}, '60 s')")).unwrap();
    let status = rows.iter().find_map(|m| match m {
        ep_connection_tests::postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(status.as_deref(), Some("done"));
    assert_counts_match_log(&mut c, "w_wait");
}
