//! The Kubernetes API: where server-external runs, and which address ranges
//! belong to the cluster (kept live with watches).

pub mod discovery;
pub mod networks;

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// Which kubeconfig, context and namespace to use; unset means as kubectl does
/// (`KUBECONFIG`, then `~/.kube/config`; the context's namespace).
#[derive(Clone, Debug, Default)]
pub struct KubeOptions {
    /// `-kubeconfig FILE`.
    pub kubeconfig: Option<PathBuf>,
    /// `--context NAME`.
    pub context: Option<String>,
    /// `--namespace NAME`.
    pub namespace: Option<String>,
    /// Use a kubeconfig whose cluster skips TLS verification
    /// (`--allow-insecure-kubeconfig`).
    pub allow_insecure: bool,
}

/// A connected API client.
#[derive(Clone)]
pub struct Kube {
    /// The client.
    pub client: kube::Client,
    /// The namespace server-external's pod lives in.
    pub namespace: String,
    /// The API server's URL, for messages.
    pub url: String,
    /// The API server's addresses: never routed into the tunnel.
    pub api_addresses: Vec<IpAddr>,
}

impl Kube {
    /// Loads the kubeconfig and makes a client (no request is sent yet).
    pub async fn connect(opts: &KubeOptions) -> Result<Kube> {
        let options = KubeConfigOptions {
            context: opts.context.clone(),
            ..Default::default()
        };
        let config = match &opts.kubeconfig {
            Some(path) => {
                let kc = Kubeconfig::read_from(path)
                    .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kc, &options)
                    .await
                    .with_context(|| format!("cannot use kubeconfig {}", path.display()))?
            }
            None => kube::Config::from_kubeconfig(&options)
                .await
                .context("cannot load a kubeconfig (KUBECONFIG, ~/.kube/config); pass -kubeconfig=FILE")?,
        };
        let url = config.cluster_url.to_string();
        if config.accept_invalid_certs {
            if !opts.allow_insecure {
                return Err(anyhow!(
                    "the kubeconfig's cluster {url} sets insecure-skip-tls-verify: whoever is on the path to the API could choose the server this machine dials and the networks it routes; give the cluster's CA (certificate-authority-data) or pass --allow-insecure-kubeconfig"
                ));
            }
            tracing::warn!("the Kubernetes API's certificate at {url} is not checked (insecure-skip-tls-verify, --allow-insecure-kubeconfig)");
        }
        let host = config
            .cluster_url
            .host()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_owned();
        let port = config.cluster_url.port_u16().unwrap_or(443);
        let api_addresses = match host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => tokio::net::lookup_host((host.as_str(), port))
                .await
                .map(|addrs| addrs.map(|a| a.ip()).collect())
                .unwrap_or_default(),
        };
        let namespace = opts
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = kube::Client::try_from(config).context("cannot make a Kubernetes client from the kubeconfig")?;
        Ok(Kube {
            client,
            namespace,
            url,
            api_addresses,
        })
    }

    /// Turns an API error into one clear line about `verb` on `resource`.
    pub fn explain(&self, e: kube::Error, verb: &str, resource: &str, namespace: Option<&str>) -> anyhow::Error {
        let scope = namespace.map_or_else(|| "cluster-wide".to_owned(), |ns| format!("in namespace {ns}"));
        match e {
            kube::Error::Api(status) => match status.code {
                401 => anyhow!(
                    "the Kubernetes API at {} does not accept the kubeconfig's credentials (401 Unauthorized); refresh them",
                    self.url
                ),
                403 => anyhow!(
                    "forbidden: the kubeconfig's user may not {verb} {resource} {scope} (403); \
                     grant it with RBAC (a Role or ClusterRole allowing {verb} on {resource})"
                ),
                code => anyhow!("the Kubernetes API refused to {verb} {resource} {scope}: {} ({code})", status.message),
            },
            other => {
                // The innermost cause says what happened ("Connection refused", a TLS failure).
                let mut cause: &dyn std::error::Error = &other;
                while let Some(next) = cause.source() {
                    cause = next;
                }
                anyhow!("cannot reach the Kubernetes API at {}: {cause}", self.url)
            }
        }
    }
}
