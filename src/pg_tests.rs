//! The single-session tests (`cargo pgrx test`). Each runs in one transaction that is rolled
//! back, so everything about concurrency, commits, workers and crashes lives in `pgrx-tests/`
//! instead.

/// pgrx's test runner calls `tests.<name>()`: the module is schema `tests`.
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// Tests run in parallel connections; a registration waits for every transaction that appended
    /// (and two transactions that both append and then register deadlock, as documented), so the
    /// tests take turns.
    fn serial() {
        run("SELECT pg_advisory_xact_lock(4242)");
    }

    fn run(sql: &str) {
        Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn one<T: FromDatum + IntoDatum>(sql: &str) -> Option<T> {
        Spi::get_one::<T>(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The SQLSTATE `sql` fails with (None when it succeeds). The statement runs in a
    /// subtransaction (a PL/pgSQL exception block), so the test's transaction goes on either way.
    fn sqlstate_of(sql: &str) -> Option<String> {
        run("SELECT set_config('ep_test.state', '', true)");
        let quoted = sql.replace('\'', "''");
        run(&format!(
            "DO $do$ BEGIN EXECUTE '{quoted}'; \
             EXCEPTION WHEN OTHERS THEN PERFORM set_config('ep_test.state', SQLSTATE, true); END $do$"
        ));
        one::<String>("SELECT current_setting('ep_test.state')").filter(|s| !s.is_empty())
    }

    /// The grants README.md ("Security") gives a projection owner (which include a writer's).
    fn grant_projection_owner(role: &str) {
        for sql in [
            "GRANT USAGE ON SCHEMA ep TO {r}",
            "GRANT SELECT ON ep.events, ep.streams, ep.projection_status TO {r}",
            "GRANT EXECUTE ON FUNCTION ep_append(text, text, jsonb, jsonb, bigint, uuid, text), ep_append_events(text, jsonb, bigint), \
             ep_stream_version(text), ep_read_stream(text, bigint, int, text), ep_read_all(bigint, int, text), \
             ep_register_projection(text, regprocedure, text, text[], text, regprocedure), ep_unregister_projection(text), \
             ep_rebuild(text, text, regprocedure, regprocedure), ep_rebuild_wait(bigint, interval), ep_rebuild_status(bigint), \
             ep_cancel_rebuild(text), ep_retry_projection(text), ep_skip_event(text, bigint), \
             ep_wait_for(text, bigint, interval), ep_require_ready(text), ep_projection_ready(text) TO {r}",
        ] {
            run(&sql.replace("{r}", role));
        }
    }

    fn assert_fails(sql: &str, state: &str) {
        assert_eq!(sqlstate_of(sql).as_deref(), Some(state), "{sql}");
    }

    /// A read model counting events per stream and checking stream order, as a plpgsql handler.
    fn create_counter(schema: &str) {
        run(&format!(
            "CREATE SCHEMA {schema};
             CREATE TABLE {schema}.counts (stream_id text PRIMARY KEY, n bigint NOT NULL, last_position bigint NOT NULL);
             CREATE FUNCTION {schema}.count(e ep.events) RETURNS void LANGUAGE plpgsql AS $$
             DECLARE seen bigint;
             BEGIN
               SELECT n INTO seen FROM counts WHERE stream_id = e.stream_id;
               IF coalesce(seen, 0) + 1 <> e.stream_position THEN
                 RAISE EXCEPTION 'out of order: % after %', e.stream_position, seen;
               END IF;
               INSERT INTO counts VALUES (e.stream_id, 1, e.global_position)
                 ON CONFLICT (stream_id) DO UPDATE SET n = counts.n + 1, last_position = excluded.last_position;
             END $$;"
        ));
    }

    #[pg_test]
    fn append_assigns_global_and_stream_positions() {
        serial();
        let p1 = one::<i64>("SELECT ep_append('s1', 'Created', '{\"a\":1}')").unwrap();
        let p2 = one::<i64>("SELECT ep_append('s2', 'Created', '{}')").unwrap();
        let p3 = one::<i64>("SELECT ep_append('s1', 'Renamed', '{}', '{\"by\":\"me\"}')").unwrap();
        assert!(p1 < p2 && p2 < p3);
        assert_eq!(one::<i64>("SELECT ep_stream_version('s1')"), Some(2));
        assert_eq!(one::<i64>("SELECT ep_stream_version('nope')"), Some(0));
        assert_eq!(
            one::<String>("SELECT string_agg(stream_position::text || event_type, ',' ORDER BY stream_position) FROM ep_read_stream('s1')"),
            Some("1Created,2Renamed".into())
        );
        assert_eq!(
            one::<String>(&format!("SELECT metadata->>'by' FROM ep.events WHERE global_position = {p3}")),
            Some("me".into())
        );
        assert_eq!(one::<i64>(&format!("SELECT count(*) FROM ep_read_all({p1})")), Some(2));
        assert_eq!(one::<i64>("SELECT count(*) FROM ep_read_stream('s1', 2)"), Some(1));
    }

    #[pg_test]
    fn expected_version_is_checked_before_anything_is_written() {
        serial();
        run("SELECT ep_append('acct', 'Opened', '{}', NULL, 0)");
        run("SELECT ep_append('acct', 'Deposited', '{}', NULL, 1)");
        let before = one::<i64>("SELECT last_value FROM ep.global_position_seq");
        // Wrong version: 40001, nothing written, no position burned.
        assert_fails("SELECT ep_append('acct', 'Deposited', '{}', NULL, 1)", "40001");
        assert_fails("SELECT ep_append('acct', 'Opened', '{}', NULL, 0)", "40001");
        assert_fails("SELECT ep_append_events('acct', '[{\"type\":\"X\",\"data\":{}}]', 5)", "40001");
        assert_eq!(one::<i64>("SELECT last_value FROM ep.global_position_seq"), before);
        assert_eq!(one::<i64>("SELECT ep_stream_version('acct')"), Some(2));
        run("SELECT ep_append_events('acct', '[{\"type\":\"A\",\"data\":{}},{\"type\":\"B\",\"data\":{}}]', 2)");
        assert_eq!(one::<i64>("SELECT ep_stream_version('acct')"), Some(4));
    }

    #[pg_test]
    fn a_retried_append_returns_the_first_position_and_writes_nothing() {
        serial();
        create_counter("m");
        run("SELECT ep_register_projection('m', 'm.count(ep.events)', 'inline', NULL, 'm')");
        let id = "'0190f5a4-1111-7000-8000-000000000001'";
        let p = one::<i64>(&format!("SELECT ep_append('acct', 'Opened', '{{\"a\":1}}', NULL, NULL, {id})")).unwrap();
        let seq = one::<i64>("SELECT last_value FROM ep.global_position_seq");
        // The same id, stream, type and data (metadata may differ): the first position, nothing
        // written, no position taken, no handler run; the expected version is not checked again.
        for retry in [
            format!("SELECT ep_append('acct', 'Opened', '{{\"a\":1}}', NULL, NULL, {id})"),
            format!("SELECT ep_append('acct', 'Opened', '{{\"a\": 1}}', '{{\"retry\":true}}', 0, {id})"),
            "SELECT ep_append_events('acct', '[{\"type\":\"Opened\",\"data\":{\"a\":1},\"id\":\"{0190F5A4-1111-7000-8000-000000000001}\"}]')".to_string(),
        ] {
            assert_eq!(one::<i64>(&retry), Some(p), "{retry}");
        }
        assert_eq!(one::<i64>("SELECT last_value FROM ep.global_position_seq"), seq);
        assert_eq!(one::<i64>("SELECT ep_stream_version('acct')"), Some(1));
        assert_eq!(one::<i64>("SELECT n FROM m.counts WHERE stream_id = 'acct'"), Some(1));
        assert_eq!(
            one::<String>(&format!("SELECT event_id::text FROM ep.events WHERE global_position = {p}")),
            Some("0190f5a4-1111-7000-8000-000000000001".into())
        );
        // The same id with another stream, type or data: 23505, nothing written.
        for other in [
            format!("SELECT ep_append('acct2', 'Opened', '{{\"a\":1}}', NULL, NULL, {id})"),
            format!("SELECT ep_append('acct', 'Closed', '{{\"a\":1}}', NULL, NULL, {id})"),
            format!("SELECT ep_append('acct', 'Opened', '{{\"a\":2}}', NULL, NULL, {id})"),
        ] {
            assert_fails(&other, "23505");
        }
        assert_eq!(one::<i64>("SELECT count(*) FROM ep.events"), Some(1));
        assert_eq!(one::<i64>("SELECT ep_stream_version('acct')"), Some(1));
        assert_eq!(one::<i64>("SELECT ep_stream_version('acct2')"), Some(0));
        // A batch: retried whole, it returns its last position; partly in the log, it is refused.
        let batch = "'[{\"type\":\"A\",\"data\":{},\"id\":\"0190f5a4-2222-7000-8000-000000000001\"},\
                      {\"type\":\"B\",\"data\":{},\"id\":\"0190f5a4-2222-7000-8000-000000000002\"}]'";
        let last = one::<i64>(&format!("SELECT ep_append_events('b', {batch})")).unwrap();
        assert_eq!(one::<i64>(&format!("SELECT ep_append_events('b', {batch})")), Some(last));
        assert_eq!(one::<i64>("SELECT ep_stream_version('b')"), Some(2));
        assert_fails(
            "SELECT ep_append_events('b', '[{\"type\":\"A\",\"data\":{},\"id\":\"0190f5a4-2222-7000-8000-000000000001\"},\
                                          {\"type\":\"C\",\"data\":{},\"id\":\"0190f5a4-2222-7000-8000-000000000003\"}]')",
            "23505",
        );
        assert_eq!(one::<i64>("SELECT ep_stream_version('b')"), Some(2));
        assert_eq!(one::<i64>("SELECT n FROM m.counts WHERE stream_id = 'b'"), Some(2));
    }

    #[pg_test]
    fn generated_event_ids_are_unique_version_7_uuids() {
        serial();
        run("SELECT ep_append_events('g', (SELECT jsonb_agg(jsonb_build_object('type', 'T', 'data', '{}'::jsonb)) FROM generate_series(1, 500)))");
        for i in 0..100 {
            run(&format!("SELECT ep_append('g', 'T', '{{\"i\":{i}}}')"));
        }
        assert_eq!(one::<i64>("SELECT count(DISTINCT event_id) FROM ep.events"), Some(600));
        // Version 7 and the RFC 4122 variant; the timestamp is now (within a minute).
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM ep.events WHERE substr(event_id::text, 15, 1) = '7' \
                 AND substr(event_id::text, 20, 1) IN ('8', '9', 'a', 'b') \
                 AND abs(('x' || substr(replace(event_id::text, '-', ''), 1, 12))::bit(48)::bigint \
                         - (extract(epoch FROM clock_timestamp()) * 1000)::bigint) < 60000"
            ),
            Some(600)
        );
    }

    #[pg_test]
    fn reads_filter_by_correlation_id() {
        serial();
        for (stream, corr) in [("a", Some("c1")), ("a", Some("c2")), ("b", Some("c1")), ("a", None), ("b", Some("c1"))]
        {
            let meta = corr
                .map(|c| format!("'{{\"correlation_id\":\"{c}\",\"causation_id\":\"x\"}}'"))
                .unwrap_or("NULL".into());
            run(&format!("SELECT ep_append('{stream}', 'T', '{{}}', {meta})"));
        }
        assert_eq!(one::<i64>("SELECT count(*) FROM ep_read_all(0, 1000, 'c1')"), Some(3));
        assert_eq!(one::<i64>("SELECT count(*) FROM ep_read_all(0, 2, 'c1')"), Some(2));
        assert_eq!(one::<i64>("SELECT count(*) FROM ep_read_all(0, 1000, 'nope')"), Some(0));
        assert_eq!(one::<i64>("SELECT count(*) FROM ep_read_all(0)"), Some(5));
        assert_eq!(
            one::<String>("SELECT string_agg(stream_position::text, ',') FROM ep_read_stream('a', 1, 1000, 'c2')"),
            Some("2".into())
        );
        assert_eq!(
            one::<String>("SELECT string_agg(stream_position::text, ',') FROM ep_read_stream('b', 1, 1000, 'c1')"),
            Some("1,2".into())
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM ep_read_stream('a', 1, 1000, NULL)"), Some(3));
    }

    #[pg_test]
    fn deleting_streams_soft_and_hard() {
        serial();
        for i in 0..3 {
            run(&format!("SELECT ep_append('a', 'T', '{{\"i\":{i}}}')"));
            run(&format!("SELECT ep_append('b', 'T', '{{\"i\":{i}}}')"));
        }
        // Soft: hidden from ep_read_stream, appends refused, the marker in the log; undelete.
        let m = one::<i64>("SELECT ep_delete_stream('a')").unwrap();
        assert_eq!(one::<String>(&format!("SELECT event_type || ' ' || stream_position || ' ' || data::text FROM ep.events WHERE global_position = {m}")),
            Some("$stream_deleted 4 {\"hard\": false}".into()));
        assert_eq!(one::<i64>("SELECT count(*) FROM ep_read_stream('a')"), Some(0));
        assert_eq!(one::<i64>("SELECT count(*) FROM ep.events WHERE stream_id = 'a'"), Some(4));
        assert_fails("SELECT ep_append('a', 'T', '{}')", "55000");
        assert_fails("SELECT ep_append_events('a', '[{\"type\":\"T\",\"data\":{}}]')", "55000");
        assert_fails("SELECT ep_delete_stream('a')", "55000");
        run("SELECT ep_undelete_stream('a')");
        assert_fails("SELECT ep_undelete_stream('a')", "55000");
        assert_eq!(one::<i64>("SELECT count(*) FROM ep_read_stream('a')"), Some(5));
        run("SELECT ep_append('a', 'T', '{}')");
        assert_eq!(one::<i64>("SELECT ep_stream_version('a')"), Some(6));
        // Hard: the events before the marker leave the log, for good; recorded.
        let h = one::<i64>("SELECT ep_delete_stream('b', true)").unwrap();
        assert_eq!(one::<i64>("SELECT count(*) FROM ep.events WHERE stream_id = 'b'"), Some(1));
        assert_eq!(one::<i64>("SELECT count(*) FROM ep.events WHERE stream_id = 'a'"), Some(6));
        assert_fails("SELECT ep_append('b', 'T', '{}')", "55000");
        assert_fails("SELECT ep_undelete_stream('b')", "55000");
        assert_fails("SELECT ep_delete_stream('b', true)", "55000");
        assert_eq!(
            one::<String>(
                "SELECT string_agg(action || ':' || events_removed, ',' ORDER BY id) FROM ep.stream_deletions"
            ),
            Some("soft:0,undelete:0,hard:3".into())
        );
        assert_eq!(one::<i64>("SELECT marker_position FROM ep.stream_deletions WHERE action = 'hard'"), Some(h));
        // A soft-deleted stream can be hard-deleted.
        run("SELECT ep_delete_stream('a')");
        run("SELECT ep_delete_stream('a', true)");
        assert_eq!(one::<i64>("SELECT count(*) FROM ep.events WHERE stream_id = 'a'"), Some(1));
        // Unknown streams, NULLs, and the markers' types are not for clients.
        for (sql, state) in [
            ("SELECT ep_delete_stream('nope')", "42704"),
            ("SELECT ep_delete_stream('nope', true)", "42704"),
            ("SELECT ep_undelete_stream('nope')", "42704"),
            ("SELECT ep_delete_stream(NULL)", "22004"),
            ("SELECT ep_delete_stream('x', NULL)", "22004"),
            ("SELECT ep_undelete_stream(NULL)", "22004"),
            ("SELECT ep_append('c', '$stream_deleted', '{\"hard\":true}')", "22023"),
            ("SELECT ep_append_events('c', '[{\"type\":\"$stream_undeleted\",\"data\":{}}]')", "22023"),
        ] {
            assert_fails(sql, state);
        }
        assert_eq!(one::<i64>("SELECT ep_stream_version('nope')"), Some(0));
        // The log stays append-only for anyone else.
        assert_fails("DELETE FROM ep.events WHERE stream_id = 'c'", "0A000");
    }

    #[pg_test]
    fn handlers_cannot_append_to_or_delete_the_stream_being_deleted() {
        serial();
        run("CREATE SCHEMA z;
             CREATE FUNCTION z.zombie(e ep.events) RETURNS void LANGUAGE plpgsql AS $$
             BEGIN PERFORM ep_append(e.stream_id, 'Zombie', '{}'); END $$;
             CREATE FUNCTION z.deleter(e ep.events) RETURNS void LANGUAGE plpgsql AS $$
             BEGIN PERFORM ep_delete_stream(e.stream_id, true); END $$;");
        run("SELECT ep_append('a', 'T', '{}')");
        run("SELECT ep_register_projection('zombie', 'z.zombie(ep.events)', 'inline', ARRAY['$stream_deleted'], 'z')");
        // The marker's handler appends to the stream: the stream is already marked (55000), and
        // the whole delete is rolled back.
        assert_fails("SELECT ep_delete_stream('a', true)", "55000");
        assert_eq!(one::<i64>("SELECT count(*) FROM ep.events WHERE stream_id = 'a'"), Some(1));
        assert_eq!(one::<i64>("SELECT count(*) FROM ep.stream_deletions"), Some(0));
        run("SELECT ep_unregister_projection('zombie')");
        // A handler may not delete streams at all.
        run("SELECT ep_register_projection('deleter', 'z.deleter(ep.events)', 'inline', ARRAY['U'], 'z')");
        assert_fails("SELECT ep_append('a', 'U', '{}')", "55000");
        assert_fails("SELECT ep_append('b', 'U', '{}')", "55000");
        run("SELECT ep_unregister_projection('deleter')");
        run("SELECT ep_delete_stream('a', true)");
        assert_eq!(one::<i64>("SELECT count(*) FROM ep.events WHERE stream_id = 'a'"), Some(1));
    }

    #[pg_test]
    fn append_events_is_all_or_nothing() {
        serial();
        create_counter("m");
        run("SELECT ep_register_projection('m', 'm.count(ep.events)', 'inline', NULL, 'm')");
        run("CREATE FUNCTION m.refuse(e ep.events) RETURNS void LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'no'; END $$");
        run("SELECT ep_register_projection('refuse', 'm.refuse(ep.events)', 'inline', ARRAY['Bad'], 'm')");
        assert_fails(
            "SELECT ep_append_events('s', '[{\"type\":\"Good\",\"data\":{}},{\"type\":\"Bad\",\"data\":{}}]')",
            "P0001",
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM ep.events"), Some(0));
        assert_eq!(one::<i64>("SELECT count(*) FROM m.counts"), Some(0));
        assert_eq!(one::<i64>("SELECT ep_stream_version('s')"), Some(0));
        let last = one::<i64>(
            "SELECT ep_append_events('s', '[{\"type\":\"Good\",\"data\":{}},{\"type\":\"Good\",\"data\":{\"x\":1}}]')",
        );
        assert_eq!(last, one::<i64>("SELECT max(global_position) FROM ep.events"));
        assert_eq!(one::<i64>("SELECT n FROM m.counts WHERE stream_id = 's'"), Some(2));
    }

    #[pg_test]
    fn bad_input_is_refused_with_documented_sqlstates() {
        serial();
        let cases: &[(&str, &str)] = &[
            ("SELECT ep_append(NULL, 'T', '{}')", "22004"),
            ("SELECT ep_append('', 'T', '{}')", "22023"),
            ("SELECT ep_append('s', NULL, '{}')", "22004"),
            ("SELECT ep_append('s', '', '{}')", "22023"),
            ("SELECT ep_append('s', 'T', NULL)", "22004"),
            ("SELECT ep_append('s', 'T', '{}', NULL, -1)", "22023"),
            ("SELECT ep_append_events(NULL, '[]')", "22004"),
            ("SELECT ep_append_events('s', NULL)", "22004"),
            ("SELECT ep_append_events('s', '{}')", "22023"),
            ("SELECT ep_append_events('s', '[]')", "22023"),
            ("SELECT ep_append_events('s', '[1]')", "22023"),
            ("SELECT ep_append_events('s', '[{\"data\":{}}]')", "22023"),
            ("SELECT ep_append_events('s', '[{\"type\":7,\"data\":{}}]')", "22023"),
            ("SELECT ep_append_events('s', '[{\"type\":\"\",\"data\":{}}]')", "22023"),
            ("SELECT ep_append_events('s', '[{\"type\":\"T\"}]')", "22023"),
            ("SELECT ep_append_events('s', '[{\"type\":\"T\",\"data\":{},\"id\":7}]')", "22023"),
            ("SELECT ep_append_events('s', '[{\"type\":\"T\",\"data\":{},\"id\":\"not-a-uuid\"}]')", "22023"),
            ("SELECT ep_append_events('s', '[{\"type\":\"T\",\"data\":{},\"id\":\"0190f5a4-1111-7000-8000-0000000000011\"}]')", "22023"),
            ("SELECT ep_append_events('s', '[{\"type\":\"T\",\"data\":{},\"id\":\"-0190f5a4-1111-7000-8000-00000000001\"}]')", "22023"),
            (
                "SELECT ep_append_events('s', '[{\"type\":\"T\",\"data\":{},\"id\":\"0190f5a4-1111-7000-8000-000000000001\"},\
                                             {\"type\":\"U\",\"data\":{},\"id\":\"0190f5a41111-7000-8000-000000000001\"}]')",
                "22023",
            ),
            ("SELECT ep_append('s', 'T', '{}', NULL, NULL, 'zz')", "22P02"),
            (
                "SELECT ep_append_events('s', '[{\"type\":\"T\",\"data\":{},\"id\":\"0190f5a4-1111-7000-8000-000000000009\"},\
                                             {\"type\":\"U\",\"data\":{}}]')",
                "22023",
            ),
            ("SELECT * FROM ep_read_stream(NULL)", "22004"),
            ("SELECT * FROM ep_read_stream('s', 0)", "22023"),
            ("SELECT * FROM ep_read_stream('s', 1, 0)", "22023"),
            ("SELECT * FROM ep_read_all(-1)", "22023"),
            ("SELECT * FROM ep_read_all(0, 0)", "22023"),
            ("SELECT ep_register_projection(NULL, 'm.count(ep.events)')", "22004"),
            ("SELECT ep_register_projection('', 'm.count(ep.events)')", "22023"),
            ("SELECT ep_register_projection('p', NULL)", "22004"),
            ("SELECT ep_register_projection('p', 'm.count(ep.events)', 'sometimes')", "22023"),
            ("SELECT ep_register_projection('p', 'm.count(ep.events)', 'inline', ARRAY[]::text[])", "22023"),
            ("SELECT ep_register_projection('p', 'm.count(ep.events)', 'inline', ARRAY[NULL]::text[])", "22023"),
            ("SELECT ep_register_projection('p', 'm.count(ep.events)', 'inline', NULL, 'no_such_schema')", "3F000"),
            ("SELECT ep_register_projection('p', 'm.count(ep.events)', 'inline', NULL, '')", "22023"),
            ("SELECT ep_register_projection('p', 'pg_catalog.now()')", "42P13"),
            ("SELECT ep_register_projection('p', 'm.returns_int(ep.events)')", "42P13"),
            ("SELECT ep_register_projection('p', 'm.stable(ep.events)')", "42P13"),
            ("SELECT ep_register_projection('p', 'm.two(ep.events,integer)')", "42P13"),
            ("SELECT ep_register_projection('p', 'm.no_such(ep.events)')", "42883"),
            ("SELECT ep_register_projection('m', 'm.count(ep.events)')", "42710"),
            ("SELECT ep_unregister_projection('nope')", "42704"),
            ("SELECT ep_unregister_projection(NULL)", "22004"),
            ("SELECT ep_rebuild('nope')", "42704"),
            ("SELECT ep_rebuild('m', 'sideways')", "22023"),
            ("SELECT ep_rebuild('unscoped')", "55000"),
            ("SELECT ep_rebuild('m', 'in_place', 'm.count(ep.events)')", "22023"),
            ("SELECT ep_rebuild_wait(NULL)", "22004"),
            ("SELECT ep_rebuild_wait(-5)", "42704"),
            ("SELECT ep_rebuild_wait(1, '-1 second')", "22023"),
            ("SELECT ep_cancel_rebuild('nope')", "42704"),
            ("SELECT ep_wait_for('nope', 1)", "42704"),
            ("SELECT ep_wait_for('m', NULL)", "22004"),
            ("SELECT ep_require_ready('nope')", "42704"),
            ("SELECT ep_retry_projection('m')", "55000"),
            ("SELECT ep_skip_event('m', 1)", "55000"),
            ("SELECT ep_set_stream_policy(NULL, max_count => 1)", "22004"),
            ("SELECT ep_set_stream_policy('', max_count => 1)", "22023"),
            ("SELECT ep_set_stream_policy('s%')", "22023"),
            ("SELECT ep_set_stream_policy('s%', max_count => 0)", "22023"),
            ("SELECT ep_set_stream_policy('s%', truncate_before => -3)", "22023"),
            ("SELECT ep_set_stream_policy('s%', max_age => '0 seconds')", "22023"),
            ("SELECT ep_set_stream_policy('s%', max_age => '-1 day')", "22023"),
            ("SELECT ep_drop_stream_policy(NULL)", "22004"),
            ("SELECT ep_append('s', '$stream_truncated', '{\"truncate_before\": 5}')", "22023"),
        ];
        create_counter("m");
        run("CREATE FUNCTION m.returns_int(e ep.events) RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 1'");
        run("CREATE FUNCTION m.stable(e ep.events) RETURNS void LANGUAGE sql STABLE AS ''");
        run("CREATE FUNCTION m.two(e ep.events, i int) RETURNS void LANGUAGE sql AS ''");
        run("SELECT ep_register_projection('m', 'm.count(ep.events)', 'inline', NULL, 'm')");
        run("SELECT ep_register_projection('unscoped', 'm.count(ep.events)')");
        let before = one::<i64>("SELECT count(*) FROM ep.events");
        for (sql, state) in cases {
            assert_fails(sql, state);
        }
        assert_eq!(one::<i64>("SELECT count(*) FROM ep.events"), before, "a refused call wrote an event");
        assert_eq!(one::<i64>("SELECT count(*) FROM ep.projections"), Some(2), "a refused call registered something");
    }

    #[pg_test]
    fn the_log_is_append_only() {
        serial();
        run("SELECT ep_append('s', 'T', '{}')");
        for sql in [
            "UPDATE ep.events SET data = '{}'",
            "DELETE FROM ep.events",
            "TRUNCATE ep.events",
            "INSERT INTO ep.events VALUES (1000, 'x', 1, 'T', '{}')",
        ] {
            assert_fails(sql, "0A000");
        }
        assert_eq!(one::<i64>("SELECT count(*) FROM ep.events"), Some(1));
    }

    #[pg_test]
    fn inline_projection_runs_in_the_append_and_filters_types() {
        serial();
        create_counter("m");
        run("SELECT ep_register_projection('m', 'm.count(ep.events)', 'inline', ARRAY['A', 'B'], 'm')");
        run("SELECT ep_append('s', 'A', '{}')");
        run("SELECT ep_append('s', 'C', '{}')"); // not subscribed
        run("SELECT ep_append('t', 'B', '{}')");
        assert_eq!(one::<i64>("SELECT count(*) FROM m.counts"), Some(2));
        // The handler saw the event value itself: last_position is the event's global position.
        assert_eq!(
            one::<i64>("SELECT last_position FROM m.counts WHERE stream_id = 't'"),
            one::<i64>("SELECT max(global_position) FROM ep.events")
        );
    }

    #[pg_test]
    fn a_failing_handler_aborts_the_append_and_names_the_projection() {
        serial();
        run("CREATE SCHEMA f");
        run("CREATE FUNCTION f.h(e ep.events) RETURNS void LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'handler says no' USING ERRCODE = '23514'; END $$");
        run("SELECT ep_register_projection('strict_one', 'f.h(ep.events)')");
        assert_fails("SELECT ep_append('s', 'T', '{}')", "23514");
        run("SELECT set_config('ep_test.msg', '', true)");
        run("DO $$ BEGIN PERFORM ep_append('s', 'T', '{}'); EXCEPTION WHEN OTHERS THEN PERFORM set_config('ep_test.msg', SQLERRM, true); END $$");
        let msg = one::<String>("SELECT current_setting('ep_test.msg')").unwrap_or_default();
        assert!(msg.contains("projection \"strict_one\"") && msg.contains("handler says no"), "{msg}");
        assert_eq!(one::<i64>("SELECT count(*) FROM ep.events"), Some(0));
        assert_eq!(one::<i64>("SELECT ep_stream_version('s')"), Some(0));
    }

    #[pg_test]
    fn registration_builds_the_model_from_the_whole_log() {
        serial();
        for i in 0..50 {
            run(&format!("SELECT ep_append('s{}', 'T', '{{}}')", i % 7));
        }
        create_counter("m");
        run("SELECT ep_register_projection('m', 'm.count(ep.events)', 'inline', NULL, 'm')");
        assert_eq!(one::<i64>("SELECT sum(n)::bigint FROM m.counts"), Some(50));
        assert_eq!(one::<i64>("SELECT count(*) FROM m.counts"), Some(7));
        run("SELECT ep_append('s0', 'T', '{}')");
        assert_eq!(one::<i64>("SELECT sum(n)::bigint FROM m.counts"), Some(51));
        // Unregistered: the handler no longer runs.
        run("SELECT ep_unregister_projection('m')");
        run("SELECT ep_append('s0', 'T', '{}')");
        assert_eq!(one::<i64>("SELECT sum(n)::bigint FROM m.counts"), Some(51));
    }

    #[pg_test]
    fn batch_handlers_receive_one_array_per_append() {
        serial();
        run("CREATE SCHEMA b");
        run("CREATE TABLE b.calls (n int, first bigint, last bigint)");
        run("CREATE FUNCTION b.h(es ep.events[]) RETURNS void LANGUAGE sql AS
             'INSERT INTO b.calls SELECT cardinality(es), es[1].global_position, es[cardinality(es)].global_position'");
        run("SELECT ep_append('s', 'T', '{}')");
        run("SELECT ep_register_projection('b', 'b.h(ep.events[])', 'inline', NULL, 'b')");
        run("SELECT ep_append_events('s', '[{\"type\":\"T\",\"data\":{}},{\"type\":\"T\",\"data\":{}},{\"type\":\"T\",\"data\":{}}]')");
        // One call for the registration build (1 event), one for the 3-event append, in order.
        assert_eq!(one::<String>("SELECT string_agg(n::text, ',' ORDER BY first) FROM b.calls"), Some("1,3".into()));
        assert_eq!(one::<bool>("SELECT bool_and(first <= last) FROM b.calls"), Some(true));
    }

    #[pg_test]
    fn handlers_run_as_the_projection_owner_with_its_schema_first() {
        serial();
        run("CREATE ROLE ep_owner_t");
        run("CREATE ROLE ep_writer_t");
        grant_projection_owner("ep_owner_t");
        grant_projection_owner("ep_writer_t");
        run("GRANT CREATE ON DATABASE pgrx_tests TO ep_owner_t");
        run("CREATE SCHEMA o AUTHORIZATION ep_owner_t");
        run("SET ROLE ep_owner_t");
        run("CREATE TABLE o.seen (who name, path text)");
        // PL/pgSQL resolves `seen` when it runs, through the search_path the handler runs with.
        run("CREATE FUNCTION o.h(e ep.events) RETURNS void LANGUAGE plpgsql AS
             'BEGIN INSERT INTO seen VALUES (current_user, current_setting(''search_path'')); END'");
        run("SELECT ep_register_projection('o', 'o.h(ep.events)', 'inline', NULL, 'o')");
        run("RESET ROLE");
        run("SET ROLE ep_writer_t");
        run("SELECT ep_append('s', 'T', '{}')");
        run("RESET ROLE");
        assert_eq!(one::<String>("SELECT who::text FROM o.seen"), Some("ep_owner_t".into()));
        let path = one::<String>("SELECT path FROM o.seen").unwrap_or_default();
        assert!(path.starts_with("\"o\",") && path.ends_with(", \"pg_temp\""), "{path}");
        // The writer's own role and search_path are back after the call.
        assert_eq!(one::<String>("SELECT current_user::text"), Some("postgres".into()));
    }

    #[pg_test]
    fn an_ordinary_role_cannot_gain_privileges_through_a_handler() {
        serial();
        run("CREATE ROLE ep_mallory_t");
        grant_projection_owner("ep_mallory_t");
        run("CREATE SCHEMA x AUTHORIZATION ep_mallory_t");
        run("SET ROLE ep_mallory_t");
        // The handler tries something only a superuser may do.
        run("CREATE FUNCTION x.h(e ep.events) RETURNS void LANGUAGE plpgsql AS $$ BEGIN ALTER ROLE ep_mallory_t SUPERUSER; END $$");
        run("SELECT ep_register_projection('x', 'x.h(ep.events)', 'inline', NULL, 'x')");
        run("RESET ROLE");
        // A superuser's append runs the handler as its owner: refused.
        assert_fails("SELECT ep_append('s', 'T', '{}')", "42501");
        assert_eq!(one::<bool>("SELECT rolsuper FROM pg_roles WHERE rolname = 'ep_mallory_t'"), Some(false));
        // The catalog is not writable by the role either.
        run("SET ROLE ep_mallory_t");
        assert_fails("UPDATE ep.projections SET owner = 'postgres'", "42501");
        assert_fails("SELECT ep_rebuild('m')", "42704");
        run("RESET ROLE");
    }

    #[pg_test]
    fn only_the_owner_may_drop_or_rebuild_a_projection() {
        serial();
        create_counter("m");
        run("SELECT ep_register_projection('m', 'm.count(ep.events)', 'inline', NULL, 'm')");
        run("CREATE ROLE ep_other_t");
        grant_projection_owner("ep_other_t");
        run("SET ROLE ep_other_t");
        assert_fails("SELECT ep_unregister_projection('m')", "42501");
        assert_fails("SELECT ep_rebuild('m')", "42501");
        assert_fails("SELECT ep_cancel_rebuild('m')", "42501");
        run("RESET ROLE");
    }

    #[pg_test]
    fn a_queued_rebuild_is_returned_again_and_can_be_cancelled() {
        serial();
        create_counter("m");
        run("SELECT ep_register_projection('m', 'm.count(ep.events)', 'inline', NULL, 'm')");
        let a = one::<i64>("SELECT ep_rebuild('m')").unwrap();
        let b = one::<i64>("SELECT ep_rebuild('m', 'blue_green')").unwrap();
        assert_eq!(a, b, "a second ep_rebuild must return the open one");
        // Waiting in the transaction that queued it could only time out: refused at once.
        assert_fails(&format!("SELECT ep_rebuild_wait({a})"), "55000");
        assert_fails("SELECT ep_rebuild_wait(ep_rebuild('m'))", "55000");
        assert_eq!(one::<i64>("SELECT ep_cancel_rebuild('m')"), Some(a));
        assert_eq!(one::<String>(&format!("SELECT ep_rebuild_wait({a}, '1 second')")), Some("cancelled".into()));
        assert_eq!(one::<i64>("SELECT ep_cancel_rebuild('m')"), None);
        assert_eq!(one::<String>("SELECT status FROM ep.projection_status WHERE name = 'm'"), Some("active".into()));
    }

    #[pg_test]
    fn readiness_is_visible_and_checkable() {
        serial();
        create_counter("m");
        run("SELECT ep_register_projection('m', 'm.count(ep.events)', 'inline', NULL, 'm')");
        assert_eq!(one::<bool>("SELECT ep_require_ready('m')"), Some(true));
        assert_eq!(one::<bool>("SELECT ep_projection_ready('m')"), Some(true));
        // As an in-place rebuild leaves it between R0 and Rf:
        run("UPDATE ep.projections SET status = 'rebuilding' WHERE name = 'm'");
        assert_fails("SELECT count(*) FROM m.counts WHERE ep_require_ready('m')", "55000");
        assert_eq!(one::<bool>("SELECT ep_projection_ready('m')"), Some(false));
        // ... and appends skip it meanwhile (the rebuild reads the event from the log).
        run("SELECT ep_append('s', 'T', '{}')");
        assert_eq!(one::<i64>("SELECT count(*) FROM m.counts"), Some(0));
    }

    #[pg_test]
    fn prepare_transaction_is_refused_after_an_append() {
        serial();
        // A pg_test runs inside a transaction, so PREPARE itself cannot be issued here; the
        // connection suite prepares a real one. This checks the append leaves the marker PREPARE
        // looks at.
        run("SELECT ep_append('s', 'T', '{}')");
        assert!(crate::handoff::inflight::holding());
    }

    #[pg_test]
    fn no_rust_backtrace_reaches_a_client() {
        // The server may have been started with RUST_BACKTRACE set; _PG_init pins the library's
        // switch off, which the standard library reads before RUST_BACKTRACE.
        // SAFETY: the backend is single-threaded.
        unsafe { std::env::set_var("RUST_BACKTRACE", "1") };
        let caught = PgTryBuilder::new(|| -> Option<String> { panic!("a panic inside the extension") })
            .catch_others(|e| match e {
                pgrx::pg_sys::panic::CaughtError::RustPanic { ereport, .. }
                | pgrx::pg_sys::panic::CaughtError::PostgresError(ereport)
                | pgrx::pg_sys::panic::CaughtError::ErrorReport(ereport) => ereport.detail_with_backtrace(),
            })
            .execute();
        let detail = caught.unwrap_or_default();
        assert!(!detail.contains("stack backtrace") && !detail.contains("rust_begin_unwind"), "{detail}");
    }

    #[pg_test]
    fn handler_search_paths_end_with_pg_temp() {
        serial();
        create_counter("m");
        run("SET search_path = pg_temp, public, \"$user\"");
        run("SELECT ep_register_projection('m', 'm.count(ep.events)', 'inline', NULL, 'm')");
        run("RESET search_path");
        let p = crate::registry::by_name("m").expect("registered");
        assert_eq!(p.live_handler().search_path, "\"m\", \"public\", \"$user\", \"pg_temp\"");
    }
}
