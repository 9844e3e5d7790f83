//! Steps that send traffic through the tunnel and check routes.

use schemars::JsonSchema;
use serde::Deserialize;

use super::super::defaults;
use super::super::values::{Direction, Target};

/// ping from the laptop (3 packets).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Ping {
    /// What to ping.
    pub to: Target,
    /// Use the target's IPv6 address.
    #[serde(default)]
    pub ipv6: bool,
    /// Pass only if it fails.
    #[serde(default)]
    pub expect_failure: bool,
}

/// TCP echo from the laptop to a pod's echo port.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TcpEcho {
    /// The pod (or address).
    pub to: Target,
    /// Use IPv6.
    #[serde(default)]
    pub ipv6: bool,
    /// Pass only if it fails.
    #[serde(default)]
    pub expect_failure: bool,
}

/// UDP echo from the laptop to a pod's echo port.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UdpEcho {
    /// The pod (or address).
    pub to: Target,
    /// Use IPv6.
    #[serde(default)]
    pub ipv6: bool,
}

/// HTTP GET from the laptop; the answer must come from the right pod.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Http {
    /// A pod (port 8080) or `service:NAME` (its port).
    pub to: Target,
    /// Pass only if it fails.
    #[serde(default)]
    pub expect_failure: bool,
}

/// A pod connects to the server-cluster pod's IP; a listener on the laptop must get it.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectBack {
    /// The pod that connects.
    pub from: String,
    /// Use IPv6.
    #[serde(default)]
    pub ipv6: bool,
}

/// Move seeded bytes through the tunnel between the laptop and the app pod;
/// the SHA-256 must match. Reports the throughput.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Transfer {
    /// Which way.
    pub direction: Direction,
    /// How many bytes.
    pub bytes: u64,
    /// Seed of the content.
    #[serde(default = "defaults::seed_one")]
    pub seed: u64,
}

/// The laptop routes `to` into the tunnel (or, with `present = false`, no
/// longer does) within `within` seconds. Reports how long after the object's
/// last change it happened.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// A pod, `service:NAME`, `node:NAME` or an address.
    pub to: Target,
    /// Use the target's IPv6 address.
    #[serde(default)]
    pub ipv6: bool,
    /// Whether the route must exist.
    #[serde(default = "defaults::yes")]
    pub present: bool,
    /// Seconds to wait.
    #[serde(default = "defaults::two")]
    pub within: u64,
}
