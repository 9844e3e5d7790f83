//! The TeleTUN testbench as a library: the `testbench` binary's rooms, also
//! reachable by the fuzz targets (`fuzz/`, the scenario-file parser).

pub mod agent;
pub mod bench;
pub mod cache;
pub mod chart;
pub mod closed_set;
pub mod cluster;
pub mod controlplane;
pub mod exec;
pub mod hostile;
pub mod impair;
pub mod kind;
pub mod laptop;
pub mod netlink;
pub mod netns;
pub mod peers;
pub mod pki;
pub mod report;
pub mod scenario;
pub mod topology;

#[cfg(test)]
mod house;
