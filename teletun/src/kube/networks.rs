//! The cluster's address ranges, kept live with watches: nodes' `podCIDRs`,
//! `ServiceCIDR` objects where the API serves them, and for whatever those do
//! not cover, every service cluster IP and — only where a node carries no
//! podCIDRs — every pod IP as a host route (the seed's "all cluster IPs").
//! Pods on the host network have node addresses, never routed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{anyhow, Result};
use futures::{Stream, StreamExt};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::api::{ListParams, WatchParams};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Resource, ResourceExt};
use tokio::sync::watch;
use tracing::{info, warn};

use super::Kube;

/// How long the first complete listing may take.
pub const FIRST_LIST_TIMEOUT: Duration = Duration::from_secs(15);

/// The networks one kind of object contributes, by object.
type ByObject = BTreeMap<String, Vec<IpNet>>;

/// Which kind an object is, and what it says about addresses.
trait Addresses: Resource + Clone + std::fmt::Debug + Send + Sync + serde::de::DeserializeOwned + 'static {
    const KIND: Kind;
    /// The networks (CIDRs) or host addresses (as /32, /128) it names.
    fn networks(&self) -> Vec<IpNet>;
}

/// The kinds watched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Node,
    ServiceCidr,
    Pod,
    Service,
}

fn parse_all<'a>(items: impl IntoIterator<Item = &'a String>) -> Vec<IpNet> {
    items
        .into_iter()
        .filter_map(|s| {
            s.parse::<IpNet>()
                .ok()
                .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
        })
        .map(|n| n.trunc())
        .collect()
}

impl Addresses for Node {
    const KIND: Kind = Kind::Node;
    fn networks(&self) -> Vec<IpNet> {
        let spec = self.spec.as_ref();
        let many = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
        let one = spec.and_then(|s| s.pod_cidr.clone());
        parse_all(many.iter().chain(one.iter()))
    }
}

impl Addresses for ServiceCIDR {
    const KIND: Kind = Kind::ServiceCidr;
    fn networks(&self) -> Vec<IpNet> {
        parse_all(self.spec.as_ref().and_then(|s| s.cidrs.as_ref()).into_iter().flatten())
    }
}

impl Addresses for Pod {
    const KIND: Kind = Kind::Pod;
    fn networks(&self) -> Vec<IpNet> {
        if self.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            return Vec::new();
        }
        let status = self.status.as_ref();
        let many: Vec<String> = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| ips.iter().map(|p| p.ip.clone()).collect())
            .unwrap_or_default();
        let one = status.and_then(|s| s.pod_ip.clone());
        parse_all(many.iter().chain(one.iter()))
    }
}

impl Addresses for Service {
    const KIND: Kind = Kind::Service;
    fn networks(&self) -> Vec<IpNet> {
        let spec = self.spec.as_ref();
        let many = spec.and_then(|s| s.cluster_ips.clone()).unwrap_or_default();
        let one = spec.and_then(|s| s.cluster_ip.clone());
        // Headless services have clusterIP "None".
        parse_all(many.iter().chain(one.iter()))
    }
}

/// Everything the watches have seen, per kind.
#[derive(Debug, Default)]
struct Inventory {
    kinds: BTreeMap<Kind, ByObject>,
    /// Objects of a kind being relisted, until the listing is complete.
    relisting: BTreeMap<Kind, ByObject>,
    listed: BTreeSet<Kind>,
}

/// What one watch event means for the inventory.
enum Update {
    Apply(String, Vec<IpNet>),
    Delete(String),
    Init,
    InitApply(String, Vec<IpNet>),
    InitDone,
}

/// One event, reduced to what matters here.
struct Change {
    kind: Kind,
    update: Update,
}

impl Change {
    fn of<K: Addresses>(event: Event<K>) -> Change {
        let key = |o: &K| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any());
        let update = match event {
            Event::Apply(o) => Update::Apply(key(&o), o.networks()),
            Event::Delete(o) => Update::Delete(key(&o)),
            Event::Init => Update::Init,
            Event::InitApply(o) => Update::InitApply(key(&o), o.networks()),
            Event::InitDone => Update::InitDone,
        };
        Change { kind: K::KIND, update }
    }
}

impl Inventory {
    fn apply(&mut self, change: Change) {
        let kind = change.kind;
        match change.update {
            Update::Apply(key, nets) => {
                self.kinds.entry(kind).or_default().insert(key, nets);
            }
            Update::Delete(key) => {
                self.kinds.entry(kind).or_default().remove(&key);
            }
            Update::Init => {
                self.relisting.insert(kind, ByObject::new());
            }
            Update::InitApply(key, nets) => {
                self.relisting.entry(kind).or_default().insert(key, nets);
            }
            Update::InitDone => {
                let fresh = self.relisting.remove(&kind).unwrap_or_default();
                self.kinds.insert(kind, fresh);
                self.listed.insert(kind);
            }
        }
    }

