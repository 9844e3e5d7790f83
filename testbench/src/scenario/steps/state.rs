//! The laptop's state: unchanged after a client, recorded as snapshots, and
//! repaired by `teletun cleanup`.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::super::case::Case;
use super::super::schema::{LaptopUnchanged, Snapshot};
use crate::exec;

/// `laptop-unchanged`: the state equals the one before any client ran
/// (waiting up to `within` seconds for a guard to finish).
pub fn laptop_unchanged(case: &mut Case, s: &LaptopUnchanged) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(s.within);
    loop {
        let now = case.cluster().laptop.snapshot()?;
        if now == case.laptop_before {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("laptop state differs:\n{}", diff(&case.laptop_before, &now));
        }
        exec::check_interrupted()?;
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `snapshot`: the normalized state, kept in the results under its name.
pub fn snapshot(case: &mut Case, s: &Snapshot) -> Result<()> {
    let state = normalize(&case.cluster().laptop.snapshot()?);
    case.snapshot = Some((s.name.clone(), state));
    Ok(())
}

/// `teletun-cleanup`: it must succeed.
pub fn teletun_cleanup(case: &mut Case) -> Result<()> {
    let teletun = case.cluster().teletun.to_string_lossy().into_owned();
    case.laptop_check(&teletun, &["cleanup"]).map(|_| ())
}

/// Replaces what differs from run to run (MAC addresses, link-local addresses
/// derived from them, namespace names, peer interface numbers) with fixed words,
/// and sorts the listings whose order carries no meaning (links, addresses,
/// routes, rules: the kernel orders them by values that were just replaced;
/// the search line of systemd-resolved's stub file, which it fills from a hash
/// table of links).
pub fn normalize(state: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut unordered: Vec<String> = Vec::new();
    let mut sorting = false;
    let resolved_stub = state.lines().any(|l| l == "nameserver 127.0.0.53");
    for line in normalize_words(state).lines() {
        if let Some(domains) = line.strip_prefix("search ").filter(|_| resolved_stub) {
            let mut domains: Vec<&str> = domains.split_whitespace().collect();
            domains.sort_unstable();
            out.push(format!("search {}", domains.join(" ")));
        } else if line.starts_with("# ") {
            unordered.sort();
            out.append(&mut unordered);
            sorting = ["# links", "# addresses", "# routes", "# rules"].contains(&line);
            out.push(line.to_owned());
        } else if sorting {
            unordered.push(line.to_owned());
        } else {
            out.push(line.to_owned());
        }
    }
    unordered.sort();
    out.append(&mut unordered);
    out.join("\n")
}

fn normalize_word(w: &str) -> String {
    let hexes: Vec<&str> = w.split(':').collect();
    if hexes.len() == 6
        && hexes
            .iter()
            .all(|h| h.len() == 2 && h.chars().all(|c| c.is_ascii_hexdigit()))
    {
        "MAC".to_owned()
    } else if w.starts_with("fe80::") {
        format!("fe80::LINKLOCAL{}", w.find('/').map(|i| &w[i..]).unwrap_or(""))
    } else if let Some(role) = namespace_role(w) {
        format!("RUN-{role}")
    } else if let Some(i) = w.find("@if") {
        format!("{}@ifN{}", &w[..i], if w.ends_with(':') { ":" } else { "" })
    } else {
        w.to_owned()
    }
}

fn normalize_words(state: &str) -> String {
    state
        .lines()
        .map(|line| line.split(' ').map(normalize_word).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `ROLE` of a namespace name `tt<pid>-<hex>-ROLE`.
fn namespace_role(word: &str) -> Option<&str> {
    let (pid, rest) = word.strip_prefix("tt")?.split_once('-')?;
    let (id, role) = rest.split_once('-')?;
    let ok = !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()) && id.chars().all(|c| c.is_ascii_hexdigit());
    ok.then_some(role)
}

/// Lines only in `a` (prefixed -) or only in `b` (prefixed +).
fn diff(a: &str, b: &str) -> String {
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let mut out = Vec::new();
    out.extend(la.iter().filter(|l| !lb.contains(l)).map(|l| format!("- {l}")));
    out.extend(lb.iter().filter(|l| !la.contains(l)).map(|l| format!("+ {l}")));
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_removes_what_changes_between_runs() {
        let raw = "eth0@if3: <BROADCAST> mtu 1500 link/ether 5a:0b:11:22:33:44 brd ff:ff:ff:ff:ff:ff link-netns tt123-ab12cd-router\n\
                   eth0    inet6 fe80::580b:11ff:fe22:3344/64 scope link";
        assert_eq!(
            normalize(raw),
            "eth0@ifN: <BROADCAST> mtu 1500 link/ether MAC brd MAC link-netns RUN-router\n\
             eth0    inet6 fe80::LINKLOCAL/64 scope link"
        );
    }

    #[test]
    fn only_resolveds_search_line_is_sorted() {
        let stub = "nameserver 127.0.0.53\nsearch svc.cluster.local home.arpa";
        assert_eq!(
            normalize(stub),
            "nameserver 127.0.0.53\nsearch home.arpa svc.cluster.local"
        );
        let merged = "nameserver 127.0.53.1\nsearch svc.cluster.local home.arpa";
        assert_eq!(normalize(merged), merged);
    }

    #[test]
    fn diff_shows_both_sides() {
        assert_eq!(diff("a\nb", "b\nc"), "- a\n+ c");
    }
}
