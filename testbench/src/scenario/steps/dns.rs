//! Names as the laptop resolves them (glibc, its own resolv.conf): answers,
//! how many queries a lookup costs, and how long it takes.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::super::case::Case;
use super::super::schema::{LookupLatency, Resolve};
use super::super::values::{Answer, LookupTool};
use crate::topology::DnsManager;

/// `resolve`: the lookup gives the target's address first, or (for `nothing`)
/// no answer at all; with `queries`, that many reached the DNS servers.
pub fn resolve(case: &mut Case, s: &Resolve) -> Result<()> {
    let before = match s.queries {
        Some(_) => {
            if case.cluster().laptop.dns == DnsManager::Resolved {
                case.cluster().laptop.run_sh("resolvectl flush-caches")?;
            }
            Some(queries_for(case, &s.name))
        }
        None => None,
    };
    look_up(case, s)?;
    if let (Some(want), Some(before)) = (s.queries, before) {
        // dnsmasq writes its log line as it answers; give it a moment to land.
        let mut seen = queries_for(case, &s.name) - before;
        for _ in 0..20 {
            if seen >= want as usize {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
            seen = queries_for(case, &s.name) - before;
        }
        if seen != want as usize {
            bail!("the lookup cost {seen} queries at the LAN's and the cluster's DNS servers, not {want}");
        }
        case.detail = Some(format!("{seen} queries"));
    }
    Ok(())
}

fn look_up(case: &mut Case, s: &Resolve) -> Result<()> {
    let (target, ipv6) = match &s.expect {
        Answer::Nothing => {
            let database = if s.with == LookupTool::GetentHosts {
                "hosts"
            } else {
                "ahosts"
            };
            return match case.laptop_check("getent", &[database, &s.name]) {
                Ok(out) => bail!("{} resolved: {}", s.name, out.lines().next().unwrap_or("")),
                Err(_) => Ok(()),
            };
        }
        Answer::Address { target, ipv6 } => (target, *ipv6),
    };
    let want = case.address(target, ipv6)?;
    let database = match (s.with, ipv6) {
        (LookupTool::GetentHosts, _) => "hosts",
        (LookupTool::Getent, true) => "ahostsv6",
        (LookupTool::Getent, false) => "ahostsv4",
    };
    let out = case
        .laptop_check("getent", &[database, &s.name])
        .with_context(|| format!("{} does not resolve", s.name))?;
    let got: Vec<&str> = out.lines().filter_map(|l| l.split_whitespace().next()).collect();
    if got.first().copied() != Some(want.to_string().as_str()) {
        bail!("{} resolved to {got:?}, expected {want}", s.name);
    }
    Ok(())
}

/// How many queries for `name` (or a name starting with it) the LAN's and
/// the current cluster's DNS servers have logged so far.
fn queries_for(case: &mut Case, name: &str) -> usize {
    let exact = format!("] {name} ");
    let longer = format!("] {name}.");
    let mut logs = Vec::new();
    for c in case.clusters.iter_mut() {
        if let Ok(p) = c.process_mut("lan-dns") {
            logs.push(p.log_text());
        }
    }
    if let Ok(p) = case.cluster_mut().process_mut("dnsmasq") {
        logs.push(p.log_text());
    }
    logs.iter()
        .flat_map(|l| l.lines())
        .filter(|l| l.contains(": query[") && (l.contains(&exact) || l.contains(&longer)))
        .count()
}

/// `lookup-latency`: getaddrinfo `count` times on the laptop; the median and
/// 90th percentile go in the report.
pub fn lookup_latency(case: &mut Case, s: &LookupLatency) -> Result<()> {
    let count = s.count.to_string();
    let mut args = vec!["lookup", &s.name, &count];
    if s.missing {
        args.push("--missing");
    }
    let server = match &s.server {
        Some(t) => Some(case.address(t, false)?.to_string()),
        None => None,
    };
    if let Some(server) = &server {
        args.extend(["--server", server]);
    }
    let out = case.agent_on(&s.on, &args)?;
    case.detail = out.lines().last().map(|l| l.trim_start_matches("ok: ").to_owned());
    Ok(())
}
