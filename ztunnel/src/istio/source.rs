//! The Istio-mode source of the store: istiod's resources (from [`xds`](super::xds)) and
//! istio-cni's pods (from [`zds`](super::zds)) merged into the same [`LocalConfig`] the
//! workload file produces, sent on the same watch channel. A pod handed over by ZDS is
//! enrolled by giving its workload (istiod's, or one made from the ZDS message when
//! istiod has not sent it yet) the netns (`/proc/self/fd/<n>`, the fd istio-cni passed,
//! kept open here), the cgroup found from that netns, and the ambient label.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    os::fd::{AsRawFd as _, OwnedFd},
    path::PathBuf,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use tokio::sync::watch;

use super::xds::{Resources, XdsAddress};
use crate::{
    identity::Identity,
    state::{self, LocalConfig, Protocol, Workload},
};

/// The result of the last reconcile for each pod that should be enrolled
/// (`namespace/name` → `Ok` or why it failed); published by the composition root.
pub type EnrolResults = BTreeMap<String, Result<(), String>>;

/// How long a ZDS request waits for the enrolment to finish before answering with an error.
const ENROL_WAIT: Duration = Duration::from_secs(60);

/// A pod istio-cni handed over.
#[derive(Debug)]
pub struct ZdsPod {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// Keeps the netns alive and reachable at `netns`.
    pub fd: OwnedFd,
    pub netns: PathBuf,
    /// (device, inode) of the netns: the same netns sent again is the same pod.
    pub netns_id: (u64, u64),
    pub cgroup: PathBuf,
    pub addresses: Vec<IpAddr>,
}

impl ZdsPod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Health of the control-plane connections, for readiness and metrics.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub xds_connected: bool,
    /// At least one xDS response has been applied since start.
    pub xds_synced: bool,
    pub xds_error: Option<String>,
    pub zds_connected: bool,
    /// A ZDS snapshot has been reconciled since start.
    pub zds_synced: bool,
    pub zds_error: Option<String>,
}

/// What the merged config is built from besides the resources.
#[derive(Debug, Clone)]
pub struct Base {
    pub node: String,
    pub trust_domain: String,
    pub cluster: String,
}

pub struct IstioSource {
    base: Base,
    tx: watch::Sender<LocalConfig>,
    results: watch::Receiver<EnrolResults>,
    xds: Mutex<Resources>,
    pods: Mutex<BTreeMap<String, ZdsPod>>,
    status: Mutex<Status>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl IstioSource {
    pub fn new(
        base: Base,
        tx: watch::Sender<LocalConfig>,
        results: watch::Receiver<EnrolResults>,
    ) -> Self {
        Self {
            base,
            tx,
            results,
            xds: Mutex::default(),
            pods: Mutex::default(),
            status: Mutex::default(),
        }
    }

    /// The config with nothing received yet.
    pub fn empty(base: &Base) -> LocalConfig {
        LocalConfig {
            trust_domain: base.trust_domain.clone(),
            cluster: base.cluster.clone(),
            ..LocalConfig::default()
        }
    }

    pub fn status(&self) -> Status {
        lock(&self.status).clone()
    }

    pub fn set_xds_connected(&self, connected: bool, error: Option<String>) {
        let mut s = lock(&self.status);
        s.xds_connected = connected;
        if connected {
            s.xds_synced = true;
        }
        s.xds_error = error;
    }

    pub fn set_zds_connected(&self, connected: bool, error: Option<String>) {
        let mut s = lock(&self.status);
        s.zds_connected = connected;
        s.zds_error = error;
    }

    /// Ready once istiod has answered and istio-cni's snapshot is reconciled.
    pub fn readiness(&self, zds: bool) -> Result<(), String> {
        let s = self.status();
        if !s.xds_synced {
            return Err(format!(
                "no workloads from istiod yet{}",
                s.xds_error.map(|e| format!(": {e}")).unwrap_or_default()
            ));
        }
        if zds && !s.zds_synced {
            return Err(format!(
                "no pod snapshot from istio-cni yet{}",
                s.zds_error.map(|e| format!(": {e}")).unwrap_or_default()
            ));
        }
        Ok(())
    }

    pub fn with_xds<T>(&self, f: impl FnOnce(&Resources) -> T) -> T {
        f(&lock(&self.xds))
    }

    /// Applies an xDS response and publishes the result; returns the rejected resources.
    pub fn apply_xds(
        &self,
        resp: &super::proto::envoy::DeltaDiscoveryResponse,
    ) -> Vec<super::xds::Error> {
        let errors = lock(&self.xds).apply(resp);
        tracing::info!(
            type_url = %resp.type_url,
            updated = resp.resources.len() - errors.len(),
            removed = resp.removed_resources.len(),
            rejected = errors.len(),
            "xds update"
        );
        self.publish();
        errors
    }

    /// Sends the merged config; false when nothing changed.
    fn publish(&self) -> bool {
        let cfg = self.build();
        self.tx.send_if_modified(|cur| {
            if *cur == cfg {
                false
            } else {
                *cur = cfg;
                true
            }
        })
    }

    fn build(&self) -> LocalConfig {
        let xds = lock(&self.xds);
        let pods = lock(&self.pods);
        let mut cfg = Self::empty(&self.base);
        let mut healthy = Vec::new();
        for (_, address) in xds.addresses.values() {
            match address {
                XdsAddress::Workload(w) => {
                    if w.healthy {
                        healthy.push(w);
                    }
                    cfg.workloads.push(w.workload.clone());
                }
                XdsAddress::Service(s) => cfg.services.push(s.clone()),
            }
        }
        // A named target port (0 on the wire) is resolved per workload by istiod; our
        // services hold one target per port, taken from the first endpoint that has one.
        for svc in &mut cfg.services {
            let key = format!("{}/{}", svc.namespace, svc.hostname());
            for p in &mut svc.ports {
                if p.target_port.is_none() {
                    p.target_port = healthy
                        .iter()
                        .filter_map(|w| w.services.get(&key)?.get(&p.port).copied())
                        .find(|t| *t != 0);
                }
            }
        }
        cfg.policies = xds
            .authorizations
            .values()
            .filter(|(_, a)| !a.dry_run)
            .map(|(_, a)| a.policy.clone())
            .collect();
        for pod in pods.values() {
            let key = pod.key();
            let i = match cfg.workloads.iter().position(|w| w.key() == key) {
                Some(i) => i,
                None => {
                    cfg.workloads.push(Workload {
                        name: pod.name.clone(),
                        namespace: pod.namespace.clone(),
                        uid: None,
                        node: self.base.node.clone(),
                        network: String::new(),
                        addresses: pod.addresses.clone(),
                        service_account: pod.service_account.clone(),
                        trust_domain: None,
                        protocol: Some(Protocol::Hbone),
                        labels: BTreeMap::new(),
                        canonical_name: None,
                        canonical_revision: None,
                        workload_type: None,
                        workload_name: None,
                        netns: None,
                        cgroup: None,
                    });
                    cfg.workloads.len() - 1
                }
            };
            let w = &mut cfg.workloads[i];
            w.node = self.base.node.clone();
            w.netns = Some(pod.netns.clone());
            w.cgroup = Some(pod.cgroup.clone());
            if w.addresses.is_empty() {
                w.addresses = pod.addresses.clone();
            }
            w.labels
                .insert(state::DATAPLANE_MODE.to_owned(), state::AMBIENT.to_owned());
        }
        cfg
    }

    /// Adds (or confirms) a pod from ZDS and waits for its enrolment's result.
    pub async fn zds_add(&self, pod: ZdsPod) -> Result<(), String> {
        let key = pod.key();
        let identity = format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.base.trust_domain, pod.namespace, pod.service_account
        );
        identity
            .parse::<Identity>()
            .map_err(|e| format!("pod {key}: {e}"))?;
        let (same, old) = {
            let mut pods = lock(&self.pods);
            match pods.get(&pod.uid) {
                // The same netns again (a reconnect's snapshot): nothing changes.
                Some(old) if old.netns_id == pod.netns_id => (true, None),
                Some(_) => (false, pods.remove(&pod.uid)),
                None => (false, None),
            }
        };
        if same {
            drop(pod);
            return self.wait_enrolled(&key).await;
        }
        if let Some(old) = old {
            // A new netns under the same uid: release the old one first.
            let old_key = old.key();
            self.unenrol_and_close(&old_key, old).await;
        }
        lock(&self.pods).insert(pod.uid.clone(), pod);
        self.wait_enrolled(&key).await
    }

