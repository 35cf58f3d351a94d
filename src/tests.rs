//! Single-session tests (`cargo pgrx test`): each runs in one transaction that is rolled back.
use pgrx::prelude::*;

#[pg_test]
fn append_returns_positions() {
    let p1 = Spi::get_one::<i64>("SELECT ep_append('s1', 'Created', '{\"a\":1}')").unwrap().unwrap();
    let p2 = Spi::get_one::<i64>("SELECT ep_append('s1', 'Renamed', '{}')").unwrap().unwrap();
    assert!(p2 > p1);
}
