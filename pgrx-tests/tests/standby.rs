//! Read models on a hot standby (issue 16): a streaming standby of the test cluster on loopback
//! (`pg_basebackup`); appends on the primary, reads on the standby. `ep_wait_for` there waits for
//! the standby to replay what the projection needs, so a client that appended on the primary reads
//! its own write on the standby.

use ep_connection_tests::served::*;
use ep_connection_tests::*;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const STANDBY_PORT: u16 = 55436;

/// A streaming standby of the test cluster, stopped and removed when dropped.
struct Standby {
    dir: PathBuf,
    bin: PathBuf,
}

fn as_postgres(args: &[&str]) -> std::process::Output {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Standby {
    fn start() -> Standby {
        let bin = PathBuf::from(std::env::var("EP_PGBIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()));
        let base = std::env::var("EP_DATA").unwrap_or_else(|_| "/var/tmp/event_projections/ctest".into());
        let dir = PathBuf::from(format!("{base}-standby"));
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("pg_ctl"))
            .args(["-D", &dir.join("pgdata").to_string_lossy(), "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("socket")).unwrap();
        Command::new("chown").args(["-R", "postgres:postgres", &dir.to_string_lossy()]).status().unwrap();
        let pgdata = dir.join("pgdata");
        as_postgres(&[
            &bin.join("pg_basebackup").to_string_lossy(),
            "-h",
            &host(),
            "-p",
            &port().to_string(),
            "-U",
            "postgres",
            "-D",
            &pgdata.to_string_lossy(),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
        ]);
        let opts = format!(
            "-p {STANDBY_PORT} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c hot_standby=on",
            dir.join("socket").display()
        );
        as_postgres(&[
            &bin.join("pg_ctl").to_string_lossy(),
            "-D",
            &pgdata.to_string_lossy(),
            "-o",
            &opts,
            "-l",
            &dir.join("server.log").to_string_lossy(),
            "-w",
            "-t",
            "60",
            "start",
        ]);
        Standby { dir, bin }
    }

    fn connect(&self, db: &str) -> postgres::Client {
        let info = format!("host=127.0.0.1 port={STANDBY_PORT} user=postgres dbname={db}");
        let mut last = None;
        for _ in 0..100 {
            match postgres::Client::connect(&info, postgres::NoTls) {
                Ok(c) => return c,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("connecting to the standby: {:?}", last)
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &self.dir.join("pgdata").to_string_lossy(), "-m", "fast", "-w", "stop"])
            .output();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn has_position(c: &mut postgres::Client, schema: &str, stream: &str, position: i64) -> bool {
    c.query_one(
        &format!("SELECT coalesce(max(last_position), 0) >= $2 FROM {schema}.counts WHERE stream_id = $1"),
        &[&stream, &position],
    )
    .unwrap()
    .get(0)
}

/// Appends on the primary, `ep_wait_for` and reads on the standby: every read sees its own write,
/// for an inline and an async projection; `ep_require_ready` answers on the standby; the models
/// there equal a replay of the standby's log.
#[test]
fn read_your_writes_on_a_hot_standby() {
    let _all = AllDatabases::on(2);
    let db = TestDb::new("standby");
    let mut c = db.connect();
    create_counts_projection(&mut c, "inl", "w_inl");
    create_counts_model(&mut c, "w_asy");
    register(&mut c, "asy", "w_asy.count_event(ep.events)", "async", "w_asy");
    let standby = Standby::start();
    let mut s = standby.connect(&db.name);
    let in_recovery: bool = s.query_one("SELECT pg_is_in_recovery()", &[]).unwrap().get(0);
    assert!(in_recovery, "not a standby");
    for i in 0..60 {
        let stream = format!("s{}", i % 4);
        let p = append(&mut c, &stream, "T", &json!({ "i": i }), None).unwrap();
        for (projection, schema) in [("inl", "w_inl"), ("asy", "w_asy")] {
            let reached: bool = s
                .query_one("SELECT ep_wait_for($1, $2, '20 s')", &[&projection, &p])
                .unwrap_or_else(|e| panic!("ep_wait_for on the standby: {}", show(&e)))
                .get(0);
            assert!(reached, "{projection}: the standby did not replay position {p}");
            assert!(has_position(&mut s, schema, &stream, p), "{projection}: read on the standby misses its write {p}");
        }
    }
    let ready: bool = s.query_one("SELECT ep_require_ready('inl') AND ep_projection_ready('asy')", &[]).unwrap().get(0);
    assert!(ready);
    assert_counts_match_log(&mut s, "w_inl");
    assert_counts_match_log(&mut s, "w_asy");
}
