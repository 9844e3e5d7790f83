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

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::pki;

/// The port the API listens on.
pub const API_PORT: u16 = 6443;
/// How many events are kept for watches; older resourceVersions get 410 Gone.
const EVENT_LOG: usize = 1000;
/// How often an idle watch gets a bookmark.
const BOOKMARK_EVERY: Duration = Duration::from_secs(5);

/// The kinds served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// core/v1 Node (cluster-scoped).
    Node,
    /// core/v1 Pod.
    Pod,
    /// core/v1 Service.
    Service,
    /// networking.k8s.io/v1 ServiceCIDR (cluster-scoped).
    ServiceCidr,
}

impl Kind {
    fn plural(self) -> &'static str {
        match self {
            Kind::Node => "nodes",
            Kind::Pod => "pods",
            Kind::Service => "services",
            Kind::ServiceCidr => "servicecidrs",
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            Kind::Node => "NodeList",
            Kind::Pod => "PodList",
            Kind::Service => "ServiceList",
            Kind::ServiceCidr => "ServiceCIDRList",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::ServiceCidr => "networking.k8s.io/v1",
            _ => "v1",
        }
    }

    fn object_kind(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::ServiceCidr => "ServiceCIDR",
        }
    }
}

/// One change, for watches.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    namespace: Option<String>,
    kind_of_event: &'static str,
    object: Value,
}

/// The objects and their history.
struct Store {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    log: VecDeque<Change>,
    forbidden: BTreeSet<String>,
    serve_service_cidrs: bool,
    token: String,
    changes: broadcast::Sender<Change>,
    /// 410 Gone answers sent, and list requests served, so far.
    gone_sent: u64,
    lists_served: u64,
}

impl Store {
    fn oldest_watchable(&self) -> u64 {
        self.log.front().map_or(self.rv, |c| c.rv - 1)
    }
}

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

struct Tls {
    ca_pem: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
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
                runtime.block_on(serve(address, tls, served, ready_tx, stop_rx));
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

fn record(s: &mut Store, kind: Kind, namespace: Option<String>, event: &'static str, object: Value) {
    let change = Change {
        rv: s.rv,
        kind,
        namespace,
        kind_of_event: event,
        object,
    };
    s.log.push_back(change.clone());
    while s.log.len() > EVENT_LOG {
        s.log.pop_front();
    }
    let _ = s.changes.send(change);
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

type Body = BoxBody<Bytes, Infallible>;

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .expect("static response parts are valid")
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}),
    )
}

