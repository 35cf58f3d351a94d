//! The security suite (issue 10): each attack an ordinary role could make through the extension,
//! from a real connection as that role, holding every grant the privilege model gives its kind of
//! user (README.md, "Security"). Each test asserts that no privilege was gained, no object taken,
//! the read models equal a replay of the log, and the other roles' work goes on.
//!
//! Roles are cluster-wide, so every test uses role names of its own.

use ep_connection_tests::postgres::error::SqlState;
use ep_connection_tests::postgres::Client;
use ep_connection_tests::served::*;
use ep_connection_tests::*;
use std::time::{Duration, Instant};

/// `CREATE SCHEMA <schema> AUTHORIZATION <role>` as the superuser (an ordinary role may not
/// create schemas in the database), then `sql` as the role.
fn schema_for(admin: &mut Client, role: &Role, schema: &str, sql: &str) {
    admin.batch_execute(&format!("CREATE SCHEMA {schema} AUTHORIZATION {}", role.name)).unwrap();
    role.connect().batch_execute(sql).unwrap_or_else(|e| panic!("{sql}: {}", show(&e)));
}

/// A counts model of `schema` created by `role` itself.
fn counts_model_of(admin: &mut Client, role: &Role, schema: &str) {
    admin.batch_execute(&format!("CREATE SCHEMA {schema} AUTHORIZATION {}", role.name)).unwrap();
    create_counts_model_in_existing(&mut role.connect(), schema);
}

/// `create_counts_model` without the CREATE SCHEMA.
fn create_counts_model_in_existing(c: &mut Client, schema: &str) {
    c.batch_execute(&format!(
        r#"
CREATE TABLE {schema}.counts (stream_id text PRIMARY KEY, n bigint NOT NULL, last_position bigint NOT NULL);
CREATE FUNCTION {schema}.count_event(e ep.events) RETURNS void LANGUAGE plpgsql AS $f$
BEGIN
    INSERT INTO counts AS c VALUES (e.stream_id, 1, e.global_position)
        ON CONFLICT (stream_id) DO UPDATE SET n = c.n + 1, last_position = excluded.last_position;
END
$f$;
"#
    ))
    .unwrap_or_else(|e| panic!("creating {schema}: {}", show(&e)));
}

fn register_as(
    c: &mut Client,
    name: &str,
    handler: &str,
    mode: &str,
    schema: &str,
) -> std::result::Result<(), postgres::Error> {
    c.execute(
        "SELECT ep_register_projection($1, $2::text::regprocedure, $3, NULL, $4)",
        &[&name, &handler, &mode, &schema],
    )
    .map(|_| ())
}

// ------------------------------------------------------------------------------------------------
// The privilege model

/// After CREATE EXTENSION, PUBLIC may do nothing with the log or the registry.
#[test]
fn a_role_granted_nothing_can_do_nothing() {
    let db = TestDb::new("sec_nothing");
    let mut admin = db.connect();
    create_counts_projection(&mut admin, "p", "rm");
    append(&mut admin, "s", "T", &json!({}), None).unwrap();
    let nobody = Role::create(&db.name, "sec_nobody", Grants::Nothing);
    let mut c = nobody.connect();
    for sql in [
        "SELECT ep_append('s', 'T', '{}')",
        "SELECT ep_append_events('s', '[{\"type\": \"T\", \"data\": {}}]')",
        "SELECT ep_read_all()",
        "SELECT ep_read_stream('s')",
        "SELECT ep_stream_version('s')",
        "SELECT * FROM ep.events",
        "SELECT * FROM ep.projections",
        "SELECT * FROM ep.rebuilds",
        "SELECT * FROM ep.projection_status",
        "SELECT ep_register_projection('x', 'rm.count_event(ep.events)')",
        "SELECT ep_unregister_projection('p')",
        "SELECT ep_rebuild('p')",
        "SELECT ep_in_flight()",
        "SELECT ep_require_ready('p')",
    ] {
        expect_sqlstate(c.batch_execute(sql), &SqlState::INSUFFICIENT_PRIVILEGE, sql);
    }
    assert_counts_match_log(&mut admin, "rm");
    assert_eq!(check_log(&mut admin).len(), 1, "a role granted nothing appended");
}

/// Each kind of user can do what its grants say, and no more.
#[test]
fn each_grant_set_does_what_it_says() {
    let db = TestDb::new("sec_grants");
    let mut admin = db.connect();
    create_counts_projection(&mut admin, "p", "rm");
    let writer = Role::create(&db.name, "sec_writer", Grants::Writer);
    let reader = Role::create(&db.name, "sec_reader", Grants::Reader);
    let mut w = writer.connect();
    append(&mut w, "s", "T", &json!({}), Some(0)).unwrap();
    assert_eq!(stream_version(&mut w, "s").unwrap(), 1);
    expect_sqlstate(
        w.batch_execute("SELECT * FROM ep.events"),
        &SqlState::INSUFFICIENT_PRIVILEGE,
        "a writer reads the log",
    );
    expect_sqlstate(
        w.batch_execute("SELECT ep_register_projection('x', 'rm.count_event(ep.events)')"),
        &SqlState::INSUFFICIENT_PRIVILEGE,
        "a writer registers",
    );
    let mut r = reader.connect();
    assert_eq!(r.query("SELECT * FROM ep_read_all()", &[]).unwrap().len(), 1);
    assert_eq!(r.query("SELECT * FROM ep_read_stream('s')", &[]).unwrap().len(), 1);
    expect_sqlstate(
        r.batch_execute("SELECT ep_append('s', 'T', '{}')"),
        &SqlState::INSUFFICIENT_PRIVILEGE,
        "a reader appends",
    );
    // The inline handler ran with its owner's rights for the writer's append.
    assert_counts_match_log(&mut admin, "rm");
}

