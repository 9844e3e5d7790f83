//! Changing this machine's network configuration: addresses, routes and policy
//! rules (rtnetlink), DNS registration (resolvconf with a local split-DNS
//! forwarder, or systemd-resolved), kernel parameters, and the
//! record of every change a client makes.

pub mod dns;
pub mod forwarder;
pub mod local;
pub mod netlink;
pub mod overlap;
pub mod record;
pub mod resolved;
pub mod routes;
pub mod takeover;
