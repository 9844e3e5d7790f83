//! Named crash points in the client, for the testbench only.
//!
//! When the environment variable `TELETUN_TESTBENCH_CRASHPOINT` names a point,
//! the client announces on stderr that it reached it and stops there until a
//! signal arrives. SIGKILL ends it on the spot (the guard process then cleans
//! up); SIGINT or SIGTERM resume it, and the client's normal signal handling
//! takes over, as if the signal had arrived at exactly that point.

use std::sync::OnceLock;

/// The environment variable the testbench sets.
pub const ENV: &str = "TELETUN_TESTBENCH_CRASHPOINT";

/// The points the client passes, in order.
pub const POINTS: &[&str] = &[
    "after-tun",
    "after-addresses",
    "after-routes",
    "after-forwarder",
    "after-dns",
    "mid-traffic",
    "mid-teardown",
];

/// Marks that the client reached `point`.
pub async fn reached(point: &str) {
    static CHOSEN: OnceLock<Option<String>> = OnceLock::new();
    let chosen = CHOSEN.get_or_init(|| std::env::var(ENV).ok());
    if chosen.as_deref() != Some(point) {
        return;
    }
    use tokio::signal::unix::{signal, SignalKind};
    eprintln!("teletun: crashpoint {point} reached; waiting for a signal");
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
    eprintln!("teletun: crashpoint {point}: resuming after a signal");
}

#[cfg(test)]
mod tests {
    use super::POINTS;

    /// Every crash point the client passes is in the testbench's crash matrix,
    /// and the client really passes it.
    #[test]
    fn the_crash_matrix_covers_every_point() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let matrix = std::fs::read_to_string(root.join("scenarios/crash.toml")).unwrap();
        let client = std::fs::read_to_string(root.join("teletun/src/roles/client.rs")).unwrap();
        for point in POINTS {
            assert!(
                matrix.contains(&format!("\"{point}\"")),
                "scenarios/crash.toml lacks {point}"
            );
            assert!(
                client.contains(&format!("reached(\"{point}\")")),
                "the client never reaches {point}"
            );
        }
        assert_eq!(
            client.matches("crashpoint::reached(").count(),
            POINTS.len(),
            "a point missing from POINTS"
        );
    }
}