/// A projection may only use a read-model schema its owner owns: a schema another role merely
/// lets it use cannot be registered (and so cannot be emptied, copied or swapped by a rebuild).
#[test]
fn a_projection_cannot_take_another_roles_schema() {
    let db = TestDb::new("sec_schema");
    let mut admin = db.connect();
    let alice = Role::create(&db.name, "sec_alice", Grants::ProjectionOwner);
    let mallory = Role::create(&db.name, "sec_mallory", Grants::ProjectionOwner);
    counts_model_of(&mut admin, &alice, "alice_rm");
    alice.connect().batch_execute("GRANT USAGE ON SCHEMA alice_rm TO sec_mallory").unwrap();
    schema_for(
        &mut admin,
        &mallory,
        "mal",
        "CREATE FUNCTION mal.h(e ep.events) RETURNS void LANGUAGE plpgsql AS $$ BEGIN END $$",
    );
    let mut m = mallory.connect();
    let r = register_as(&mut m, "grab", "mal.h(ep.events)", "inline", "alice_rm");
    let err = expect_sqlstate(r, &SqlState::INSUFFICIENT_PRIVILEGE, "registering on another role's schema");
    assert!(err.message().contains("alice_rm"), "{}", err.message());
    let projections: i64 = admin.query_one("SELECT count(*) FROM ep.projections", &[]).unwrap().get(0);
    assert_eq!(projections, 0);
}

/// A temporary function vanishes with its session; registered as a handler it would have broken
/// every append of its types afterwards. It is refused, as handler and as setup function.
#[test]
fn a_temporary_function_cannot_be_a_handler() {
    let db = TestDb::new("sec_temp_fn");
    let mut admin = db.connect();
    let mallory = Role::create(&db.name, "sec_tmpfn", Grants::ProjectionOwner);
    counts_model_of(&mut admin, &mallory, "tmp_rm");
    let mut m = mallory.connect();
    m.batch_execute("CREATE FUNCTION pg_temp.h(e ep.events) RETURNS void LANGUAGE plpgsql AS $$ BEGIN END $$").unwrap();
    let r = m.execute(
        "SELECT ep_register_projection('t', (SELECT p.oid::regprocedure FROM pg_proc p WHERE p.proname = 'h' AND p.pronamespace = pg_my_temp_schema()), 'inline', NULL, 'tmp_rm')",
        &[],
    );
    expect_sqlstate(r, &SqlState::INVALID_FUNCTION_DEFINITION, "a pg_temp handler");
    drop(m);
    append(&mut admin, "s", "T", &json!({}), None).unwrap();
}

/// A registered handler and a read-model schema cannot be dropped from under their projection
/// (that made every append of its types fail with "cache lookup failed"); unregistering first
/// lets the drop through.
#[test]
fn what_a_projection_uses_cannot_be_dropped_from_under_it() {
    let db = TestDb::new("sec_depend");
    let mut admin = db.connect();
    let alice = Role::create(&db.name, "sec_dep_alice", Grants::ProjectionOwner);
    counts_model_of(&mut admin, &alice, "dep_rm");
    let mut a = alice.connect();
    register_as(&mut a, "dep", "dep_rm.count_event(ep.events)", "inline", "dep_rm").unwrap();
    // The owner role owns the function and the schema: DROP ROLE refuses (PostgreSQL's own
    // dependency), and DROP OWNED, which would drop them, meets the guard.
    let err = expect_sqlstate(
        admin.batch_execute("DROP ROLE sec_dep_alice"),
        &SqlState::DEPENDENT_OBJECTS_STILL_EXIST,
        "DROP ROLE",
    );
    assert!(err.message().contains("sec_dep_alice"), "{}", err.message());
    for sql in
        ["DROP FUNCTION dep_rm.count_event(ep.events)", "DROP SCHEMA dep_rm CASCADE", "DROP OWNED BY sec_dep_alice"]
    {
        let c: &mut Client = if sql.starts_with("DROP OWNED") { &mut admin } else { &mut a };
        let err = expect_sqlstate(c.batch_execute(sql), &SqlState::DEPENDENT_OBJECTS_STILL_EXIST, sql);
        assert!(err.message().contains("\"dep\"") || err.message().contains("'dep'"), "{sql}: {}", err.message());
    }
    append(&mut admin, "s", "T", &json!({}), None).unwrap();
    assert_counts_match_log(&mut admin, "dep_rm");
    a.batch_execute("SELECT ep_unregister_projection('dep'); DROP SCHEMA dep_rm CASCADE").unwrap();
    append(&mut admin, "s", "T", &json!({}), None).unwrap();
}

