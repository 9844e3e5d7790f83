//! How steps appear in reports, and which steps are set-up or expected to fail.

use super::schema::*;
use super::values::Place;

fn v6(ipv6: bool) -> &'static str {
    if ipv6 {
        " (IPv6)"
    } else {
        ""
    }
}

fn fails(expect_failure: bool) -> &'static str {
    if expect_failure {
        " fails"
    } else {
        ""
    }
}

impl Step {
    /// A one-line label for reports.
    pub fn label(&self) -> String {
        match self {
            Step::StartServers(_) => "start servers".into(),
            Step::StartClient(StartClient {
                name,
                expect_error: None,
                ..
            }) => format!("start client {name}"),
            Step::StartClient(StartClient {
                name,
                expect_error: Some(e),
                ..
            }) => format!("client {name} fails with {e:?}"),
            Step::StopClient(s) => format!("stop client {} with {}", s.name, s.signal),
            Step::Status(s) => format!(
                "teletun status{} shows {}",
                if s.json { " --json" } else { "" },
                s.expect.iter().map(|e| format!("{e:?}")).collect::<Vec<_>>().join(", ")
            ),
            Step::ConnectInTurn(s) => format!(
                "{} clients connect one after another, each within {} s",
                s.count, s.within
            ),
            Step::Ping(s) => format!("ping {}{}{}", s.to, v6(s.ipv6), fails(s.expect_failure)),
            Step::TcpEcho(s) => format!("TCP echo {}{}{}", s.to, v6(s.ipv6), fails(s.expect_failure)),
            Step::UdpEcho(s) => format!("UDP echo {}{}", s.to, v6(s.ipv6)),
            Step::Http(s) => format!("HTTP {}{}", s.to, fails(s.expect_failure)),
            Step::Resolve(s) => format!("resolve {} → {}", s.name, s.expect),
            Step::LookupLatency(s) => {
                let mut label = format!("{} lookups of {}", s.count, s.name);
                if let Some(server) = &s.server {
                    label += &format!(" at {server}");
                }
                if s.on != Place::Laptop {
                    label += &format!(" on {}", s.on);
                }
                label
            }
            Step::AddPod(AddPod { name, node: None }) => format!("add pod {name}"),
            Step::AddPod(AddPod { name, node: Some(n) }) => format!("add pod {name} on {n}"),
            Step::PodSecurity(s) => format!("Pod Security admits {} first at {}", s.pod, s.lowest),
            Step::ClaimPod(s) => format!(
                "the API claims pod {} at {}",
                s.name,
                s.ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            ),
            Step::AddNode(_) => "add a node".into(),
            Step::RemoveNode(s) => format!("remove {}", s.name),
            Step::UseCluster(s) => format!("use cluster {}", s.name),
            Step::RemovePod(s) => format!("remove pod {}", s.name),
            Step::AddService(s) => format!("add service {} → {}", s.name, s.pod),
            Step::RemoveService(s) => format!("remove service {}", s.name),
            Step::AddServiceCidr(s) => format!("add ServiceCIDR {} {}", s.name, s.cidr),
            Step::Route(s) if s.present => format!("{}{} is routed into the tunnel", s.to, v6(s.ipv6)),
            Step::Route(s) => format!("{}{} is not routed into the tunnel", s.to, v6(s.ipv6)),
            Step::CompactApi(_) => "compact the API's history and restart it (410 Gone)".into(),
            Step::ClientRole(s) if s.without.is_empty() => "client role: all of rbac.yaml".into(),
            Step::ClientRole(s) => format!("client role: rbac.yaml without {}", s.without.join(", ")),
            Step::ConnectBack(s) => format!("{} connects to the laptop{}", s.from, v6(s.ipv6)),
            Step::LaptopUnchanged(_) => "laptop state unchanged".into(),
            Step::CrashClient(s) => format!("client stopped at {}, then {}", s.point, s.kill),
            Step::TeletunCleanup(_) => "teletun cleanup".into(),
            Step::Snapshot(s) => format!("snapshot of the laptop: {}", s.name),
            Step::Impair(s) => format!("impair the underlay: {}", s.profile),
            Step::Transfer(s) => format!("transfer {} MB ({})", s.bytes / 1_000_000, s.direction),
            Step::NoCorruption(_) => "no corrupted or spliced packets".into(),
            Step::KillClient(s) => format!("kill client {} with {}", s.name, s.signal),
            Step::Run(s) => {
                let one_line: String = s.command.escape_debug().collect();
                let cut: String = one_line.chars().take(60).collect();
                let more = if cut.len() < one_line.len() { "…" } else { "" };
                format!("on {}: {cut}{more}", s.on)
            }
            Step::LogContains(s) if s.absent => format!("{} log lacks {:?}", s.process, s.text),
            Step::LogContains(s) => format!("{} log has {:?}", s.process, s.text),
            Step::StartServer(s) => format!("start {}", s.role),
            Step::StopServer(s) => format!("stop {} with {}", s.role, s.signal),
            Step::ClientExits(s) => format!("client {} exits with {:?}", s.name, s.expect_error),
            Step::StartFlood(s) => format!(
                "flood from the {} at the {}: {} connects/s, {} datagrams/s{}",
                s.from,
                s.aim,
                s.connects_per_second,
                s.datagrams_per_second,
                match s.dtls_clients_per_second {
                    0 => String::new(),
                    n => format!(", {n} DTLS clients/s returning their cookies"),
                }
            ),
            Step::StopFlood(_) => "stop the flood; server-external lived through it".into(),
            Step::Throughput(s) => format!("throughput {} ({} s)", s.name, s.seconds),
            Step::Forge(s) => format!("{} forged packets {} are dropped", s.count, s.way),
            Step::PlantRecord(s) => format!("a planted takeover record ({}) is discarded", s.record),
            Step::ConnectLink(s) if s.intruder == LinkIntruder::Silent => {
                "server-external links up beside connections that never answer the link key's challenge".into()
            }
            Step::ConnectLink(s) if s.intruder == LinkIntruder::OtherPair => {
                "another pair's server-external on the node never links up with this pair's server-cluster".into()
            }
            Step::ConnectLink(s) => format!("an intruder ({}) on the AF_UNIX link gets nothing", s.intruder),
            Step::Counter(s) => format!("{} counts at least {} {}", s.process, s.at_least, s.counter),
            Step::ChangeAddress(ChangeAddress { host: Some(h) }) => {
                format!("the laptop's address changes to 192.168.1.{h}")
            }
            Step::ChangeAddress(_) => "the laptop's address changes".into(),
            Step::SwitchUplink(s) => format!("the laptop switches to its {} uplink", s.to),
            Step::NatRebind(_) => "the home NAT forgets and maps anew".into(),
            Step::Sleep(s) => format!("the laptop sleeps {} s (client {} frozen)", s.seconds, s.client),
            Step::StartProbe(s) => format!("start pinging {}{} (100/s)", s.to, v6(s.ipv6)),
            Step::StopProbe(StopProbe { max_gap_ms: Some(m) }) => format!("stop the probe; no gap over {m} ms"),
            Step::StopProbe(_) => "stop the probe; report its longest gap".into(),
            Step::StartTransfer(s) => format!(
                "start a transfer of {} MB ({}) in the background",
                s.bytes / 1_000_000,
                s.direction
            ),
            Step::FinishTransfer(_) => "the background transfer completes, SHA-256 equal".into(),
            Step::MtuBlackHole(s) => format!("an MTU black hole at {} bytes between the laptop and the nodes", s.mtu),
        }
    }

    /// Whether the step passes only when its check fails.
    pub fn expects_failure(&self) -> bool {
        match self {
            Step::Ping(s) => s.expect_failure,
            Step::TcpEcho(s) => s.expect_failure,
            Step::Http(s) => s.expect_failure,
            _ => false,
        }
    }

    /// Whether later steps make no sense when this one fails (a server or a
    /// client did not come up).
    pub fn is_setup(&self) -> bool {
        matches!(
            self,
            Step::StartServers(_) | Step::StartServer(_) | Step::StartClient(StartClient { expect_error: None, .. })
        )
    }
}
