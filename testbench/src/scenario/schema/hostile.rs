//! Steps that play a hostile network or a hostile peer: floods from a
//! stranger, forged packets, a planted takeover record, an intruder on the
//! AF_UNIX link.

use schemars::JsonSchema;
use serde::Deserialize;

use crate::closed_set::closed_set;

closed_set! {
    /// Where a `start-flood` generator aims.
    pub enum FloodAim("aim") {
        /// server-external's control (TCP) and data (UDP) port.
        Server = "server",
        /// A port on the same node nobody listens on: the generator's own
        /// cost, for comparison.
        ClosedPort = "closed-port",
    }
}

closed_set! {
    /// Where a `start-flood` generator runs.
    pub enum FloodFrom("from") {
        /// The router: a stranger on the internet.
        Internet = "internet",
        /// The laptop's home router: a host behind the laptop's NAT, with the
        /// same public address as the laptop.
        Home = "home",
        /// The router, over IPv6 to the node, each connection from another
        /// address of one /64 (2001:db8:77::/64): a stranger walking a
        /// subscriber's whole prefix.
        InternetV6Prefix = "internet-v6-prefix",
    }
}

closed_set! {
    /// Which way a `forge` step sends packets with a forged address.
    pub enum ForgeWay("way") {
        /// From the laptop into the tunnel, with another pod's source address.
        ToCluster = "to-cluster",
        /// From the server side into the tunnel, to an address the client does not own.
        ToLaptop = "to-laptop",
    }
}

closed_set! {
    /// What a `plant-record` step leaves in server-cluster's state directory.
    pub enum PlantedRecord("record") {
        /// A well-formed record made in another network namespace (a replaced
        /// pod's), naming an IPv6 address that is not this pod's.
        OtherNamespace = "other-namespace",
        /// A record with a parameter server-cluster never writes.
        ForeignKey = "foreign-key",
        /// A record for this pod naming an interface that does not exist.
        MissingInterface = "missing-interface",
        /// A symbolic link to a file elsewhere, where the record goes.
        Symlink = "symlink",
    }
}

closed_set! {
    /// Who a `connect-link` step connects to server-cluster's AF_UNIX socket as.
    pub enum LinkIntruder("as") {
        /// An unprivileged process (uid 65534, nobody).
        Nobody = "nobody",
        /// A process of server-external's own uid, while server-external is connected.
        SameUid = "same-uid",
        /// Another pair's server-external (its own keys and link key) on the
        /// same node, while this pair's is stopped: refused on both ends.
        OtherPair = "other-pair",
        /// Processes of server-external's uid that connect and stay silent,
        /// while this pair's server-external is stopped: it links up all the same.
        Silent = "silent",
    }
}

/// Start a flood from a stranger on the internet side (the router): TCP
/// connects to server-external's port (half held idle, half sending a
/// replayed TLS ClientHello) and UDP datagrams at its data port (half
/// DTLS-handshake-shaped, half junk), and optionally real DTLS clients
/// that return the server's cookie and go silent. Runs until `stop-flood`; meanwhile
/// server-external's resident memory and open files are sampled.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartFlood {
    /// Where the generator aims.
    pub aim: FloodAim,
    /// Where it runs.
    #[serde(default = "internet")]
    pub from: FloodFrom,
    /// TCP connects per second.
    #[serde(default = "connects_per_second")]
    pub connects_per_second: u32,
    /// UDP datagrams per second.
    #[serde(default = "datagrams_per_second")]
    pub datagrams_per_second: u32,
    /// Real DTLS clients (OpenSSL) per second at the data port, each from a
    /// port of its own, that return the server's cookie and go silent.
    #[serde(default)]
    pub dtls_clients_per_second: u32,
}

fn internet() -> FloodFrom {
    FloodFrom::Internet
}
fn connects_per_second() -> u32 {
    5000
}
fn datagrams_per_second() -> u32 {
    20_000
}

/// Stop the flood; server-external must still run, and stay within the
/// limits given while the flood ran. Reports what the generator sent and
/// server-external's peak memory and open files.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StopFlood {
    /// server-external's resident memory must stay under this many MiB.
    pub max_rss_mib: Option<u64>,
    /// server-external's open files must stay under this many.
    pub max_fds: Option<u64>,
}

/// Measure TCP throughput from the laptop through the tunnel to the app pod
/// with iperf3 for `seconds`; the figure goes in the report, under `name`,
/// with its ratio to an earlier measurement. Nothing is asserted about the
/// figure: timings belong in reports, not in pass/fail.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Throughput {
    /// Name of this measurement.
    pub name: String,
    /// How long to measure.
    #[serde(default = "ten_seconds")]
    pub seconds: u64,
    /// An earlier measurement to compare with.
    pub compare_with: Option<String>,
}

fn ten_seconds() -> u64 {
    10
}

/// Send `count` UDP packets with a forged address into the tunnel; none may
/// arrive. `to-cluster`: from the laptop, with another pod's source address,
/// to the app pod (one honest packet goes last and must arrive).
/// `to-laptop`: from server-cluster's pod, to the laptop's LAN address
/// through the tunnel (a server reaching past the client's own addresses).
/// The receiving role counts them as spoofed (see `counter`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Forge {
    /// Which way.
    pub way: ForgeWay,
    /// How many forged packets.
    #[serde(default = "fifty")]
    pub count: u32,
}

fn fifty() -> u32 {
    50
}

/// With server-cluster stopped, leave a hostile or stale takeover record in
/// its state directory, start it, and check it discarded the record with a
/// warning, applied nothing of it (no planted address or parameter in the
/// pod; a symbolic link's target untouched) and took over as usual.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlantRecord {
    /// What to plant.
    pub record: PlantedRecord,
}

/// Connect to server-cluster's AF_UNIX socket while server-external is
/// linked; the intruder must get nothing (no greeting, no packets), and
/// server-external's link must live on. With `as = "other-pair"`, another
/// pair's server-external tries while this pair's is stopped: both ends
/// refuse, and this pair's links up again. With `as = "silent"`, three
/// connections that never answer the link key's challenge are held open
/// while this pair's server-external starts: it must link up while they are
/// held (10 s).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectLink {
    /// Who connects.
    #[serde(rename = "as")]
    pub intruder: LinkIntruder,
}

/// The last session summary in a process's log reports at least `at_least`
/// of `counter` (e.g. `spoofed`), summed over its directions.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Counter {
    /// Whose log: `client:NAME`, `server-cluster` or `server-external`.
    pub process: super::super::values::Process,
    /// The counter's word in the summary.
    pub counter: String,
    /// Its least value.
    pub at_least: u64,
}
