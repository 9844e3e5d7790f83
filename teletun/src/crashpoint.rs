//! Named crash points in the client, for the testbench only.
//!
//! When the environment variable `TELETUN_TESTBENCH_CRASHPOINT` names a point,
//! the client announces on stderr that it reached it and then waits to be
//! killed there. Without the variable, `reached` costs one cached lookup.

use std::sync::OnceLock;

/// The environment variable the testbench sets.
pub const ENV: &str = "TELETUN_TESTBENCH_CRASHPOINT";

/// The points the client passes, in order.
pub const POINTS: &[&str] = &[
    "after-tun",
    "after-addresses",
    "after-routes",
    "after-dns",
    "mid-traffic",
    "mid-teardown",
];

/// Marks that the client reached `point`.
pub fn reached(point: &str) {
    static CHOSEN: OnceLock<Option<String>> = OnceLock::new();
    let chosen = CHOSEN.get_or_init(|| std::env::var(ENV).ok());
    if chosen.as_deref() == Some(point) {
        eprintln!("teletun: crashpoint {point} reached; waiting to be killed");
        loop {
            std::thread::park();
        }
    }
}
