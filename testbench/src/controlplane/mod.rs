//! A real Kubernetes control plane for a namespace cluster: etcd and
//! kube-apiserver, built from their published Go modules (`build`), run in the
//! control-plane node's network namespace with their own CA, serving
//! certificate, ServiceAccount issuer, RBAC and the cluster's service network.
//! The testbench plays kubelet and controllers through [`ControlPlane`]: it
//! registers nodes, creates pods and writes their status, creates services and
//! takes the cluster IPs the API allocates, and sets the client's RBAC role
//! (`rbac`).

mod admin;
pub mod build;
pub mod podsecurity;
pub mod rbac;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use crate::exec::{last_lines, Background};
use crate::netns::Netns;
use crate::pki;
use admin::{Admin, Reply, Request, Target};

/// The client's ServiceAccount's user name in the API (in the audit log, in
/// RBAC answers).
pub const CLIENT_USER: &str = "system:serviceaccount:default:teletun-client";
/// The port the API listens on.
pub const API_PORT: u16 = 6443;
/// etcd's client URL, on the node's loopback.
const ETCD_URL: &str = "http://127.0.0.1:2379";

/// How the API is configured.
pub struct Options {
    /// The service network (`--service-cluster-ip-range`).
    pub service_cidr: ipnet::IpNet,
    /// Serve networking.k8s.io/v1 ServiceCIDRs. Without, the API server
    /// emulates 1.33 with the MultiCIDRServiceAllocator off and the resource
    /// disabled: a cluster that allocates from the flag's range alone, as
    /// before ServiceCIDRs (1.34 cannot allocate without them).
    pub serve_service_cidrs: bool,
}

