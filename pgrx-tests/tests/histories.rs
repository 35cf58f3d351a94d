//! Randomized histories (issue 11): sessions running seeded random sequences of everything a user
//! can do, interleaved by one driver thread, with worker SIGKILLs and immediate shutdowns; each
//! history is checked at its end against a replay of the committed log (`history.rs` says what is
//! generated and what is checked).
//!
//! `make test` runs a bounded number of histories: EP_HISTORIES (default 40) of EP_HISTORY_STEPS
//! steps (default 200), with at most EP_HISTORY_CRASHES crashes each (default 1) and races unless
//! EP_HISTORY_RACES=0; no new history starts after EP_HISTORY_BUDGET_SECS (default 150). A failure
//! prints the seed, the history and the command that replays it:
//! `EP_SEED=<seed> EP_HISTORIES=1 cargo test --release --test histories random_histories -- --nocapture`
//! (EP_HISTORY_PRINT=1 prints every history; EP_HISTORY_FAILURES=<dir> also writes a failure there).
//! `scripts/soak.sh` runs `soak` for EP_SOAK_SECONDS.

use ep_connection_tests::history::{self, Plan};
use std::time::Duration;

#[test]
fn random_histories() {
    let plan = Plan::from_env(40, 200, 150);
    let stats = history::run("random_histories", &plan);
    assert!(stats.histories >= 1, "no history ran");
}

/// For `scripts/soak.sh`: histories for EP_SOAK_SECONDS (default 600; EP_HISTORIES stops after that
/// many), a progress line every EP_SOAK_REPORT_SECONDS (default 60). The soak watches the memory of
/// long-lived processes, so the sessions stay connected from one history to the next, the histories
/// carry the extension and its log over (a fresh extension once the log holds more than
/// EP_SOAK_LOG_LIMIT events, default 20000), and there are no crashes unless EP_SOAK_CRASHES is set
/// (a crash restarts every process).
#[test]
#[ignore]
fn soak() {
    let seconds = history::env_num("EP_SOAK_SECONDS", 600);
    let plan = Plan {
        histories: std::env::var("EP_HISTORIES").ok().and_then(|v| v.parse().ok()),
        duration: Some(Duration::from_secs(seconds)),
        budget: None,
        steps: history::env_num("EP_HISTORY_STEPS", 150) as usize,
        crashes: history::env_num("EP_SOAK_CRASHES", 0) as usize,
        races: history::env_num("EP_HISTORY_RACES", 1) != 0,
        report_every: Some(Duration::from_secs(history::env_num("EP_SOAK_REPORT_SECONDS", 60))),
        carry_over: true,
        log_limit: history::env_num("EP_SOAK_LOG_LIMIT", 20_000) as i64,
    };
    let stats = history::run("soak", &plan);
    assert!(stats.histories >= 1, "no history ran");
}
