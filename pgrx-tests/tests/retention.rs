//! Retention (README, "Retention"; DESIGN.md, section 17): policies cut streams while writers
//! append, and the worker removes the cut events in small transactions. A read model that acts on
//! the `$stream_truncated` marker stays equal to a replay of what remains of the log, before and
//! after rebuilds and a dump and restore; an async consumer that ignores the marker still saw
//! every event (nothing is removed before every consumer is past it, nor while a rebuild runs); a
//! worker killed mid-removal loses no bookkeeping (crash.rs); ordinary roles cannot set policies without the
//! grant, and a hostile handler stops only the cut of its own stream.

use ep_connection_tests::postgres::Client;
use ep_connection_tests::retention::*;
use ep_connection_tests::served::*;
use ep_connection_tests::*;
use postgres::error::SqlState;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// An async model that ignores the marker and counts every `T` event per stream: what a consumer
/// has seen, which retention must not shrink.
fn create_seen_model(c: &mut Client, schema: &str) {
    c.batch_execute(&format!(
        r#"
CREATE SCHEMA {schema};
CREATE TABLE {schema}.seen (stream_id text PRIMARY KEY, n bigint NOT NULL);
CREATE FUNCTION {schema}.apply(e ep.events) RETURNS void LANGUAGE plpgsql AS $f$
BEGIN
    INSERT INTO seen AS s VALUES (e.stream_id, 1) ON CONFLICT (stream_id) DO UPDATE SET n = s.n + 1;
END
$f$;
"#
    ))
    .unwrap_or_else(|e| panic!("{}", show(&e)));
}

