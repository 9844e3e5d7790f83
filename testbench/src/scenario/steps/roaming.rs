//! The laptop's life: a new address, another uplink, a NAT that forgets, a
//! sleep; and the probe and background transfer that show what a session
//! lived through.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ipnet::IpNet;

use super::super::case::Case;
use super::super::schema::{
    ChangeAddress, FinishTransfer, MtuBlackHole, NatRebind, Sleep, StartProbe, StartTransfer, StopProbe, SwitchUplink,
};
use super::super::values::Uplink;
use crate::cluster::{HomeLan, HOME_WAN_IF, SERVER_PORT};
use crate::exec::{self, Background};
use crate::netlink::Via;
use crate::netns::{self, Netns};

/// The second uplink's subnet: 192.168.2.0/24, the laptop at .10, the home router at .1.
const SECOND_LAN: [u8; 3] = [192, 168, 2];
/// The home router's interface on the second subnet.
const HOME_LAN2_IF: &str = "lan1";

fn home(case: &Case) -> Result<Netns> {
    case.cluster()
        .home
        .clone()
        .context("this step needs the laptop's home LAN ([topology] lan = true)")
}

fn default_route() -> IpNet {
    IpNet::new(Ipv4Addr::UNSPECIFIED.into(), 0).expect("valid")
}

/// Points the laptop's default route at `gateway` (as DHCP does).
fn route_default_via(laptop: &Netns, gateway: Ipv4Addr) -> Result<()> {
    // Gone already when its interface went down or lost its address.
    let _ = laptop.run("ip", &["route", "del", "default"]);
    laptop
        .netlink()?
        .add_route(default_route(), Via::Gateway(gateway.into()), None)
}

/// `change-address`: the old address goes, the new one and the default route come.
pub fn change_address(case: &mut Case, s: &ChangeAddress) -> Result<()> {
    home(case)?;
    let lan = HomeLan;
    let old = case.roaming.laptop_ip.unwrap_or_else(|| lan.laptop_ip());
    let host = s.host.unwrap_or(old.octets()[3].wrapping_add(1));
    if matches!(host, 0 | 1 | 255) || host == old.octets()[3] {
        bail!("192.168.1.{host} cannot be the laptop's new address (it has {old}; .0, .1 and .255 are taken)");
    }
    let new = Ipv4Addr::new(192, 168, 1, host);
    let laptop = case.cluster().laptop.ns.clone();
    // The old goes first, as DHCP does it (a second address on the subnet
    // would go with the first).
    laptop.run("ip", &["addr", "del", &format!("{old}/24"), "dev", "eth0"])?;
    let t = Instant::now();
    let added = laptop
        .netlink()
        .and_then(|n| n.add_address("eth0", IpNet::new(new.into(), 24)?));
    if let Err(e) = added {
        // Put the old one back, so later steps find the laptop as they expect.
        let _ = laptop
            .netlink()
            .and_then(|n| n.add_address("eth0", IpNet::new(old.into(), 24)?));
        let _ = route_default_via(&laptop, lan.router_ip());
        return Err(e.context(format!("cannot give the laptop {new}")));
    }
    case.roaming.laptop_ip = Some(new);
    route_default_via(&laptop, lan.router_ip())?;
    case.detail = Some(format!(
        "{old} → {new} ({} ms without an address)",
        t.elapsed().as_millis()
    ));
    Ok(())
}

