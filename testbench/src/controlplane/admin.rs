//! The testbench's own connection to the control plane: a thread inside the
//! control-plane node's network namespace (the API and etcd are reachable only
//! there) running the `kube` client, which steps on any thread hand requests.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use http_body_util::BodyExt;
use tokio::sync::{mpsc, oneshot};

/// Where a request goes.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// kube-apiserver, as the testbench's cluster-admin.
    Api,
    /// etcd's JSON gateway (plain HTTP on the node's loopback).
    Etcd,
}

/// One HTTP request.
pub struct Request {
    /// To whom.
    pub target: Target,
    /// GET, POST, PATCH, DELETE.
    pub method: http::Method,
    /// Path and query.
    pub path: String,
    /// The body's content type (ignored without a body).
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
}

/// An answer: status code and body.
pub struct Reply {
    /// The HTTP status.
    pub status: u16,
    /// The body (JSON).
    pub body: String,
}

type Job = (Request, oneshot::Sender<Result<Reply>>);

/// The client thread; dropping it ends the thread.
pub struct Admin {
    jobs: Option<mpsc::UnboundedSender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl Admin {
    /// Starts the thread in network namespace `netns` (a `/run/netns` path),
    /// talking to the API with `kubeconfig` and to etcd at `etcd_url`.
    pub fn start(netns: &Path, kubeconfig: &str, etcd_url: &str) -> Result<Admin> {
        let ns_file = std::fs::File::open(netns).with_context(|| format!("cannot open {}", netns.display()))?;
        let kubeconfig = kube::config::Kubeconfig::from_yaml(kubeconfig).context("bad admin kubeconfig")?;
        let etcd_url: http::Uri = etcd_url.parse().context("bad etcd URL")?;
        let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread = std::thread::Builder::new()
            .name("control-plane admin".into())
            .spawn(move || {
                // SAFETY: setns on this thread only, with a namespace file we hold open.
                if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns_file), libc::CLONE_NEWNET) } != 0 {
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
                runtime.block_on(async move {
                    let clients = async {
                        let options = kube::config::KubeConfigOptions::default();
                        let api = kube::Config::from_custom_kubeconfig(kubeconfig, &options).await?;
                        let api = kube::Client::try_from(api)?;
                        let etcd = kube::Client::try_from(kube::Config::new(etcd_url))?;
                        Ok::<_, anyhow::Error>((api, etcd))
                    };
                    let (api, etcd) = match clients.await {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    while let Some((request, reply)) = rx.recv().await {
                        let client = match request.target {
                            Target::Api => &api,
                            Target::Etcd => &etcd,
                        };
                        let answer = tokio::time::timeout(REQUEST_TIMEOUT, send(client, request))
                            .await
                            .unwrap_or_else(|_| Err(anyhow!("no answer within {REQUEST_TIMEOUT:?}")));
                        let _ = reply.send(answer);
                    }
                });
            })?;
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| anyhow!("the control plane's admin client did not start"))??;
        Ok(Admin {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Sends `request` and waits for the answer (any status).
    pub fn send(&self, request: Request) -> Result<Reply> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .as_ref()
            .context("admin client stopped")?
            .send((request, tx))
            .map_err(|_| anyhow!("the admin client's thread ended"))?;
        rx.blocking_recv()
            .map_err(|_| anyhow!("the admin client's thread ended"))?
    }
}

async fn send(client: &kube::Client, r: Request) -> Result<Reply> {
    let what = format!("{} {}", r.method, r.path);
    let mut builder = http::Request::builder().method(r.method).uri(&r.path);
    if !r.body.is_empty() {
        builder = builder.header(http::header::CONTENT_TYPE, r.content_type);
    }
    let request = builder.body(kube::client::Body::from(r.body))?;
    let response = client.send(request).await.with_context(|| format!("{what} failed"))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .with_context(|| format!("{what}: the answer broke off"))?
        .to_bytes();
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
