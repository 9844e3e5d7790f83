//! The values steps take: closed sets of words (signals, roles, keys, …) and
//! the few structured strings (targets, places, processes), each parsed when
//! the file is loaded so that a typo is reported before anything is built.

use std::borrow::Cow;
use std::net::IpAddr;
use std::str::FromStr;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};

use crate::closed_set::closed_set;
pub use crate::cluster::{BrokenKubeconfig, KeyName};

closed_set! {
    /// How `stop-client` asks a client to stop: it must clean up and exit 0.
    pub enum StopSignal("signal") {
        /// As Ctrl-C does.
        Int = "SIGINT",
        /// As `kill` and service managers do.
        Term = "SIGTERM",
    }
}

closed_set! {
    /// How `stop-server` stops a server role.
    pub enum ServerSignal("signal") {
        /// As Ctrl-C does; it must exit 0.
        Int = "SIGINT",
        /// As `kill` and kubelet do; it must exit 0.
        Term = "SIGTERM",
        /// At once, without cleaning up.
        Kill = "SIGKILL",
    }
}

closed_set! {
    /// How `kill-client` and `crash-client` end a client.
    pub enum KillMode("kill mode") {
        /// As Ctrl-C does: the client cleans up and exits 0.
        Int = "SIGINT",
        /// As `kill` does: the client cleans up and exits 0.
        Term = "SIGTERM",
        /// The client alone, at once; its guard cleans up.
        Kill = "SIGKILL",
        /// The client's whole process group, at once.
        KillGroup = "SIGKILL-group",
    }
}

impl StopSignal {
    /// The signal number.
    pub fn number(self) -> libc::c_int {
        match self {
            StopSignal::Int => libc::SIGINT,
            StopSignal::Term => libc::SIGTERM,
        }
    }
}

impl ServerSignal {
    /// The signal number.
    pub fn number(self) -> libc::c_int {
        match self {
            ServerSignal::Int => libc::SIGINT,
            ServerSignal::Term => libc::SIGTERM,
            ServerSignal::Kill => libc::SIGKILL,
        }
    }
}

impl KillMode {
    /// The signal number and whether it goes to the whole process group.
    pub fn signal(self) -> (libc::c_int, bool) {
        match self {
            KillMode::Int => (libc::SIGINT, false),
            KillMode::Term => (libc::SIGTERM, false),
            KillMode::Kill => (libc::SIGKILL, false),
            KillMode::KillGroup => (libc::SIGKILL, true),
        }
    }
}

closed_set! {
    /// A teletun server role.
    pub enum Role("role") {
        /// In the pod the laptop replaces.
        ServerCluster = "server-cluster",
        /// On the node (hostNetwork), where the laptop dials.
        ServerExternal = "server-external",
    }
}

closed_set! {
    /// How `resolve` looks a name up on the laptop.
    pub enum LookupTool("lookup tool") {
        /// `getent ahostsv4` (or `ahostsv6` for `/ipv6`): getaddrinfo, the first address.
        Getent = "getent",
        /// `getent hosts`: gethostbyname2, as older programs resolve.
        GetentHosts = "getent-hosts",
    }
}

closed_set! {
    /// Which way a `transfer` moves its bytes.
    pub enum Direction("direction") {
        /// From the app pod to the laptop.
        Get = "get",
        /// From the laptop to the app pod.
        Put = "put",
    }
}

closed_set! {
    /// The laptop's uplinks (`switch-uplink`).
    pub enum Uplink("uplink") {
        /// `eth0` on the home LAN, as the laptop starts.
        First = "first",
        /// `eth1` on the home router's second subnet.
        Second = "second",
    }
}

closed_set! {
    /// A named point in the client where the testbench can stop it.
    pub enum CrashPoint("crash point") {
        /// The TUN device exists, nothing else.
        AfterTun = "after-tun",
        /// The pod's addresses are on the TUN.
        AfterAddresses = "after-addresses",
        /// The cluster's routes are in place.
        AfterRoutes = "after-routes",
        /// The split-DNS forwarder listens (with resolvconf), not yet registered.
        AfterForwarder = "after-forwarder",
        /// The cluster's DNS is registered.
        AfterDns = "after-dns",
        /// The tunnel carries traffic.
        MidTraffic = "mid-traffic",
        /// The client is undoing its changes after SIGTERM.
        MidTeardown = "mid-teardown",
    }
}