    /// The networks to route: every CIDR, plus host routes for addresses no
    /// CIDR covers.
    fn networks(&self) -> BTreeSet<IpNet> {
        let of = |k: Kind| {
            self.kinds
                .get(&k)
                .into_iter()
                .flat_map(|m| m.values().flatten().copied())
        };
        let cidrs: BTreeSet<IpNet> = of(Kind::Node).chain(of(Kind::ServiceCidr)).collect();
        let hosts = of(Kind::Pod)
            .chain(of(Kind::Service))
            .filter(|h| !cidrs.iter().any(|c| c.contains(h)));
        let mut all = cidrs.clone();
        all.extend(hosts);
        all
    }
}

/// Checks that we may list and watch `K` (for a clear error now rather than
/// endless retries later). `Ok(false)`: the API does not serve this kind, or
/// (for an optional kind) we may not read it.
async fn probe<K: Addresses>(kube: &Kube, resource: &str, optional: bool) -> Result<bool>
where
    K::DynamicType: Default,
{
    let api: Api<K> = Api::all(kube.client.clone());
    let denied = |verb: &str, e: kube::Error| match e {
        kube::Error::Api(s) if optional && s.code == 404 => Ok(false),
        kube::Error::Api(s) if optional && s.code == 403 => {
            warn!("may not {verb} {resource}: routing each service address instead");
            Ok(false)
        }
        e => Err(kube.explain(e, verb, resource, None)),
    };
    let listed = match api.list_metadata(&ListParams::default().limit(1)).await {
        Ok(list) => list,
        Err(e) => return denied("list", e),
    };
    // From the list's version, so no backlog is sent; the answer's headers say
    // whether we may, and the stream itself is dropped.
    let version = listed.metadata.resource_version.unwrap_or_else(|| "0".into());
    match api.watch_metadata(&WatchParams::default().timeout(1), &version).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if matches!(s.code, 401 | 403 | 404) => denied("watch", kube::Error::Api(s)),
        // Anything else (429 while a restarted API server fills its watch
        // cache, a dropped connection) is for the watcher's retries, not fatal.
        Err(e) => {
            warn!("a first watch of {resource} failed ({e}); the watcher will retry");
            Ok(true)
        }
    }
}

/// Whether pods must be watched: only where a node carries no podCIDRs is
/// each pod's address routed, which takes reading every namespace's pods
/// (their specs too: env values, args), a permission a user should not need
/// where the nodes say their networks. Said when it is so.
async fn pods_needed(kube: &Kube) -> Result<bool> {
    let nodes: Api<Node> = Api::all(kube.client.clone());
    let listed = nodes
        .list(&ListParams::default())
        .await
        .map_err(|e| kube.explain(e, "list", "nodes", None))?;
    let bare = nodes_without_pod_cidrs(&listed.items);
    if bare.is_empty() && !listed.items.is_empty() {
        return Ok(false);
    }
    info!(
        "{}: routing each pod's address, which needs list and watch of pods cluster-wide",
        if listed.items.is_empty() {
            "the cluster lists no nodes".to_owned()
        } else {
            format!(
                "{} of {} nodes carry no podCIDRs ({})",
                bare.len(),
                listed.items.len(),
                bare.join(", ")
            )
        }
    );
    Ok(true)
}

/// The names of the nodes whose spec names no pod network.
fn nodes_without_pod_cidrs(nodes: &[Node]) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| n.networks().is_empty())
        .map(|n| n.name_any())
        .collect()
}

fn stream_of<K>(kube: &Kube) -> impl Stream<Item = Result<Change, watcher::Error>> + Send + 'static
where
    K: Addresses,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::all(kube.client.clone());
    watcher::watcher(api, watcher::Config::default().any_semantic()).map(|r| r.map(Change::of))
}