fn read_seen(c: &mut Client, schema: &str) -> BTreeMap<String, i64> {
    c.query(&format!("SELECT stream_id, n FROM {schema}.seen"), &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Waits until every policy completed a whole scan that started after this call (two completed
/// scans: the first may have begun before) and no cut event is left that the consumers are done
/// with.
fn wait_settled(c: &mut Client, timeout: Duration) -> bool {
    let scanned_since = |c: &mut Client, t: f64| -> Result<bool> {
        Ok(c.query_one(
            "SELECT coalesce(bool_and(NOT scanning AND extract(epoch FROM last_scan_at)::float8 > $1::float8), true)
                    AND coalesce(sum(events_pending), 0) = 0 FROM ep.retention",
            &[&t],
        )?
        .get(0))
    };
    let now = |c: &mut Client| -> f64 {
        c.query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[]).unwrap().get(0)
    };
    let t1 = now(c);
    if !wait_until(timeout, || scanned_since(c, t1)).unwrap_or(false) {
        return false;
    }
    let t2 = now(c);
    wait_until(timeout, || scanned_since(c, t2)).unwrap_or(false)
}

/// What a policy keeps of stream `s`: the stream positions of its `T` events.
fn kept(log: &[Event], s: &str) -> Vec<i64> {
    log.iter().filter(|e| e.stream_id == s && e.event_type == "T").map(|e| e.stream_position).collect()
}

#[test]
fn retention_among_writers_keeps_models_equal_to_a_replay() {
    let _all = AllDatabases::on(2);
    let _interval = Settings::set(&["event_projections.retention_interval = 50"]);
    let db = TestDb::new("retention_writers");
    let mut c = db.connect();
    create_copy_model(&mut c, "rc");
    create_copy_model(&mut c, "rca");
    create_seen_model(&mut c, "rs");
    register(&mut c, "rc", "rc.apply(ep.events)", "inline", "rc");
    register(&mut c, "rca", "rca.apply(ep.events)", "async", "rca");
    // The consumer that ignores the marker only receives the writers' events.
    c.batch_execute("SELECT ep_register_projection('rs', 'rs.apply(ep.events)', 'async', ARRAY['T'], 'rs')").unwrap();
    for e in 0..6 {
        append(&mut c, "old-1", "T", &json!({ "e": e }), None).unwrap();
    }
    c.batch_execute(
        "SELECT ep_set_stream_policy('r-%', max_count => 5);
         SELECT ep_set_stream_policy('r-0', truncate_before => 20);
         SELECT ep_set_stream_policy('old-%', max_age => '1 second');",
    )
    .unwrap();
    let seed = seed("retention_among_writers_keeps_models_equal_to_a_replay");
    let stop = AtomicBool::new(false);
    let appended = Mutex::new(BTreeMap::<String, i64>::new());
    let outcomes = run_parallel(&db, 5, |i, c| {
        let mut rng = Lcg(seed ^ (i as u64 + 1));
        if i == 4 {
            // Rebuilds while the writers write: no removal while one is queued or running.
            let _stop = StopOnDrop(&stop);
            let mut samples = 0;
            for (name, strategy) in [("rca", "blue_green"), ("rc", "in_place"), ("rc", "blue_green")] {
                std::thread::sleep(Duration::from_millis(300));
                let id = rebuild(c, name, strategy);
                let at_start = removed_total(c);
                loop {
                    let (status, _, _) = rebuild_status(c, id);
                    let now = removed_total(c);
                    if status != "queued" && status != "running" {
                        break;
                    }
                    samples += 1;
                    if now != at_start {
                        return Err(
                            format!("{now} events removed while the rebuild of {name} ran, {at_start} before").into()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                if rebuild_wait(c, id) != "done" {
                    return Err(format!("the rebuild of {name} ({strategy}) failed").into());
                }
            }
            std::thread::sleep(Duration::from_millis(300));
            return Ok(format!("rebuilder: {samples} samples while rebuilds were open"));
        }
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            let s = format!("r-{}", rng.next() % 8);
            append(c, &s, "T", &json!({ "w": i, "n": n }), None).map_err(|e| show(&e))?;
            *appended.lock().unwrap().entry(s).or_default() += 1;
            n += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(format!("writer {i}: {n} appended"))
    });
    eprintln!("{}", outcomes.join("; "));
    assert!(wait_settled(&mut c, Duration::from_secs(60)), "retention did not settle");

    let check = |c: &mut Client, when: &str| -> Vec<Event> {
        let log = read_log(c);
        let h = log.last().map(|e| e.global_position).unwrap_or(0);
        for p in ["rca", "rs"] {
            assert!(wait_for(c, p, h, "60 s"), "{when}: {p} did not catch up");
        }
        let expected = replay_copy(&log);
        assert_eq!(read_copy(c, "rc"), expected, "{when}: the inline model is not a replay of the log");
        assert_eq!(read_copy(c, "rca"), expected, "{when}: the async model is not a replay of the log");
        // The consumer that ignores the marker saw every event the writers appended.
        let appended = appended.lock().unwrap().clone();
        let mut seen = read_seen(c, "rs");
        seen.remove("old-1").expect("old-1 seen");
        assert_eq!(seen, appended, "{when}: an async consumer missed events to retention");
        log
    };
    let log = check(&mut c, "after the writes");
    // What each policy keeps: the last 5 of every r-*, and nothing below 20 of r-0 (both apply).
    let appended = appended.lock().unwrap().clone();
    for (s, n) in &appended {
        let last: Vec<i64> = kept(&log, s);
        let versions = stream_version(&mut c, s).unwrap();
        assert!(last.len() <= 5 && (last.len() == 5 || *n < 5), "{s}: {last:?}");
        assert!(last.windows(2).all(|w| w[0] < w[1]), "{s}: {last:?}");
        assert_eq!(
            last.last().copied(),
            log.iter().filter(|e| &e.stream_id == s && e.event_type == "T").map(|e| e.stream_position).max()
        );
        if s == "r-0" {
            assert!(last.iter().all(|p| *p >= 20), "r-0 keeps events below 20: {last:?}");
        }
        let read: Vec<i64> = c
            .query("SELECT stream_position FROM ep_read_stream($1) WHERE event_type = 'T'", &[s])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(read, last, "{s}: ep_read_stream and the log disagree");
        assert!(versions > *n, "{s}: the version counts the markers too ({versions} for {n} events)");
    }
    // The aged-out stream keeps only a marker.
    assert!(kept(&log, "old-1").is_empty(), "old-1 keeps aged-out events");
    let removed = removed_total(&mut c);
    let total: i64 = appended.values().sum::<i64>() + 6;
    let left_t = log.iter().filter(|e| e.event_type == "T").count() as i64;
    let markers_removed = removed - (total - left_t);
    assert!(markers_removed >= 0, "the bookkeeping says {removed} removed, the log {} T events gone", total - left_t);
    let r: Vec<(String, Option<String>, i64, i64)> = c
        .query("SELECT stream_pattern, waiting_for, streams_cut, events_pending FROM ep.retention ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    eprintln!("ep.retention: {r:?}; {removed} events removed in all");
    assert!(r.iter().all(|(_, w, _, pending)| w.is_none() && *pending == 0), "{r:?}");

    for (name, strategy) in [("rc", "in_place"), ("rca", "blue_green"), ("rs", "in_place")] {
        let id = rebuild(&mut c, name, strategy);
        assert_eq!(rebuild_wait(&mut c, id), "done", "rebuild of {name} ({strategy})");
    }
    let log = read_log(&mut c);
    let expected = replay_copy(&log);
    assert_eq!(read_copy(&mut c, "rc"), expected, "the inline model after its rebuild");
    assert_eq!(read_copy(&mut c, "rca"), expected, "the async model after its rebuild");
    // Rebuilt from what remains, the marker-blind consumer counts what remains.
    let remaining: BTreeMap<String, i64> =
        log.iter().filter(|e| e.event_type == "T").fold(BTreeMap::new(), |mut m, e| {
            *m.entry(e.stream_id.clone()).or_default() += 1;
            m
        });
    assert_eq!(read_seen(&mut c, "rs"), remaining);

    // A dump and restore keeps the policies, the cuts and their record, and the log without what
    // was removed; the restored database goes on applying the policies.
    let target = dump_restored(&db, "retention_restored");
    let mut r = target.connect();
    assert_eq!(read_log(&mut r), read_log(&mut c));
    for schema in ["rc", "rca"] {
        assert_eq!(read_copy(&mut r, schema), read_copy(&mut c, schema), "{schema} after the restore");
    }
    let state = |c: &mut Client| -> Vec<String> {
        let mut v = Vec::new();
        for sql in [
            "SELECT s::text FROM ep.streams s ORDER BY stream_id",
            "SELECT (stream_pattern, max_age, max_count, truncate_before, set_by, set_at)::text FROM ep.stream_policies ORDER BY 1",
            "SELECT t::text FROM ep.stream_truncations t ORDER BY stream_id",
        ] {
            v.extend(c.query(sql, &[]).unwrap().iter().map(|r| r.get::<_, String>(0)));
        }
        v
    };
    assert_eq!(state(&mut r), state(&mut c));
    for s in appended.keys() {
        let read = |c: &mut Client| -> Vec<i64> {
            c.query("SELECT stream_position FROM ep_read_stream($1)", &[s]).unwrap().iter().map(|r| r.get(0)).collect()
        };
        assert_eq!(read(&mut r), read(&mut c), "ep_read_stream({s}) after the restore");
    }
    for k in 0..8 {
        append(&mut r, "r-1", "T", &json!({ "after_restore": k }), None).unwrap();
    }
    let cut_again = wait_until(Duration::from_secs(30), || {
        Ok(r.query_one("SELECT count(*) FROM ep_read_stream('r-1') WHERE event_type = 'T'", &[])?.get::<_, i64>(0) == 5)
    });
    assert!(cut_again.unwrap(), "the restored database does not apply the policy");
}

/// A writer cannot set a policy; a role granted only ep_set_stream_policy can, is recorded by
/// name, and still cannot read the catalog; a pattern is a value, never SQL; a handler cannot set
/// a policy; and a projection owner whose handler fails on the marker stops only its own stream's
/// cut, with the error hidden from roles that may not read it.
#[test]
fn policies_need_their_grant_and_a_hostile_handler_stops_only_its_stream() {
    let _all = AllDatabases::on(2);
    let _interval = Settings::set(&["event_projections.retention_interval = 50"]);
    let db = TestDb::new("retention_security");
    let mut admin = db.connect();
    let writer = Role::create(&db.name, "ret_writer", Grants::Writer);
    let mut w = writer.connect();
    expect_sqlstate(
        w.query_one("SELECT ep_set_stream_policy('%', max_count => 1)", &[]),
        &SqlState::INSUFFICIENT_PRIVILEGE,
        "a writer setting a policy",
    );
    // A writer cannot append the marker itself (which would make models forget events).
    expect_sqlstate(
        w.query_one("SELECT ep_append('x-1', '$stream_truncated', '{\"truncate_before\": 99}')", &[]),
        &SqlState::INVALID_PARAMETER_VALUE,
        "a writer faking a cut",
    );
    let keeper = Role::create(&db.name, "ret_keeper", Grants::Nothing);
    admin
        .batch_execute(
            "GRANT USAGE ON SCHEMA ep TO ret_keeper;
             GRANT EXECUTE ON FUNCTION ep_set_stream_policy(text, interval, bigint, bigint), ep_drop_stream_policy(text) TO ret_keeper;",
        )
        .unwrap();
    let mut k = keeper.connect();
    let hostile = "x'); DELETE FROM ep.events; --";
    k.execute("SELECT ep_set_stream_policy($1, max_count => 1)", &[&hostile]).unwrap();
    expect_sqlstate(
        k.query("SELECT * FROM ep.stream_policies", &[]),
        &SqlState::INSUFFICIENT_PRIVILEGE,
        "reading policies",
    );
    let by: String =
        admin.query_one("SELECT set_by FROM ep.stream_policies WHERE stream_pattern = $1", &[&hostile]).unwrap().get(0);
    assert_eq!(by, "ret_keeper");
    assert!(k.query_one("SELECT ep_drop_stream_policy($1)", &[&hostile]).unwrap().get::<_, bool>(0));

    // A projection owner whose inline handler fails on the marker of its stream, and tries to set
    // a policy from inside a handler.
    let owner = Role::create(&db.name, "ret_owner", Grants::ProjectionOwner);
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA ret_owner AUTHORIZATION ret_owner;
             GRANT EXECUTE ON FUNCTION ep_set_stream_policy(text, interval, bigint, bigint) TO ret_owner;
             GRANT SELECT ON ep.retention TO {};",
            writer.name
        ))
        .unwrap();
    let mut o = owner.connect();
    o.batch_execute(
        r#"
CREATE TABLE ret_owner.t (n int);
CREATE FUNCTION ret_owner.h(e ep.events) RETURNS void LANGUAGE plpgsql AS $f$
BEGIN
    IF e.event_type = '$stream_truncated' AND e.stream_id = 'v-1' THEN
        RAISE EXCEPTION 'the handler refuses the cut of %', e.stream_id;
    END IF;
    IF e.event_type = 'SetPolicy' THEN
        PERFORM ep_set_stream_policy('%', max_count => 1);
    END IF;
END
$f$;
SELECT ep_register_projection('ret_h', 'ret_owner.h(ep.events)', 'inline', NULL, 'ret_owner');
"#,
    )
    .unwrap_or_else(|e| panic!("{}", show(&e)));
    expect_sqlstate(
        w.query_one("SELECT ep_append('x-1', 'SetPolicy', '{}')", &[]),
        &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
        "a policy set from inside a handler",
    );
    for s in ["v-1", "v-2"] {
        for n in 0..4 {
            append(&mut w, s, "T", &json!({ "n": n }), None).unwrap();
        }
    }
    admin.batch_execute("SELECT ep_set_stream_policy('v-%', max_count => 2)").unwrap();
    let cut = wait_until(Duration::from_secs(30), || {
        Ok(admin.query_one("SELECT count(*) FROM ep_read_stream('v-2') WHERE event_type = 'T'", &[])?.get::<_, i64>(0)
            == 2)
    });
    assert!(cut.unwrap(), "v-2 was not cut");
    let failed = wait_until(Duration::from_secs(30), || {
        Ok(admin.query_one("SELECT last_error IS NOT NULL FROM ep.retention WHERE stream_pattern = 'v-%'", &[])?.get(0))
    });
    assert!(failed.unwrap(), "the failed cut is not recorded");
    let (err, v1): (String, i64) = {
        let e =
            admin.query_one("SELECT last_error FROM ep.retention WHERE stream_pattern = 'v-%'", &[]).unwrap().get(0);
        let n = admin.query_one("SELECT count(*) FROM ep_read_stream('v-1')", &[]).unwrap().get(0);
        (e, n)
    };
    assert!(err.contains("v-1") && err.contains("refuses"), "{err}");
    assert_eq!(v1, 4, "v-1 was cut although its marker's handler failed");
    // A role that may read the view but not the error column sees that there was one, not what.
    let shown: (Option<String>, Option<Value>) = {
        let r = w
            .query_one("SELECT last_error, to_jsonb(last_error_at) FROM ep.retention WHERE stream_pattern = 'v-%'", &[])
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(shown.0.is_none() && shown.1.is_some(), "{shown:?}");
    assert!(!writer.is_superuser() && !keeper.is_superuser() && !owner.is_superuser());
}

/// A registration builds its inline projection from the log in several statements without a
/// lock that appends or the worker would wait for; a removal must not run between them (the
/// build would count some events of a stream and miss the others). A slow marker-blind handler is
/// registered while 1990 cut events are ready to go: the model counts all 2000 the log had.
#[test]
fn no_removal_runs_while_a_registration_reads_the_log() {
    let _all = AllDatabases::on(2);
    let _interval = Settings::set(&["event_projections.retention_interval = 50"]);
    let db = TestDb::new("retention_registration");
    let mut c = db.connect();
    c.batch_execute(
        "SELECT ep_append_events('big', (SELECT jsonb_agg(jsonb_build_object('type', 'T', 'data', '{}'::jsonb))
                                           FROM generate_series(1, 2000)));
         -- A subscription that acknowledges nothing holds removal back until it goes.
         SELECT ep_subscribe('hold', NULL, 1);
         SELECT ep_set_stream_policy('big', max_count => 10);
         CREATE SCHEMA reg;
         CREATE TABLE reg.seen (n bigint NOT NULL);
         INSERT INTO reg.seen VALUES (0);
         CREATE FUNCTION reg.apply(e ep.events) RETURNS void LANGUAGE plpgsql AS $f$
         BEGIN
             PERFORM pg_sleep(0.001);
             UPDATE seen SET n = n + 1;
         END $f$;",
    )
    .unwrap_or_else(|e| panic!("{}", show(&e)));
    let cut = wait_until(Duration::from_secs(30), || {
        Ok(c.query_one("SELECT count(*) FROM ep.stream_truncations WHERE pending", &[])?.get::<_, i64>(0) == 1)
    });
    assert!(cut.unwrap(), "big was not cut");
    assert_eq!(removed_total(&mut c), 0, "removed while the subscription held it back");
    std::thread::scope(|s| {
        let registering = s.spawn(|| {
            let mut r = db.connect();
            r.batch_execute("SELECT ep_register_projection('reg', 'reg.apply(ep.events)', 'inline', ARRAY['T'], 'reg')")
                .map_err(|e| show(&e))
        });
        // Once the build is reading the log (its first batch takes a second), let removal go.
        std::thread::sleep(Duration::from_millis(300));
        c.batch_execute("SELECT ep_unsubscribe('hold')").unwrap();
        registering.join().unwrap().unwrap();
    });
    let n: i64 = c.query_one("SELECT n FROM reg.seen", &[]).unwrap().get(0);
    assert_eq!(n, 2000, "the registration's build saw the log shrink under it");
    let done = wait_until(Duration::from_secs(30), || Ok(removed_total(&mut c) == 1990));
    assert!(done.unwrap(), "the removal did not go on after the registration");
}