/// `switch-uplink`: to `second`, eth1 comes up with the default route and
/// eth0 goes down; to `first`, the reverse, and eth1 is unplugged.
pub fn switch_uplink(case: &mut Case, s: &SwitchUplink) -> Result<()> {
    let home = home(case)?;
    let laptop = case.cluster().laptop.ns.clone();
    let [a, b, c] = SECOND_LAN;
    match s.to {
        Uplink::Second => {
            if case.roaming.second_uplink {
                bail!("the laptop already uses its second uplink");
            }
            netns::veth(&laptop, "eth1", &home, HOME_LAN2_IF)?;
            // From here `first` undoes it, whatever fails below.
            case.roaming.second_uplink = true;
            laptop
                .netlink()?
                .add_address("eth1", IpNet::new(Ipv4Addr::new(a, b, c, 10).into(), 24)?)?;
            home.netlink()?
                .add_address(HOME_LAN2_IF, IpNet::new(Ipv4Addr::new(a, b, c, 1).into(), 24)?)?;
            route_default_via(&laptop, Ipv4Addr::new(a, b, c, 1))?;
            laptop.run("ip", &["link", "set", "eth0", "down"])?;
            case.detail = Some(format!("eth1 {a}.{b}.{c}.10 up, eth0 down"));
        }
        Uplink::First => {
            if !case.roaming.second_uplink {
                bail!("the laptop already uses its first uplink");
            }
            laptop.run("ip", &["link", "set", "eth0", "up"])?;
            route_default_via(&laptop, HomeLan.router_ip())?;
            let _ = laptop.run("ip", &["link", "del", "eth1"]);
            case.roaming.second_uplink = false;
            // Gone, or never fully made.
            if laptop.netlink()?.has_link("eth1") {
                bail!("eth1 is still on the laptop after unplugging it");
            }
            case.detail = Some("eth0 up, eth1 unplugged".into());
        }
    }
    Ok(())
}

/// The client's UDP mapping on the home router: the port its traffic to the
/// server leaves from, if conntrack has it.
fn udp_mapping(home: &Netns) -> Result<Option<u16>> {
    let port = SERVER_PORT.to_string();
    let out = home.run("conntrack", &["-L", "-p", "udp", "--orig-port-dst", &port])?;
    // … src=192.168.1.10 dst=N sport=A dport=P src=N dst=WAN sport=P dport=B …: B is the mapped port.
    Ok(out.lines().find_map(|l| {
        l.split_whitespace()
            .filter_map(|w| w.strip_prefix("dport="))
            .nth(1)
            .and_then(|p| p.parse().ok())
    }))
}