// ------------------------------------------------------------------------------------------------
// The sandbox, inline

/// A handler that changes settings with set_config (session-wide and local) leaves nothing behind
/// in the session that appended: not its search_path (the next unqualified operator would be the
/// handler owner's), not DateStyle, not a custom setting.
#[test]
fn settings_a_handler_changes_do_not_outlive_it() {
    let db = TestDb::new("sec_settings");
    let mut admin = db.connect();
    let mallory = Role::create(&db.name, "sec_set_mal", Grants::ProjectionOwner);
    schema_for(
        &mut admin,
        &mallory,
        "set_rm",
        r#"
CREATE TABLE set_rm.seen (n int);
CREATE FUNCTION set_rm.h(e ep.events) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('search_path', 'set_rm, pg_catalog', false);
    PERFORM set_config('DateStyle', 'SQL, DMY', false);
    PERFORM set_config('ep_attack.flag', 'planted', false);
    PERFORM set_config('work_mem', '77kB', true);
    INSERT INTO seen VALUES (1);
END $$;
"#,
    );
    register_as(&mut mallory.connect(), "settings", "set_rm.h(ep.events)", "inline", "set_rm").unwrap();
    let before: (String, String, String) = {
        let r = admin
            .query_one(
                "SELECT current_setting('search_path'), current_setting('DateStyle'), current_setting('work_mem')",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    // In a transaction and outside one, single and batch appends.
    admin.batch_execute("BEGIN").unwrap();
    append(&mut admin, "s", "T", &json!({}), None).unwrap();
    let inside: String = admin.query_one("SELECT current_setting('search_path')", &[]).unwrap().get(0);
    admin.batch_execute("COMMIT").unwrap();
    append_events(&mut admin, "s", &[("T", json!({})), ("T", json!({}))], None).unwrap();
    let after = admin
        .query_one(
            "SELECT current_setting('search_path'), current_setting('DateStyle'), current_setting('work_mem'), \
                    coalesce(current_setting('ep_attack.flag', true), '')",
            &[],
        )
        .unwrap();
    assert_eq!(inside, before.0, "the handler's search_path survived it inside the transaction");
    assert_eq!((after.get::<_, String>(0), after.get::<_, String>(1), after.get::<_, String>(2)), before);
    assert_eq!(after.get::<_, String>(3), "", "a custom setting planted by the handler survived it");
    let n: i64 = admin.query_one("SELECT count(*) FROM set_rm.seen", &[]).unwrap().get(0);
    assert_eq!(n, 3, "the handler ran for each event");
}

/// A role that may append creates a temporary table named like a read-model table, with a
/// trigger: the owner's inline handler must write the real read model, never the temporary table
/// (whose trigger would run with the owner's rights).
#[test]
fn temporary_tables_cannot_shadow_a_read_model() {
    let db = TestDb::new("sec_pg_temp");
    let mut admin = db.connect();
    let alice = Role::create(&db.name, "sec_tmp_alice", Grants::ProjectionOwner);
    let mallory = Role::create(&db.name, "sec_tmp_mal", Grants::Writer);
    counts_model_of(&mut admin, &alice, "tmp_alice");
    register_as(&mut alice.connect(), "acct", "tmp_alice.count_event(ep.events)", "inline", "tmp_alice").unwrap();
    let mut m = mallory.connect();
    m.batch_execute(
        r#"
CREATE TEMP TABLE counts (stream_id text PRIMARY KEY, n bigint NOT NULL, last_position bigint NOT NULL);
CREATE FUNCTION pg_temp.steal() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE NOTICE 'running as %', current_user; RETURN NEW; END $$;
CREATE TRIGGER steal BEFORE INSERT OR UPDATE ON pg_temp.counts FOR EACH ROW EXECUTE FUNCTION pg_temp.steal();
"#,
    )
    .unwrap();
    for _ in 0..3 {
        append(&mut m, "acct-1", "Deposited", &json!({}), None).unwrap();
    }
    let shadow: i64 = m.query_one("SELECT count(*) FROM pg_temp.counts", &[]).unwrap().get(0);
    assert_eq!(shadow, 0, "the owner's handler wrote the appender's temporary table");
    assert_counts_match_log(&mut admin, "tmp_alice");
}

// ------------------------------------------------------------------------------------------------
// Locks

/// The extension's lock tags are not ones SQL's advisory lock functions make: an ordinary role
/// holding `pg_advisory_lock(<class>, 0)` (or the bigint spelling) stops no append.
#[test]
fn no_role_can_take_the_extensions_locks() {
    let db = TestDb::new("sec_locks");
    let mut admin = db.connect();
    create_counts_projection(&mut admin, "p", "rm");
    let id: i32 = admin.query_one("SELECT id FROM ep.projections WHERE name = 'p'", &[]).unwrap().get(0);
    let mallory = Role::create(&db.name, "sec_lock_mal", Grants::Writer);
    let mut m = mallory.connect();
    let class: i32 = 0x4550_0001;
    for key in [0, id] {
        m.execute("SELECT pg_advisory_lock($1, $2)", &[&class, &key]).unwrap();
        m.execute("SELECT pg_advisory_lock($1::bigint << 32 | $2)", &[&(class as i64), &(key as i64)]).unwrap();
    }
    admin.batch_execute("SET statement_timeout = '5s'").unwrap();
    let t = Instant::now();
    append(&mut admin, "s", "T", &json!({}), None)
        .unwrap_or_else(|e| panic!("an append waited on a role's advisory lock: {}", show(&e)));
    assert!(t.elapsed() < Duration::from_secs(3));
    m.batch_execute("SELECT pg_advisory_unlock_all()").unwrap();
    assert_counts_match_log(&mut admin, "rm");
}

// ------------------------------------------------------------------------------------------------
// Through the worker

/// The blue-green grant copy built SQL text from a table name and ran it as the extension owner:
/// a table named with a quote and SQL made its owner superuser. Here it is a table like any other,
/// copied with its grants, and its owner stays an ordinary role.
#[test]
fn a_blue_green_rebuild_cannot_be_made_to_run_a_name() {
    let (_served, mut admin) = Served::fresh();
    let mallory = Role::create(&served_db(), "sec_bg_mal", Grants::ProjectionOwner);
    let evil = "u'||chr(34)||' TO PUBLIC;ALTER ROLE sec_bg_mal SUPERUSER;--'||'";
    counts_model_of(&mut admin, &mallory, "w_bgmal");
    let mut m = mallory.connect();
    m.batch_execute(&format!(
        "CREATE TABLE w_bgmal.u (x int); CREATE TABLE w_bgmal.\"{q}\" (x int);
         GRANT SELECT ON w_bgmal.u, w_bgmal.\"{q}\" TO PUBLIC;",
        q = evil.replace('"', "\"\"")
    ))
    .unwrap();
    register_as(&mut m, "bgmal", "w_bgmal.count_event(ep.events)", "inline", "w_bgmal").unwrap();
    fill(&mut admin, 3, 50);
    let id: i64 = m.query_one("SELECT ep_rebuild('bgmal', 'blue_green')", &[]).unwrap().get(0);
    assert_eq!(rebuild_wait(&mut admin, id), "done", "{:?}", rebuild_status(&mut admin, id));
    assert!(!mallory.is_superuser(), "the rebuild made its projection's owner a superuser");
    // The odd table was copied, with its grant.
    let granted: bool = admin
        .query_one("SELECT has_table_privilege('public', format('w_bgmal.%I', $1::text), 'SELECT')", &[&evil])
        .unwrap()
        .get(0);
    assert!(granted, "the copy lost the table's grant");
    assert_counts_match_log(&mut admin, "w_bgmal");
}

/// Names with quotes, double quotes, dots, spaces, a keyword, non-ASCII letters and 63 bytes work
/// as read-model schemas through registration and both rebuilds; the derived names of the copies
/// fit, and never collide with an existing schema (a taken name is refused, never dropped).
#[test]
fn odd_schema_names_rebuild_and_derived_names_never_take_a_schema() {
    let (_served, mut admin) = Served::fresh();
    let long = format!("w_{}", "é".repeat(30)); // 62 bytes
    for (i, schema) in ["w_we\"ird.na'me; x", "w_select", long.as_str()].iter().enumerate() {
        let q = schema.replace('"', "\"\"");
        admin
            .batch_execute(&format!(
                "CREATE SCHEMA \"{q}\"; CREATE TABLE \"{q}\".counts (stream_id text PRIMARY KEY, n bigint NOT NULL, last_position bigint NOT NULL);
                 CREATE FUNCTION \"{q}\".h(e ep.events) RETURNS void LANGUAGE plpgsql AS $f$ BEGIN
                   INSERT INTO counts AS c VALUES (e.stream_id, 1, e.global_position)
                   ON CONFLICT (stream_id) DO UPDATE SET n = c.n + 1, last_position = excluded.last_position; END $f$;"
            ))
            .unwrap();
        let handler = format!("\"{q}\".h(ep.events)");
        let name = format!("odd{i}");
        register_as(&mut admin, &name, &handler, "inline", schema).unwrap_or_else(|e| panic!("{schema}: {}", show(&e)));
        fill(&mut admin, 2, 20);
        for strategy in ["in_place", "blue_green"] {
            let id = rebuild(&mut admin, &name, strategy);
            assert_eq!(
                rebuild_wait(&mut admin, id),
                "done",
                "{schema} {strategy}: {:?}",
                rebuild_status(&mut admin, id)
            );
        }
        let model = read_counts(&mut admin, &format!("\"{q}\""));
        let log = check_log(&mut admin);
        assert_matches_replay(schema, &model, &log, count);
    }
    // A schema that already holds the name the next copy would get: refused, and left alone.
    let next: i64 = admin.query_one("SELECT last_value + 1 FROM ep.rebuild_id_seq", &[]).unwrap().get(0);
    let victim = format!("w_select__ep_build_{next}");
    admin.batch_execute(&format!("CREATE SCHEMA {victim}; CREATE TABLE {victim}.precious (x int)")).unwrap();
    let id = rebuild(&mut admin, "odd1", "blue_green");
    assert_eq!(rebuild_wait(&mut admin, id), "failed");
    let kept: i64 =
        admin.query_one(&format!("SELECT count(*) FROM pg_tables WHERE schemaname = '{victim}'"), &[]).unwrap().get(0);
    assert_eq!(kept, 1, "a rebuild dropped a schema it did not create");
}

/// A setup function is called only if the projection's owner may EXECUTE it: `lo_import` (which
/// opens server files) is refused when the rebuild is queued.
#[test]
fn a_setup_function_needs_execute() {
    let (_served, mut admin) = Served::fresh();
    let mallory = Role::create(&served_db(), "sec_setup_mal", Grants::ProjectionOwner);
    counts_model_of(&mut admin, &mallory, "w_setup");
    let mut m = mallory.connect();
    register_as(&mut m, "setup", "w_setup.count_event(ep.events)", "inline", "w_setup").unwrap();
    let r = m.query_one("SELECT ep_rebuild('setup', 'blue_green', NULL, 'pg_catalog.lo_import(text)')", &[]);
    expect_sqlstate(r, &SqlState::INSUFFICIENT_PRIVILEGE, "lo_import as a setup function");
    // A superuser queuing it for the owner does not lend the owner its rights either.
    let r = admin.query_one("SELECT ep_rebuild('setup', 'blue_green', NULL, 'pg_catalog.lo_import(text)')", &[]);
    expect_sqlstate(r, &SqlState::INSUFFICIENT_PRIVILEGE, "lo_import queued by a superuser for an ordinary owner");
}

/// An async handler (run by the worker, a superuser process) that sets settings: the next
/// owner's handler runs with the defaults, and an operator planted through the search_path is
/// never resolved by the worker's own SQL (which would run it as the superuser).
#[test]
fn the_worker_leaves_no_setting_of_one_owner_to_the_next() {
    let (_served, mut admin) = Served::fresh();
    let mallory = Role::create(&served_db(), "sec_wrk_mal", Grants::ProjectionOwner);
    let alice = Role::create(&served_db(), "sec_wrk_alice", Grants::ProjectionOwner);
    schema_for(
        &mut admin,
        &mallory,
        "w_wmal",
        r#"
CREATE FUNCTION w_wmal.escalate() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    BEGIN EXECUTE 'ALTER ROLE sec_wrk_mal SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END;
END $$;
CREATE FUNCTION w_wmal.eq_int(a integer, b integer) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM w_wmal.escalate(); RETURN a OPERATOR(pg_catalog.=) b; END $$;
CREATE FUNCTION w_wmal.eq_big(a bigint, b bigint) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM w_wmal.escalate(); RETURN a OPERATOR(pg_catalog.=) b; END $$;
CREATE FUNCTION w_wmal.eq_text(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM w_wmal.escalate(); RETURN a OPERATOR(pg_catalog.=) b; END $$;
CREATE OPERATOR w_wmal.= (LEFTARG = integer, RIGHTARG = integer, FUNCTION = w_wmal.eq_int);
CREATE OPERATOR w_wmal.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = w_wmal.eq_big);
CREATE OPERATOR w_wmal.= (LEFTARG = text, RIGHTARG = text, FUNCTION = w_wmal.eq_text);
CREATE FUNCTION w_wmal.h(e ep.events) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('search_path', 'w_wmal, pg_catalog', false);
    PERFORM set_config('DateStyle', 'SQL, DMY', false);
    PERFORM set_config('ep_attack.flag', 'planted', false);
END $$;
"#,
    );
    schema_for(
        &mut admin,
        &alice,
        "w_walice",
        r#"
CREATE TABLE w_walice.seen (pos bigint, datestyle text, path text, flag text);
CREATE FUNCTION w_walice.h(e ep.events) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO seen VALUES (e.global_position, current_setting('DateStyle'), current_setting('search_path'),
                             coalesce(current_setting('ep_attack.flag', true), ''));
END $$;
"#,
    );
    register_as(&mut mallory.connect(), "wmal", "w_wmal.h(ep.events)", "async", "w_wmal").unwrap();
    register_as(&mut alice.connect(), "walice", "w_walice.h(ep.events)", "async", "w_walice").unwrap();
    let mut last = 0;
    for i in 0..20 {
        last = append(&mut admin, &format!("s{}", i % 3), "T", &json!({}), None).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(wait_for(&mut admin, "walice", last, "30 seconds"));
    assert!(wait_for(&mut admin, "wmal", last, "30 seconds"));
    let bad: Vec<(i64, String, String, String)> = admin
        .query("SELECT pos, datestyle, path, flag FROM w_walice.seen WHERE datestyle <> 'ISO, MDY' OR flag <> '' OR path LIKE '%w_wmal%'", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert!(bad.is_empty(), "alice's handler ran with settings mallory's left behind: {bad:?}");
    assert!(!mallory.is_superuser(), "the worker resolved an operator planted by a handler");
}

/// A handler that never returns (it catches query cancels) is stopped after
/// `event_projections.handler_timeout`: its projection shows `failed` with a clear error, and
/// another role's projection keeps being served meanwhile.
#[test]
fn a_runaway_handler_is_stopped_and_others_are_served() {
    let (_served, mut admin) = Served::fresh();
    settings(&mut admin, &["ALTER SYSTEM SET event_projections.handler_timeout = '1s'"]);
    let _reset = ResetOnDrop("ALTER SYSTEM RESET event_projections.handler_timeout");
    let mallory = Role::create(&served_db(), "sec_loop_mal", Grants::ProjectionOwner);
    let alice = Role::create(&served_db(), "sec_loop_alice", Grants::ProjectionOwner);
    schema_for(
        &mut admin,
        &mallory,
        "w_loop",
        r#"
CREATE FUNCTION w_loop.h(e ep.events) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    LOOP
        BEGIN
            PERFORM pg_sleep(0.05);
        EXCEPTION WHEN query_canceled THEN
            NULL; -- and go on
        END;
    END LOOP;
END $$;
"#,
    );
    counts_model_of(&mut admin, &alice, "w_served");
    register_as(&mut mallory.connect(), "loop", "w_loop.h(ep.events)", "async", "w_loop").unwrap();
    register_as(&mut alice.connect(), "served", "w_served.count_event(ep.events)", "async", "w_served").unwrap();
    let mut last = 0;
    let t = Instant::now();
    for i in 0..30 {
        last = append(&mut admin, &format!("s{}", i % 3), "T", &json!({}), None).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(wait_for(&mut admin, "served", last, "60 seconds"), "the other projection was not served");
    let failed = wait_until(Duration::from_secs(60), || Ok(status(&mut admin, "loop") == "failed")).unwrap();
    let error: Option<String> =
        admin.query_one("SELECT last_error FROM ep.projections WHERE name = 'loop'", &[]).unwrap().get(0);
    assert!(failed, "the runaway projection did not stop (after {:?}): {error:?}", t.elapsed());
    assert!(error.as_deref().unwrap_or_default().contains("handler_timeout"), "unclear error: {error:?}");
    assert_counts_match_log(&mut admin, "w_served");
}

/// Runs an ALTER SYSTEM statement and a reload when dropped (also when the test fails).
struct ResetOnDrop(&'static str);
impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        let mut c = reconnect();
        let _ = c.batch_execute(self.0);
        let _ = c.batch_execute("SELECT pg_reload_conf()");
    }
}

// ------------------------------------------------------------------------------------------------
// Found by the hostile review of the first version of this suite

/// User code that calls `pg_advisory_unlock_all()` inside the worker released the worker's
/// session-level ownership lock of another role's projection; a second worker then delivered the
/// same batch again. Checkpoints now move only from where their step started: of two steps from
/// the same checkpoint one commits, the other rolls back.
#[test]
fn user_code_cannot_make_a_worker_deliver_twice() {
    let (served, mut admin) = Served::fresh();
    let alice = Role::create(&served_db(), "sec_own_alice", Grants::ProjectionOwner);
    let mallory = Role::create(&served_db(), "sec_own_mal", Grants::ProjectionOwner);
    // Alice's process manager appends a follow-up (to a stream of its own per process, so that two
    // processes never wait for each other), then waits at a gate the test holds, then records.
    schema_for(
        &mut admin,
        &alice,
        "w_saga",
        r#"
CREATE TABLE w_saga.applied (global_position bigint NOT NULL);  -- no key: a second delivery shows
CREATE FUNCTION w_saga.saga(e ep.events) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ep_append('ship-' || e.stream_id || '-' || pg_backend_pid(), 'ShipmentRequested', '{}');
    WHILE NOT pg_try_advisory_xact_lock_shared(9101) LOOP PERFORM pg_sleep(0.05); END LOOP;
    INSERT INTO applied VALUES (e.global_position);
END $$;
"#,
    );
    // Mallory's inline handler of the follow-up runs inside the worker and drops its session locks.
    schema_for(
        &mut admin,
        &mallory,
        "w_unlock",
        "CREATE FUNCTION w_unlock.h(e ep.events) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_catalog.pg_advisory_unlock_all(); END $$;",
    );
    alice
        .connect()
        .execute(
            "SELECT ep_register_projection('saga', 'w_saga.saga(ep.events)', 'async', ARRAY['OrderPlaced'], 'w_saga')",
            &[],
        )
        .unwrap();
    mallory
        .connect()
        .execute(
            "SELECT ep_register_projection('unlock', 'w_unlock.h(ep.events)', 'inline', ARRAY['ShipmentRequested'], 'w_unlock')",
            &[],
        )
        .unwrap();
    let mut gate = served.closed_gate(9101);
    let last = append(&mut admin, "order-1", "OrderPlaced", &json!({}), None).unwrap();
    // The first worker is at the gate without its ownership lock; the second has time to take the
    // projection and reach the gate too (idle workers look every naptime, 1 s).
    std::thread::sleep(Duration::from_secs(3));
    gate.open();
    assert!(wait_for(&mut admin, "saga", last, "60 seconds"));
    std::thread::sleep(Duration::from_secs(2)); // a second deliverer would be done by now
    let (rows, distinct): (i64, i64) = {
        let r = admin.query_one("SELECT count(*), count(DISTINCT global_position) FROM w_saga.applied", &[]).unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((rows, distinct), (1, 1), "an async projection applied an event twice");
}

/// Skips recorded by `ep_skip_event` belonged to a projection *name*: a role that registered,
/// skipped and unregistered a name made the next owner of the name skip that event silently, even
/// through a rebuild. Skips now go with their projection and end at a rebuild.
#[test]
fn skips_do_not_outlive_their_projection() {
    let (_served, mut admin) = Served::fresh();
    let alice = Role::create(&served_db(), "sec_skip_alice", Grants::ProjectionOwner);
    let mallory = Role::create(&served_db(), "sec_skip_mal", Grants::ProjectionOwner);
    let victim = append(&mut admin, "acct-victim", "Deposited", &json!({}), None).unwrap();
    schema_for(
        &mut admin,
        &mallory,
        "w_skipmal",
        "CREATE FUNCTION w_skipmal.fail_on(e ep.events) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN IF e.stream_id = 'acct-victim' THEN RAISE EXCEPTION 'no'; END IF; END $$;",
    );
    let mut m = mallory.connect();
    register_as(&mut m, "balances", "w_skipmal.fail_on(ep.events)", "async", "w_skipmal").unwrap();
    let failing = wait_until(Duration::from_secs(30), || {
        Ok(m.query_one("SELECT failing_position FROM ep.projection_status WHERE name = 'balances'", &[])?
            .get::<_, Option<i64>>(0)
            == Some(victim))
    })
    .unwrap();
    assert!(failing, "mallory's projection never failed on the event");
    m.batch_execute(&format!(
        "SELECT ep_skip_event('balances', {victim}); SELECT ep_unregister_projection('balances')"
    ))
    .unwrap();
    counts_model_of(&mut admin, &alice, "w_skipalice");
    let mut a = alice.connect();
    register_as(&mut a, "balances", "w_skipalice.count_event(ep.events)", "async", "w_skipalice").unwrap();
    assert!(wait_for(&mut a, "balances", victim, "30 seconds"));
    assert_counts_match_log(&mut admin, "w_skipalice");
}

/// Registering another role's function (PUBLIC may execute most functions, and a `regprocedure`
/// given as an OID needs no schema USAGE) made the drop guard refuse that role's DROP FUNCTION and
/// DROP SCHEMA. A projection's code must now be its owner's.
#[test]
fn a_projection_cannot_take_another_roles_function_hostage() {
    let db = TestDb::new("sec_hostage");
    let mut admin = db.connect();
    let alice = Role::create(&db.name, "sec_host_alice", Grants::ProjectionOwner);
    let mallory = Role::create(&db.name, "sec_host_mal", Grants::ProjectionOwner);
    counts_model_of(&mut admin, &alice, "host_alice");
    counts_model_of(&mut admin, &mallory, "host_mal");
    let f: u32 = admin.query_one("SELECT 'host_alice.count_event(ep.events)'::regprocedure::oid", &[]).unwrap().get(0);
    let mut m = mallory.connect();
    let r = m.execute(
        &format!(
            "SELECT ep_register_projection('hostage', {f}::oid::regprocedure, 'inline', ARRAY['never'], 'host_mal')"
        ),
        &[],
    );
    expect_sqlstate(r, &SqlState::INSUFFICIENT_PRIVILEGE, "registering another role's function");
    register_as(&mut m, "mine", "host_mal.count_event(ep.events)", "inline", "host_mal").unwrap();
    let r = m.execute(&format!("SELECT ep_rebuild('mine', 'blue_green', NULL, {f}::oid::regprocedure)"), &[]);
    expect_sqlstate(r, &SqlState::INSUFFICIENT_PRIVILEGE, "another role's function as a setup function");
    alice.connect().batch_execute("DROP SCHEMA host_alice CASCADE").unwrap();
}

/// `ep.projection_status` filtered other roles' rows in its WHERE clause, but a cheap function of
/// the reader's in the query ran before the filter and saw every row (their errors quote events).
/// It is a security barrier view now.
#[test]
fn the_status_views_leak_no_other_roles_rows() {
    let db = TestDb::new("sec_leak");
    let mut admin = db.connect();
    let alice = Role::create(&db.name, "sec_leak_alice", Grants::ProjectionOwner);
    let mallory = Role::create(&db.name, "sec_leak_mal", Grants::ProjectionOwner);
    counts_model_of(&mut admin, &alice, "leak_alice");
    register_as(&mut alice.connect(), "secret", "leak_alice.count_event(ep.events)", "inline", "leak_alice").unwrap();
    admin.batch_execute("UPDATE ep.projections SET last_error = 'card 4111-1111' WHERE name = 'secret'").unwrap();
    admin.batch_execute("GRANT EXECUTE ON FUNCTION ep_subscribe(text, text[], int) TO sec_leak_alice").unwrap();
    alice.connect().batch_execute("SELECT ep_subscribe('alice_sub')").unwrap();
    schema_for(
        &mut admin,
        &mallory,
        "leak_mal",
        "CREATE TABLE leak_mal.loot (what text);
         CREATE FUNCTION leak_mal.leak(t text) RETURNS boolean LANGUAGE plpgsql COST 0.0000001 AS $$
         BEGIN INSERT INTO leak_mal.loot VALUES (t); RETURN true; END $$;",
    );
    let mut m = mallory.connect();
    admin.batch_execute("GRANT SELECT ON ep.subscription_status TO sec_leak_mal").unwrap();
    m.query("SELECT name FROM ep.projection_status WHERE leak_mal.leak(name || ':' || coalesce(last_error, ''))", &[])
        .unwrap();
    let _ = m.query("SELECT subscription FROM ep.subscription_status WHERE leak_mal.leak(subscription)", &[]);
    let loot: Vec<String> =
        admin.query("SELECT what FROM leak_mal.loot", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert!(loot.is_empty(), "rows of another role reached a function of the reader: {loot:?}");
}

/// A handler that takes just under the timeout per event, with a backlog, held a worker for the
/// whole batch (hours at the defaults); two of them stopped everyone's async projections. A step
/// now applies events for a bounded time and hands the worker on.
#[test]
fn slow_handlers_cannot_hold_the_workers() {
    let (_served, mut admin) = Served::fresh();
    let alice = Role::create(&served_db(), "sec_hog_alice", Grants::ProjectionOwner);
    let mallory = Role::create(&served_db(), "sec_hog_mal", Grants::ProjectionOwner);
    schema_for(
        &mut admin,
        &mallory,
        "w_hog",
        "CREATE FUNCTION w_hog.h(e ep.events) RETURNS void LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.5); END $$;",
    );
    let mut m = mallory.connect();
    for name in ["hog1", "hog2"] {
        m.execute("SELECT ep_register_projection($1, 'w_hog.h(ep.events)', 'async', ARRAY['Junk'], 'w_hog')", &[&name])
            .unwrap();
    }
    m.batch_execute("SELECT count(ep_append('junk', 'Junk', '{}')) FROM generate_series(1, 40)").unwrap();
    counts_model_of(&mut admin, &alice, "w_hogged");
    register_as(&mut alice.connect(), "hogged", "w_hogged.count_event(ep.events)", "async", "w_hogged").unwrap();
    std::thread::sleep(Duration::from_secs(1)); // the hogs have the workers
    let p = append(&mut admin, "acct", "Deposited", &json!({}), None).unwrap();
    // Before the fix this took a whole batch of the hogs: 40 events x 0.5 s per worker.
    assert!(wait_for(&mut admin, "hogged", p, "10 seconds"), "a slow projection kept the workers from another role's");
}

/// A handler stuck in a worker (it catches the cancel) holds the locks of its step; DROP EXTENSION
/// waits for them no longer than `handler_timeout` plus the second of grace.
#[test]
fn a_stuck_handler_does_not_hold_drop_extension() {
    let (_served, mut admin) = Served::fresh();
    settings(&mut admin, &["ALTER SYSTEM SET event_projections.handler_timeout = '1s'"]);
    let _reset = ResetOnDrop("ALTER SYSTEM RESET event_projections.handler_timeout");
    let mallory = Role::create(&served_db(), "sec_drop_mal", Grants::ProjectionOwner);
    schema_for(
        &mut admin,
        &mallory,
        "w_stuck2",
        "CREATE FUNCTION w_stuck2.h(e ep.events) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN LOOP BEGIN PERFORM pg_sleep(0.05); EXCEPTION WHEN query_canceled THEN NULL; END; END LOOP; END $$;",
    );
    register_as(&mut mallory.connect(), "stuck", "w_stuck2.h(ep.events)", "async", "w_stuck2").unwrap();
    append(&mut admin, "s", "T", &json!({}), None).unwrap();
    let running = wait_until(Duration::from_secs(20), || {
        Ok(admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'event_projections worker' AND query LIKE '%delivering to stuck%'",
                &[],
            )?
            .get::<_, i64>(0)
            > 0)
    })
    .unwrap();
    assert!(running, "the worker never ran the stuck handler");
    let t = Instant::now();
    admin.batch_execute("SET lock_timeout = '10s'; DROP EXTENSION event_projections CASCADE").unwrap();
    assert!(t.elapsed() < Duration::from_secs(6), "DROP EXTENSION waited {:?} for a stuck handler", t.elapsed());
    admin.batch_execute("RESET lock_timeout; CREATE EXTENSION event_projections").unwrap();
}
