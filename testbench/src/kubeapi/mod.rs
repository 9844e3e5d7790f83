//! A Kubernetes API server for the namespace cluster: HTTPS with its own CA and
//! a bearer token it checks, serving the Nodes, Pods, Services and ServiceCIDRs
//! that describe the cluster the testbench built, as real Kubernetes JSON
//! (k8s-openapi types), with get, list and watch (resourceVersions, bookmarks,
//! 410 Gone for a compacted version), so the unmodified `kube` client works
//! against it. Scenario steps change the objects while clients watch.
//!
//! It runs on a thread that has joined the node's network namespace, so the
//! laptop reaches it over the underlay at the node's address, like a real API
//! endpoint.

mod http;
mod store;

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde_json::json;
use tokio::sync::broadcast;

use crate::pki;
use http::Tls;
pub use store::Kind;
use store::{record, Store};

/// The port the API listens on.
pub const API_PORT: u16 = 6443;

/// A running API server; dropping it stops it.
pub struct ApiServer {
    store: Arc<Mutex<Store>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What is served and refused.
pub struct ApiOptions {
    /// Resources (plural names) answered with 403 Forbidden.
    pub forbidden: Vec<String>,
    /// Whether networking.k8s.io/v1 ServiceCIDRs are served (else 404, as an
    /// older cluster would).
    pub serve_service_cidrs: bool,
}

/// A CA and a server certificate for `ip`, signed by it.
fn make_tls(ip: IpAddr) -> Result<Tls> {
    let ca = pki::issue("testbench cluster CA", None, true, None)?;
    let server = pki::issue("kube-apiserver", Some(&ca), false, Some(ip))?;
    Ok(Tls {
        ca_pem: ca.cert.to_pem()?,
        cert: server.cert.to_der()?,
        key: server.key.private_key_to_pkcs8()?,
    })
}

impl ApiServer {
    /// Starts the server in network namespace `netns` (a `/run/netns` path),
    /// listening on `ip`. Writes a kubeconfig for it to `kubeconfig`.
    pub fn start(netns: &Path, ip: IpAddr, kubeconfig: &Path, options: ApiOptions) -> Result<ApiServer> {
        let tls = make_tls(ip)?;
        let mut token = [0u8; 16];
        openssl::rand::rand_bytes(&mut token)?;
        let token: String = token.iter().map(|b| format!("{b:02x}")).collect();
        let address = SocketAddr::new(ip, API_PORT);
        write_kubeconfig(kubeconfig, address, &tls.ca_pem, &token)?;
        let (changes, _) = broadcast::channel(4096);
        let store = Arc::new(Mutex::new(Store {
            rv: 1,
            objects: BTreeMap::new(),
            log: VecDeque::new(),
            forbidden: options.forbidden.into_iter().collect(),
            serve_service_cidrs: options.serve_service_cidrs,
            token,
            changes,
            gone_sent: 0,
            lists_served: 0,
        }));
        let ns_file = std::fs::File::open(netns).with_context(|| format!("cannot open {}", netns.display()))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let served = store.clone();
        let thread = std::thread::Builder::new()
            .name("kube-apiserver".into())
            .spawn(move || {
                // SAFETY: setns on this thread only, with a namespace file we hold open.
                let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns_file), libc::CLONE_NEWNET) };
                if r != 0 {
                    let _ = ready_tx.send(Err(anyhow!("setns: {}", std::io::Error::last_os_error())));
                    return;
                }
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                runtime.block_on(http::serve(address, tls, served, ready_tx, stop_rx));
            })?;
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| anyhow!("the API server did not start"))??;
        Ok(ApiServer {
            store,
            shutdown: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Creates or replaces an object (a k8s-openapi value) and tells watchers.
    pub fn put<T: serde::Serialize>(&self, kind: Kind, object: &T) -> Result<()> {
        let mut value = serde_json::to_value(object)?;
        let mut s = self.store.lock().map_err(|_| anyhow!("API store poisoned"))?;
        s.rv += 1;
        let rv = s.rv;
        let meta = &mut value["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        if meta["uid"].is_null() {
            meta["uid"] = json!(format!("uid-{rv}"));
        }
        let namespace = meta["namespace"].as_str().map(str::to_owned);
        let name = meta["name"].as_str().context("object without a name")?.to_owned();
        let key = (kind, namespace.clone().unwrap_or_default(), name);
        let event = if s.objects.insert(key, value.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        record(&mut s, kind, namespace, event, value);
        Ok(())
    }

    /// Deletes an object and tells watchers.
    pub fn delete(&self, kind: Kind, namespace: Option<&str>, name: &str) -> Result<()> {
        let mut s = self.store.lock().map_err(|_| anyhow!("API store poisoned"))?;
        let key = (kind, namespace.unwrap_or_default().to_owned(), name.to_owned());
        let mut value = s
            .objects
            .remove(&key)
            .with_context(|| format!("no {kind:?} {name} in the API"))?;
        s.rv += 1;
        value["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        record(&mut s, kind, namespace.map(str::to_owned), "DELETED", value);
        Ok(())
    }

    /// Forgets the event history, as etcd compaction would, and ends every open
    /// watch, as an API server restart would: clients watch again from the
    /// version they last saw, get 410 Gone, and must list again.
    pub fn compact(&self) {
        if let Ok(mut s) = self.store.lock() {
            s.log.clear();
            s.rv += 1;
            s.changes = broadcast::channel(4096).0;
        }
    }

    /// How many 410 Gone answers and list answers were sent so far.
    pub fn counters(&self) -> (u64, u64) {
        self.store
            .lock()
            .map(|s| (s.gone_sent, s.lists_served))
            .unwrap_or_default()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.shutdown.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_kubeconfig(path: &Path, address: SocketAddr, ca_pem: &[u8], token: &str) -> Result<()> {
    let ca = openssl::base64::encode_block(ca_pem);
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: testbench\n  cluster:\n    server: https://{address}\n    \
         certificate-authority-data: {ca}\nusers:\n- name: teletun\n  user:\n    token: {token}\ncontexts:\n- name: testbench\n  \
         context:\n    cluster: testbench\n    user: teletun\n    namespace: default\ncurrent-context: testbench\n"
    );
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}
