//! What each step does, one file per family: `connectivity`, `dns`,
//! `processes`, `changes` (to the cluster), `impairment`, `state` (of the
//! laptop), `hostile` (floods, forgeries), `link` (intruders on the AF_UNIX
//! link), `roaming` (the laptop's life: addresses, uplinks, NAT, sleep). [`perform`] sends each step kind to its function.

mod changes;
mod connectivity;
mod dns;
mod hostile;
mod impairment;
mod link;
mod processes;
mod roaming;
mod state;

use anyhow::Result;

use super::case::Case;
use super::schema::Step;

/// Runs one step against the case.
pub fn perform(case: &mut Case, step: &Step) -> Result<()> {
    match step {
        Step::StartServers(_) => case.cluster_mut().start_servers(),
        Step::StartServer(s) => processes::start_server(case, s),
        Step::StopServer(s) => processes::stop_server(case, s),
        Step::StartClient(s) => processes::start_client(case, s),
        Step::StopClient(s) => processes::stop_client(case, s),
        Step::ConnectInTurn(s) => processes::connect_in_turn(case, s),
        Step::Status(s) => processes::status(case, s),
        Step::ClientExits(s) => processes::client_exits(case, s),
        Step::KillClient(s) => processes::kill_client(case, s),
        Step::CrashClient(s) => processes::crash_client(case, s),
        Step::LogContains(s) => processes::log_contains(case, s),
        Step::Run(s) => processes::run(case, s),
        Step::Ping(s) => connectivity::ping(case, s),
        Step::TcpEcho(s) => connectivity::tcp_echo(case, s),
        Step::UdpEcho(s) => connectivity::udp_echo(case, s),
        Step::Http(s) => connectivity::http(case, s),
        Step::ConnectBack(s) => connectivity::connect_back(case, s),
        Step::Transfer(s) => connectivity::transfer(case, s),
        Step::Route(s) => connectivity::route(case, s),
        Step::Resolve(s) => dns::resolve(case, s),
        Step::LookupLatency(s) => dns::lookup_latency(case, s),
        Step::AddPod(s) => changes::add_pod(case, s),
        Step::ClaimPod(s) => changes::claim_pod(case, s),
        Step::RemovePod(s) => changes::remove_pod(case, s),
        Step::AddService(s) => changes::add_service(case, s),
        Step::RemoveService(s) => changes::remove_service(case, s),
        Step::AddServiceCidr(s) => changes::add_service_cidr(case, s),
        Step::AddNode(_) => changes::add_node(case),
        Step::RemoveNode(s) => changes::remove_node(case, s),
        Step::UseCluster(s) => changes::use_cluster(case, s),
        Step::CompactApi(_) => changes::compact_api(case),
        Step::ClientRole(s) => changes::client_role(case, s),
        Step::PodSecurity(s) => changes::pod_security(case, s),
        Step::Impair(s) => impairment::impair(case, s),
        Step::NoCorruption(_) => impairment::no_corruption(case),
        Step::LaptopUnchanged(s) => state::laptop_unchanged(case, s),
        Step::Snapshot(s) => state::snapshot(case, s),
        Step::TeletunCleanup(_) => state::teletun_cleanup(case),
        Step::StartFlood(s) => hostile::start_flood(case, s),
        Step::StopFlood(s) => hostile::stop_flood(case, s),
        Step::Throughput(s) => hostile::throughput(case, s),
        Step::Forge(s) => hostile::forge(case, s),
        Step::PlantRecord(s) => hostile::plant_record(case, s),
        Step::ConnectLink(s) => link::connect_link(case, s),
        Step::Counter(s) => hostile::counter(case, s),
        Step::ChangeAddress(s) => roaming::change_address(case, s),
        Step::SwitchUplink(s) => roaming::switch_uplink(case, s),
        Step::NatRebind(s) => roaming::nat_rebind(case, s),
        Step::Sleep(s) => roaming::sleep(case, s),
        Step::StartProbe(s) => roaming::start_probe(case, s),
        Step::StopProbe(s) => roaming::stop_probe(case, s),
        Step::StartTransfer(s) => roaming::start_transfer(case, s),
        Step::FinishTransfer(s) => roaming::finish_transfer(case, s),
        Step::MtuBlackHole(s) => roaming::mtu_black_hole(case, s),
    }
}