/// `nat-rebind`: the home router masquerades from another port range and
/// forgets every mapping.
pub fn nat_rebind(case: &mut Case, _: &NatRebind) -> Result<()> {
    let home = home(case)?;
    let before =
        udp_mapping(&home).context("cannot read the home router's conntrack table (is conntrack installed?)")?;
    case.roaming.rebinds += 1;
    // Ranges that never hold the port a mapping had before.
    let base = if case.roaming.rebinds % 2 == 1 { 20000 } else { 30000 };
    let rules = format!(
        "flush chain ip home-nat postrouting\n\
         add rule ip home-nat postrouting oifname \"{HOME_WAN_IF}\" meta l4proto {{ tcp, udp }} masquerade to :{base}-{}\n\
         add rule ip home-nat postrouting oifname \"{HOME_WAN_IF}\" masquerade\n",
        base + 9999
    );
    let file = case
        .cluster()
        .dir
        .join(format!("home-nat-rebind-{}.nft", case.roaming.rebinds));
    std::fs::write(&file, rules)?;
    home.run("nft", &["-f", &file.to_string_lossy()])?;
    home.run("conntrack", &["-F"])?;
    // The next datagram from the client makes the new mapping.
    let deadline = Instant::now() + Duration::from_secs(2);
    let after = loop {
        if let Some(p) = udp_mapping(&home)? {
            break Some(p);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let show = |p: Option<u16>| p.map_or_else(|| "none".to_string(), |p| p.to_string());
    match (before, after) {
        (Some(b), Some(a)) if a == b => bail!("the client's UDP mapping kept port {a}: the NAT did not rebind"),
        (Some(_), Some(_)) => {}
        _ => bail!(
            "no UDP mapping of the client's to see rebind (before: {}, after: {}): is a client connected?",
            show(before),
            show(after)
        ),
    }
    case.detail = Some(format!("client's UDP mapping: port {} → {}", show(before), show(after)));
    Ok(())
}

/// `sleep`: the client frozen and the laptop's network silent, then both resume.
pub fn sleep(case: &mut Case, s: &Sleep) -> Result<()> {
    let dir = case.cluster().dir.clone();
    let laptop = case.cluster().laptop.ns.clone();
    let silence = dir.join("laptop-asleep.nft");
    // Everything but loopback dropped both ways: a closed lid.
    std::fs::write(
        &silence,
        "table inet asleep {\n  chain in { type filter hook input priority -500; policy accept; iifname != \"lo\" drop; }\n  \
         chain out { type filter hook output priority -500; policy accept; oifname != \"lo\" drop; }\n}\n",
    )?;
    let client = case
        .clients
        .get_mut(&s.client)
        .with_context(|| format!("no running client {:?}", s.client))?;
    client.signal(libc::SIGSTOP);
    let asleep = laptop.run("nft", &["-f", &silence.to_string_lossy()]);
    if asleep.is_ok() {
        std::thread::sleep(Duration::from_secs(s.seconds));
    }
    // Wake in the order a laptop does: the network, then the processes.
    let awake = laptop.run("nft", &["delete", "table", "inet", "asleep"]);
    client.signal(libc::SIGCONT);
    asleep.context("cannot silence the laptop's network")?;
    awake.context("cannot wake the laptop's network")?;
    case.roaming.mark = Some(("waking", Instant::now()));
    Ok(())
}

/// `mtu-black-hole`: the router's links carry at most `mtu` bytes and its
/// ICMP "too big" messages are dropped.
pub fn mtu_black_hole(case: &mut Case, s: &MtuBlackHole) -> Result<()> {
    let router = case.cluster().router.clone();
    let file = case.cluster().dir.join("black-hole.nft");
    std::fs::write(
        &file,
        "table inet black-hole {\n  chain out {\n    type filter hook output priority 0; policy accept;\n    \
         icmp type destination-unreachable icmp code frag-needed drop\n    icmpv6 type packet-too-big drop\n  }\n}\n",
    )?;
    router.run("nft", &["-f", &file.to_string_lossy()])?;
    let mtu = s.mtu.to_string();
    for link in ["to-laptop", "nodes"] {
        router.run("ip", &["link", "set", link, "mtu", &mtu])?;
    }
    case.detail = Some(format!("router links at MTU {mtu}, its ICMP too-big dropped"));
    Ok(())
}

/// Replies seen by a probe: (time in seconds as ping's `-D` prints it, icmp_seq).
fn replies(log: &str) -> Vec<(f64, u64)> {
    log.lines()
        .filter(|l| l.contains(" bytes from "))
        .filter_map(|l| {
            let time = l.strip_prefix('[')?.split(']').next()?.parse().ok()?;
            let seq = l.split("icmp_seq=").nth(1)?.split_whitespace().next()?.parse().ok()?;
            Some((time, seq))
        })
        .collect()
}

/// The longest time between consecutive replies: (milliseconds, seq before, seq after).
fn longest_gap(replies: &[(f64, u64)]) -> Option<(f64, u64, u64)> {
    replies
        .windows(2)
        .map(|w| ((w[1].0 - w[0].0) * 1000.0, w[0].1, w[1].1))
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

/// `start-probe`: ping 100 times a second in the background.
pub fn start_probe(case: &mut Case, s: &StartProbe) -> Result<()> {
    if case.roaming.probe.is_some() {
        bail!("a probe already runs; stop-probe first");
    }
    let ip = case.address(&s.to, s.ipv6)?.to_string();
    let mut cmd = case.cluster().laptop.cmd("ping");
    cmd.args(["-D", "-n", "-i", "0.01", "-W", "1", &ip]);
    let log = case.cluster().dir.join(format!("probe-{}.log", case.roaming.probes));
    case.roaming.probes += 1;
    let mut probe = Background::spawn("probe", cmd, &log)?;
    // Replies flow before anything else happens.
    probe.wait_for_log(" bytes from ", Duration::from_secs(5))?;
    case.roaming.probe = Some(probe);
    Ok(())
}

/// `stop-probe`: the longest gap between replies, and the replies lost.
pub fn stop_probe(case: &mut Case, s: &StopProbe) -> Result<()> {
    let mut probe = case.roaming.probe.take().context("no probe runs")?;
    let stopped_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    probe.signal(libc::SIGINT);
    probe.wait(Duration::from_secs(5))?;
    let log = probe.log_text();
    let got = replies(&log);
    let sent = log
        .lines()
        .find_map(|l| l.split(" packets transmitted").next()?.parse::<u64>().ok())
        .unwrap_or(0);
    let Some((mut gap, from, mut to)) = longest_gap(&got) else {
        bail!("the probe saw fewer than two replies: {}", exec::last_lines(&log, 3));
    };
    // Silence at the end counts too: a tunnel that never came back must not pass.
    if let Some((last, seq)) = got.last() {
        let tail = (stopped_at - last) * 1000.0;
        if tail > gap {
            (gap, to) = (tail, seq + 1);
        }
    }
    let lost = sent.saturating_sub(got.len() as u64);
    let mut detail = format!(
        "longest gap {gap:.0} ms (icmp_seq {from} → {to}); {} of {sent} replies, {lost} lost",
        got.len()
    );
    if let Some((event, at)) = case.roaming.mark.take() {
        // How long after the event (waking, a server back) the first reply came.
        let event_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64()
            - at.elapsed().as_secs_f64();
        match got.iter().find(|(t, _)| *t >= event_at) {
            Some((t, _)) => detail += &format!("; first reply {:.0} ms after {event}", (t - event_at) * 1000.0),
            None => bail!("{detail}; no reply after {event}"),
        }
    }
    case.detail = Some(detail);
    if let Some(max) = s.max_gap_ms {
        if gap > max as f64 {
            bail!(
                "{}: over the {max} ms allowed",
                case.detail.as_deref().unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// `start-transfer`: the `transfer` step's blob, in the background.
pub fn start_transfer(case: &mut Case, s: &StartTransfer) -> Result<()> {
    if case.roaming.transfer.is_some() {
        bail!("a transfer already runs; finish-transfer first");
    }
    let c = super::connectivity::blob_command(case, s.direction, s.bytes, s.seed)?;
    let log = case.cluster().dir.join("background-transfer.log");
    case.roaming.transfer = Some((Background::spawn("background transfer", c, &log)?, Instant::now()));
    Ok(())
}

/// `finish-transfer`: it completes, SHA-256 equal.
pub fn finish_transfer(case: &mut Case, s: &FinishTransfer) -> Result<()> {
    let (mut t, started) = case.roaming.transfer.take().context("no transfer runs")?;
    let status = t.wait(Duration::from_secs(s.within))?;
    let log = t.log_text();
    if !status.success() {
        bail!("the transfer failed ({status}): {}", exec::last_lines(&log, 2));
    }
    let ok = log.lines().last().unwrap_or_default().trim_start_matches("ok: ");
    case.detail = Some(format!("{ok}; {} s in all", started.elapsed().as_secs()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_gap_between_replies_is_found() {
        let log = "PING 10.0.0.1 (10.0.0.1) 56(84) bytes of data.\n\
                   [1700000000.000000] 64 bytes from 10.0.0.1: icmp_seq=1 ttl=63 time=0.5 ms\n\
                   [1700000000.010000] 64 bytes from 10.0.0.1: icmp_seq=2 ttl=63 time=0.5 ms\n\
                   [1700000000.750000] 64 bytes from 10.0.0.1: icmp_seq=70 ttl=63 time=0.5 ms\n\
                   [1700000000.760000] 64 bytes from 10.0.0.1: icmp_seq=71 ttl=63 time=0.5 ms\n\
                   \n--- 10.0.0.1 ping statistics ---\n\
                   80 packets transmitted, 4 received, 95% packet loss, time 800ms\n";
        let got = replies(log);
        assert_eq!(got.len(), 4);
        let (gap, from, to) = longest_gap(&got).unwrap();
        assert_eq!((gap.round(), from, to), (740.0, 2, 70));
    }
}
