//! The Istio-mode source of the store: istiod's resources (from [`xds`](super::xds)) and
//! istio-cni's pods (from [`zds`](super::zds)) merged into the same [`LocalConfig`] the
//! workload file produces, sent on the same watch channel. A pod handed over by ZDS is
//! enrolled by giving its workload (istiod's, or one made from the ZDS message when
//! istiod has not sent it yet) the netns (`/proc/self/fd/<n>`, the fd istio-cni passed,
//! kept open here), the cgroup found from that netns, and the ambient label.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    os::fd::{AsRawFd as _, OwnedFd},
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
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
    /// What the xDS client received and how its streams ended (Istio's `istio_xds_*`).
    pub xds_totals: crate::metrics::XdsTotals,
}

/// What the merged config is built from besides the resources.
#[derive(Debug, Clone)]
pub struct Base {
    pub node: String,
    pub trust_domain: String,
    pub cluster: String,
}

pub struct IstioSource {
    /// Set once a successor has taken over: nothing is enrolled or unenrolled here any
    /// more, so ZDS requests are answered at once instead of after the enrolment wait.
    stopped: std::sync::atomic::AtomicBool,
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
            stopped: std::sync::atomic::AtomicBool::new(false),
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

    /// Counts an xDS response and its resources' bytes, by type URL.
    pub fn count_xds_message(&self, resp: &super::proto::envoy::DeltaDiscoveryResponse) {
        let bytes: usize = resp
            .resources
            .iter()
            .filter_map(|r| r.resource.as_ref())
            .map(|a| a.value.len())
            .sum();
        let mut s = lock(&self.status);
        let t = &mut s.xds_totals;
        *t.messages.entry(resp.type_url.clone()).or_default() += 1;
        *t.message_bytes.entry(resp.type_url.clone()).or_default() += bytes as u64;
    }

