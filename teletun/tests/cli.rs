//! The command line: help everywhere, and bad input answered with one clear
//! line and a non-zero exit, never a panic.

use std::path::PathBuf;
use std::process::{Command, Output};

fn teletun(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_teletun"))
        .args(args)
        .output()
        .expect("run teletun")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exactly one line on stderr, starting with "teletun: ", no panic.
fn assert_one_error_line(o: &Output, contains: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic: {err}"
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].starts_with("teletun: "), "{err}");
    assert!(lines[0].contains(contains), "expected {contains:?} in {err}");
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("teletun-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn help_on_every_subcommand() {
    for sub in ["client", "server-external", "server-cluster", "cleanup", "keygen"] {
        let o = teletun(&[sub, "--help"]);
        assert!(o.status.success(), "{sub} --help failed");
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("Usage: teletun"), "{sub}: {out}");
    }
    let out = String::from_utf8_lossy(&teletun(&["--help"]).stdout).into_owned();
    for sub in ["client", "server-external", "server-cluster", "cleanup", "keygen"] {
        assert!(out.contains(sub), "top-level help lacks {sub}");
    }
}

#[test]
fn bad_flags_give_one_line() {
    assert_one_error_line(&teletun(&["client", "-port=banana"]), "--port");
    assert_one_error_line(
        &teletun(&[
            "client",
            "-port=70000",
            "-server-pubkey=a",
            "-client-pubkey=b",
            "-client-privkey=c",
        ]),
        "--port",
    );
    assert_one_error_line(&teletun(&["server-cluster"]), "--sockfile");
    assert_one_error_line(&teletun(&["frobnicate"]), "frobnicate");
    assert_one_error_line(
        &teletun(&[
            "client",
            "-port=1",
            "-server-pubkey=a",
            "-client-pubkey=b",
            "-client-privkey=c",
            "--route=10.0.0.0/33",
        ]),
        "--route",
    );
    for (domain, why) in [("com", "top-level domain"), ("bad_name.example", "not a domain name")] {
        let o = teletun(&[
            "client",
            "-port=1",
            "-server-pubkey=a",
            "-client-pubkey=b",
            "-client-privkey=c",
            &format!("--cluster-domain={domain}"),
        ]);
        assert_one_error_line(&o, "--cluster-domain");
        assert!(stderr(&o).contains(why), "{domain}: {}", stderr(&o));
    }
}

#[test]
fn key_problems_give_one_line_naming_the_file() {
    let d = tempdir("keys");
    let prefix = d.join("k");
    let o = teletun(&["keygen", "--out", prefix.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (key, public) = (format!("{}.key", prefix.display()), format!("{}.pub", prefix.display()));
    assert_one_error_line(
        &teletun(&["keygen", "--out", prefix.to_str().unwrap()]),
        "already exists",
    );

    let base = |privkey: &str, pubkey: &str| {
        teletun(&[
            "client",
            "-port=8443",
            &format!("-server-pubkey={public}"),
            &format!("-client-pubkey={pubkey}"),
            &format!("-client-privkey={privkey}"),
            "--server-address=127.0.0.1",
        ])
    };
    assert_one_error_line(&base("/nonexistent/c.key", &public), "/nonexistent/c.key");
    assert_one_error_line(&base(&public, &public), "holds a public key");
    assert_one_error_line(&base(&key, &key), "holds a private key");
    let garbage = d.join("garbage.pub");
    std::fs::write(&garbage, "not a key").unwrap();
    assert_one_error_line(&base(&key, garbage.to_str().unwrap()), "not a PEM public key");
    let o = teletun(&["keygen", "--out", d.join("other").to_str().unwrap()]);
    assert!(o.status.success());
    assert_one_error_line(
        &base(&key, d.join("other.pub").to_str().unwrap()),
        "does not belong to private key",
    );
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn the_server_must_be_named_and_a_bad_kubeconfig_is_named() {
    let d = tempdir("kube");
    let prefix = d.join("k");
    assert!(teletun(&["keygen", "--out", prefix.to_str().unwrap()]).status.success());
    let (key, public) = (format!("{}.key", prefix.display()), format!("{}.pub", prefix.display()));
    let keys = [
        format!("-server-pubkey={public}"),
        format!("-client-pubkey={public}"),
        format!("-client-privkey={key}"),
    ];
    let mut args = vec!["client", "-port=8443"];
    args.extend(keys.iter().map(String::as_str));
    assert_one_error_line(&teletun(&args), "-pod=NAME");
    let missing = d.join("no-such-kubeconfig");
    let flag = format!("-kubeconfig={}", missing.display());
    args.extend(["-pod=teletun-external", flag.as_str()]);
    assert_one_error_line(&teletun(&args), "no-such-kubeconfig");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn keygen_writes_a_private_key_only_its_owner_reads() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempdir("mode");
    let prefix = d.join("k");
    assert!(teletun(&["keygen", "--out", prefix.to_str().unwrap()]).status.success());
    let mode = std::fs::metadata(format!("{}.key", prefix.display()))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let pem = std::fs::read_to_string(format!("{}.key", prefix.display())).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8 PEM expected");
    let pem = std::fs::read_to_string(format!("{}.pub", prefix.display())).unwrap();
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"), "SPKI PEM expected");
    std::fs::remove_dir_all(d).unwrap();
}
