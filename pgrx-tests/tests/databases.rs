//! Every database of the cluster (issue: operable like the extensions DBAs run): the launcher
//! serves each database that has the extension, shares `event_projections.max_workers` among
//! them, follows CREATE and DROP EXTENSION, and reports its workers in `ep.workers`.

use ep_connection_tests::served::*;
use ep_connection_tests::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn create_async_counts(c: &mut postgres::Client, name: &str, schema: &str) {
    create_counts_model(c, schema);
    register(c, name, &format!("{schema}.count_event(ep.events)"), "async", schema);
}

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
    assert_eq!(doc["library_version"], json!("0.2.0"));
    assert_eq!(doc["extension_version"], json!("0.2.0"));
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
    drop(m);
    c.batch_execute("DROP OWNED BY m_watch; DROP ROLE m_watch;").unwrap_or_default();
}