    /// Counts the end of an xDS stream under Istio's reason.
    pub fn count_xds_termination(&self, reason: &'static str) {
        *lock(&self.status)
            .xds_totals
            .terminations
            .entry(reason)
            .or_default() += 1;
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
                XdsAddress::Service(s) => cfg.services.push((**s).clone()),
            }
        }
        // A named target port (0 on the wire) is resolved per workload by istiod; our
        // services hold one target per port, taken from the first endpoint that has one.
        // One pass over the endpoints finds each (service, port)'s first target.
        let mut targets: HashMap<(&str, u16), u16> = HashMap::new();
        for w in &healthy {
            for (key, ports) in &w.services {
                for (port, target) in ports {
                    if *target != 0 {
                        targets.entry((key.as_str(), *port)).or_insert(*target);
                    }
                }
            }
        }
        for svc in &mut cfg.services {
            let key = format!("{}/{}", svc.namespace, svc.hostname());
            for p in &mut svc.ports {
                if p.target_port.is_none() {
                    p.target_port = targets.get(&(key.as_str(), p.port)).copied();
                }
            }
        }
        cfg.policies = xds
            .authorizations
            .values()
            .filter(|(_, a)| !a.dry_run)
            .map(|(_, a)| a.policy.clone())
            .collect();
        let mut at: HashMap<String, usize> = HashMap::new();
        if !pods.is_empty() {
            for (i, w) in cfg.workloads.iter().enumerate() {
                at.entry(w.key()).or_insert(i);
            }
        }
        for pod in pods.values() {
            let key = pod.key();
            let i = match at.get(&key) {
                Some(i) => *i,
                None => {
                    at.insert(key, cfg.workloads.len());
                    cfg.workloads.push(Arc::new(Workload {
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
                        locality: None,
                        waypoint: None,
                    }));
                    cfg.workloads.len() - 1
                }
            };
            // Only this node's pods are copied to be changed; the rest stay shared.
            let w = Arc::make_mut(&mut cfg.workloads[i]);
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
                Some(old) if old.netns_id == pod.netns_id => (Some(old.key()), None),
                _ => {
                    // The config holds one workload per name: a second uid under a name
                    // (a pod recreated with its name, added before the old one is deleted)
                    // waits until the old one is gone, which keeps the old pod captured
                    // meanwhile; the new one does not start until its add succeeds.
                    if let Some(other) = pods.values().find(|p| p.uid != pod.uid && p.key() == key)
                    {
                        return Err(format!(
                            "pod {key} is still held under uid {}; refusing uid {} until istio-cni deletes the other",
                            other.uid, pod.uid
                        ));
                    }
                    // A new netns under a known uid: the old one is released below.
                    (None, pods.remove(&pod.uid))
                }
            }
        };
        if let Some(held) = same {
            // A pod's uid and name never change; a message that renames a held uid and
            // netns is wrong, so the pod stays as held (as in Istio's ztunnel) and the
            // answer is that pod's enrolment, which is the one that exists.
            if held != key {
                tracing::warn!(uid = %pod.uid, %held, named = %key, "zds add renames a pod already held with this netns; keeping it as held");
            }
            drop(pod);
            return self.wait_enrolled(&held).await;
        }
        if let Some(old) = old {
            // A new netns under the same uid: release the old one first.
            let old_key = old.key();
            self.unenrol_and_close(&old_key, old).await;
        }
        lock(&self.pods).insert(pod.uid.clone(), pod);
        self.wait_enrolled(&key).await
    }

    /// A successor took over: answer istio-cni at once from now on.
    pub fn stop_enrolling(&self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.stopped.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn wait_enrolled(&self, key: &str) -> Result<(), String> {
        if self.stopped() {
            return Err(format!(
                "pod {key}: this ztunnel handed over to a successor and enrols nothing"
            ));
        }
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
        if self.publish() && !self.stopped() {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::fuzzing::zds::enrolment;

    const NODE: &str = "node1";

    fn source() -> (IstioSource, watch::Receiver<LocalConfig>) {
        let base = Base {
            node: NODE.to_owned(),
            trust_domain: "cluster.local".to_owned(),
            cluster: "Kubernetes".to_owned(),
        };
        let (tx, configs) = watch::channel(IstioSource::empty(&base));
        let (results_tx, results) = watch::channel(BTreeMap::new());
        tokio::spawn(enrolment(configs.clone(), results_tx));
        (IstioSource::new(base, tx, results), configs)
    }

    fn pod(uid: &str, namespace: &str, name: &str, netns: u64) -> ZdsPod {
        let fd: OwnedFd = std::fs::File::open("/dev/null").expect("/dev/null").into();
        ZdsPod {
            uid: uid.into(),
            name: name.into(),
            namespace: namespace.into(),
            service_account: "web".into(),
            netns: PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
            fd,
            netns_id: (0, netns),
            cgroup: PathBuf::from(format!("/sys/fs/cgroup/kubepods/pod-{netns}")),
            addresses: vec![IpAddr::from([10, 0, 0, 1])],
        }
    }

    /// A ZDS answer, which never needs the 60 s enrolment wait here: enrolment answers at once.
    async fn answered<T>(what: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(30), what)
            .await
            .expect("answered without waiting for the enrolment timeout")
    }

    /// Found by fuzzing (`zds`): the add was answered only after the 60 s enrolment wait,
    /// with an error, holding up every request behind it.
    #[tokio::test]
    async fn an_add_renaming_a_held_pod_is_answered_at_once_and_keeps_the_pod() {
        let (source, configs) = source();
        source
            .zds_add(pod("uid-a", "shop", "web-0", 1))
            .await
            .expect("first add");
        let renamed = answered(source.zds_add(pod("uid-a", "other", "web-0", 1))).await;
        assert_eq!(renamed, Ok(()));
        let keys: Vec<String> = configs.borrow().workloads.iter().map(|w| w.key()).collect();
        assert_eq!(keys, ["shop/web-0"]);
    }

    /// Found by fuzzing (`zds`): two uids under one name were merged into one workload,
    /// and deleting either waited the full 60 s for the name to leave the enrolment
    /// results, which the other uid kept there.
    #[tokio::test]
    async fn a_second_uid_under_a_held_name_waits_for_the_first_to_be_deleted() {
        let (source, configs) = source();
        assert_eq!(
            answered(source.zds_add(pod("uid-a", "shop", "web-0", 1))).await,
            Ok(())
        );
        let refused = answered(source.zds_add(pod("uid-b", "shop", "web-0", 2)))
            .await
            .expect_err("the name is held by uid-a");
        assert!(
            refused.contains("uid-a") && refused.contains("uid-b"),
            "{refused}"
        );
        let cgroups = || {
            configs
                .borrow()
                .workloads
                .iter()
                .map(|w| w.cgroup.clone())
                .collect::<Vec<_>>()
        };
        let pod_1 = Some(PathBuf::from("/sys/fs/cgroup/kubepods/pod-1"));
        assert_eq!(cgroups(), [pod_1], "still one workload, uid-a's");
        assert!(answered(source.zds_del("uid-a")).await);
        assert_eq!(
            answered(source.zds_add(pod("uid-b", "shop", "web-0", 2))).await,
            Ok(())
        );
        let pod_2 = Some(PathBuf::from("/sys/fs/cgroup/kubepods/pod-2"));
        assert_eq!(cgroups(), [pod_2], "now uid-b's");
    }

    /// A named target port (0 on the wire) takes the target of the first healthy endpoint,
    /// in resource-name order, that names a non-zero one for that port.
    #[tokio::test]
    async fn named_target_ports_come_from_the_first_healthy_endpoint_with_one() {
        use prost::Message as _;

        use crate::istio::proto::{ADDRESS_TYPE, envoy, workload as xds};
        let (source, configs) = source();
        let port = |service_port, target_port| xds::Port {
            service_port,
            target_port,
        };
        let service = |name: &str, ports| xds::Address {
            r#type: Some(xds::address::Type::Service(xds::Service {
                name: name.into(),
                namespace: "shop".into(),
                hostname: format!("{name}.shop.svc"),
                addresses: vec![xds::NetworkAddress {
                    network: String::new(),
                    address: vec![10, 96, 0, name.len() as u8],
                }],
                ports,
                ..Default::default()
            })),
        };
        let pod = |name: &str, last: u8, healthy: bool, ports| xds::Address {
            r#type: Some(xds::address::Type::Workload(xds::Workload {
                uid: format!("Kubernetes//Pod/shop/{name}"),
                name: name.into(),
                namespace: "shop".into(),
                addresses: vec![vec![10, 0, 0, last]],
                status: if healthy {
                    xds::WorkloadStatus::Healthy
                } else {
                    xds::WorkloadStatus::Unhealthy
                } as i32,
                services: HashMap::from([(
                    "shop/web.shop.svc".to_owned(),
                    xds::PortList { ports },
                )]),
                ..Default::default()
            })),
        };
        let addresses = [
            (
                "shop/web.shop.svc",
                service("web", vec![port(80, 0), port(81, 0), port(82, 9090)]),
            ),
            ("shop/idle.shop.svc", service("idle", vec![port(80, 0)])),
            (
                "w-a",
                pod("a", 1, false, vec![port(80, 7000), port(81, 7001)]),
            ),
            ("w-b", pod("b", 2, true, vec![port(80, 0), port(81, 8081)])),
            (
                "w-c",
                pod("c", 3, true, vec![port(80, 8080), port(81, 9999)]),
            ),
        ];
        let resp = envoy::DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            resources: addresses
                .iter()
                .map(|(name, a)| envoy::Resource {
                    version: "1".into(),
                    name: (*name).into(),
                    resource: Some(prost_types::Any {
                        type_url: ADDRESS_TYPE.into(),
                        value: a.encode_to_vec(),
                    }),
                    aliases: Vec::new(),
                })
                .collect(),
            nonce: "1".into(),
            ..Default::default()
        };
        assert!(source.apply_xds(&resp).is_empty());
        let cfg = configs.borrow().clone();
        let targets = |name: &str| -> Vec<(u16, Option<u16>)> {
            let svc = cfg.services.iter().find(|s| s.name == name).expect(name);
            svc.ports.iter().map(|p| (p.port, p.target_port)).collect()
        };
        // 80: a is unhealthy, b names none; 81: b is first; 82 is not named.
        assert_eq!(
            targets("web"),
            [(80, Some(8080)), (81, Some(8081)), (82, Some(9090))]
        );
        // No endpoint names one.
        assert_eq!(targets("idle"), [(80, None)]);
    }
}
