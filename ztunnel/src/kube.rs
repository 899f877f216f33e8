//! The Kubernetes source (`--source kube`): watches Pods, Namespaces, Services and
//! waypoint Gateways through the API server, turns them into the same [`LocalConfig`] the workload file produces, finds
//! each local pod's network namespace and cgroup on the node, and keeps the built-in CA's
//! root in a Secret every node shares.
//!
//! Pods are watched cluster-wide, not only this node's: outbound HBONE must verify the
//! remote pod's identity, which comes from its service account, and only the Pod carries
//! that. Each Pod is cut down to a small record on arrival, so the memory kept per pod is a
//! few hundred bytes, not the whole object.
use std::path::PathBuf;

use kube::Client;
use tokio::sync::watch;

use crate::{config::Config, identity::BuiltinCa, state::LocalConfig};

pub mod ca_secret;
pub mod convert;
pub mod discovery;
pub mod watcher;

// Test support, also compiled into the integration tests (tests/tests/it/kube.rs).
#[cfg(test)]
mod fake_api;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to build a kubernetes client (in-cluster service account or KUBECONFIG)")]
    Client {
        #[source]
        source: kube::Error,
    },
    #[error("--ca-secret {value:?}: must be `namespace/name`")]
    SecretRef { value: String },
    #[error("failed to {action} secret {secret}")]
    Secret {
        action: &'static str,
        secret: String,
        #[source]
        source: kube::Error,
    },
    #[error("secret {secret} has no `{key}` entry; delete it to let ztunnel create a new root")]
    SecretKey { secret: String, key: &'static str },
    #[error("secret {secret} does not exist yet; the nodes' ztunnels create it")]
    SecretMissing { secret: String },
    #[error("secret {secret} holds an unusable ca root")]
    SecretRoot {
        secret: String,
        #[source]
        source: Box<crate::identity::Error>,
    },
    #[error("the kubernetes watchers stopped before their first full list")]
    Stopped,
}

/// A Kubernetes API call ztunnel makes: the RBAC rule it needs. `deploy/base/rbac.yaml`
/// grants exactly these (a test compares them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// API group, `""` for the core group.
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    /// Cluster-wide (a ClusterRole) or only in ztunnel's own namespace (a Role).
    pub namespaced: bool,
}

/// Every API call of the watchers and the CA Secret.
pub const API_ACCESS: &[Access] = &[
    WATCHED[0],
    WATCHED[1],
    WATCHED[2],
    WATCHED[3],
    Access {
        group: "",
        resource: "secrets",
        verbs: &["get", "create"],
        namespaced: true,
    },
];

/// What both a node's ztunnel and a waypoint list and watch, cluster-wide.
const WATCHED: [Access; 4] = [
    Access {
        group: "",
        resource: "pods",
        verbs: &["list", "watch"],
        namespaced: false,
    },
    Access {
        group: "",
        resource: "namespaces",
        verbs: &["list", "watch"],
        namespaced: false,
    },
    Access {
        group: "",
        resource: "services",
        verbs: &["list", "watch"],
        namespaced: false,
    },
    // Waypoints: Gateways of class `istio-waypoint` (an optional CRD: without it, or
    // without this grant, ztunnel runs without waypoints).
    Access {
        group: "gateway.networking.k8s.io",
        resource: "gateways",
        verbs: &["list", "watch"],
        namespaced: false,
    },
];

/// Every API call of `ztunnel waypoint --source kube`: the kinds a node's ztunnel
/// watches, a waypoint's own (HTTPRoutes, AuthorizationPolicies), and reading — never
/// creating — the CA root Secret. `deploy/waypoint/rbac.yaml` grants exactly these (a
/// test compares them).
pub const WAYPOINT_API_ACCESS: &[Access] = &[
    WATCHED[0],
    WATCHED[1],
    WATCHED[2],
    WATCHED[3],
    Access {
        group: "gateway.networking.k8s.io",
        resource: "httproutes",
        verbs: &["list", "watch"],
        namespaced: false,
    },
    Access {
        group: "security.istio.io",
        resource: "authorizationpolicies",
        verbs: &["list", "watch"],
        namespaced: false,
    },
    Access {
        group: "",
        resource: "secrets",
        verbs: &["get"],
        namespaced: true,
    },
];

/// `namespace/name` → `(namespace, name)`, both non-empty.
pub fn split_secret_ref(value: &str) -> Option<(&str, &str)> {
    let (ns, name) = value.split_once('/')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains('/')).then_some((ns, name))
}

/// The running Kubernetes source: its client and the stream of configurations.
pub struct Kube {
    pub client: Client,
    /// The current configuration; changes whenever a watched object or a pod's placement
    /// on the node changes.
    pub updates: watch::Receiver<LocalConfig>,
    /// Stops the watchers when dropped.
    pub guard: watcher::Guard,
}

/// Options of the Kubernetes source, taken from [`Config`].
#[derive(Debug, Clone)]
pub struct Options {
    pub node: String,
    pub trust_domain: String,
    /// The cgroup v2 mount holding the node's whole cgroup tree.
    pub cgroup_root: PathBuf,
    pub host_proc: PathBuf,
    /// Also watch what a waypoint applies (HTTPRoutes, AuthorizationPolicies with
    /// `targetRefs`): `ztunnel waypoint --source kube`; a node's ztunnel does not.
    pub waypoint_config: bool,
}

impl Options {
    pub fn from_config(cfg: &Config, cgroup_root: PathBuf) -> Self {
        Self {
            node: cfg.node.clone(),
            trust_domain: cfg.trust_domain.clone(),
            cgroup_root,
            host_proc: cfg.host_proc.clone(),
            waypoint_config: false,
        }
    }
}

/// Connects (in-cluster config, else KUBECONFIG), starts the watchers and returns once each
/// has listed its objects, so the first configuration is complete.
pub async fn start(opts: Options) -> Result<Kube, Error> {
    let client = Client::try_default()
        .await
        .map_err(|source| Error::Client { source })?;
    start_with(client, opts).await
}

/// [`start`] with a given client (tests point it at a fake API server).
pub async fn start_with(client: Client, opts: Options) -> Result<Kube, Error> {
    let (updates, guard) = watcher::spawn(client.clone(), opts).await?;
    Ok(Kube {
        client,
        updates,
        guard,
    })
}

/// The built-in CA with its root from the shared Secret, which must exist: a waypoint
/// reads the root the nodes' ztunnels created, and may not create one.
pub async fn builtin_ca_existing(
    client: &Client,
    secret_ref: &str,
    trust_domain: &str,
    lifetime: std::time::Duration,
) -> Result<BuiltinCa, Error> {
    let (namespace, name) = split_secret_ref(secret_ref).ok_or_else(|| Error::SecretRef {
        value: secret_ref.to_owned(),
    })?;
    ca_secret::load(client, namespace, name, trust_domain, lifetime).await
}

/// The built-in CA with its root from the shared Secret (created if missing).
pub async fn builtin_ca(
    client: &Client,
    secret_ref: &str,
    trust_domain: &str,
    lifetime: std::time::Duration,
) -> Result<BuiltinCa, Error> {
    let (namespace, name) = split_secret_ref(secret_ref).ok_or_else(|| Error::SecretRef {
        value: secret_ref.to_owned(),
    })?;
    ca_secret::load_or_create(client, namespace, name, trust_domain, lifetime).await
}