async fn serve(
    address: SocketAddr,
    tls: Tls,
    store: Arc<Mutex<Store>>,
    ready: std::sync::mpsc::Sender<Result<()>>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let setup = || -> Result<(tokio::net::TcpListener, tokio_rustls::TlsAcceptor)> {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![tls.cert.clone().into()],
                rustls::pki_types::PrivatePkcs8KeyDer::from(tls.key.clone()).into(),
            )?;
        let std_listener =
            std::net::TcpListener::bind(address).with_context(|| format!("cannot listen on {address}"))?;
        std_listener.set_nonblocking(true)?;
        Ok((
            tokio::net::TcpListener::from_std(std_listener)?,
            tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        ))
    };
    let (listener, acceptor) = match setup() {
        Ok(x) => x,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    loop {
        let (tcp, _) = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let acceptor = acceptor.clone();
        let store = store.clone();
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else { return };
            let service = hyper::service::service_fn(move |req| {
                let store = store.clone();
                async move { Ok::<_, Infallible>(handle(req, &store)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// What a request asks for.
struct Query {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    watch: bool,
    resource_version: Option<u64>,
    timeout: Duration,
}

fn parse(path: &str, query: &str) -> Option<Query> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (kind, namespace, name) = match parts.as_slice() {
        ["api", "v1", plural] => (plural_kind(plural)?, None, None),
        ["api", "v1", plural, name] if *plural != "namespaces" => (plural_kind(plural)?, None, Some(*name)),
        ["api", "v1", "namespaces", ns, plural] => (plural_kind(plural)?, Some(*ns), None),
        ["api", "v1", "namespaces", ns, plural, name] => (plural_kind(plural)?, Some(*ns), Some(*name)),
        ["apis", "networking.k8s.io", "v1", "servicecidrs"] => (Kind::ServiceCidr, None, None),
        ["apis", "networking.k8s.io", "v1", "servicecidrs", name] => (Kind::ServiceCidr, None, Some(*name)),
        _ => return None,
    };
    if kind == Kind::ServiceCidr && parts[0] == "api" {
        return None;
    }
    let params: BTreeMap<&str, &str> = query.split('&').filter_map(|kv| kv.split_once('=')).collect();
    Some(Query {
        kind,
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
        watch: params.get("watch").is_some_and(|v| *v == "true" || *v == "1"),
        resource_version: params.get("resourceVersion").and_then(|v| v.parse().ok()),
        timeout: Duration::from_secs(params.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(300)),
    })
}

fn plural_kind(plural: &str) -> Option<Kind> {
    match plural {
        "nodes" => Some(Kind::Node),
        "pods" => Some(Kind::Pod),
        "services" => Some(Kind::Service),
        _ => None,
    }
}

fn handle(req: Request<hyper::body::Incoming>, store: &Arc<Mutex<Store>>) -> Response<Body> {
    let Ok(mut s) = store.lock() else {
        return status(500, "InternalError", "store poisoned");
    };
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {}", s.token));
    if !authorized {
        return status(401, "Unauthorized", "Unauthorized");
    }
    let path = req.uri().path().to_owned();
    if path == "/version" {
        return json_response(
            StatusCode::OK,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-testbench"}),
        );
    }
    let Some(q) = parse(&path, req.uri().query().unwrap_or("")) else {
        return status(
            404,
            "NotFound",
            &format!("the server could not find the requested resource ({path})"),
        );
    };
    if q.kind == Kind::ServiceCidr && !s.serve_service_cidrs {
        return status(404, "NotFound", "the server could not find the requested resource");
    }
    let resource = q.kind.plural();
    if s.forbidden.contains(resource) {
        let verb = match (q.watch, &q.name) {
            (true, _) => "watch",
            (false, Some(_)) => "get",
            (false, None) => "list",
        };
        let scope = q.namespace.as_ref().map_or_else(
            || "at the cluster scope".to_owned(),
            |ns| format!("in the namespace \"{ns}\""),
        );
        return status(
            403,
            "Forbidden",
            &format!("{resource} is forbidden: User \"teletun\" cannot {verb} resource \"{resource}\" in API group \"\" {scope}"),
        );
    }
    let matches = |kind: Kind, ns: &str| kind == q.kind && q.namespace.as_deref().is_none_or(|want| want == ns);
    if let Some(name) = &q.name {
        let key = (q.kind, q.namespace.clone().unwrap_or_default(), name.clone());
        return match s.objects.get(&key) {
            Some(o) => json_response(StatusCode::OK, o),
            None => status(404, "NotFound", &format!("{resource} \"{name}\" not found")),
        };
    }
    if !q.watch {
        s.lists_served += 1;
        let items: Vec<&Value> = s
            .objects
            .iter()
            .filter(|((k, ns, _), _)| matches(*k, ns))
            .map(|(_, v)| v)
            .collect();
        return json_response(
            StatusCode::OK,
            &json!({"kind": q.kind.list_kind(), "apiVersion": q.kind.api_version(),
                    "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
        );
    }
    // A watch: what happened after the given version, then whatever happens next.
    let since = q.resource_version.unwrap_or(s.rv);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(256);
    let line = |v: Value| Ok(Frame::data(Bytes::from(format!("{v}\n"))));
    if since < s.oldest_watchable() {
        s.gone_sent += 1;
        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": format!("too old resource version: {since}"), "reason": "Expired", "code": 410}});
        let _ = tx.try_send(line(gone));
        drop(tx);
    } else {
        let backlog: Vec<Change> = s.log.iter().filter(|c| c.rv > since).cloned().collect();
        let mut live = s.changes.subscribe();
        let (kind, namespace, timeout) = (q.kind, q.namespace.clone(), q.timeout);
        let mut last_rv = s.rv;
        tokio::spawn(async move {
            let wanted =
                |c: &Change| c.kind == kind && namespace.as_deref().is_none_or(|n| c.namespace.as_deref() == Some(n));
            let event = |c: &Change| json!({"type": c.kind_of_event, "object": c.object});
            for c in backlog.iter().filter(|c| wanted(c)) {
                if tx.send(line(event(c))).await.is_err() {
                    return;
                }
            }
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let next = tokio::time::timeout(BOOKMARK_EVERY, live.recv());
                let item = tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => return,
                    n = next => n,
                };
                let out = match item {
                    Ok(Ok(c)) => {
                        last_rv = c.rv;
                        if !wanted(&c) {
                            continue;
                        }
                        event(&c)
                    }
                    Ok(Err(_lagged_or_closed)) => return,
                    Err(_idle) => json!({"type": "BOOKMARK", "object": {"kind": kind.object_kind(),
                        "apiVersion": kind.api_version(), "metadata": {"resourceVersion": last_rv.to_string()}}}),
                };
                if tx.send(line(out)).await.is_err() {
                    return;
                }
            }
        });
    }
    let stream = tokio_stream_from(rx);
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed())
        .expect("static response parts are valid")
}

/// An mpsc receiver as a stream (without pulling in tokio-stream).
fn tokio_stream_from<T>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl futures_core::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_resources() {
        let q = parse("/api/v1/namespaces/default/pods/teletun", "").unwrap();
        assert_eq!(
            (q.kind, q.namespace.as_deref(), q.name.as_deref()),
            (Kind::Pod, Some("default"), Some("teletun"))
        );
        let q = parse("/api/v1/nodes", "watch=true&resourceVersion=17&timeoutSeconds=290").unwrap();
        assert_eq!(
            (q.kind, q.watch, q.resource_version, q.timeout),
            (Kind::Node, true, Some(17), Duration::from_secs(290))
        );
        assert_eq!(
            parse("/apis/networking.k8s.io/v1/servicecidrs", "").unwrap().kind,
            Kind::ServiceCidr
        );
        assert!(parse("/api/v1/secrets", "").is_none());
        assert!(parse("/api/v1/namespaces", "").is_none());
    }
}
