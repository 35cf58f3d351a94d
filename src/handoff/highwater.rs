//! The high-water mark of the log (DESIGN.md, section 4): the largest position up to which every
//! event is either visible to a snapshot taken after this call or never going to exist.

use crate::handoff::inflight::{self, Horizon};
use crate::pg::spi::{self, Snap, Stmt};
use pgrx::pg_sys;
use pgrx::prelude::*;

/// H1: the last position handed out by the sequence (0 before the first).
/// H1: the last position handed out. The sequence tuple is updated in place and always visible,
/// so this reads the current value whatever the snapshot. Under a hand-off lock it bounds the
/// catch-up: positions handed out later belong to appends that will apply their own events.
pub fn last_value() -> i64 {
    crate::pg::catalog::read(|| {
        Spi::connect(|client| spi::exec(client, &LAST_VALUE, &[], Snap::Fresh, 0).get(0, 1).unwrap_or(0))
    })
}

static LAST_VALUE: Stmt =
    Stmt { sql: "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM ep.global_position_seq", types: &[] };

/// H1..H3. Waits (briefly, a backend is between two instructions) while a slot is PENDING. The
/// caller must read the events with a snapshot taken after this returns (H4): at READ COMMITTED,
/// any statement executed afterwards.
pub fn compute() -> i64 {
    compute_with(inflight::horizon)
}

/// `compute` for a reader of the log outside the protocol's own steps (`ep_read_all`, `ep_poll`):
/// positions its own transaction holds are visible to it and do not hold it back.
pub fn compute_for_reader() -> i64 {
    compute_with(inflight::horizon_for_own_reads)
}

fn compute_with(horizon: fn(i64) -> Horizon) -> i64 {
    loop {
        let l = last_value();
        match horizon(l) {
            Horizon::UpTo(hw) => return hw,
            // SAFETY: a sleep and an interrupt check in a backend, outside any critical section.
            Horizon::Unsettled => unsafe {
                pg_sys::pg_usleep(100);
                pgrx::check_for_interrupts!();
            },
        }
    }
}