/// Whether `name` is a DNS label (what Kubernetes allows in pod, service and
/// namespace names).
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn label(kind: &str, name: &str) -> Result<String, String> {
    if is_dns_label(name) {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "{name:?} is not a {kind} name (lower-case letters, digits and '-', at most 63)"
        ))
    }
}

/// What a check aims at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A pod by name (its IPv4 address, or IPv6 with `ipv6 = true`).
    Pod(String),
    /// `service:NAME`: a service's cluster IP.
    Service(String),
    /// `node:NAME`: a node's address in its pod network (IPv4 or IPv6).
    Node(String),
    /// A literal address.
    Address(IpAddr),
}

impl FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(name) = s.strip_prefix("service:") {
            return label("service", name).map(Target::Service);
        }
        if let Some(name) = s.strip_prefix("node:") {
            return label("node", name).map(Target::Node);
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Target::Address(ip));
        }
        if is_dns_label(s) {
            return Ok(Target::Pod(s.to_owned()));
        }
        Err(format!(
            "unknown target {s:?}; the allowed values are POD, service:NAME, node:NAME or an IP address"
        ))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Pod(p) => f.write_str(p),
            Target::Service(s) => write!(f, "service:{s}"),
            Target::Node(n) => write!(f, "node:{n}"),
            Target::Address(a) => write!(f, "{a}"),
        }
    }
}

/// What `resolve` expects a name to resolve to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// `nothing`: no address at all.
    Nothing,
    /// The target's address (`POD`, `POD/ipv6`, `service:NAME`, or an address itself).
    Address {
        /// Whose address.
        target: Target,
        /// Its IPv6 address.
        ipv6: bool,
    },
}

impl FromStr for Answer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "nothing" {
            return Ok(Answer::Nothing);
        }
        let (target, ipv6) = match s.strip_suffix("/ipv6") {
            Some(t) => (t, true),
            None => (s, false),
        };
        match target.parse() {
            Ok(target @ (Target::Pod(_) | Target::Service(_))) => Ok(Answer::Address { target, ipv6 }),
            Ok(target @ Target::Address(_)) if !ipv6 => Ok(Answer::Address { target, ipv6: false }),
            _ => Err(format!(
                "unknown answer {s:?}; the allowed values are POD, POD/ipv6, service:NAME, an IP address or nothing"
            )),
        }
    }
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Nothing => f.write_str("nothing"),
            Answer::Address { target, ipv6: false } => write!(f, "{target}"),
            Answer::Address { target, ipv6: true } => write!(f, "{target}/ipv6"),
        }
    }
}

/// Where `run` runs its command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// The laptop (its network and mount namespaces).
    Laptop,
    /// node1, where server-external runs.
    Node,
    /// The router between the laptop and the nodes.
    Router,
    /// The laptop's home router (NAT, LAN resolver).
    Home,
    /// `pod:NAME`: a pod's network namespace.
    Pod(String),
}

impl FromStr for Place {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "laptop" => Ok(Place::Laptop),
            "node" => Ok(Place::Node),
            "router" => Ok(Place::Router),
            "home" => Ok(Place::Home),
            other => match other.strip_prefix("pod:") {
                Some(pod) => label("pod", pod).map(Place::Pod),
                None => Err(format!(
                    "unknown place {other:?}; the allowed values are laptop, node, router, home, pod:NAME"
                )),
            },
        }
    }
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Laptop => f.write_str("laptop"),
            Place::Node => f.write_str("node"),
            Place::Router => f.write_str("router"),
            Place::Home => f.write_str("home"),
            Place::Pod(p) => write!(f, "pod:{p}"),
        }
    }
}

/// A process whose log `log-contains` reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Process {
    /// A teletun server role.
    Server(Role),
    /// The cluster's DNS server.
    Dnsmasq,
    /// The home LAN's resolver.
    LanDns,
    /// The userspace impairer in the router.
    Impairer,
    /// `client:NAME`: a client started by `start-client` (also after it ended).
    Client(String),
}

