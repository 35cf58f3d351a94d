//! Read models for the retention tests (retention.rs, crash.rs).

use crate::*;
use postgres::Client;
use std::collections::BTreeSet;

/// A read model holding one row per event of the log, which acts on the marker as README's
/// example: a cut stream forgets what is below the cut.
pub fn create_copy_model(c: &mut Client, schema: &str) {
    c.batch_execute(&format!(
        r#"
CREATE SCHEMA {schema};
CREATE TABLE {schema}.events (stream_id text, stream_position bigint, event_type text, PRIMARY KEY (stream_id, stream_position));
CREATE FUNCTION {schema}.apply(e ep.events) RETURNS void LANGUAGE plpgsql AS $f$
BEGIN
    IF e.event_type = '$stream_truncated' THEN
        DELETE FROM events WHERE stream_id = e.stream_id AND stream_position < (e.data ->> 'truncate_before')::bigint;
    END IF;
    INSERT INTO events VALUES (e.stream_id, e.stream_position, e.event_type);
END
$f$;
"#
    ))
    .unwrap_or_else(|e| panic!("{}", show(&e)));
}

pub type Copy = BTreeSet<(String, i64, String)>;

pub fn read_copy(c: &mut Client, schema: &str) -> Copy {
    c.query(&format!("SELECT stream_id, stream_position, event_type FROM {schema}.events"), &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// The Rust twin of `apply`, over what is in the log.
pub fn replay_copy(log: &[Event]) -> Copy {
    let mut m = Copy::new();
    for e in log {
        if e.event_type == "$stream_truncated" {
            let cut = e.data["truncate_before"].as_i64().expect("truncate_before");
            m.retain(|(s, p, _)| s != &e.stream_id || *p >= cut);
        }
        m.insert((e.stream_id.clone(), e.stream_position, e.event_type.clone()));
    }
    m
}

/// How many events the record says retention removed, in all.
pub fn removed_total(c: &mut Client) -> i64 {
    c.query_one("SELECT coalesce(sum(events_removed), 0)::bigint FROM ep.stream_truncations", &[]).unwrap().get(0)
}

/// ALTER SYSTEM settings for the length of a test, reset (and reloaded) when it ends, even when
/// it fails. Tests that change settings this way take turns.
pub struct Settings {
    names: Vec<String>,
    _turn: std::sync::MutexGuard<'static, ()>,
}
static SETTINGS_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
impl Settings {
    /// `assignments`: `name = value`.
    pub fn set(assignments: &[&str]) -> Settings {
        let turn = SETTINGS_TURN.lock().unwrap_or_else(|p| p.into_inner());
        let stmts: Vec<String> = assignments.iter().map(|a| format!("ALTER SYSTEM SET {a}")).collect();
        let refs: Vec<&str> = stmts.iter().map(|s| s.as_str()).collect();
        crate::served::settings(&mut connect("postgres"), &refs);
        let names = assignments.iter().map(|a| a.split('=').next().unwrap_or(a).trim().to_string()).collect();
        Settings { names, _turn: turn }
    }
}
impl Drop for Settings {
    fn drop(&mut self) {
        if let Ok(mut c) = Client::connect(&conninfo("postgres"), postgres::NoTls) {
            for n in &self.names {
                let _ = c.batch_execute(&format!("ALTER SYSTEM RESET {n}"));
            }
            let _ = c.batch_execute("SELECT pg_reload_conf()");
        }
    }
}
