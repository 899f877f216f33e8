//! Istio's control-plane interfaces: workloads, services and policies from istiod over
//! delta xDS ([`xds`]), workload certificates from Istio's CA ([`ca_client`]), and pods'
//! network namespaces from istio-cni over ZDS ([`zds`]). Each feeds the same store,
//! enrolment and certificate seams as the local workload file and the built-in CA.
pub mod ca_client;
pub mod channel;
pub mod proto;
pub mod source;
pub mod xds;
pub mod zds;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use rustls_pki_types::CertificateDer;
use serde::Serialize;
use tokio::{sync::watch, task::JoinHandle};

use crate::state::LocalConfig;

/// Settings for talking to istiod, its CA and istio-cni.
#[derive(Debug, Clone, clap::Args, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IstioConfig {
    /// istio-cni's ZDS socket (with `--source istio`).
    #[arg(
        long,
        env = "ZTUNNEL_ZDS_SOCKET",
        default_value = "/var/run/ztunnel/ztunnel.sock"
    )]
    pub zds_socket: PathBuf,

    /// istiod's xDS address (with `--source istio`).
    #[arg(
        long,
        env = "XDS_ADDRESS",
        default_value = "https://istiod.istio-system.svc:15012"
    )]
    pub xds_address: String,

    /// Istio's CA address (with `--ca istio`); defaults to `--xds-address`.
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,

    /// PEM roots that istiod's serving certificate chains to.
    #[arg(
        long,
        env = "ZTUNNEL_ISTIO_ROOT_CERT",
        default_value = "/var/run/secrets/istio/root-cert.pem"
    )]
    pub istio_root_cert: PathBuf,

    /// The projected service-account token sent as a bearer token (re-read per request).
    #[arg(
        long,
        env = "ZTUNNEL_ISTIO_TOKEN",
        default_value = "/var/run/secrets/tokens/istio-token"
    )]
    pub istio_token: PathBuf,

    /// The cluster id sent to istiod (`clusterid` header) and shown in metrics.
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,

    /// ztunnel's own pod IP, name and namespace, for its xDS node id.
    #[arg(long, env = "INSTANCE_IP", default_value = "127.0.0.1")]
    pub pod_ip: String,
    #[arg(long, env = "POD_NAME", default_value = "ztunnel")]
    pub pod_name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pub pod_namespace: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Channel(#[from] channel::Error),
    #[error("istiod root certificate {} is unusable: {problem}", path.display())]
    Roots { path: PathBuf, problem: String },
}

impl IstioConfig {
    fn channel(&self, address: &str) -> channel::ChannelConfig {
        channel::ChannelConfig {
            address: address.to_owned(),
            root_cert: self.istio_root_cert.clone(),
            token: Some(self.istio_token.clone()),
            cluster_id: self.cluster_id.clone(),
        }
    }

    /// The base of the merged config in Istio mode; `trust_domain` is that of pods
    /// istio-cni hands over before istiod has described them (`--trust-domain`).
    pub fn base(&self, node: &str, trust_domain: &str) -> source::Base {
        source::Base {
            node: node.to_owned(),
            trust_domain: trust_domain.to_owned(),
            cluster: self.cluster_id.clone(),
        }
    }

    /// A client of Istio's CA.
    pub fn ca(&self, lifetime: Duration) -> Result<ca_client::IstioCa, Error> {
        let address = self
            .ca_address
            .clone()
            .unwrap_or_else(|| self.xds_address.clone());
        let channel = channel::connect(&self.channel(&address))?;
        let roots: Vec<CertificateDer<'static>> = std::fs::read(&self.istio_root_cert)
            .map_err(|e| e.to_string())
            .and_then(|pem| crate::identity::certificates_from_pem(&pem))
            .map_err(|problem| Error::Roots {
                path: self.istio_root_cert.clone(),
                problem,
            })?;
        Ok(ca_client::IstioCa::new(channel, address, lifetime, roots))
    }
}

/// The running Istio source: the xDS and ZDS clients (stopped on drop) and its status.
pub struct Running {
    pub source: Arc<source::IstioSource>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts the xDS and ZDS clients feeding `tx`.
pub fn start(
    cfg: &IstioConfig,
    node: &str,
    trust_domain: &str,
    tx: watch::Sender<LocalConfig>,
    results: watch::Receiver<source::EnrolResults>,
) -> Result<Running, Error> {
    let src = Arc::new(source::IstioSource::new(
        cfg.base(node, trust_domain),
        tx,
        results,
    ));
    let channel = channel::connect(&cfg.channel(&cfg.xds_address))?;
    let xds_node = xds::node(
        &cfg.pod_ip,
        &cfg.pod_name,
        &cfg.pod_namespace,
        node,
        &cfg.cluster_id,
    );
    let tasks = vec![
        tokio::spawn(xds::run(channel, xds_node, src.clone())),
        tokio::spawn(zds::run(cfg.zds_socket.clone(), src.clone())),
    ];
    Ok(Running { source: src, tasks })
}

/// Health of the Istio interfaces in use, for readiness and metrics.
#[derive(Default, Clone)]
pub struct Health {
    pub source: Option<Arc<source::IstioSource>>,
    pub ca: Option<Arc<Mutex<ca_client::CaStatus>>>,
}

impl Health {
    /// Not ready until istiod and istio-cni have been heard from; an unreachable CA is
    /// reported while the current certificates keep serving until they expire.
    pub fn readiness(&self) -> Result<(), String> {
        if let Some(s) = &self.source {
            s.readiness(true)?;
        }
        if let Some(ca) = &self.ca {
            let status = ca.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(e) = status.last_error {
                return Err(format!(
                    "istio ca unreachable ({e}); serving with the current certificates until they expire"
                ));
            }
        }
        Ok(())
    }

    /// Whether every pod that should be enrolled is known: always with the file; with
    /// ZDS once istio-cni's first snapshot has been reconciled.
    pub fn pods_known(&self) -> bool {
        self.source.as_ref().is_none_or(|s| s.status().zds_synced)
    }

    pub fn refresh_metrics(&self, m: &crate::metrics::Metrics) {
        if let Some(s) = &self.source {
            let st = s.status();
            m.set_control_plane_up("xds", st.xds_connected);
            m.set_control_plane_up("zds", st.zds_connected);
            m.set_xds(&st.xds_totals);
        }
        if let Some(ca) = &self.ca {
            let ok = ca
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .last_error
                .is_none();
            m.set_control_plane_up("ca", ok);
        }
    }
}
