//! Changing this machine's network configuration: addresses, routes and policy
//! rules (rtnetlink), DNS registration (resolvconf), kernel parameters, and the
//! record of every change a client makes.

pub mod dns;
pub mod netlink;
pub mod overlap;
pub mod record;
pub mod resolved;
pub mod sysctl;