    async fn wait_enrolled(&self, key: &str) -> Result<(), String> {
        let mut rx = self.results.clone();
        rx.mark_unchanged();
        let changed = self.publish();
        let wait = async {
            if !changed && let Some(r) = rx.borrow().get(key) {
                return r.clone();
            }
            loop {
                if rx.changed().await.is_err() {
                    return Err("ztunnel is shutting down".to_owned());
                }
                if let Some(r) = rx.borrow_and_update().get(key) {
                    return r.clone();
                }
            }
        };
        tokio::time::timeout(ENROL_WAIT, wait)
            .await
            .unwrap_or_else(|_| Err(format!("pod {key} was not enrolled within {ENROL_WAIT:?}")))
    }

    /// Removes a pod, waits until it is unenrolled, then closes its netns fd (its
    /// `/proc/self/fd/<n>` path must not be reused by another pod while still in use).
    pub async fn zds_del(&self, uid: &str) -> bool {
        let Some(pod) = lock(&self.pods).remove(uid) else {
            return false;
        };
        let key = pod.key();
        self.unenrol_and_close(&key, pod).await;
        true
    }

    async fn unenrol_and_close(&self, key: &str, pod: ZdsPod) {
        let mut rx = self.results.clone();
        rx.mark_unchanged();
        if self.publish() {
            let gone = async {
                while rx.changed().await.is_ok() {
                    if !rx.borrow_and_update().contains_key(key) {
                        break;
                    }
                }
            };
            if tokio::time::timeout(ENROL_WAIT, gone).await.is_err() {
                tracing::warn!(pod = %key, "pod not unenrolled in time; closing its netns anyway");
            }
        }
        tracing::info!(pod = %key, uid = %pod.uid, fd = pod.fd.as_raw_fd(), "zds pod released");
        drop(pod);
    }

    /// Whether a pod with this uid is held.
    pub fn zds_has(&self, uid: &str) -> bool {
        lock(&self.pods).contains_key(uid)
    }

    /// After a snapshot: drops every pod not named since the connection began.
    pub async fn zds_reconcile(&self, seen: &BTreeSet<String>) {
        let gone: Vec<String> = lock(&self.pods)
            .keys()
            .filter(|uid| !seen.contains(*uid))
            .cloned()
            .collect();
        for uid in gone {
            tracing::info!(%uid, "pod missing from istio-cni's snapshot; unenrolling");
            self.zds_del(&uid).await;
        }
        lock(&self.status).zds_synced = true;
        // Wake the enrolment loop even if nothing changed: it releases capture a previous
        // ztunnel left for pods no longer wanted once the pods are known.
        self.tx.send_modify(|_| {});
    }
}
