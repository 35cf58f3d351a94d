//! The log for consumers outside the database (issue 12): `ep_read_all` never passes the
//! high-water mark, and durable subscriptions (`ep_subscribe`, `ep_poll`, `ep_ack`) deliver each
//! member's share of the streams completely, in order, at least once, across consumer crashes,
//! under writers that hold transactions open and roll some back.

use ep_connection_tests::postgres::error::SqlState;
use ep_connection_tests::postgres::Client;
use ep_connection_tests::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// One delivered event: (global position, stream, stream position).
type Got = (i64, String, i64);

fn poll(c: &mut Client, sub: &str, member: i32, max: i32, wait: &str) -> Vec<Got> {
    c.query(
        &format!("SELECT global_position, stream_id, stream_position FROM ep_poll($1, $2, $3, '{wait}')"),
        &[&sub, &member, &max],
    )
    .unwrap_or_else(|e| panic!("ep_poll({sub}, {member}): {}", show(&e)))
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

fn ack(c: &mut Client, sub: &str, member: i32, position: i64) {
    c.execute("SELECT ep_ack($1, $2, $3)", &[&sub, &member, &position])
        .unwrap_or_else(|e| panic!("ep_ack({sub}, {member}, {position}): {}", show(&e)));
}

/// The member of `members` that receives `stream` (as the extension computes it).
fn member_of(c: &mut Client, stream: &str, members: i32) -> i32 {
    let m: i64 = c
        .query_one("SELECT (hashtextextended($1, 0) & 9223372036854775807) % $2::bigint", &[&stream, &(members as i64)])
        .unwrap()
        .get(0);
    m as i32
}

/// Asserts that one consumer's sequence keeps each stream in stream order (repeats allowed only
/// as a re-delivery of a suffix, which the caller counts).
fn assert_stream_order(what: &str, got: &[Got]) {
    let mut last: BTreeMap<&str, i64> = BTreeMap::new();
    for (pos, stream, sp) in got {
        if let Some(prev) = last.get(stream.as_str()) {
            assert!(sp > prev, "{what}: stream {stream} went from {prev} to {sp} at position {pos}");
        }
        last.insert(stream, *sp);
    }
}

/// Eight writers hold transactions open for random times and roll some back; two subscriptions
/// of three members each and an `ep_read_all` poller consume meanwhile. Every seventh batch a
/// consumer "crashes": it processes half the batch and reconnects without acknowledging. Each
/// consumer receives every committed event of its share and nothing else, each stream in order
/// within each run, and again only what it had not acknowledged; the poller exactly the committed
/// log.
#[test]
fn consumers_receive_every_committed_event_of_their_share_in_order() {
    let db = TestDb::new("subs_writers");
    let mut c = db.connect();
    c.batch_execute("SELECT ep_subscribe('all', NULL, 3); SELECT ep_subscribe('some', ARRAY['A', 'C'], 3)").unwrap();
    let seed = seed("consumers_receive_every_committed_event_of_their_share_in_order");
    let stop = &AtomicBool::new(false);
    let db = &db;
    // (subscription, member, the runs between crashes, events processed and not acknowledged)
    type Consumed = (String, i32, Vec<Vec<Got>>, usize);
    let consumed: Vec<Consumed> = std::thread::scope(|s| {
        let mut consumers = Vec::new();
        for sub in ["all", "some"] {
            for member in 0..3 {
                consumers.push(s.spawn(move || {
                    let mut c = db.connect();
                    let (mut runs, mut unacked, mut batches) = (vec![Vec::new()], 0usize, 0usize);
                    loop {
                        let stopping = stop.load(Ordering::SeqCst);
                        let batch = poll(&mut c, sub, member, 50, "200 ms");
                        if batch.is_empty() {
                            if stopping {
                                return (sub.to_string(), member, runs, unacked);
                            }
                            continue;
                        }
                        batches += 1;
                        if batches % 7 == 0 {
                            let half = batch.len().div_ceil(2);
                            runs.last_mut().unwrap().extend(batch.into_iter().take(half));
                            unacked += half;
                            c = db.connect(); // the crash: the next run starts after the last ack
                            runs.push(Vec::new());
                            continue;
                        }
                        ack(&mut c, sub, member, batch.last().unwrap().0);
                        runs.last_mut().unwrap().extend(batch);
                    }
                }));
            }
        }
        let reader = s.spawn(move || {
            let mut c = db.connect();
            let (mut after, mut got) = (0i64, Vec::new());
            loop {
                let stopping = stop.load(Ordering::SeqCst);
                let rows: Vec<i64> = c
                    .query("SELECT global_position FROM ep_read_all($1, 100)", &[&after])
                    .unwrap()
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                match rows.last() {
                    Some(&last) => after = last,
                    None if stopping => return got,
                    None => std::thread::sleep(Duration::from_millis(5)),
                }
                got.extend(rows);
            }
        });
        let _stop = served::StopOnDrop(stop); // a failing writer must not leave the consumers polling
        run_parallel(db, 8, |w, conn| {
            let mut rng = served::Lcg(seed ^ (w as u64).wrapping_mul(0x9e37_79b9));
            for i in 0..60 {
                let mut t = conn.transaction()?;
                let mut failed = false;
                for k in 0..=(rng.next() % 3) {
                    let ty = ["A", "B", "C"][(rng.next() % 3) as usize];
                    let stream = format!("s{}", rng.next() % 12);
                    // Several streams in one transaction: two writers can deadlock (40P01); that
                    // transaction rolls back like the deliberate rollbacks.
                    match t.query_one("SELECT ep_append($1, $2, $3)", &[&stream, &ty, &json!({"w": w, "i": i, "k": k})])
                    {
                        Ok(_) => {}
                        Err(e) if e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED) => {
                            failed = true;
                            break;
                        }
                        Err(e) => return Err(e.into()),
                    }
                    if rng.next().is_multiple_of(4) {
                        std::thread::sleep(Duration::from_millis(rng.next() % 15));
                    }
                }
                if failed || rng.next().is_multiple_of(10) {
                    t.rollback()?;
                } else {
                    t.commit()?;
                }
            }
            Ok(())
        });
        stop.store(true, Ordering::SeqCst);
        let read = reader.join().expect("reader");
        let committed: Vec<i64> = check_log(&mut c).iter().map(|e| e.global_position).collect();
        assert_eq!(read, committed, "ep_read_all skipped, repeated or reordered an event");
        consumers.into_iter().map(|h| h.join().expect("consumer")).collect()
    });
    let log = check_log(&mut c);
    let (mut total, mut crashes) = (0, 0);
    for (sub, member, runs, unacked) in &consumed {
        let expected: BTreeSet<Got> = log
            .iter()
            .filter(|e| *sub == "all" || e.event_type != "B")
            .filter(|e| member_of(&mut c, &e.stream_id, 3) == *member)
            .map(|e| (e.global_position, e.stream_id.clone(), e.stream_position))
            .collect();
        let received: Vec<&Got> = runs.iter().flatten().collect();
        let unique: BTreeSet<Got> = received.iter().map(|g| (*g).clone()).collect();
        assert_eq!(unique, expected, "subscription {sub} member {member}: missing or foreign events");
        assert!(received.len() - unique.len() <= *unacked, "{sub}/{member}: duplicates of acknowledged events");
        for (i, run) in runs.iter().enumerate() {
            assert_stream_order(&format!("{sub}/{member} run {i}"), run);
        }
        if *sub == "all" {
            total += unique.len();
        }
        crashes += runs.len() - 1;
    }
    assert_eq!(total, log.len(), "the members of 'all' together received the whole log");
    assert!(log.len() > 300, "the writers barely wrote ({} events)", log.len());
    assert!(crashes > 0, "no consumer crashed");
}