/// A running etcd and kube-apiserver; dropping it stops them.
pub struct ControlPlane {
    ns: Netns,
    ip: IpAddr,
    dir: PathBuf,
    apiserver_binary: PathBuf,
    options: Options,
    apiserver: Option<Background>,
    restarts: u32,
    admin: Admin,
    /// The CA that signed the serving certificate (PEM), for kubeconfigs.
    ca_pem: Vec<u8>,
    /// kube-apiserver's `gitVersion` (from `/version`).
    pub version: String,
    etcd: Background,
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

fn random_hex() -> Result<String> {
    let mut bytes = [0u8; 16];
    openssl::rand::rand_bytes(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A kubeconfig for the API at `server` with a bearer token.
pub fn kubeconfig_text(server: &str, ca_pem: &[u8], user: &str, token: &str) -> String {
    let ca = openssl::base64::encode_block(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: testbench\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: testbench\n  \
         context:\n    cluster: testbench\n    user: {user}\n    namespace: default\ncurrent-context: testbench\n"
    )
}

/// The API path of an object of kind `K`.
fn path_of<K: k8s_openapi::Resource>(namespace: Option<&str>, name: &str) -> String {
    let base = if K::GROUP.is_empty() {
        format!("/api/{}", K::VERSION)
    } else {
        format!("/apis/{}/{}", K::GROUP, K::VERSION)
    };
    match namespace {
        Some(ns) => format!("{base}/namespaces/{ns}/{}/{name}", K::URL_PATH_SEGMENT),
        None => format!("{base}/{}/{name}", K::URL_PATH_SEGMENT),
    }
}

/// The `message` of a Kubernetes Status answer, or the body.
fn message_of(reply: &Reply) -> String {
    serde_json::from_str::<Value>(&reply.body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| reply.body.chars().take(300).collect())
}

impl ControlPlane {
    /// Builds (once) and starts etcd and kube-apiserver in `ns`, the API
    /// listening on `ip`; files and logs go to `dir`. Returns once the API is
    /// ready and the ServiceAccounts pods need exist.
    pub fn start(ns: &Netns, ip: IpAddr, dir: &Path, options: Options) -> Result<ControlPlane> {
        let binaries = build::binaries()?;
        let pki_dir = dir.join("control-plane");
        std::fs::create_dir_all(&pki_dir).with_context(|| format!("cannot create {}", pki_dir.display()))?;
        // The `kubernetes` service's address: the first of the service network.
        let first_service_ip = options
            .service_cidr
            .hosts()
            .next()
            .context("an empty service network")?;
        let ca = pki::issue("testbench cluster CA", None, true, &[])?;
        let serving = pki::issue(
            "kube-apiserver",
            Some(&ca),
            false,
            &[ip, IpAddr::V4(Ipv4Addr::LOCALHOST), first_service_ip],
        )?;
        let ca_pem = ca.cert.to_pem()?;
        write(&pki_dir.join("ca.crt"), &ca_pem)?;
        write(&pki_dir.join("apiserver.crt"), &serving.cert.to_pem()?)?;
        write(&pki_dir.join("apiserver.key"), &serving.key.private_key_to_pem_pkcs8()?)?;
        // The ServiceAccount issuer's signing key.
        let issuer = pki::issue("service-account-issuer", None, false, &[])?;
        write(&pki_dir.join("sa.key"), &issuer.key.private_key_to_pem_pkcs8()?)?;
        write(&pki_dir.join("sa.pub"), &issuer.key.public_key_to_pem()?)?;
        let admin_token = random_hex()?;
        write(
            &pki_dir.join("tokens.csv"),
            format!("{admin_token},testbench-admin,testbench-admin,\"system:masters\"\n").as_bytes(),
        )?;
        // What the client does, request by request (its verbs and answers), for checks.
        write(
            &pki_dir.join("audit-policy.yaml"),
            format!(
                "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived, ResponseStarted]\nrules:\n\
                 - level: Metadata\n  users: [\"{CLIENT_USER}\"]\n- level: None\n"
            )
            .as_bytes(),
        )?;

        let mut etcd_cmd = ns.cmd(&binaries.etcd);
        etcd_cmd
            .arg("--name=controlplane")
            .arg(format!("--data-dir={}", pki_dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={ETCD_URL}"))
            .arg(format!("--advertise-client-urls={ETCD_URL}"))
            .arg("--listen-peer-urls=http://127.0.0.1:2380")
            .arg("--initial-advertise-peer-urls=http://127.0.0.1:2380")
            .arg("--initial-cluster=controlplane=http://127.0.0.1:2380")
            // A throwaway store on a shared disk: parallel clusters need not wait for fsync.
            .arg("--unsafe-no-fsync");
        let mut etcd = Background::spawn("etcd", etcd_cmd, &dir.join("etcd.log"))?;
        etcd.wait_for_log("ready to serve client requests", Duration::from_secs(30))?;

        let admin_kubeconfig = kubeconfig_text(
            &format!("https://{}", std::net::SocketAddr::new(ip, API_PORT)),
            &ca_pem,
            "testbench-admin",
            &admin_token,
        );
        write(&pki_dir.join("admin.kubeconfig"), admin_kubeconfig.as_bytes())?;
        let admin = Admin::start(&ns.path(), &admin_kubeconfig, ETCD_URL)?;
        let mut cp = ControlPlane {
            ns: ns.clone(),
            ip,
            dir: dir.to_owned(),
            apiserver_binary: binaries.apiserver,
            options,
            apiserver: None,
            restarts: 0,
            admin,
            ca_pem,
            version: String::new(),
            etcd,
        };
        cp.start_apiserver()?;
        let version: Value = serde_json::from_str(&cp.expect("GET", "/version", &[], 200)?.body)?;
        cp.version = version["gitVersion"].as_str().unwrap_or("unknown").to_owned();
        // The ServiceAccount controller's part: pods cannot be created without
        // these. The API makes their namespaces just after it is ready.
        for ns in ["default", "kube-system"] {
            let deadline = Instant::now() + Duration::from_secs(20);
            while cp.get(&format!("/api/v1/namespaces/{ns}"))?.status != 200 {
                if Instant::now() > deadline {
                    bail!("the API did not create namespace {ns} within 20 s");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            cp.post(
                &format!("/api/v1/namespaces/{ns}/serviceaccounts"),
                &json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}),
            )?;
        }
        Ok(cp)
    }

    /// Starts kube-apiserver and waits until `/readyz` says ok.
    fn start_apiserver(&mut self) -> Result<()> {
        let d = self.dir.join("control-plane");
        let f = |name: &str| d.join(name).display().to_string();
        let mut c = self.ns.cmd(&self.apiserver_binary);
        c.arg(format!("--advertise-address={}", self.ip))
            .arg(format!("--bind-address={}", self.ip))
            .arg(format!("--secure-port={API_PORT}"))
            .arg(format!("--etcd-servers={ETCD_URL}"))
            .arg(format!("--tls-cert-file={}", f("apiserver.crt")))
            .arg(format!("--tls-private-key-file={}", f("apiserver.key")))
            .arg(format!("--client-ca-file={}", f("ca.crt")))
            .arg(format!("--token-auth-file={}", f("tokens.csv")))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!("--service-account-key-file={}", f("sa.pub")))
            .arg(format!("--service-account-signing-key-file={}", f("sa.key")))
            .arg("--authorization-mode=RBAC")
            // As kubeadm and kind run it: privileged pods exist where admission lets them.
            .arg("--allow-privileged=true")
            .arg(format!("--service-cluster-ip-range={}", self.options.service_cidr))
            .arg(format!("--audit-policy-file={}", f("audit-policy.yaml")))
            .arg(format!("--audit-log-path={}", f("audit.log")))
            .arg(format!("--cert-dir={}", d.display()))
            .arg("--profiling=false");
        if !self.options.serve_service_cidrs {
            c.arg("--emulated-version=1.33")
                .arg("--feature-gates=MultiCIDRServiceAllocator=false")
                .arg("--runtime-config=networking.k8s.io/v1/servicecidrs=false,networking.k8s.io/v1/ipaddresses=false");
        }
        let log = match self.restarts {
            0 => self.dir.join("kube-apiserver.log"),
            n => self.dir.join(format!("kube-apiserver.{n}.log")),
        };
        self.apiserver = Some(Background::spawn("kube-apiserver", c, &log)?);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let last = match self.get("/readyz") {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => format!("/readyz answered {}: {}", r.status, last_lines(&r.body, 3)),
                Err(e) => format!("{e:#}"),
            };
            let p = self.apiserver.as_mut().expect("just started");
            if let Ok(Some(status)) = p.child.try_wait() {
                bail!("kube-apiserver exited ({status}): {}", last_lines(&p.log_text(), 5));
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver was not ready within 90 s ({last}): {}",
                    last_lines(&p.log_text(), 5)
                );
            }
            crate::exec::check_interrupted()?;
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn request(
        &self,
        target: Target,
        method: &str,
        path: &str,
        content_type: &'static str,
        body: Vec<u8>,
    ) -> Result<Reply> {
        self.admin.send(Request {
            target,
            method: method.parse()?,
            path: path.to_owned(),
            content_type,
            body,
        })
    }

    fn get(&self, path: &str) -> Result<Reply> {
        self.request(Target::Api, "GET", path, "", Vec::new())
    }

    /// A request to the API that must answer `want`; else one clear error.
    fn expect(&self, method: &str, path: &str, body: &[u8], want: u16) -> Result<Reply> {
        let reply = self.request(Target::Api, method, path, "application/json", body.to_vec())?;
        if reply.status != want {
            bail!(
                "the API answered {method} {path} with {}: {}",
                reply.status,
                message_of(&reply)
            );
        }
        Ok(reply)
    }

    fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let reply = self.expect("POST", path, body.to_string().as_bytes(), 201)?;
        Ok(serde_json::from_str(&reply.body)?)
    }

    /// Server-side apply (the testbench's fields, forced) of the JSON `body`
    /// at `path`: creates or updates; returns the object as stored.
    fn apply_json(&self, path: &str, body: Vec<u8>) -> Result<Reply> {
        let target = format!("{path}?fieldManager=testbench&force=true");
        let reply = self.request(Target::Api, "PATCH", &target, "application/apply-patch+yaml", body)?;
        // 201 when it created the object.
        if !matches!(reply.status, 200 | 201) {
            bail!(
                "the API refused to apply {path} ({}): {}",
                reply.status,
                message_of(&reply)
            );
        }
        Ok(reply)
    }

    /// Server-side apply of a typed `object` at its path plus `suffix`.
    fn apply_at<K>(&self, object: &K, suffix: &str) -> Result<K>
    where
        K: k8s_openapi::Resource + k8s_openapi::Metadata<Ty = ObjectMeta> + Serialize + DeserializeOwned,
    {
        let meta = object.metadata();
        let name = meta.name.as_deref().context("object without a name")?;
        let path = format!("{}{suffix}", path_of::<K>(meta.namespace.as_deref(), name));
        let reply = self.apply_json(&path, serde_json::to_vec(object)?)?;
        serde_json::from_str(&reply.body).with_context(|| format!("cannot read the applied {path}"))
    }

    /// Creates or updates `object` (server-side apply); returns it as stored.
    pub fn apply<K>(&self, object: &K) -> Result<K>
    where
        K: k8s_openapi::Resource + k8s_openapi::Metadata<Ty = ObjectMeta> + Serialize + DeserializeOwned,
    {
        self.apply_at(object, "")
    }

    /// Writes `object`'s status through the status subresource, as a kubelet
    /// does for pods.
    pub fn apply_status<K>(&self, object: &K) -> Result<K>
    where
        K: k8s_openapi::Resource + k8s_openapi::Metadata<Ty = ObjectMeta> + Serialize + DeserializeOwned,
    {
        self.apply_at(object, "/status")
    }

    /// Deletes an object at once (grace period 0, as a kubelet confirms a
    /// pod's end; no kubelet runs here to do it).
    pub fn delete<K: k8s_openapi::Resource>(&self, namespace: Option<&str>, name: &str) -> Result<()> {
        let path = path_of::<K>(namespace, name);
        let body = json!({"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0});
        let reply = self.request(
            Target::Api,
            "DELETE",
            &path,
            "application/json",
            body.to_string().into_bytes(),
        )?;
        if !matches!(reply.status, 200 | 202) {
            bail!(
                "the API refused to delete {path} ({}): {}",
                reply.status,
                message_of(&reply)
            );
        }
        Ok(())
    }

    /// The API's URL, as the laptop reaches it.
    pub fn url(&self) -> String {
        format!("https://{}", std::net::SocketAddr::new(self.ip, API_PORT))
    }

    /// Kills kube-apiserver (as a crash), moves etcd's revision on with a
    /// write, compacts etcd to it and starts kube-apiserver again: a client
    /// watching from the version it last saw must get 410 Gone and list again.
    /// Checks that etcd refuses the old revision and that the new server
    /// answers a watch from the old version with 410 Gone. Returns the audit
    /// log's length before the restart.
    pub fn compact_and_restart(&mut self) -> Result<usize> {
        let before: Value = serde_json::from_str(&self.expect("GET", "/api/v1/pods?limit=1", &[], 200)?.body)?;
        let old_version = before["metadata"]["resourceVersion"]
            .as_str()
            .context("a list without a resourceVersion")?
            .to_owned();
        let audit_lines = self.audit_events()?.len();
        // Killed, as a crash would: a graceful stop waits for open watches to drain.
        if let Some(mut p) = self.apiserver.take() {
            p.kill();
        }
        let b64 = |s: &str| openssl::base64::encode_block(s.as_bytes());
        let etcd = |path: &str, body: Value| -> Result<Value> {
            let r = self.request(
                Target::Etcd,
                "POST",
                path,
                "application/json",
                body.to_string().into_bytes(),
            )?;
            if r.status != 200 {
                bail!("etcd answered {path} with {}: {}", r.status, r.body);
            }
            Ok(serde_json::from_str(&r.body)?)
        };
        let put = etcd(
            "/v3/kv/put",
            json!({"key": b64("/testbench/compaction"), "value": b64(&self.restarts.to_string())}),
        )?;
        let revision = put["header"]["revision"]
            .as_str()
            .context("etcd put without a revision")?
            .to_owned();
        etcd("/v3/kv/compaction", json!({"revision": revision, "physical": true}))?;
        // The old version is an etcd revision: etcd must refuse to read at it now.
        let old = self.request(
            Target::Etcd,
            "POST",
            "/v3/kv/range",
            "application/json",
            json!({"key": b64("/registry/"), "revision": old_version})
                .to_string()
                .into_bytes(),
        )?;
        if !old.body.contains("compacted") {
            bail!(
                "etcd still reads revision {old_version} after compacting to {revision}: {}",
                old.body
            );
        }
        self.restarts += 1;
        self.start_apiserver()?;
        let watch = self.get(&format!(
            "/api/v1/pods?watch=1&resourceVersion={old_version}&timeoutSeconds=1"
        ))?;
        let expired = watch.status == 410 || watch.body.contains("\"code\":410");
        if !expired {
            bail!(
                "after the restart, a watch from version {old_version} (compacted away at {revision}) was not answered 410 Gone ({}: {})",
                watch.status,
                last_lines(&watch.body, 2)
            );
        }
        Ok(audit_lines)
    }

    /// What the client asked the API so far, from the audit log: (verb,
    /// resource, HTTP status) per complete line (a line being written is
    /// left for the next call; an unreadable one counts, empty).
    pub fn audit_events(&self) -> Result<Vec<(String, String, u16)>> {
        let path = self.dir.join("control-plane/audit.log");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let complete = text.split_inclusive('\n').filter(|l| l.ends_with('\n'));
        Ok(complete
            .map(|line| {
                let event: Value = serde_json::from_str(line).unwrap_or_default();
                (
                    event["verb"].as_str().unwrap_or_default().to_owned(),
                    event["objectRef"]["resource"].as_str().unwrap_or_default().to_owned(),
                    event["responseStatus"]["code"].as_u64().unwrap_or_default() as u16,
                )
            })
            .collect())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // A throwaway control plane: nothing to drain or keep.
        if let Some(p) = self.apiserver.as_mut() {
            p.kill();
        }
        self.etcd.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Node, Pod};
    use k8s_openapi::api::networking::v1::ServiceCIDR;

    #[test]
    fn objects_have_their_api_paths() {
        assert_eq!(
            path_of::<Pod>(Some("default"), "app"),
            "/api/v1/namespaces/default/pods/app"
        );
        assert_eq!(path_of::<Node>(None, "node1"), "/api/v1/nodes/node1");
        assert_eq!(
            path_of::<ServiceCIDR>(None, "kubernetes"),
            "/apis/networking.k8s.io/v1/servicecidrs/kubernetes"
        );
    }
}
