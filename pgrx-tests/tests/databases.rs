//! Every database of the cluster (issue: operable like the extensions DBAs run): the launcher
//! serves each database that has the extension, shares `event_projections.max_workers` among
//! them, follows CREATE and DROP EXTENSION, and reports its workers in `ep.workers`.

use ep_connection_tests::served::*;
use ep_connection_tests::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn last_position(c: &mut postgres::Client) -> i64 {
    c.query_one("SELECT coalesce(max(global_position), 0) FROM ep.events", &[]).unwrap().get(0)
}

/// Two databases with async projections and rebuilds at once, while a third creates and drops the
/// extension three times: both models end equal to a replay of their own log, both databases had
/// a worker all along, and the third is served while it has the extension and not after.
#[test]
fn two_databases_work_at_once_while_a_third_comes_and_goes() {
    let _all = AllDatabases::on(4);
    let dbs = [TestDb::new("multi_a"), TestDb::new("multi_b")];
    let third = TestDb::empty("multi_c");
    for db in &dbs {
        let mut c = db.connect();
        create_async_counts(&mut c, "asy", "w_asy");
        create_counts_projection(&mut c, "inl", "w_inl");
        assert!(wait_for_workers(&mut c, &db.name, 1, Duration::from_secs(20)), "no worker serves {}", db.name);
    }
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    std::thread::scope(|s| {
        let writers: Vec<_> = dbs
            .iter()
            .flat_map(|db| (0..2).map(move |w| (db, w)))
            .map(|(db, w)| {
                let stop = &stop;
                s.spawn(move || {
                    let mut c = db.connect();
                    let mut n = 0;
                    while !stop.load(Ordering::SeqCst) && n < 400 {
                        append(&mut c, &format!("s{w}-{}", n % 7), "T", &json!({ "n": n }), None).unwrap();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        // Rebuilds in both databases while they append.
        let rebuilds: Vec<_> = dbs
            .iter()
            .map(|db| {
                s.spawn(move || {
                    let mut c = db.connect();
                    std::thread::sleep(Duration::from_millis(200));
                    let id = rebuild(&mut c, "inl", "in_place");
                    rebuild_wait(&mut c, id)
                })
            })
            .collect();
        // Meanwhile the third database gets the extension, is served, and loses it again.
        let mut t = third.connect();
        for round in 0..3 {
            t.batch_execute("CREATE EXTENSION event_projections").unwrap();
            create_async_counts(&mut t, "asy", "w_asy");
            let p = append(&mut t, "x", "T", &json!({ "round": round }), None).unwrap();
            assert!(
                wait_for(&mut t, "asy", p, "30 s"),
                "round {round}: the new extension in {} was not served",
                third.name
            );
            assert_counts_match_log(&mut t, "w_asy");
            t.batch_execute("DROP EXTENSION event_projections CASCADE; DROP SCHEMA IF EXISTS w_asy CASCADE").unwrap();
        }
        // Both working databases keep at least one worker throughout.
        let mut a = dbs[0].connect();
        for db in &dbs {
            assert!(wait_for_workers(&mut a, &db.name, 1, Duration::from_secs(10)), "{} lost its workers", db.name);
        }
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            assert!(w.join().unwrap() > 0);
        }
        for r in rebuilds {
            assert_eq!(r.join().unwrap(), "done");
        }
    });
    eprintln!("appends, rebuilds and three CREATE/DROP rounds took {:?}", started.elapsed());
    for db in &dbs {
        let mut c = db.connect();
        let p = last_position(&mut c);
        assert!(wait_for(&mut c, "asy", p, "60 s"), "{}: async projection did not catch up", db.name);
        assert_counts_match_log(&mut c, "w_asy");
        assert_counts_match_log(&mut c, "w_inl");
    }
    // The third database, without the extension now, has no worker left.
    let mut a = dbs[0].connect();
    let gone = wait_until(Duration::from_secs(10), || {
        Ok(a.query_one("SELECT count(*) FROM ep.workers WHERE database = $1", &[&third.name])?.get::<_, i64>(0) == 0)
    });
    assert!(gone.unwrap(), "a worker still serves {} after DROP EXTENSION", third.name);
}

/// With more databases than workers each still gets its turn: five databases with async
/// projections and one worker all catch up.
#[test]
fn more_databases_than_workers_take_turns() {
    let _all = AllDatabases::on(1);
    let dbs: Vec<TestDb> = (0..5).map(|i| TestDb::new(&format!("turns_{i}"))).collect();
    let mut targets = Vec::new();
    for db in &dbs {
        let mut c = db.connect();
        create_async_counts(&mut c, "asy", "w_asy");
        let mut p = 0;
        for n in 0..20 {
            p = append(&mut c, &format!("s{}", n % 3), "T", &json!({ "n": n }), None).unwrap();
        }
        targets.push(p);
    }
    let started = Instant::now();
    for (db, p) in dbs.iter().zip(targets) {
        let mut c = db.connect();
        assert!(wait_for(&mut c, "asy", p, "90 s"), "{} never got a worker", db.name);
        assert_counts_match_log(&mut c, "w_asy");
    }
    eprintln!("five databases, one worker: all caught up after {:?}", started.elapsed());
    let mut c = dbs[0].connect();
    let n: i64 = c.query_one("SELECT count(*) FROM ep.workers", &[]).unwrap().get(0);
    assert!(n <= 1, "{n} workers run with max_workers = 1");
}

/// ep_status() describes the database in one document, and ep.workers lists the workers.
#[test]
fn status_document_and_workers_view() {
    let _all = AllDatabases::on(2);
    let db = TestDb::new("status_doc");
    let mut c = db.connect();
    create_async_counts(&mut c, "asy", "w_asy");
    let p = append(&mut c, "s", "T", &json!({}), None).unwrap();
    assert!(wait_for(&mut c, "asy", p, "30 s"));
    let mut holder = db.connect();
    holder.batch_execute("BEGIN; SELECT ep_append('held', 'T', '{}')").unwrap();
    let doc: serde_json::Value = c.query_one("SELECT ep_status()", &[]).unwrap().get(0);
    assert_eq!(doc["database"], json!(db.name));
    assert_eq!(doc["library_version"], json!("0.5.0"));
    assert_eq!(doc["extension_version"], json!("0.5.0"));
    assert_eq!(doc["preloaded"], json!(true));
    assert_eq!(doc["high_water"], json!(p), "the held append is above the mark: {doc}");
    assert_eq!(doc["in_flight"]["oldest_position"], json!(p + 1), "{doc}");
    assert!(doc["in_flight"]["oldest_age_seconds"].as_f64().is_some_and(|a| a >= 0.0), "{doc}");
    let asy = &doc["projections"][0];
    assert_eq!(asy["name"], json!("asy"));
    assert_eq!(asy["mode"], json!("async"));
    assert_eq!(asy["position"], json!(p));
    assert!(doc["launcher"]["pid"].as_i64().is_some(), "{doc}");
    let mine: Vec<&serde_json::Value> =
        doc["workers"].as_array().unwrap().iter().filter(|w| w["database"] == json!(db.name)).collect();
    assert!(!mine.is_empty(), "no worker of this database in {doc}");
    holder.batch_execute("ROLLBACK").unwrap();
    let doc: serde_json::Value = c.query_one("SELECT ep_status()", &[]).unwrap().get(0);
    assert_eq!(doc["in_flight"]["oldest_position"], json!(null));
    // The view agrees with pg_stat_activity about the pids.
    let missing: i64 = c
        .query_one(
            "SELECT count(*) FROM ep.workers w WHERE w.pid IS NOT NULL AND NOT EXISTS
               (SELECT 1 FROM pg_stat_activity a WHERE a.pid = w.pid AND a.backend_type = 'event_projections worker')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(missing, 0);
}

/// An ordinary role gets nothing from the monitoring functions without the grants, and with the
/// monitoring grants of README sees only the projections it acts for.
#[test]
fn monitoring_needs_its_grants() {
    let _all = AllDatabases::on(2);
    let db = TestDb::new("status_grants");
    let mut c = db.connect();
    create_async_counts(&mut c, "asy", "w_asy");
    c.batch_execute(
        "DROP ROLE IF EXISTS m_watch; CREATE ROLE m_watch LOGIN;
         GRANT CONNECT ON DATABASE t_status_grants TO m_watch;",
    )
    .unwrap();
    let mut m = postgres::Client::connect(&format!("{} user=m_watch", conninfo(&db.name)), postgres::NoTls).unwrap();
    for sql in ["SELECT ep_status()", "SELECT * FROM ep.workers", "SELECT * FROM ep.worker_processes()"] {
        expect_sqlstate(m.query(sql, &[]), &postgres::error::SqlState::INSUFFICIENT_PRIVILEGE, sql);
    }
    c.batch_execute(
        "GRANT USAGE ON SCHEMA ep TO m_watch;
         GRANT SELECT ON ep.projection_status, ep.subscription_status, ep.workers TO m_watch;
         GRANT EXECUTE ON FUNCTION ep_status(), ep.worker_processes() TO m_watch;",
    )
    .unwrap();
    let doc: serde_json::Value = m.query_one("SELECT ep_status()", &[]).unwrap().get(0);
    assert_eq!(doc["projections"], json!([]), "m_watch acts for no projection: {doc}");
    m.query("SELECT * FROM ep.workers", &[]).unwrap();
    // The README's monitoring grants: every projection, never its error (which can quote events).
    c.batch_execute(
        "CREATE FUNCTION w_asy.leaky(e ep.events) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'card %', e.data ->> 'card'; END $$;
         SELECT ep_register_projection('leaky', 'w_asy.leaky(ep.events)', 'async', NULL, 'w_asy');
         SELECT ep_append('pay', 'Paid', '{\"card\": \"4111-1111\"}');
         GRANT SELECT (id, name) ON ep.projections TO m_watch;
         GRANT SELECT (name) ON ep.subscriptions TO m_watch;",
    )
    .unwrap();
    let failed = wait_until(Duration::from_secs(20), || {
        Ok(c.query_one("SELECT last_error IS NOT NULL FROM ep.projections WHERE name = 'leaky'", &[])?
            .get::<_, bool>(0))
    });
    assert!(failed.unwrap(), "the leaky projection never failed");
    let doc: serde_json::Value = m.query_one("SELECT ep_status()", &[]).unwrap().get(0);
    assert_eq!(doc["projections"].as_array().map(|a| a.len()), Some(2), "{doc}");
    assert!(!doc.to_string().contains("4111"), "an event's data reached the monitoring role: {doc}");
    let seen: i64 =
        m.query_one("SELECT count(*) FROM ep.projection_status WHERE last_error IS NOT NULL", &[]).unwrap().get(0);
    assert_eq!(seen, 0, "the status view shows errors to the monitoring role");
    drop(m);
    c.batch_execute("DROP OWNED BY m_watch; DROP ROLE m_watch;").unwrap_or_default();
}

/// Looking at databases never takes a slot from a served one: while twenty new databases without
/// the extension are probed, the one worker of a served database keeps running, the same process.
#[test]
fn probes_never_take_a_serving_slot() {
    // Enough slots for every database with the extension here (this one and the served `ep`), so
    // that no rotation moves the worker: only a probe could.
    let _all = AllDatabases::on(4);
    let db = TestDb::new("probe_served");
    let mut c = db.connect();
    create_async_counts(&mut c, "asy", "w_asy");
    assert!(wait_for_workers(&mut c, &db.name, 1, Duration::from_secs(20)));
    let pid = |c: &mut postgres::Client| -> Option<i32> {
        c.query_one("SELECT max(pid) FROM ep.workers WHERE database = current_database() AND slot <= 16", &[])
            .ok()
            .and_then(|r| r.get(0))
    };
    let first = pid(&mut c);
    assert!(first.is_some());
    let others: Vec<TestDb> = (0..20).map(|i| TestDb::empty(&format!("probe_other_{i}"))).collect();
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        assert_eq!(pid(&mut c), first, "the served database's worker was replaced while others were probed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let p = append(&mut c, "s", "T", &json!({}), None).unwrap();
    assert!(wait_for(&mut c, "asy", p, "10 s"));
    drop(others);
}

/// A launcher that is terminated is restarted by the postmaster, and the new one ends the workers
/// the old one started before it starts its own: never more than max_workers serve, and the
/// database is served again.
#[test]
fn a_restarted_launcher_takes_over() {
    let _all = AllDatabases::on(2);
    let db = TestDb::new("launcher_restart");
    let mut c = db.connect();
    create_async_counts(&mut c, "asy", "w_asy");
    assert!(wait_for_workers(&mut c, &db.name, 1, Duration::from_secs(20)));
    // Worker processes of every database, the probe's included (at most one more).
    let serving = |c: &mut postgres::Client| -> i64 {
        c.query_one("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'event_projections worker'", &[])
            .unwrap()
            .get(0)
    };
    for round in 0..2 {
        let old: i32 = c
            .query_one("SELECT pid FROM pg_stat_activity WHERE backend_type = 'event_projections launcher'", &[])
            .unwrap()
            .get(0);
        c.execute("SELECT pg_terminate_backend($1)", &[&old]).unwrap();
        let back = wait_until(Duration::from_secs(30), || {
            Ok(c.query_opt(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'event_projections launcher' AND pid <> $1",
                &[&old],
            )?
            .is_some())
        });
        assert!(back.unwrap(), "round {round}: no new launcher");
        let settled = wait_until(Duration::from_secs(20), || Ok(serving(&mut c) <= 3));
        assert!(settled.unwrap(), "round {round}: {} workers with max_workers = 2", serving(&mut c));
        let p = append(&mut c, "s", "T", &json!({ "round": round }), None).unwrap();
        assert!(wait_for(&mut c, "asy", p, "30 s"), "round {round}: not served after the launcher's restart");
        assert!(
            serving(&mut c) <= 3,
            "round {round}: {} workers with max_workers = 2 (and the probe)",
            serving(&mut c)
        );
    }
    assert_counts_match_log(&mut c, "w_asy");
}

/// A database's owner, not a superuser, can drop, rename and copy their database while the
/// workers serve it (they run as the bootstrap superuser, so not even `WITH (FORCE)` could end
/// them); another role's attempt leaves the workers where they are.
#[test]
fn a_database_owner_can_drop_a_served_database() {
    let _all = AllDatabases::on(4);
    let mut admin = connect("postgres");
    // One statement per call: DROP DATABASE refuses a transaction block.
    for sql in [
        "DROP DATABASE IF EXISTS t_owned WITH (FORCE)",
        "DROP DATABASE IF EXISTS t_owned2 WITH (FORCE)",
        "DROP DATABASE IF EXISTS t_owned_copy WITH (FORCE)",
        "DROP ROLE IF EXISTS db_owner",
        "DROP ROLE IF EXISTS db_other",
        "CREATE ROLE db_owner LOGIN CREATEDB",
        "CREATE ROLE db_other LOGIN",
    ] {
        admin.batch_execute(sql).unwrap_or_else(|e| panic!("{sql}: {}", show(&e)));
    }
    let as_role = |role: &str, db: &str| {
        postgres::Client::connect(&format!("{} user={role}", conninfo(db)), postgres::NoTls).unwrap()
    };
    as_role("db_owner", "postgres").batch_execute("CREATE DATABASE t_owned").unwrap();
    let served = || {
        let mut c = connect("t_owned");
        c.batch_execute("CREATE EXTENSION IF NOT EXISTS event_projections").unwrap();
        if c.query_opt("SELECT 1 FROM ep.projections WHERE name = 'asy'", &[]).unwrap().is_none() {
            create_async_counts(&mut c, "asy", "w_asy");
        }
        let p = append(&mut c, "s", "T", &json!({}), None).unwrap();
        assert!(wait_for(&mut c, "asy", p, "20 s"), "t_owned is not served");
    };
    served();
    // Someone else's DROP fails on its privileges and the worker stays.
    let mut watch = connect("t_owned");
    let before: i64 =
        watch.query_one("SELECT count(*) FROM ep.workers WHERE database = 't_owned'", &[]).unwrap().get(0);
    expect_sqlstate(
        as_role("db_other", "postgres").batch_execute("DROP DATABASE t_owned"),
        &postgres::error::SqlState::INSUFFICIENT_PRIVILEGE,
        "another role's DROP DATABASE",
    );
    let after: i64 = watch.query_one("SELECT count(*) FROM ep.workers WHERE database = 't_owned'", &[]).unwrap().get(0);
    assert!(after >= 1 && after >= before, "another role's DROP DATABASE sent the workers away ({before} -> {after})");
    drop(watch);
    // The owner copies it, renames it and drops it, each while it is served.
    let mut owner = as_role("db_owner", "postgres");
    owner
        .batch_execute("CREATE DATABASE t_owned_copy TEMPLATE t_owned")
        .unwrap_or_else(|e| panic!("copy: {}", show(&e)));
    owner.batch_execute("DROP DATABASE t_owned_copy").unwrap();
    served();
    owner.batch_execute("ALTER DATABASE t_owned RENAME TO t_owned2").unwrap_or_else(|e| panic!("rename: {}", show(&e)));
    owner.batch_execute("ALTER DATABASE t_owned2 RENAME TO t_owned").unwrap();
    served();
    owner.batch_execute("DROP DATABASE t_owned").unwrap_or_else(|e| panic!("drop: {}", show(&e)));
    admin.batch_execute("DROP ROLE db_owner").unwrap();
    admin.batch_execute("DROP ROLE db_other").unwrap();
}