/// A consumer killed in the middle of a batch (its connection dropped before the ack) and started
/// again receives everything, in order; what it receives twice is what it had not acknowledged.
#[test]
fn a_killed_consumer_loses_nothing() {
    let db = TestDb::new("subs_kill");
    let mut c = db.connect();
    c.batch_execute("SELECT ep_subscribe('k', NULL, 1)").unwrap();
    fill_log(&mut c, 500);
    let mut got: Vec<Got> = Vec::new();
    let mut acked = 0i64;
    let mut duplicates_allowed = 0usize;
    for round in 0.. {
        let mut consumer = db.connect();
        let batch = poll(&mut consumer, "k", 0, 40, "0");
        if batch.is_empty() {
            break;
        }
        // Every third round "crashes" after processing part of the batch, before its ack.
        if round % 3 == 2 {
            let half = batch.len() / 2;
            got.extend(batch[..half].iter().cloned());
            duplicates_allowed += half;
            drop(consumer);
            continue;
        }
        let first = batch[0].0;
        assert!(first > acked, "a poll returned an acknowledged event ({first} <= {acked})");
        acked = batch.last().unwrap().0;
        got.extend(batch);
        ack(&mut consumer, "k", 0, acked);
    }
    let log = check_log(&mut c);
    let unique: BTreeSet<i64> = got.iter().map(|g| g.0).collect();
    let expected: BTreeSet<i64> = log.iter().map(|e| e.global_position).collect();
    assert_eq!(unique, expected, "a restarted consumer missed events");
    assert_eq!(got.len() - unique.len(), duplicates_allowed, "duplicates other than the unacknowledged ones");
}

