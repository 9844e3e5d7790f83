//! The HTTPS side: TLS, routing a request to get, list or watch, and the
//! Kubernetes-shaped answers (Status objects, lists, watch events, bookmarks).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

use super::store::{Change, Kind, Store};

/// How often an idle watch gets a bookmark.
const BOOKMARK_EVERY: Duration = Duration::from_secs(5);

/// The server's certificate and key, and the CA that signed it.
pub struct Tls {
    /// The CA certificate (PEM), for the kubeconfig.
    pub ca_pem: Vec<u8>,
    /// The server certificate (DER).
    pub cert: Vec<u8>,
    /// Its key (PKCS#8 DER).
    pub key: Vec<u8>,
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

/// Serves the API at `address` until `stop`; reports on `ready` once it listens.
pub async fn serve(
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
