//! A scenario file with mistakes stops the testbench before anything is
//! built: every mistake is one `FILE:LINE: …` line, the exit status is
//! non-zero, and no namespace of that run exists.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A scratch file unique to this test process.
fn scratch(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("testbench-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const BROKEN: &str = "\
name = 'typos'
[topology]
resolvconf = 'systemd-resolvd'
[[step]]
do = 'start-servers'
[[step]]
do = 'start-client'
[[step]]
do = 'stop-client'
signal = 'SIGFOO'
";

/// Runs the testbench; returns its exit success, stdout and stderr, and
/// whether a namespace named after its pid existed when it ended.
fn testbench(args: &[&str]) -> (bool, String, String, bool) {
    let child = Command::new(env!("CARGO_BIN_EXE_testbench"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run testbench");
    let prefix = format!("tt{}-", child.id());
    let out = child.wait_with_output().expect("wait for testbench");
    let left = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        })
        .unwrap_or(false);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        left,
    )
}

#[test]
fn mistakes_are_reported_by_line_before_anything_is_built() {
    let file = scratch("typos.toml", BROKEN);
    let shown = file.display().to_string();
    let runs: Vec<_> = [
        vec!["scenario", "--check", shown.as_str()],
        vec!["scenario", shown.as_str()],
    ]
    .into_iter()
    .map(|args| (args.join(" "), testbench(&args)))
    .collect();
    let _ = std::fs::remove_dir_all(file.parent().unwrap_or(Path::new("/nonexistent")));
    for (args, (ok, stdout, stderr, left)) in runs {
        assert!(!ok, "{args} succeeded: {stdout}{stderr}");
        assert!(
            stderr.contains(&format!(
                "{shown}:3: unknown DNS manager \"systemd-resolvd\"; the allowed values are debian, openresolv, systemd-resolved"
            )),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!(
                "{shown}:10: unknown signal \"SIGFOO\"; the allowed values are SIGINT, SIGTERM"
            )),
            "{stderr}"
        );
        assert!(
            stderr.contains("2 problems in 1 scenario file; nothing was built or run"),
            "{stderr}"
        );
        assert!(!stdout.contains("build cluster"), "{args} built a cluster: {stdout}");
        assert!(!left, "{args} left a namespace");
    }
}

#[test]
fn the_shipped_scenarios_pass_the_check() {
    let (ok, stdout, stderr, _) = testbench(&["scenario", "--check"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("cases, no problems"), "{stdout}");
}