/// The SQLSTATEs of the subscription functions, and who may use a subscription.
#[test]
fn subscription_errors_and_ownership() {
    let db = TestDb::new("subs_errors");
    let mut c = db.connect();
    c.batch_execute("SELECT ep_subscribe('e', NULL, 2)").unwrap();
    append(&mut c, "s", "T", &json!({}), None).unwrap();
    let cases: &[(&str, SqlState)] = &[
        ("SELECT ep_subscribe('e')", SqlState::DUPLICATE_OBJECT),
        ("SELECT ep_subscribe('z', NULL, 0)", SqlState::INVALID_PARAMETER_VALUE),
        ("SELECT ep_subscribe('z', ARRAY[]::text[])", SqlState::INVALID_PARAMETER_VALUE),
        ("SELECT ep_subscribe(NULL)", SqlState::NULL_VALUE_NOT_ALLOWED),
        ("SELECT * FROM ep_poll('nope')", SqlState::UNDEFINED_OBJECT),
        ("SELECT * FROM ep_poll('e', 2)", SqlState::INVALID_PARAMETER_VALUE),
        ("SELECT * FROM ep_poll('e', 0, 0)", SqlState::INVALID_PARAMETER_VALUE),
        ("SELECT * FROM ep_poll('e', 0, 10, '-1 s')", SqlState::INVALID_PARAMETER_VALUE),
        ("SELECT ep_ack('e', 0, 1)", SqlState::INVALID_PARAMETER_VALUE), // nothing delivered yet
        ("SELECT * FROM ep_read_all(-1)", SqlState::INVALID_PARAMETER_VALUE),
        ("SELECT ep_set_members('e', 0)", SqlState::INVALID_PARAMETER_VALUE),
        ("SELECT ep_unsubscribe('nope')", SqlState::UNDEFINED_OBJECT),
    ];
    for (sql, code) in cases {
        expect_sqlstate(c.batch_execute(sql), code, sql);
    }
    // Another role with every consumer grant may not poll, ack or drop someone else's subscription.
    let other = Role::create(&db.name, "subs_other", Grants::Consumer);
    let mut o = other.connect();
    for sql in [
        "SELECT * FROM ep_poll('e')",
        "SELECT ep_ack('e', 0, 0)",
        "SELECT ep_unsubscribe('e')",
        "SELECT ep_set_members('e', 3)",
    ] {
        expect_sqlstate(o.batch_execute(sql), &SqlState::INSUFFICIENT_PRIVILEGE, sql);
    }
    let visible: i64 = o.query_one("SELECT count(*) FROM ep.subscription_status", &[]).unwrap().get(0);
    assert_eq!(visible, 0, "another role's subscription is visible");
    o.batch_execute("SELECT ep_subscribe('mine')").unwrap();
    assert_eq!(poll(&mut o, "mine", 0, 10, "0").len(), 1);
}