impl Process {
    /// The background process's name in the cluster (not for clients).
    pub fn cluster_name(&self) -> &str {
        match self {
            Process::Server(r) => r.as_str(),
            Process::Dnsmasq => "dnsmasq",
            Process::LanDns => "lan-dns",
            Process::Impairer => "impairer",
            Process::Client(name) => name,
        }
    }
}

impl FromStr for Process {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(name) = s.strip_prefix("client:") {
            return Ok(Process::Client(name.to_owned()));
        }
        match s {
            "dnsmasq" => Ok(Process::Dnsmasq),
            "lan-dns" => Ok(Process::LanDns),
            "impairer" => Ok(Process::Impairer),
            other => other.parse().map(Process::Server).map_err(|_| {
                format!(
                    "unknown process {other:?}; the allowed values are server-external, server-cluster, dnsmasq, lan-dns, impairer, client:NAME"
                )
            }),
        }
    }
}

impl std::fmt::Display for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Process::Client(name) => write!(f, "client:{name}"),
            other => f.write_str(other.cluster_name()),
        }
    }
}

/// serde and JSON Schema for the structured strings above.
macro_rules! parsed_string {
    ($name:ident, $pattern:literal, $description:literal) => {
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                Cow::Borrowed(stringify!($name))
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({
                    "type": "string",
                    "description": $description,
                    "anyOf": [
                        { "pattern": $pattern },
                        crate::closed_set::placeholder_schema()
                    ]
                })
            }
        }
    };
}

parsed_string!(
    Target,
    r"^((service:|node:)?[a-z0-9]([-a-z0-9]*[a-z0-9])?|[0-9a-fA-F.:]+)$",
    "POD, service:NAME, node:NAME or an IP address"
);
parsed_string!(
    Answer,
    r"^(nothing|[a-z0-9]([-a-z0-9]*[a-z0-9])?(/ipv6)?|service:[a-z0-9]([-a-z0-9]*[a-z0-9])?|[0-9a-fA-F.:]+)$",
    "POD, POD/ipv6, service:NAME, an IP address or nothing"
);
parsed_string!(
    Place,
    r"^(laptop|node|router|home|pod:[a-z0-9]([-a-z0-9]*[a-z0-9])?)$",
    "laptop, node, router, home or pod:NAME"
);
parsed_string!(
    Process,
    r"^(server-external|server-cluster|dnsmasq|lan-dns|impairer|client:.+)$",
    "server-external, server-cluster, dnsmasq, lan-dns, impairer or client:NAME"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_answers_places_and_processes_parse() {
        assert_eq!("app".parse(), Ok(Target::Pod("app".into())));
        assert_eq!("service:web".parse(), Ok(Target::Service("web".into())));
        assert_eq!("node:node3".parse(), Ok(Target::Node("node3".into())));
        assert_eq!("10.1.2.3".parse(), Ok(Target::Address("10.1.2.3".parse().unwrap())));
        assert!("Serv ice".parse::<Target>().unwrap_err().contains("service:NAME"));
        assert_eq!(
            "app/ipv6".parse(),
            Ok(Answer::Address {
                target: Target::Pod("app".into()),
                ipv6: true
            })
        );
        assert_eq!("nothing".parse(), Ok(Answer::Nothing));
        assert!("node:node1".parse::<Answer>().is_err());
        assert_eq!("pod:app".parse(), Ok(Place::Pod("app".into())));
        assert!("moon"
            .parse::<Place>()
            .unwrap_err()
            .contains("laptop, node, router, home, pod:NAME"));
        assert_eq!("client:a".parse(), Ok(Process::Client("a".into())));
        assert_eq!("server-cluster".parse(), Ok(Process::Server(Role::ServerCluster)));
        for s in ["app", "service:web", "10.0.0.1", "node:node2"] {
            assert_eq!(s.parse::<Target>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn the_crash_points_are_the_clients() {
        assert_eq!(CrashPoint::WORDS, teletun::crashpoint::POINTS);
    }
}