/// Watches the cluster's networks. Returns once the first complete listing is
/// in; the receiver then always holds the current set, and the task keeps it
/// so until it is aborted.
pub async fn watch(kube: &Kube) -> Result<(watch::Receiver<BTreeSet<IpNet>>, tokio::task::JoinHandle<()>)> {
    probe::<Node>(kube, "nodes", false).await?;
    let with_pods = pods_needed(kube).await?;
    if with_pods {
        probe::<Pod>(kube, "pods", false).await?;
    }
    probe::<Service>(kube, "services", false).await?;
    let with_cidrs = probe::<ServiceCIDR>(kube, "servicecidrs.networking.k8s.io", true).await?;
    let mut streams = vec![stream_of::<Node>(kube).boxed(), stream_of::<Service>(kube).boxed()];
    let mut kinds = vec![Kind::Node, Kind::Service];
    if with_pods {
        streams.push(stream_of::<Pod>(kube).boxed());
        kinds.push(Kind::Pod);
    }
    if with_cidrs {
        streams.push(stream_of::<ServiceCIDR>(kube).boxed());
        kinds.push(Kind::ServiceCidr);
    }
    let mut events = futures::stream::select_all(streams);
    let (tx, rx) = watch::channel(BTreeSet::new());
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut inventory = Inventory::default();
        let mut ready = Some(ready_tx);
        let mut last_error = None;
        while let Some(item) = events.next().await {
            match item {
                Ok(change) => inventory.apply(change),
                Err(e) => {
                    let text = e.to_string();
                    if last_error.as_ref() != Some(&text) {
                        warn!("watching the cluster: {text} (retrying)");
                        last_error = Some(text);
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
            last_error = None;
            if kinds.iter().all(|k| inventory.listed.contains(k)) {
                tx.send_if_modified(|current| {
                    let now = inventory.networks();
                    let changed = *current != now;
                    *current = now;
                    changed
                });
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
            }
        }
    });
    match tokio::time::timeout(FIRST_LIST_TIMEOUT, ready_rx).await {
        Ok(Ok(())) => Ok((rx, task)),
        _ => {
            task.abort();
            Err(anyhow!(
                "the Kubernetes API at {} did not list the cluster's nodes, services and pods within {} s",
                kube.url,
                FIRST_LIST_TIMEOUT.as_secs()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSpec, PodIP, PodSpec, PodStatus, ServiceSpec};
    use kube::api::ObjectMeta;

    fn meta(name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            ..Default::default()
        }
    }

    fn pod(name: &str, ips: &[&str], host_network: bool) -> Pod {
        Pod {
            metadata: meta(name),
            spec: Some(PodSpec {
                host_network: Some(host_network),
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ips: Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect()),
                ..Default::default()
            }),
        }
    }

    fn node(name: &str, cidrs: &[&str]) -> Node {
        Node {
            metadata: meta(name),
            spec: Some(NodeSpec {
                pod_cidrs: Some(cidrs.iter().map(|c| c.to_string()).collect()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn service(name: &str, ip: &str) -> Service {
        Service {
            metadata: meta(name),
            spec: Some(ServiceSpec {
                cluster_ip: Some(ip.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn set(items: &[&str]) -> BTreeSet<IpNet> {
        items.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn cidrs_cover_host_addresses_and_host_network_pods_are_skipped() {
        let mut inv = Inventory::default();
        inv.apply(Change::of(Event::Apply(node(
            "n1",
            &["10.244.1.0/24", "fd00:10:244:1::/64"],
        ))));
        inv.apply(Change::of(Event::Apply(pod(
            "a",
            &["10.244.1.6", "fd00:10:244:1::6"],
            false,
        ))));
        inv.apply(Change::of(Event::Apply(pod("b", &["10.250.0.9"], false))));
        inv.apply(Change::of(Event::Apply(pod("ext", &["203.0.113.11"], true))));
        inv.apply(Change::of(Event::Apply(service("web", "10.96.0.20"))));
        inv.apply(Change::of(Event::Apply(service("headless", "None"))));
        assert_eq!(
            inv.networks(),
            set(&["10.244.1.0/24", "fd00:10:244:1::/64", "10.250.0.9/32", "10.96.0.20/32"])
        );
        inv.apply(Change::of(Event::Delete(pod("b", &["10.250.0.9"], false))));
        assert!(!inv.networks().contains(&"10.250.0.9/32".parse().unwrap()));
    }

    #[test]
    fn only_nodes_without_pod_cidrs_make_pods_needed() {
        let nodes = [node("a", &["10.244.1.0/24"]), node("b", &[]), node("c", &["junk"])];
        assert_eq!(nodes_without_pod_cidrs(&nodes), ["b", "c"]);
        assert!(nodes_without_pod_cidrs(&nodes[..1]).is_empty());
        let bare = Node {
            metadata: meta("d"),
            ..Default::default()
        };
        assert_eq!(nodes_without_pod_cidrs(&[bare]), ["d"]);
    }

    #[test]
    fn a_relist_replaces_what_was_known() {
        let mut inv = Inventory::default();
        inv.apply(Change::of(Event::Apply(service("old", "10.96.0.1"))));
        inv.apply(Change::of(Event::<Service>::Init));
        inv.apply(Change::of(Event::InitApply(service("new", "10.96.0.2"))));
        // Until the listing is done, the old view stands.
        assert_eq!(inv.networks(), set(&["10.96.0.1/32"]));
        inv.apply(Change::of(Event::<Service>::InitDone));
        assert_eq!(inv.networks(), set(&["10.96.0.2/32"]));
    }
}
