//! Registration as a hand-off (DESIGN.md 3.1): an inline projection registered while appends run
//! must end up with exactly the committed log, nothing missed and nothing applied twice.

use ep_connection_tests::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Barrier, OnceLock};
use std::time::{Duration, Instant};

/// Sets the flag when dropped, so that the writers stop even when the thread that should stop them
/// fails.
struct StopOnDrop<'a>(&'a AtomicBool);
impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn max_position(c: &mut postgres::Client) -> Result<i64> {
    Ok(c.query_one("SELECT coalesce(max(global_position), 0) FROM ep.events", &[])?.get(0))
}

/// Six writers append continuously (single events and batches, 20 streams) to a non-empty log,
/// while a seventh connection registers three inline projections one after another. After the
/// writers stop, each projection's model must equal a replay of the whole log.
#[test]
fn registration_during_appends() {
    const WRITERS: usize = 6;
    const SCHEMAS: [&str; 3] = ["late_a", "late_b", "late_c"];
    let db = TestDb::new("register_under_load");
    let seed = seed("registration_during_appends");
    let mut c = db.connect();
    for i in 0..300 {
        append(&mut c, &format!("s{}", i % 20), "Seeded", &json!({"i": i}), None).unwrap();
    }
    for schema in SCHEMAS {
        create_counts_model(&mut c, schema);
    }

    let stop = AtomicBool::new(false);
    // Max global position right after each registration committed.
    let marks: Vec<Vec<i64>> = run_parallel(&db, WRITERS + 1, |i, c| {
        if i == 0 {
            let _stop = StopOnDrop(&stop);
            let mut marks = Vec::new();
            for schema in SCHEMAS {
                std::thread::sleep(Duration::from_millis(250));
                let t = Instant::now();
                register_counts(c, schema, schema).map_err(|e| show(&e))?;
                marks.push(max_position(c)?);
                eprintln!("registered {schema} in {:?}", t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(250));
            return Ok(marks);
        }
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(i as u64));
        // The registrations end the writing (`stop`); the deadline only guards against a hang. A
        // registration replays the whole log, which these writers grow, on a machine they share:
        // under a loaded test run (4 suites at once, a debug build) the three took over 60 s.
        let deadline = Instant::now() + Duration::from_secs(300);
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            // Leave the registering connection some CPU on a 2-core machine: its replay has to
            // outrun the writers for its lock-free phase to converge (DESIGN.md 3.1).
            std::thread::sleep(Duration::from_millis(1));
            let stream = format!("s{}", rng.random_range(0..20));
            let r = if rng.random_bool(0.3) {
                let batch: Vec<_> =
                    (0..rng.random_range(2..=4)).map(|k| ("Batched", json!({"w": i, "k": k}))).collect();
                append_events(c, &stream, &batch, None)
            } else {
                append(c, &stream, "Single", &json!({"w": i}), None)
            };
            r.map_err(|e| show(&e))?;
        }
        Ok(vec![])
    });

    let marks = &marks[0];
    let log = check_log(&mut c);
    let last = log.last().unwrap().global_position;
    eprintln!("registration under load: {} events; registrations committed at positions {marks:?}", log.len());
    // The registrations really happened among the appends, not before or after them.
    assert!(
        marks[0] > 300 && marks.windows(2).all(|w| w[1] > w[0]) && last > marks[2],
        "no appends between registrations"
    );
    for schema in SCHEMAS {
        let model = read_counts(&mut c, schema);
        assert_matches_replay(&format!("projection {schema}"), &model, &log, count);
    }
    let active: i64 = c.query_one("SELECT count(*) FROM ep.projections WHERE status = 'active'", &[]).unwrap().get(0);
    assert_eq!(active, 3);
}

