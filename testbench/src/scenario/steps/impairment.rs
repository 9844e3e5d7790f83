//! A bad underlay, and proof that nothing was corrupted crossing it.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::super::case::Case;
use super::super::schema::Impair;
use crate::exec;

/// `impair`: the underlay gets the named profile from now on.
pub fn impair(case: &mut Case, s: &Impair) -> Result<()> {
    let imp = case
        .impairments
        .get(&s.profile)
        .with_context(|| format!("no profile {:?}", s.profile))?
        .clone();
    case.cluster_mut().impair(&imp)?;
    case.detail = Some(imp.describe());
    Ok(())
}

/// Kernel counters that a corrupted or spliced packet out of a TUN would raise.
const COUNTERS: &[&str] = &[
    "IpInHdrErrors",
    "IpInTruncatedPkts",
    "IcmpInCsumErrors",
    "TcpInCsumErrors",
    "UdpInCsumErrors",
    "Ip6InHdrErrors",
    "Ip6InTruncatedPkts",
    "Udp6InCsumErrors",
];

/// `no-corruption`: the laptop's and the server-cluster pod's kernels counted
/// no header or checksum errors, and every teletun session summary so far
/// reports 0 malformed packets.
pub fn no_corruption(case: &mut Case) -> Result<()> {
    let cluster = case.cluster_mut();
    let mut problems = Vec::new();
    let places = [
        ("laptop", cluster.laptop.cmd("nstat")),
        ("server-cluster pod", cluster.pod("teletun")?.ns.cmd("nstat")),
    ];
    for (place, mut nstat) in places {
        nstat.arg("-asz");
        let out = exec::run(nstat, Duration::from_secs(10))?;
        for line in out.lines() {
            let mut w = line.split_whitespace();
            if let (Some(name), Some(value)) = (w.next(), w.next()) {
                if COUNTERS.contains(&name) && value != "0" {
                    problems.push(format!("{place}: {name} = {value}"));
                }
            }
        }
    }
    let mut logs: Vec<(String, String)> = std::fs::read_dir(&cluster.dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("client-"))
        })
        .map(|p| (p.display().to_string(), std::fs::read_to_string(&p).unwrap_or_default()))
        .collect();
    for role in ["server-cluster", "server-external"] {
        logs.push((role.to_owned(), cluster.process_mut(role)?.log_text()));
    }
    let mut summaries = 0;
    for (name, log) in &logs {
        for line in log.lines().filter(|l| l.contains(" malformed")) {
            summaries += 1;
            let words: Vec<&str> = line.split_whitespace().collect();
            for pair in words.windows(2).filter(|w| w[1].starts_with("malformed")) {
                if pair[0] != "0" {
                    problems.push(format!("{name}: {}", line.trim()));
                }
            }
        }
    }
    if summaries == 0 {
        bail!("no teletun session summary to check yet: stop the client first");
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    case.detail = Some(format!(
        "{summaries} session summaries, 0 malformed; kernel error counters 0"
    ));
    Ok(())
}