/// `ep_poll` with a wait returns as soon as an append commits (woken through the latch, not by
/// its once-a-second look), and the subscription's NOTIFY channel fires at the commit.
#[test]
fn a_waiting_poll_and_listeners_are_woken_at_commit() {
    let db = TestDb::new("subs_wake");
    let mut c = db.connect();
    c.batch_execute("SELECT ep_subscribe('w', ARRAY['T'])").unwrap();
    let mut listener = db.connect();
    listener.batch_execute("LISTEN \"ep:w\"").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut p = db.connect();
            let start = Instant::now();
            let got = poll(&mut p, "w", 0, 10, "10 s");
            tx.send((got, start.elapsed())).unwrap();
        });
        std::thread::sleep(Duration::from_millis(300));
        append(&mut c, "s", "U", &json!({}), None).unwrap(); // not a type of 'w': no wake-up result
        let committed = Instant::now();
        let position = append(&mut c, "s", "T", &json!({}), None).unwrap();
        let (got, _) = rx.recv_timeout(Duration::from_secs(15)).expect("the poll returned");
        let woken_after = committed.elapsed();
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![position]);
        // Without the wake-up the poll would look again only 1 s after it started.
        assert!(woken_after < Duration::from_millis(650), "the poll returned {woken_after:?} after the commit");
        use ep_connection_tests::postgres::fallible_iterator::FallibleIterator;
        let n = listener.notifications().timeout_iter(Duration::from_secs(5)).next().unwrap().expect("a notification");
        assert_eq!((n.channel(), n.payload()), ("ep:w", position.to_string().as_str()));
    });
}

/// Changing the number of members of a live subscription skips no event and keeps every stream
/// in order for whichever member receives it: all members restart from the lowest acknowledged
/// position, so what moved is delivered again (at least once), never lost.
#[test]
fn changing_members_skips_and_reorders_nothing() {
    let db = TestDb::new("subs_resize");
    let mut c = db.connect();
    c.batch_execute("SELECT ep_subscribe('r', NULL, 2)").unwrap();
    fill_log(&mut c, 300);
    let mut got: BTreeMap<i32, Vec<Got>> = BTreeMap::new();
    for member in 0..2 {
        let b = poll(&mut c, "r", member, 30, "0");
        ack(&mut c, "r", member, b.last().unwrap().0);
        got.entry(member).or_default().extend(b);
    }
    c.batch_execute("SELECT ep_set_members('r', 3)").unwrap();
    fill_log(&mut c, 100);
    let mut after: BTreeMap<i32, Vec<Got>> = BTreeMap::new();
    loop {
        let mut any = false;
        for member in 0..3 {
            let b = poll(&mut c, "r", member, 50, "0");
            if let Some(last) = b.last() {
                ack(&mut c, "r", member, last.0);
                any = true;
            }
            after.entry(member).or_default().extend(b);
        }
        if !any {
            break;
        }
    }
    let log = check_log(&mut c);
    let mut seen: BTreeSet<i64> = BTreeSet::new();
    for g in got.values().chain(after.values()) {
        seen.extend(g.iter().map(|x| x.0));
    }
    assert_eq!(seen, log.iter().map(|e| e.global_position).collect::<BTreeSet<_>>(), "an event was skipped");
    for (member, g) in &after {
        assert_stream_order(&format!("member {member} after the change"), g);
        for (_, stream, _) in g {
            assert_eq!(member_of(&mut c, stream, 3), *member, "stream {stream} went to the wrong member");
        }
    }
}

/// `n` committed events over 10 streams and three types.
fn fill_log(c: &mut Client, n: usize) {
    c.batch_execute(&format!(
        "SELECT count(ep_append('s' || (i % 10), (ARRAY['A','B','C'])[1 + i % 3], jsonb_build_object('i', i))) \
         FROM generate_series(1, {n}) i"
    ))
    .unwrap();
}