/// Deterministic: A appends in an open transaction; B's registration must wait for A (on the
/// registry lock), and once A commits, B's model holds A's events exactly once.
#[test]
fn registration_waits_for_open_append() {
    let db = TestDb::new("register_waits");
    let mut c = db.connect();
    for i in 0..5 {
        append(&mut c, "before", "T", &json!({"i": i}), None).unwrap();
    }
    create_counts_model(&mut c, "late");

    let b_pid = OnceLock::new();
    let a_is_open = Barrier::new(2);
    let b_done = AtomicBool::new(false);
    run_parallel(&db, 2, |i, conn| {
        if i == 1 {
            // B: announce its pid, wait until A holds its append open, then register. (Both
            // threads reach the barrier even after an error, so neither can hang on the other.)
            let pid = conn.query_one("SELECT pg_backend_pid()", &[]).map(|r| r.get::<_, i32>(0));
            if let Ok(p) = pid {
                b_pid.set(p).unwrap();
            }
            a_is_open.wait();
            pid?;
            let r = register_counts(conn, "late", "late");
            b_done.store(true, Ordering::SeqCst);
            return r.map_err(|e| show(&e).into());
        }
        // A.
        let opened =
            conn.batch_execute("BEGIN").and_then(|_| append(conn, "hand", "T", &json!({"by": "A", "n": 1}), None));
        a_is_open.wait();
        opened?;
        let pid = *b_pid.get().ok_or("B has no pid")?;
        // From another connection: pg_stat_activity is a per-transaction snapshot inside A's.
        let mut observer = db.connect();
        let waiting = wait_until(Duration::from_secs(10), || {
            let row = observer.query_one(
                "SELECT (SELECT wait_event_type = 'Lock' AND wait_event = 'advisory' FROM pg_stat_activity WHERE pid = $1), \
                        EXISTS (SELECT FROM pg_locks WHERE pid = $1 AND locktype = 'advisory' AND NOT granted \
                                AND classid = $2::bigint::oid AND objid = 0 AND objsubid = 17744 AND mode = 'ExclusiveLock')",
                &[&pid, &0x4550_0001_i64],
            )?;
            Ok(row.get::<_, Option<bool>>(0) == Some(true) && row.get::<_, bool>(1))
        })?;
        if !waiting {
            return Err(format!(
                "B (pid {pid}) is not waiting for the registry lock; finished: {}",
                b_done.load(Ordering::SeqCst)
            )
            .into());
        }
        // A is still free to append while B waits, and B stays blocked until A ends.
        append(conn, "hand", "T", &json!({"by": "A", "n": 2}), None)?;
        std::thread::sleep(Duration::from_millis(200));
        if b_done.load(Ordering::SeqCst) {
            return Err("B's registration returned while A's append was still open".into());
        }
        conn.batch_execute("COMMIT")?;
        Ok(())
    });

    let log = check_log(&mut c);
    let model = read_counts(&mut c, "late");
    assert_eq!(model.get("hand").map(|r| r.0), Some(2), "A's two events, applied once each");
    assert_matches_replay("projection late", &model, &log, count);
    // After the hand-off, appends apply inline.
    append(&mut c, "hand", "T", &json!({"by": "after"}), None).unwrap();
    let log = assert_counts_match_log(&mut c, "late");
    assert_eq!(read_counts(&mut c, "late")["hand"], (3, log.last().unwrap().global_position));
}

/// DESIGN.md section 3: a hand-off waits for its lock with a short lock_timeout and retries, so
/// that appends queued behind it are not held for long. Here the registration waits for A's open
/// append transaction; an unrelated append by C must still get through while A stays open.
#[test]
fn appends_not_stalled_behind_waiting_registration() {
    let db = TestDb::new("register_stall");
    let mut c = db.connect();
    create_counts_model(&mut c, "late");
    let mut a = db.connect();
    a.batch_execute("BEGIN").unwrap();
    append(&mut a, "a", "T", &json!({}), None).unwrap();

    std::thread::scope(|s| {
        let registration = s.spawn(|| register_counts(&mut db.connect(), "late", "late").map_err(|e| show(&e)));
        let waiting = wait_until(Duration::from_secs(10), || {
            let n: i64 = c.query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND mode = 'ExclusiveLock' \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[],
            )?.get(0);
            Ok(n > 0)
        });
        // C, with a bound so that a stall fails the test instead of hanging it.
        let appended = waiting.as_ref().ok().filter(|w| **w).map(|_| {
            c.batch_execute("SET statement_timeout = '2s'").unwrap();
            let r = append(&mut c, "c", "T", &json!({}), None);
            c.batch_execute("RESET statement_timeout").unwrap();
            r
        });
        a.batch_execute("COMMIT").unwrap();
        registration.join().unwrap().unwrap();
        assert!(waiting.unwrap(), "the registration never waited for A");
        if let Some(Err(e)) = appended {
            panic!("an unrelated append was stalled behind the waiting registration: {}", show(&e));
        }
    });
    assert_counts_match_log(&mut c, "late");
}

/// A6: a REPEATABLE READ transaction whose snapshot predates a registration must not run the new
/// handler (it could not see what the registration built): its append fails with 40001, and
/// succeeds on retry.
#[test]
fn repeatable_read_append_crossing_a_registration() {
    let db = TestDb::new("register_rr");
    let mut c = db.connect();
    append(&mut c, "s", "T", &json!({}), None).unwrap();
    create_counts_model(&mut c, "late");

    let mut a = db.connect();
    a.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM ep.events").unwrap();
    register_counts(&mut c, "late", "late").unwrap();
    let err = expect_sqlstate(
        append(&mut a, "s", "T", &json!({}), None),
        &postgres::error::SqlState::T_R_SERIALIZATION_FAILURE,
        "REPEATABLE READ append after a registration",
    );
    assert!(err.message().contains("projection \"late\""), "{}", err.message());
    a.batch_execute("ROLLBACK").unwrap();
    assert_counts_match_log(&mut c, "late");

    a.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").unwrap();
    append(&mut a, "s", "T", &json!({}), None).unwrap();
    a.batch_execute("COMMIT").unwrap();
    let log = assert_counts_match_log(&mut c, "late");
    assert_eq!(log.len(), 2);
}
