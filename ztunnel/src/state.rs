//! The workload store's embedded source: a local YAML file listing namespaces and
//! workloads, including this node's pods with their netns and cgroup. Enrolment follows
//! the `istio.io/dataplane-mode` label on the pod or its namespace (the pod's value wins;
//! `none` opts out). The file is watched; an invalid file is reported with its path,
//! line and field, and the last good state stays in force.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// The label that enrols a pod or a namespace.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
pub const AMBIENT: &str = "ambient";
pub const NONE: &str = "none";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to read workload file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid workload file {path}: {location}field `{field}`: {message}")]
    Parse {
        path: PathBuf,
        location: String,
        field: String,
        message: String,
    },
    #[error("invalid workload file {path}: {object}: {reason}")]
    Invalid {
        path: PathBuf,
        object: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalConfig {
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    #[serde(default)]
    pub workloads: Vec<Workload>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Namespace {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    /// The node the pod runs on; ztunnel captures only its own node's pods.
    pub node: String,
    pub addresses: Vec<IpAddr>,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The pod's network namespace (a bind mount such as /var/run/netns/x, or
    /// /proc/<pid>/ns/net). Required for pods on this node.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// The pod's cgroup v2 directory. Required for pods on this node.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
}

fn default_service_account() -> String {
    "default".to_owned()
}

impl Workload {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A pod on this node that should be captured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalPod {
    pub key: String,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    pub addresses: Vec<IpAddr>,
}

impl LocalConfig {
    /// Parses and validates the file's text.
    pub fn parse(path: &Path, text: &str, node: &str) -> Result<Self, Error> {
        let de = serde_yaml::Deserializer::from_str(text);
        let cfg: LocalConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            let location = inner
                .location()
                .map(|l| format!("line {} column {}: ", l.line(), l.column()))
                .unwrap_or_default();
            Error::Parse {
                path: path.to_owned(),
                location,
                field,
                message: inner.to_string(),
            }
        })?;
        cfg.validate(path, node)?;
        Ok(cfg)
    }

    pub fn load(path: &Path, node: &str) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text, node)
    }

    fn validate(&self, path: &Path, node: &str) -> Result<(), Error> {
        let invalid = |object: String, reason: String| Error::Invalid {
            path: path.to_owned(),
            object,
            reason,
        };
        let mut keys = BTreeSet::new();
        let mut addrs = BTreeMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let object = format!("workloads[{i}] ({})", w.key());
            if w.name.is_empty() || w.namespace.is_empty() {
                return Err(invalid(
                    object,
                    "name and namespace must not be empty".into(),
                ));
            }
            if !keys.insert(w.key()) {
                return Err(invalid(object, "duplicate workload".into()));
            }
            for a in &w.addresses {
                if let Some(other) = addrs.insert(*a, w.key()) {
                    return Err(invalid(
                        object,
                        format!("address {a} is also used by {other}"),
                    ));
                }
            }
            if w.node == node && (w.netns.is_none() || w.cgroup.is_none()) {
                return Err(invalid(
                    object,
                    format!("a pod on this node ({node}) needs `netns` and `cgroup`"),
                ));
            }
            if let Some(mode) = w.labels.get(DATAPLANE_MODE) {
                check_mode(mode).map_err(|reason| invalid(object.clone(), reason))?;
            }
        }
        for (i, ns) in self.namespaces.iter().enumerate() {
            if let Some(mode) = ns.labels.get(DATAPLANE_MODE) {
                check_mode(mode)
                    .map_err(|reason| invalid(format!("namespaces[{i}] ({})", ns.name), reason))?;
            }
        }
        Ok(())
    }

    /// Whether a workload is in the mesh: its own label, else its namespace's.
    pub fn enrolled(&self, w: &Workload) -> bool {
        let mode = w.labels.get(DATAPLANE_MODE).or_else(|| {
            self.namespaces
                .iter()
                .find(|n| n.name == w.namespace)
                .and_then(|n| n.labels.get(DATAPLANE_MODE))
        });
        mode.is_some_and(|m| m == AMBIENT)
    }

    /// This node's pods that should be captured now.
    pub fn local_enrolled(&self, node: &str) -> BTreeMap<String, LocalPod> {
        self.workloads
            .iter()
            .filter(|w| w.node == node && self.enrolled(w))
            .filter_map(|w| {
                Some((
                    w.key(),
                    LocalPod {
                        key: w.key(),
                        netns: w.netns.clone()?,
                        cgroup: w.cgroup.clone()?,
                        addresses: w.addresses.clone(),
                    },
                ))
            })
            .collect()
    }
}