/// The example consumers (Python with psycopg 3, Node with node-postgres), killed in the middle of
/// a batch and started again, end up with every event of the log: each run in stream order, and
/// what they processed twice is at most the batch they had not acknowledged when killed.
#[test]
fn the_example_consumers_survive_being_killed() {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let python = std::env::var("EP_PYTHON3").unwrap_or_else(|_| "/usr/bin/python3".into());
    let consumers: [(&str, Vec<String>); 2] = [
        ("python", vec![python, format!("{examples}/python/consumer.py")]),
        ("node", vec!["node".into(), format!("{examples}/node/consumer.js")]),
    ];
    for (lang, command) in consumers {
        let db = TestDb::new(&format!("subs_example_{lang}"));
        let mut c = db.connect();
        c.batch_execute("SELECT ep_subscribe('ex')").unwrap();
        fill_log(&mut c, 400);
        let head: i64 = c.query_one("SELECT max(global_position) FROM ep.events", &[]).unwrap().get(0);
        let out = std::env::temp_dir().join(format!("ep-consumer-{lang}-{}.txt", std::process::id()));
        let _ = std::fs::remove_file(&out);
        let start = |delay: &str| {
            std::process::Command::new(&command[0])
                .arg(&command[1])
                .args([conninfo(&db.name).as_str(), "ex", "0", out.to_str().unwrap(), &head.to_string(), delay])
                .spawn()
                .unwrap_or_else(|e| panic!("starting the {lang} consumer ({command:?}): {e}"))
        };
        let lines = |out: &std::path::Path| std::fs::read_to_string(out).map(|s| s.lines().count()).unwrap_or(0);
        // First run: slow, killed (SIGKILL) in the middle of its second batch.
        let mut first = start("20");
        let reached = wait_until(Duration::from_secs(60), || Ok(lines(&out) >= 70)).unwrap();
        first.kill().unwrap();
        first.wait().unwrap();
        assert!(reached, "the {lang} consumer processed nothing");
        let before_restart = lines(&out);
        // Second run: to the end.
        let status = start("0").wait().unwrap();
        assert!(status.success(), "the {lang} consumer failed: {status}");
        let got: Vec<Got> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                (f[0].parse().unwrap(), f[1].to_string(), f[2].parse().unwrap())
            })
            .collect();
        let _ = std::fs::remove_file(&out);
        let log = check_log(&mut c);
        let unique: BTreeSet<i64> = got.iter().map(|g| g.0).collect();
        assert_eq!(unique, log.iter().map(|e| e.global_position).collect::<BTreeSet<_>>(), "{lang}: events were lost");
        assert_stream_order(&format!("{lang}, first run"), &got[..before_restart]);
        assert_stream_order(&format!("{lang}, second run"), &got[before_restart..]);
        let duplicates = got.len() - unique.len();
        assert!(duplicates <= 50, "{lang}: {duplicates} events processed twice, more than the batch killed");
    }
}

/// The reader's classic skip, made deterministic: position p1 is taken by a transaction that is
/// still open while p2 > p1 commits. `ep_read_all` must not return p2 before p1 is resolved; a
/// reader that continues after the last position it received then gets p1 and p2, in order.
#[test]
fn ep_read_all_never_passes_a_position_in_flight() {
    let db = TestDb::new("subs_read_all");
    let mut c = db.connect();
    let mut late = db.connect();
    let read = |c: &mut Client, after: i64| -> Vec<i64> {
        c.query("SELECT global_position FROM ep_read_all($1)", &[&after]).unwrap().iter().map(|r| r.get(0)).collect()
    };
    let p0 = append(&mut c, "s", "T", &json!({}), None).unwrap();
    late.batch_execute("BEGIN").unwrap();
    let p1 = append(&mut late, "a", "T", &json!({}), None).unwrap();
    let p2 = append(&mut c, "b", "T", &json!({}), None).unwrap();
    assert!(p0 < p1 && p1 < p2);
    let first = read(&mut c, 0);
    assert_eq!(first, vec![p0], "a position above one still in flight was returned");
    late.batch_execute("COMMIT").unwrap();
    assert_eq!(read(&mut c, *first.last().unwrap()), vec![p1, p2]);
    // A rolled-back position is a gap, passed as soon as its transaction ends.
    late.batch_execute("BEGIN").unwrap();
    append(&mut late, "a", "T", &json!({}), None).unwrap();
    let p4 = append(&mut c, "b", "T", &json!({}), None).unwrap();
    assert!(read(&mut c, p2).is_empty());
    late.batch_execute("ROLLBACK").unwrap();
    assert_eq!(read(&mut c, p2), vec![p4]);
    assert_eq!(c.query_one("SELECT ep_high_water()", &[]).unwrap().get::<_, i64>(0), p4);
}
