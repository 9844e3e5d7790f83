//! Changes to the cluster while clients run: pods, services and nodes come and
//! go, the API loses its history, the client's role changes, and steps move
//! to another cluster.

use anyhow::{Context, Result};

use super::super::case::Case;
use super::super::schema::{
    AddPod, AddService, AddServiceCidr, ClaimPod, ClientRole, PodSecurity, RemoveNode, RemovePod, RemoveService,
    UseCluster,
};

/// `add-pod`.
pub fn add_pod(case: &mut Case, s: &AddPod) -> Result<()> {
    case.cluster_mut().add_app_pod(&s.name, s.node.as_deref())
}

/// `claim-pod`.
pub fn claim_pod(case: &mut Case, s: &ClaimPod) -> Result<()> {
    case.cluster().claim_pod(&s.name, &s.ips)
}

/// `remove-pod`.
pub fn remove_pod(case: &mut Case, s: &RemovePod) -> Result<()> {
    case.cluster_mut().remove_pod(&s.name)
}

/// `add-service`: reports the cluster IP it got.
pub fn add_service(case: &mut Case, s: &AddService) -> Result<()> {
    let cluster = case.cluster_mut();
    cluster.add_service(&s.name, &s.namespace, &s.pod, (s.port, s.target_port), s.cluster_ip)?;
    case.detail = Some(format!("cluster IP {}", case.cluster().service(&s.name)?.ip));
    Ok(())
}

/// `add-service-cidr`.
pub fn add_service_cidr(case: &mut Case, s: &AddServiceCidr) -> Result<()> {
    case.cluster().add_service_cidr(&s.name, &s.cidr)
}

/// `remove-service`.
pub fn remove_service(case: &mut Case, s: &RemoveService) -> Result<()> {
    case.cluster_mut().remove_service(&s.name)
}

/// `add-node`: reports the new node's name.
pub fn add_node(case: &mut Case) -> Result<()> {
    let name = case.cluster_mut().add_node()?;
    case.detail = Some(format!("added {name}"));
    Ok(())
}

/// `remove-node`.
pub fn remove_node(case: &mut Case, s: &RemoveNode) -> Result<()> {
    case.cluster_mut().remove_node(&s.name)
}

/// `use-cluster`: later steps act on that cluster.
pub fn use_cluster(case: &mut Case, s: &UseCluster) -> Result<()> {
    let i = case
        .clusters
        .iter()
        .position(|c| c.plan.name() == s.name)
        .with_context(|| format!("no cluster {:?}: [topology] clusters says how many", s.name))?;
    case.clusters.swap(0, i);
    Ok(())
}

/// `compact-api`: the client's watches get 410 Gone and it lists again.
pub fn compact_api(case: &mut Case) -> Result<()> {
    let n = case.cluster_mut().compact_api()?;
    case.detail = Some(format!("the client listed all {n} watched kinds again"));
    Ok(())
}

/// `client-role`.
pub fn client_role(case: &mut Case, s: &ClientRole) -> Result<()> {
    case.cluster().set_client_role(&s.without)
}

/// `pod-security`: the server pod's verdict, checked and reported.
pub fn pod_security(case: &mut Case, s: &PodSecurity) -> Result<()> {
    let verdicts = case.cluster().pod_security()?;
    let v = verdicts
        .iter()
        .find(|v| v.pod == s.pod)
        .with_context(|| format!("docs/deploy/teletun-servers.yaml has no pod {:?}", s.pod))?;
    let said = |(level, checks): &(&str, Vec<String>)| format!("{level} refuses {}", checks.join(", "));
    let report = std::iter::once(format!("first admitted at {}", v.lowest))
        .chain(v.refused.iter().rev().map(said))
        .collect::<Vec<_>>()
        .join("; ");
    if v.lowest != s.lowest {
        anyhow::bail!("expected first at {}: {report}", s.lowest);
    }
    let stricter = v.refused.last().map(|(_, checks)| checks.clone()).unwrap_or_default();
    let (mut want, mut got) = (s.stricter_refuses.clone(), stricter);
    want.sort();
    got.sort();
    if want != got {
        anyhow::bail!(
            "the level stricter than {} refuses {got:?}, not {want:?}: {report}",
            v.lowest
        );
    }
    case.detail = Some(report);
    Ok(())
}
