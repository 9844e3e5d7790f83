//! Steps that move the laptop around as its life does: a new address, another
//! uplink, a NAT that forgets, a sleep; and the probes that measure how long
//! traffic stopped.

use schemars::JsonSchema;
use serde::Deserialize;

use super::super::defaults;
use super::super::values::{Direction, Target, Uplink};

/// The laptop's address on its home LAN changes, as when DHCP hands out
/// another: the old address goes, then the new one and the default route come.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeAddress {
    /// The new address's last byte on 192.168.1.0/24 (default: the current one's plus one).
    pub host: Option<u8>,
}

/// The laptop moves to another uplink: `second` brings up `eth1` (another
/// subnet of the same home router, as Ethernet beside Wi-Fi) with the default
/// route, then takes `eth0` down; `first` brings `eth0` back with the default
/// route and unplugs `eth1`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SwitchUplink {
    /// Which uplink to use from now on.
    pub to: Uplink,
}

/// The home router's NAT forgets its mappings and maps anew from another port
/// range (conntrack flushed, masquerade moved): the server sees the client
/// from a new port. Reports the client's UDP mapping before and after.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NatRebind {}

/// The laptop sleeps: the client is frozen (SIGSTOP) and the laptop's network
/// silent (everything dropped both ways) for `seconds`; then both resume.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Sleep {
    /// How long.
    pub seconds: u64,
    /// Which client freezes.
    #[serde(default = "defaults::main_client")]
    pub client: String,
}

/// An MTU black hole between the laptop and the nodes: the router's links
/// carry packets of at most `mtu` bytes, and it says nothing about larger
/// ones (its ICMP "fragmentation needed" and "packet too big" are dropped).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MtuBlackHole {
    /// The largest IP packet that passes.
    pub mtu: u32,
}

/// Starts pinging `to` from the laptop 100 times a second, until `stop-probe`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartProbe {
    /// What to ping.
    pub to: Target,
    /// Use the target's IPv6 address.
    #[serde(default)]
    pub ipv6: bool,
}

/// Stops the probe and reports the longest time without a reply (and the
/// replies lost); with `max_gap_ms`, a longer gap fails the step.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StopProbe {
    /// The longest gap allowed, in milliseconds (a sanity bound: the gap
    /// itself is reported; timings are not asserted tightly).
    pub max_gap_ms: Option<u64>,
}

/// Starts moving seeded bytes through the tunnel between the laptop and the
/// app pod in the background; `finish-transfer` waits for it.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartTransfer {
    /// Which way.
    pub direction: Direction,
    /// How many bytes.
    pub bytes: u64,
    /// Seed of the content.
    #[serde(default = "defaults::seed_one")]
    pub seed: u64,
}

/// The background transfer completes within `within` seconds and the
/// SHA-256 of what arrived matches what was sent.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FinishTransfer {
    /// Seconds to wait.
    #[serde(default = "defaults::sixty")]
    pub within: u64,
}