fn check_mode(mode: &str) -> Result<(), String> {
    if mode == AMBIENT || mode == NONE {
        Ok(())
    } else {
        Err(format!(
            "label {DATAPLANE_MODE}={mode:?} must be {AMBIENT:?} or {NONE:?}"
        ))
    }
}

/// Watches the file and sends each valid version; invalid versions are logged and skipped.
pub fn watch(
    path: PathBuf,
    node: String,
    tx: tokio::sync::watch::Sender<LocalConfig>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let dir = path
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."));
    let file_name = path.file_name().map(ToOwned::to_owned);
    let watched = path.clone();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        let Ok(ev) = ev else { return };
        if !ev
            .paths
            .iter()
            .any(|p| p.file_name() == file_name.as_deref())
        {
            return;
        }
        if matches!(ev.kind, notify::EventKind::Access(_)) {
            return;
        }
        match LocalConfig::load(&watched, &node) {
            Ok(cfg) => {
                tx.send_if_modified(|cur| {
                    if *cur == cfg {
                        false
                    } else {
                        tracing::info!(path = %watched.display(), workloads = cfg.workloads.len(), "workload file reloaded");
                        *cur = cfg;
                        true
                    }
                });
            }
            // A file being rewritten can be seen half-written; the next event re-reads it.
            Err(e) => {
                tracing::error!(error = %e, "workload file rejected; keeping the last good version")
            }
        }
    })?;
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<LocalConfig, Error> {
        LocalConfig::parse(Path::new("w.yaml"), text, "node1")
    }

    const BASE: &str = r#"
namespaces:
  - name: mesh
    labels: { istio.io/dataplane-mode: ambient }
  - name: plain
workloads:
  - name: a
    namespace: mesh
    node: node1
    addresses: [10.0.0.1]
    netns: /run/netns/a
    cgroup: /sys/fs/cgroup/a
  - name: b
    namespace: mesh
    node: node1
    addresses: [10.0.0.2]
    labels: { istio.io/dataplane-mode: none }
    netns: /run/netns/b
    cgroup: /sys/fs/cgroup/b
  - name: c
    namespace: plain
    node: node1
    addresses: [10.0.0.3]
    labels: { istio.io/dataplane-mode: ambient }
    netns: /run/netns/c
    cgroup: /sys/fs/cgroup/c
  - name: d
    namespace: mesh
    node: node2
    addresses: [10.0.1.4]
"#;

    #[test]
    fn enrolment_follows_pod_label_then_namespace_label() {
        let cfg = parse(BASE).expect("valid file");
        let local = cfg.local_enrolled("node1");
        let keys: Vec<_> = local.keys().cloned().collect();
        // a: namespace says ambient; b: pod opts out; c: pod opts in; d: other node.
        assert_eq!(keys, ["mesh/a", "plain/c"]);
        assert_eq!(local["mesh/a"].netns, PathBuf::from("/run/netns/a"));
    }

    #[test]
    fn syntax_errors_name_line_and_field() {
        let text =
            "workloads:\n  - name: a\n    namespace: x\n    node: n\n    addresses: [not-an-ip]\n";
        let err = parse(text).expect_err("bad address").to_string();
        assert!(err.contains("w.yaml"), "{err}");
        assert!(err.contains("line 5"), "{err}");
        assert!(err.contains("workloads[0].addresses"), "{err}");
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_name() {
        let text = "workloads:\n  - name: a\n    namespace: x\n    node: n\n    addresses: []\n    adresses: []\n";
        let err = parse(text).expect_err("typo").to_string();
        assert!(err.contains("adresses"), "{err}");
    }

    #[test]
    fn semantic_errors_name_the_object() {
        let dup = BASE.replace("10.0.0.2", "10.0.0.1");
        let err = parse(&dup).expect_err("duplicate address").to_string();
        assert!(
            err.contains("workloads[1] (mesh/b)") && err.contains("10.0.0.1"),
            "{err}"
        );

        let missing = "workloads:\n  - name: a\n    namespace: x\n    node: node1\n    addresses: [10.0.0.9]\n";
        let err = parse(missing).expect_err("no netns").to_string();
        assert!(err.contains("needs `netns` and `cgroup`"), "{err}");

        let bad_mode = BASE.replace("dataplane-mode: none", "dataplane-mode: sidecar");
        let err = parse(&bad_mode).expect_err("bad label").to_string();
        assert!(err.contains("\"sidecar\""), "{err}");
    }
}
