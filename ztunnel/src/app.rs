//! The composition root: loads capture, follows the workload file, enrols and unenrols
//! this node's pods, serves the admin API, and drains on SIGTERM/SIGINT, `POST
//! /quitquitquit` or a successor's request ([`Shared::request_drain`]) before it exits.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    os::fd::OwnedFd,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::{net::TcpListener, signal::unix::SignalKind, sync::watch};

use crate::{
    admin,
    capture::{Capture, PodCapture},
    cgroup,
    config::{Ca, Config, Source},
    drain, ebpf, handover,
    identity::{BuiltinCa, CertificateManager, CertificateSource, Identity},
    istio::{self, source::IstioSource},
    netns::Netns,
    proxy::{PodListeners, PodNet, Proxy},
    state::{self, LocalPod, Store},
};

/// An enrolled pod as the admin API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EnrolledPodInfo {
    pub name: String,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    pub addresses: Vec<IpAddr>,
    pub netns_cookie: u64,
    pub attached_programs: Vec<String>,
}

struct Enrolled {
    spec: LocalPod,
    /// (device, inode) of the pod's netns: a new path to the same netns is the same pod.
    netns_id: (u64, u64),
    capture: Option<PodCapture>,
    listeners: PodListeners,
    /// A successor took the pod's listening sockets: the pod's pins, map entries and
    /// return path are its successor's to keep or remove now.
    taken: bool,
}

/// An upgrade as the admin API shows it (`/config_dump`, `handover`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HandoverStatus {
    /// `none` (no predecessor answered), `taking_over` (a predecessor still serves),
    /// `complete` (it stopped accepting), `predecessor_gone` (it exited or crashed
    /// first); `handed_over` once a successor took over from this ztunnel.
    pub state: String,
    pub predecessor_pid: Option<u32>,
    /// Listening sockets taken over from the predecessor.
    pub listeners_taken: usize,
    /// From this ztunnel's start to its predecessor no longer accepting.
    pub elapsed_ms: Option<u64>,
    /// Whether this ztunnel serves `--handover-socket` for a successor.
    pub serving: bool,
}

/// The upgrade, from both sides.
struct Handover {
    socket: PathBuf,
    started: Instant,
    /// This ztunnel's pod name (`POD_NAME`; empty outside Kubernetes, where it is the
    /// default `ztunnel`).
    pod: String,
    /// The pod this ztunnel took over from: a restarted container of it is refused.
    predecessor_pod: Mutex<Option<String>>,
    /// The predecessor while it still serves; enrolment takes each pod's listening
    /// sockets from it.
    predecessor: Mutex<Option<handover::Predecessor>>,
    /// Set once a successor has taken over: this ztunnel enrols nothing more.
    handed_over: AtomicBool,
    status: Mutex<HandoverStatus>,
    /// Since when every pod of this ztunnel's view is enrolled but the predecessor still
    /// serves pods outside it (see [`Shared::advance_handover`]).
    uncovered_since: Mutex<Option<Instant>>,
    /// Why this ztunnel cannot take over from the one serving the handover socket (it
    /// refused: this is a restarted container of the pod it took over from; or it is
    /// busy with another successor): until that one is gone, this ztunnel releases no
    /// capture and does not serve the handover socket (see [`Shared::blocked`]).
    blocked: Mutex<Option<String>>,
}

/// How long a successor with every pod of its view enrolled waits for that view to
/// place the pods its predecessor still serves before it takes over anyway: a source
/// that lags (a relist, a partial snapshot) catches up in seconds; a pod that is really
/// gone, or a wrong node name, must not hold the upgrade forever.
const COVER_WAIT: Duration = Duration::from_secs(30);

impl Handover {
    fn status(&self) -> std::sync::MutexGuard<'_, HandoverStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn predecessor(&self) -> std::sync::MutexGuard<'_, Option<handover::Predecessor>> {
        self.predecessor.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Where capture may attach, for the scope check every enrolment passes (eBPF capture
/// only: iptables capture attaches nothing to cgroups).
struct Scope {
    root: PathBuf,
    own: PathBuf,
}

/// State the admin API reads.
pub struct Shared {
    pub capture: Capture,
    pub proxy: Arc<Proxy>,
    pods: Mutex<BTreeMap<String, Enrolled>>,
    /// Pods that should be enrolled (or re-enrolled with a new spec) but are not (yet),
    /// with the reason: readiness waits for them and says why.
    pending: Mutex<Vec<(String, String)>>,
    /// Pods whose change (or removal) this ztunnel leaves to the successor that took
    /// their sockets (logged once each).
    deferred: Mutex<BTreeSet<String>>,
    scope: Option<Scope>,
    pub log: crate::telemetry::LogControl,
    /// The drain asked for, once one is (see [`Shared::request_drain`]).
    drain_request: watch::Sender<Option<drain::Request>>,
    /// Drain requests so far, each counted (the first one starts the drain).
    drain_asks: watch::Sender<u64>,
    /// Each reconcile's outcome per desired pod, for sources that answer per pod (ZDS).
    enrol_results: watch::Sender<crate::istio::source::EnrolResults>,
    handover: Handover,
    /// This very `Shared`, for callbacks from other threads.
    me: std::sync::Weak<Shared>,
    /// The Istio source, when it is the source (ZDS answers depend on enrolment).
    zds: std::sync::OnceLock<Arc<IstioSource>>,
    /// The capture programs' decision events: log levels and watchers.
    pub diagnostics: crate::diagnostics::Hub,
}

impl Shared {
    fn pods(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Enrolled>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn enrolled_info(&self) -> Vec<EnrolledPodInfo> {
        self.pods()
            .values()
            .filter_map(|e| {
                let c = e.capture.as_ref()?;
                Some(EnrolledPodInfo {
                    name: e.spec.key.clone(),
                    netns: e.spec.netns.clone(),
                    cgroup: e.spec.cgroup.clone(),
                    addresses: e.spec.addresses.clone(),
                    netns_cookie: c.netns_cookie().unwrap_or(0),
                    attached_programs: c.attached(),
                })
            })
            .collect()
    }

    /// Brings the enrolled set to `desired`. `known` lists every pod the config places on
    /// a cgroup (enrolled or not), for the scope check. Returns whether every pod
    /// succeeded.
    fn reconcile(&self, desired: &BTreeMap<String, LocalPod>, known: &[(String, PathBuf)]) -> bool {
        // Certificates first, without holding the pod table: issuing one needs a runtime
        // worker, and an admin request may hold a worker while it waits for that table
        // (with one worker, e.g. on a 1-CPU node, waiting under the lock deadlocked).
        // Failures are reported by `enrol`, which asks again.
        let identities: Vec<Identity> = {
            let pods = self.pods();
            desired
                .iter()
                .filter(|(key, spec)| pods.get(*key).map(|e| &e.spec) != Some(*spec))
                .filter_map(|(_, spec)| spec.identity.parse().ok())
                .collect()
        };
        for identity in &identities {
            let _ = tokio::runtime::Handle::current().block_on(self.proxy.certs.get(identity));
        }
        let mut pods = self.pods();
        if self.handover.handed_over.load(Ordering::SeqCst) {
            // A successor serves this node's pods now; this ztunnel only drains.
            return true;
        }
        let mut failed: BTreeMap<String, String> = BTreeMap::new();
        let mut deferred = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        deferred.retain(|k| pods.get(k).is_some_and(|e| e.taken));
        let mut left_to_successor = false;
        let stale: Vec<String> = pods
            .iter()
            .filter(|(k, e)| desired.get(*k) != Some(&e.spec))
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            if pods.get(&key).is_some_and(|e| e.taken) {
                // A successor took this pod's sockets and serves it from its own view
                // once it takes over; until then this ztunnel keeps accepting for it as
                // it is. The change is the successor's to make: its pins, map entries
                // and return path are shared with it (removing them would uncapture the
                // pod under the successor). Should the successor go away instead, the
                // change applies here at the next try.
                left_to_successor = true;
                if deferred.insert(key.clone()) {
                    tracing::info!(pod = %key, "pod changed or left this ztunnel's view after a successor took its sockets; left to the successor");
                }
                continue;
            }
            if let (Some(new), Some(e)) = (desired.get(&key), pods.get(&key)) {
                let same_netns = Netns::open(&new.netns)
                    .and_then(|n| n.id())
                    .is_ok_and(|id| id == e.netns_id);
                // A new path to the same netns (another process of the pod found first)
                // is the same pod: nothing to redo.
                let same_pod = same_netns
                    && LocalPod {
                        netns: new.netns.clone(),
                        ..e.spec.clone()
                    } == *new;
                if same_pod {
                    if let Some(e) = pods.get_mut(&key) {
                        e.spec = new.clone();
                    }
                    continue;
                }
                // A changed pod is re-enrolled only when the new spec can be: a
                // half-written or wrong one must not take the working enrolment away.
                if let Err(e) = self.check(new, &pods, known) {
                    let reason = format!("{e:#}");
                    tracing::error!(pod = %key, error = %reason, "new spec of an enrolled pod refused; keeping its current enrolment; will retry");
                    self.count_failure(&e);
                    failed.insert(key, format!("failed to re-enrol pod {}: {reason}", new.key));
                    continue;
                }
                if same_netns {
                    // Make before break: the old enrolment serves (and captures) until
                    // the new one is complete, and stays if it cannot be.
                    let Some(old) = pods.remove(&key) else {
                        continue;
                    };
                    match self.reenrol(new, old) {
                        Ok(e) => {
                            tracing::info!(pod = %key, "pod re-enrolled for its changed spec");
                            pods.insert(key, e);
                        }
                        Err(refused) => {
                            let (e, old) = *refused;
                            let reason = format!("{e:#}");
                            tracing::error!(pod = %key, error = %reason, "failed to re-enrol a pod for its changed spec; keeping its current enrolment; will retry");
                            self.count_failure(&e);
                            failed.insert(
                                key.clone(),
                                format!("failed to re-enrol pod {}: {reason}", new.key),
                            );
                            pods.insert(key, old);
                        }
                    }
                    continue;
                }
            }
            // The pod left the mesh here, or came back in another netns (a new pod of
            // the same name): the old one's enrolment goes.
            if let Some(mut e) = pods.remove(&key) {
                // Capture first, so new connections go direct before the listeners close.
                if let Some(c) = e.capture.take() {
                    self.capture.unenrol(c);
                }
                e.listeners.leave_mesh();
                tracing::info!(pod = %key, "pod unenrolled");
                self.proxy.metrics.pod_unenrolled();
            }
        }
        drop(deferred);
        // Retried until the successor takes over (or goes, and the change applies here).
        let mut ok = failed.is_empty() && !left_to_successor;
        let mut results = BTreeMap::new();
        for (key, spec) in desired {
            if let Some(reason) = failed.get(key) {
                results.insert(key.clone(), Err(reason.clone()));
                continue;
            }
            if pods.contains_key(key) {
                results.insert(key.clone(), Ok(()));
                continue;
            }
            let started = std::time::Instant::now();
            match self.enrol(spec, &pods, known) {
                Ok(e) => {
                    let elapsed_us = started.elapsed().as_micros() as u64;
                    tracing::info!(pod = %key, netns = %spec.netns.display(), elapsed_us, "pod enrolled");
                    self.proxy.metrics.pod_enrolled();
                    pods.insert(key.clone(), e);
                    results.insert(key.clone(), Ok(()));
                }
                Err(e) => {
                    ok = false;
                    self.count_failure(&e);
                    let reason = format!("failed to enrol pod {key}: {e:#}");
                    failed.insert(key.clone(), reason.clone());
                    results.insert(key.clone(), Err(reason));
                    tracing::error!(pod = %key, error = format!("{e:#}"), "failed to enrol pod; will retry");
                }
            }
        }
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = failed.into_iter().collect();
        self.enrol_results.send_replace(results);
        ok
    }

    fn count_failure(&self, e: &anyhow::Error) {
        let scope = e
            .chain()
            .any(|c| matches!(c.downcast_ref(), Some(cgroup::Error::Broader { .. })));
        self.proxy
            .metrics
            .enrolment_failed(if scope { "cgroup_scope" } else { "error" });
    }

    /// What must hold before `spec` is enrolled: its netns opens and is no other enrolled
    /// pod's, and (eBPF capture) its cgroup is the pod's own, nothing broader. Returns the
    /// netns's (device, inode).
    fn check(
        &self,
        spec: &LocalPod,
        pods: &BTreeMap<String, Enrolled>,
        known: &[(String, PathBuf)],
    ) -> anyhow::Result<(u64, u64)> {
        let netns_id = Netns::open(&spec.netns)?.id()?;
        if let Some((other, _)) = pods
            .iter()
            .find(|(k, e)| **k != spec.key && e.netns_id == netns_id)
        {
            anyhow::bail!(
                "network namespace {} is pod {other}'s",
                spec.netns.display()
            );
        }
        if let Some(scope) = &self.scope {
            let mut others: Vec<(String, PathBuf, bool)> = known
                .iter()
                .map(|(k, cg)| (k.clone(), cg.clone(), false))
                .collect();
            others.extend(
                pods.values()
                    .map(|e| (e.spec.key.clone(), e.spec.cgroup.clone(), true)),
            );
            let node = cgroup::Node {
                root: scope.root.clone(),
                own: scope.own.clone(),
                pods: others,
            };
            cgroup::check_pod_scope(
                &spec.key,
                &spec.cgroup,
                netns_id,
                &node,
                cgroup::process_netns,
            )?;
        }
        Ok(netns_id)
    }

    fn enrol(
        &self,
        spec: &LocalPod,
        pods: &BTreeMap<String, Enrolled>,
        known: &[(String, PathBuf)],
    ) -> anyhow::Result<Enrolled> {
        let identity: Identity = spec.identity.parse()?;
        let netns_id = self.check(spec, pods, known)?;
        // The certificate first: the pod's HBONE listener serves it from the first connection.
        tokio::runtime::Handle::current().block_on(self.proxy.certs.get(&identity))?;
        let netns = Netns::open(&spec.netns)?;
        let v6 = spec.addresses.iter().any(IpAddr::is_ipv6);
        // A predecessor still serving hands its listening sockets over.
        let inherited = self.inherit(spec, &netns, v6)?;
        let pod = Arc::new(PodNet {
            name: spec.key.clone(),
            netns,
            addrs: spec.addresses.clone(),
            spiffe: identity.to_string(),
            identity: Arc::new(identity),
            return_path: Mutex::default(),
            server_tls: Mutex::default(),
            dial_ports: Default::default(),
        });
        // Listeners first: a connect captured before they exist would be refused.
        let listeners = match self.proxy.start_pod(pod.clone(), inherited) {
            // Someone holds the pod's ports: a ztunnel that started serving the
            // handover socket after this one looked (a predecessor's own takeover
            // finished meanwhile) can hand them over now.
            Err(e) if e.addr_in_use() && self.reconnect_predecessor() => {
                let inherited = self.inherit(spec, &pod.netns, v6)?;
                self.proxy.start_pod(pod, inherited)?
            }
            other => other?,
        };
        if listeners.inherited > 0 {
            tracing::info!(pod = %spec.key, listeners = listeners.inherited, "took the pod's listening sockets over from the predecessor");
        }
        let inbound = listeners.inbound();
        let inbound: Vec<_> = inbound
            .iter()
            .map(|(a, l)| {
                use std::os::fd::AsFd as _;
                (*a, l.as_fd())
            })
            .collect();
        let capture = self.capture.enrol(
            &spec.key,
            &spec.netns,
            &spec.cgroup,
            &spec.addresses,
            &inbound,
        )?;
        Ok(Enrolled {
            spec: spec.clone(),
            netns_id,
            capture: Some(capture),
            listeners,
            taken: false,
        })
    }

    /// Re-enrols a pod whose spec changed in the same netns (identity, addresses,
    /// cgroup), make before break: the new certificate, then new listeners on the same
    /// listening sockets (accept queues and all), then the new capture attached beside
    /// the old one; only when all of that stands do the old listeners and links go.
    /// Whatever fails, the old enrolment comes back as it was, still serving and
    /// capturing: the pod never runs uncaptured in between. Established connections
    /// keep their tasks either way.
    fn reenrol(
        &self,
        spec: &LocalPod,
        mut old: Enrolled,
    ) -> Result<Enrolled, Box<(anyhow::Error, Enrolled)>> {
        let started = (|| -> anyhow::Result<PodListeners> {
            let identity: Identity = spec.identity.parse()?;
            tokio::runtime::Handle::current().block_on(self.proxy.certs.get(&identity))?;
            let pod = Arc::new(PodNet {
                name: spec.key.clone(),
                netns: Netns::open(&spec.netns)?,
                addrs: spec.addresses.clone(),
                spiffe: identity.to_string(),
                identity: Arc::new(identity),
                return_path: Mutex::default(),
                server_tls: Mutex::default(),
                dial_ports: Default::default(),
            });
            let own = old
                .listeners
                .dup_sockets()
                .context("failed to share the pod's listening sockets with its new listeners")?;
            Ok(self.proxy.restart_pod(pod, own)?)
        })();
        let listeners = match started {
            Ok(l) => l,
            Err(e) => {
                old.listeners.reinstate();
                return Err(Box::new((e, old)));
            }
        };
        let sockets = listeners.inbound();
        let inbound: Vec<_> = sockets
            .iter()
            .map(|(a, l)| {
                use std::os::fd::AsFd as _;
                (*a, l.as_fd())
            })
            .collect();
        let replaced = match old.capture.take() {
            Some(c) => self
                .capture
                .reenrol(
                    c,
                    &old.spec.addresses,
                    &spec.netns,
                    &spec.cgroup,
                    &spec.addresses,
                    &inbound,
                )
                .map_err(|b| {
                    let (e, c) = *b;
                    (e, Some(c))
                }),
            None => self
                .capture
                .enrol(
                    &spec.key,
                    &spec.netns,
                    &spec.cgroup,
                    &spec.addresses,
                    &inbound,
                )
                .map_err(|e| (e, None)),
        };
        drop(inbound);
        drop(sockets);
        match replaced {
            Ok(capture) => Ok(Enrolled {
                spec: spec.clone(),
                netns_id: old.netns_id,
                capture: Some(capture),
                // The old listeners stop here; their sockets stay open in the new ones.
                listeners,
                taken: old.taken,
            }),
            Err((e, capture)) => {
                old.capture = capture;
                drop(listeners);
                old.listeners.reinstate();
                Err(Box::new((e.into(), old)))
            }
        }
    }

    /// The pod's listening sockets from the predecessor, if one still serves (empty
    /// otherwise). A predecessor that went away leaves the binding to this ztunnel; a
    /// socket handed over that is not the pod's fails the enrolment with the reason.
    fn inherit(
        &self,
        spec: &LocalPod,
        netns: &Netns,
        v6: bool,
    ) -> anyhow::Result<Vec<(SocketAddr, std::net::TcpListener)>> {
        let mut guard = self.handover.predecessor();
        let Some(p) = guard.as_mut() else {
            return Ok(Vec::new());
        };
        let cookie = Netns::current().and_then(|home| netns.cookie(&home)).ok();
        let wanted = crate::proxy::Proxy::pod_listen_addrs(v6);
        match p.take(&spec.key, netns.id()?, cookie, &wanted) {
            Ok(l) => {
                self.handover.status().listeners_taken = p.taken;
                Ok(l)
            }
            Err(e @ handover::Error::Listener { .. }) => Err(e.into()),
            Err(e) => {
                let pid = p.pid;
                *guard = None;
                drop(guard);
                self.predecessor_gone(pid, &e, &["taking_over"]);
                Ok(Vec::new())
            }
        }
    }

    /// Looks for a predecessor again (see [`Self::enrol`]); whether one answers.
    fn reconnect_predecessor(&self) -> bool {
        let guard = self.handover.predecessor();
        if guard.is_some() || self.handover.status().serving {
            return false;
        }
        match handover::Predecessor::connect(&self.handover.socket, &self.handover.pod) {
            Ok(Some(p)) => {
                drop(guard);
                self.set_blocked(None);
                tracing::info!(
                    predecessor_pid = p.pid,
                    "a predecessor answers on the handover socket now"
                );
                self.taking_over(p);
                true
            }
            Ok(None) => {
                self.set_blocked(None);
                false
            }
            Err(e) => {
                self.set_blocked(Some(crate::proxy::error_chain(&e)));
                false
            }
        }
    }

    /// Why this ztunnel cannot take over from the ztunnel serving the handover socket,
    /// while that is so.
    fn blocked(&self) -> Option<String> {
        self.handover
            .blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records (or clears) why the ztunnel serving the handover socket cannot be taken
    /// over from; logged when it changes.
    fn set_blocked(&self, why: Option<String>) {
        let mut blocked = self
            .handover
            .blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *blocked == why {
            return;
        }
        match &why {
            Some(reason) => {
                tracing::warn!(socket = %self.handover.socket.display(), error = %reason, "another ztunnel serves this node and this one cannot take over from it: it enrols only what is free, releases no capture and does not serve the handover socket until that ztunnel is gone");
                self.handover.status().state = "blocked".to_owned();
            }
            None => {
                tracing::info!("the ztunnel that could not be taken over from is gone");
                let mut st = self.handover.status();
                if st.state == "blocked" {
                    st.state = "none".to_owned();
                }
            }
        }
        *blocked = why;
    }

    /// The predecessor exited or crashed before stopping on request (noticed in a
    /// state of `during`): the sockets taken so far are accepted on now and stay ours,
    /// the rest is bound afresh, and its capture links go.
    fn predecessor_gone(&self, pid: u32, e: &handover::Error, during: &[&str]) {
        {
            let mut st = self.handover.status();
            if !during.contains(&st.state.as_str()) {
                return;
            }
            st.state = "predecessor_gone".to_owned();
            st.elapsed_ms = Some(self.handover.started.elapsed().as_millis() as u64);
        }
        self.proxy.set_inherited_accepting(true);
        tracing::warn!(predecessor_pid = pid, error = %e, "the predecessor went away during the handover; this ztunnel serves on its own");
        self.capture.release_superseded();
        self.proxy.metrics.handover("successor", "predecessor_gone");
    }

    /// A predecessor answered: its listening sockets are taken pod by pod but accepted
    /// on only once it is told to stop (or is gone), and its capture links stay until
    /// then.
    fn taking_over(&self, p: handover::Predecessor) {
        tracing::info!(predecessor_pid = p.pid, predecessor_pod = %p.pod, "a ztunnel serves this node; taking its pods over");
        self.proxy.set_inherited_accepting(false);
        self.capture.hold_superseded();
        *self
            .handover
            .predecessor_pod
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(p.pod.clone());
        {
            let mut st = self.handover.status();
            st.state = "taking_over".to_owned();
            st.predecessor_pid = Some(p.pid);
        }
        let (me, pid) = (self.me.clone(), p.pid);
        let watched = p.on_close(move || {
            if let Some(s) = me.upgrade() {
                s.predecessor_gone(pid, &handover::Error::Closed, &["taking_over"]);
            }
        });
        if let Err(e) = watched {
            tracing::warn!(error = %e, "cannot watch the predecessor's connection; a crash of it is noticed at the next reconcile");
        }
        *self.handover.predecessor() = Some(p);
    }

    /// After a reconcile with every pod known: finishes a takeover once every pod is
    /// enrolled (the predecessor then stops accepting), keeps its connection alive
    /// meanwhile, and serves the handover socket once no predecessor does. Returns
    /// whether it waits for something a later reconcile may bring (pods the predecessor
    /// serves that this ztunnel's view does not place here yet).
    fn advance_handover(self: &Arc<Self>, all_ok: bool) -> bool {
        if self.handover.handed_over.load(Ordering::SeqCst) {
            return false;
        }
        if self.blocked().is_some() {
            // Whoever serves the handover socket goes on doing so (a successor of ours
            // would find a ztunnel that holds nothing); try it again.
            self.reconnect_predecessor();
            return self.blocked().is_some();
        }
        let taking = self.handover.predecessor().take();
        let state = self.handover.status().state.clone();
        if let Some(mut p) = taking.filter(|_| state == "taking_over") {
            if !all_ok {
                // Some pod is not taken over yet: the predecessor keeps accepting.
                match p.keepalive() {
                    Ok(()) => *self.handover.predecessor() = Some(p),
                    Err(e) => self.predecessor_gone(p.pid, &e, &["taking_over"]),
                }
                return false;
            }
            // Every pod of this view is enrolled; the predecessor may serve more (this
            // view lags, or is wrong). Those keep their accepting process a while.
            let theirs = match p.pods() {
                Ok(pods) => pods.unwrap_or_default(),
                Err(e) => {
                    self.predecessor_gone(p.pid, &e, &["taking_over"]);
                    return false;
                }
            };
            let missing: Vec<String> = {
                let ours = self.pods();
                theirs
                    .into_iter()
                    .filter(|k| !ours.contains_key(k))
                    .collect()
            };
            if !missing.is_empty() {
                let mut since = self
                    .handover
                    .uncovered_since
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let first = since.is_none();
                let waited = since.get_or_insert_with(Instant::now).elapsed();
                if waited < COVER_WAIT {
                    if first {
                        tracing::info!(pods = ?missing, wait_s = COVER_WAIT.as_secs(), "the predecessor serves pods this ztunnel's view does not place here; it keeps accepting for them while the view catches up");
                    }
                    *self.handover.predecessor() = Some(p);
                    return true;
                }
                tracing::warn!(pods = ?missing, waited_s = waited.as_secs(), "taking over although the predecessor serves pods this ztunnel's view does not place here: their capture stays pinned and their new connections are refused until a ztunnel enrols them");
            }
            let (pid, taken) = (p.pid, p.taken);
            // Accepting before the predecessor stops: the sockets are never without an
            // accepting process (connections only ever wait in the kernel's queue).
            self.handover.status().state = "finishing".to_owned();
            self.proxy.set_inherited_accepting(true);
            match p.finish() {
                Ok(pods) => {
                    self.capture.release_superseded();
                    let elapsed_ms = self.handover.started.elapsed().as_millis() as u64;
                    {
                        let mut st = self.handover.status();
                        st.state = "complete".to_owned();
                        st.elapsed_ms = Some(elapsed_ms);
                    }
                    self.proxy.metrics.handover("successor", "complete");
                    tracing::info!(
                        predecessor_pid = pid,
                        pods,
                        listeners = taken,
                        elapsed_ms,
                        "handover complete: the predecessor no longer accepts and drains; this ztunnel serves every pod"
                    );
                }
                Err(e) => self.predecessor_gone(pid, &e, &["finishing"]),
            }
        }
        if !self.handover.status().serving {
            let serving = Arc::new(Serve {
                shared: self.clone(),
                rt: tokio::runtime::Handle::current(),
            });
            match handover::serve(&self.handover.socket, serving) {
                Ok(()) => self.handover.status().serving = true,
                Err(e) => {
                    tracing::error!(error = %crate::proxy::error_chain(&e), "failed to serve the handover socket; an upgrade will have to restart this ztunnel instead");
                }
            }
        }
        false
    }

    pub fn handover_status(&self) -> HandoverStatus {
        self.handover.status().clone()
    }

    /// Whether a successor took over from this ztunnel.
    pub fn handed_over(&self) -> bool {
        self.handover.handed_over.load(Ordering::SeqCst)
    }

    /// Starts a drain: readiness answers 503 from now on, and the main loop drains the
    /// data path (see [`crate::drain`]) and exits, leaving every pod's capture, pins and
    /// return path in place. The first request counts; later ones are logged. Callable
    /// from anywhere (signal handler, admin API, the handover).
    ///
    /// `successor`: another ztunnel already holds the pods' listening sockets and takes
    /// the new connections; without one they fail closed until the next ztunnel starts.
    pub fn request_drain(&self, cause: &str, successor: bool) {
        // Every request counts here, the first or not: a ztunnel that handed over waits
        // for the next one to exit.
        self.drain_asks.send_modify(|n| *n += 1);
        let first = self.drain_request.send_if_modified(|r| {
            if r.is_some() {
                return false;
            }
            *r = Some(drain::Request {
                cause: cause.to_owned(),
                successor,
            });
            true
        });
        if first {
            tracing::info!(cause, successor, "drain requested");
        } else {
            tracing::info!(cause, "drain requested again; the drain under way goes on");
        }
    }

    /// Drains the data path: stops accepting, sends GOAWAY, and lets established
    /// connections run until they end or `timeout` passes (then ends them). Logs and
    /// counts it.
    async fn drain(&self, req: &drain::Request, timeout: Duration) -> drain::Report {
        let proxy = &self.proxy;
        let at_start = proxy.connections.open_count();
        proxy.metrics.drain_started(at_start);
        let new_connections = if req.successor {
            "go to the successor"
        } else {
            "fail closed until the next ztunnel (capture stays attached)"
        };
        tracing::info!(
            cause = %req.cause,
            successor = req.successor,
            connections = at_start,
            timeout = %humantime::format_duration(timeout),
            new_connections,
            "drain started: readiness 503, listeners closed, GOAWAY sent; established connections run until they end or the timeout"
        );
        proxy.start_drain();
        let report = drain::run(&**proxy, timeout, |n| proxy.metrics.set_drain_remaining(n)).await;
        proxy.metrics.drain_forced(report.forced);
        let elapsed_ms = report.elapsed.as_millis() as u64;
        if report.forced > 0 || report.remaining > 0 {
            tracing::warn!(
                connections = report.at_start,
                remaining = report.remaining,
                forced = report.forced,
                elapsed_ms,
                "drain timeout passed; closed the connections left (outcome `drain timeout`)"
            );
        } else {
            tracing::info!(
                connections = report.at_start,
                remaining = 0,
                forced = 0,
                elapsed_ms,
                "drain finished: every connection ended"
            );
        }
        report
    }

    /// On exit, capture stays attached and pinned, and each pod's return path installed,
    /// for the next ztunnel (an upgrade or a restart; a successor may already rely on
    /// them): meanwhile the pods' connections fail closed instead of leaking plaintext.
    fn leave_all(&self) {
        self.proxy.keep_return_paths();
        let mut pods = self.pods();
        for (key, mut e) in std::mem::take(&mut *pods) {
            if let Some(c) = e.capture.take() {
                self.capture.leave_attached(c);
            }
            tracing::info!(pod = %key, "capture and return path left in place for the next ztunnel");
        }
    }

    /// Brings the gauges up to date before a scrape.
    fn refresh_metrics(&self) {
        let m = &self.proxy.metrics;
        m.set_enrolled_pods(self.pods().values().filter(|e| e.capture.is_some()).count() as i64);
        m.set_pending_pods(self.pending.lock().unwrap_or_else(|p| p.into_inner()).len() as i64);
        let (out, inb) = self.proxy.connections.active_counts();
        m.set_active("outbound", out as i64);
        m.set_active("inbound", inb as i64);
        let pool = self.proxy.pool_stats();
        m.set_pool(pool.connections as i64, pool.active_streams as i64);
        m.set_tls_client_configs(self.proxy.client_configs_held() as i64);
        let now = std::time::SystemTime::now();
        for c in self.proxy.certs.snapshot() {
            if let Some(t) = c.not_after {
                let secs = match t.duration_since(now) {
                    Ok(d) => d.as_secs() as i64,
                    Err(e) => -(e.duration().as_secs() as i64),
                };
                m.set_certificate_expiry(&c.identity.to_string(), secs);
            }
        }
        let occ = self.capture.occupancy();
        let maps = std::collections::BTreeMap::from([
            (
                ztunnel_common::orig_dst::BY_COOKIE,
                occ.orig_dst_by_cookie as u64,
            ),
            (
                ztunnel_common::orig_dst::BY_TUPLE,
                occ.orig_dst_by_tuple as u64,
            ),
            (ztunnel_common::pod_addrs::NAME, occ.pod_addrs as u64),
            (ztunnel_common::pod_addrs::SOURCES, occ.pod_sources as u64),
            (
                ztunnel_common::fast_path::SOCKHASH,
                occ.fast_path_sockets as u64,
            ),
        ]);
        m.set_capture(&self.capture.stats(), &maps);
        m.set_bpf_stats(&self.capture.run_stats());
        m.set_capture_watchers(self.diagnostics.watchers());
    }

    /// Ready when the workload file is loaded (it is, once this runs), every pod that
    /// should be enrolled is (capture attached), and each has its certificate.
    pub fn readiness(&self) -> Result<(), String> {
        if let Some(req) = self.drain_request.borrow().as_ref() {
            return Err(format!(
                "draining ({}): no new connections are accepted",
                req.cause
            ));
        }
        if let Some(why) = self.blocked() {
            return Err(format!(
                "another ztunnel serves this node and this one cannot take over from it: {why}"
            ));
        }
        {
            let st = self.handover.status();
            if st.state == "taking_over" || st.state == "finishing" {
                return Err(format!(
                    "taking over from the running ztunnel (pid {}); it still accepts",
                    st.predecessor_pid.unwrap_or_default()
                ));
            }
        }
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if !pending.is_empty() {
            let pods: Vec<String> = pending
                .iter()
                .map(|(pod, why)| format!("{pod} ({why})"))
                .collect();
            return Err(format!("capture not attached yet for: {}", pods.join("; ")));
        }
        let certs = self.proxy.certs.snapshot();
        for e in self.pods().values() {
            let ok = certs
                .iter()
                .any(|c| c.identity.to_string() == e.spec.identity && c.state == "available");
            if !ok {
                return Err(format!("no certificate yet for {}", e.spec.identity));
            }
        }
        Ok(())
    }

    fn netns_cookies(&self) -> Vec<u64> {
        self.pods()
            .values()
            .filter_map(|e| e.capture.as_ref().and_then(PodCapture::netns_cookie))
            .collect()
    }
}

/// This ztunnel as a predecessor, for [`handover::serve`].
struct Serve {
    shared: Arc<Shared>,
    rt: tokio::runtime::Handle,
}

impl handover::Serving for Serve {
    fn pod(&self) -> String {
        self.shared.handover.pod.clone()
    }

    fn pods(&self) -> Vec<String> {
        self.shared.pods().keys().cloned().collect()
    }

    fn refuse(&self, pod: &str) -> Option<String> {
        let from = self
            .shared
            .handover
            .predecessor_pod
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        (!pod.is_empty() && pod == from).then(|| {
            format!(
                "this ztunnel took over from pod {pod}; a restarted container of that pod does not take the node back (its pod is being replaced)"
            )
        })
    }

    fn listeners(&self, netns_id: (u64, u64)) -> Option<Vec<(SocketAddr, OwnedFd)>> {
        if self.shared.handed_over() {
            return None;
        }
        let mut pods = self.shared.pods();
        let e = pods.values_mut().find(|e| e.netns_id == netns_id)?;
        match e.listeners.dup_sockets() {
            Ok(l) => {
                e.taken = true;
                Some(l.into_iter().map(|(a, l)| (a, OwnedFd::from(l))).collect())
            }
            Err(e) => {
                tracing::error!(error = %e, "failed to duplicate a listening socket for the successor");
                None
            }
        }
    }

    fn stop_accepting(&self) -> usize {
        // No reconcile after this one enrols anything (it checks under the pod table).
        self.shared
            .handover
            .handed_over
            .store(true, Ordering::SeqCst);
        // istio-cni's requests on this ztunnel's connection are answered at once from
        // now on: the successor enrols and unenrols.
        if let Some(zds) = self.shared.zds.get() {
            zds.stop_enrolling();
        }
        let (pods, loops) = {
            let mut pods = self.shared.pods();
            let loops: Vec<_> = pods
                .values_mut()
                .flat_map(|e| e.listeners.stop_accepting())
                .collect();
            (pods.len(), loops)
        };
        self.rt.block_on(async {
            for l in loops {
                let _ = l.await;
            }
        });
        self.shared.handover.status().state = "handed_over".to_owned();
        pods
    }

    fn successor_gone(&self) {
        for e in self.shared.pods().values_mut() {
            e.taken = false;
        }
    }

    fn drain(&self) {
        self.shared
            .request_drain("handed over to a successor", true);
    }

    fn count(&self, result: &'static str) {
        self.shared.proxy.metrics.handover("predecessor", result);
    }
}

/// Binds one of ztunnel's own ports (admin, metrics, readiness: in its own netns) and
/// serves it. On one host (no pod netns of its own, as under systemd) a predecessor may
/// still hold the port: then it is bound as soon as the predecessor has exited, retried
/// every 250 ms for two minutes (a drain fits in that) and every 5 s after, logged once.
/// Any other error fails start-up.
async fn serve_port<F, Fut>(addr: SocketAddr, what: &'static str, serve: F) -> anyhow::Result<()>
where
    F: FnOnce(TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    match TcpListener::bind(addr).await {
        Ok(l) => {
            tokio::spawn(serve(l));
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::warn!(%addr, port = what, "port in use (a predecessor on this host draining?); serving it once it is free");
            tokio::spawn(async move {
                let started = Instant::now();
                let mut warned = false;
                loop {
                    let slow = started.elapsed() > Duration::from_secs(120);
                    if slow && !warned {
                        warned = true;
                        tracing::error!(%addr, port = what, "port still in use after 2 minutes; retrying every 5 s");
                    }
                    tokio::time::sleep(if slow {
                        Duration::from_secs(5)
                    } else {
                        Duration::from_millis(250)
                    })
                    .await;
                    match TcpListener::bind(addr).await {
                        Ok(l) => {
                            tracing::info!(%addr, port = what, "port free now; serving it");
                            serve(l).await;
                            return;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
                        Err(e) => {
                            tracing::error!(%addr, port = what, error = %e, "failed to bind the port");
                            return;
                        }
                    }
                }
            });
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("failed to bind the {what} port to {addr}")),
    }
}

/// `--pod-name`'s default: ztunnel runs outside a pod (no `POD_NAME`).
const DEFAULT_POD_NAME: &str = "ztunnel";

/// Hands heap that start-up and enrolment freed (the parsed eBPF object and BTF, netns
/// and certificate work on blocking threads with their own malloc arenas) back to the
/// kernel: glibc keeps it otherwise, and it counts in ztunnel's resident memory
/// (`cargo xtask bench`, "ztunnel RSS, idle"). Takes well under a millisecond.
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Once start-up is over (the first reconcile, with the pods known), the executable's
/// code and read-only data that only start-up used go (`code_pages`): an idle ztunnel
/// keeps resident only what it runs from then on. A failure only leaves more resident.
async fn release_startup_code() {
    match tokio::task::spawn_blocking(crate::code_pages::release_startup_code).await {
        Ok(Ok(r)) => tracing::info!(
            segments_kib = r.segment_bytes / 1024,
            kept_pages = r.kept_pages,
            rss_kib_before = r.rss_kib_before,
            rss_kib_after = r.rss_kib_after,
            "released start-up code"
        ),
        Ok(Err(e)) => tracing::warn!(error = %e, "failed to release start-up code"),
        Err(e) => tracing::warn!(error = %e, "failed to release start-up code"),
    }
}

/// Keeps the node's addresses among the kubelet probe sources current (a node's
/// addresses rarely change; 30 s bounds how long a new one is not recognised).
async fn follow_node_addresses(probes: Arc<crate::probes::ProbeSources>) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    let mut warned = false;
    loop {
        tick.tick().await;
        let p = probes.clone();
        let result = tokio::task::spawn_blocking(move || {
            let home = Netns::current()?;
            p.refresh(&home)
        })
        .await;
        match result {
            Ok(Ok(())) => warned = false,
            Ok(Err(e)) if !warned => {
                warned = true;
                tracing::warn!(error = %crate::proxy::error_chain(&e), "cannot read the node's addresses; kubelet probes from them are policed like any plaintext until they can be read");
            }
            Ok(Err(_)) => {}
            Err(e) => tracing::error!(error = %e, "probe source refresh panicked"),
        }
    }
}

/// How often free heap is handed back to the kernel besides after each reconcile.
const HEAP_RELEASE_EVERY: Duration = Duration::from_secs(10);

pub async fn run(cfg: Config, log: crate::telemetry::LogControl) -> anyhow::Result<()> {
    let started = Instant::now();
    cfg.validate()?;
    tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), "starting ztunnel");
    tracing::info!(
        record_layer = crate::tls::record_layer().name(),
        cpu = ?crate::tls::aes_gcm_cpu(),
        "HBONE's TLS records are sealed by the AES-GCM that is faster on this CPU"
    );
    match crate::limits::raise_open_files_limit() {
        Ok((from, to)) => tracing::info!(
            from,
            to,
            "open-file limit (RLIMIT_NOFILE) raised to its hard limit"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "failed to raise the open-file limit (RLIMIT_NOFILE); listeners may hit EMFILE early")
        }
    }
    let cgroup_root = ebpf::mount_point("cgroup2").context(
        "no cgroup2 mount found in /proc/self/mountinfo; mount one (`cargo xtask setup` does)",
    )?;
    if let Some(cg) = &cfg.cgroup {
        cgroup::join(cg, &cgroup_root)?;
    }
    let mut own_cgroup =
        ebpf::own_cgroup().context("failed to find ztunnel's cgroup v2 directory")?;
    if cfg.source == Source::Kube && own_cgroup == cgroup_root {
        // In a pod's private cgroup namespace /proc/self/cgroup says "/": look ourselves up
        // in the node's tree (mounted over the pod's view) instead.
        own_cgroup = crate::kube::discovery::cgroup_of(&cgroup_root, std::process::id())
            .unwrap_or(own_cgroup);
    }
    if own_cgroup == cgroup_root {
        anyhow::bail!(
            "ztunnel runs in the root cgroup ({}); its programs would cover every pod. Start it in its own cgroup or pass --cgroup",
            cgroup_root.display()
        );
    }

    // Where workloads and enrolment come from, the updates that follow, and what keeps the
    // source running (Istio's starts below, once enrolment can answer istio-cni).
    let metrics = crate::metrics::Metrics::new();
    let mut istio_tx = None;
    let (initial, mut rx, mut source, kube_client): (_, _, Option<Box<dyn std::any::Any>>, _) =
        match cfg.source {
            Source::File => {
                let path = cfg
                    .workloads
                    .clone()
                    .context("--workloads is required with --source file")?;
                let initial = state::file::load_settled(&path, &cfg.node)?;
                let (tx, rx) = watch::channel(initial.clone());
                let watcher =
                    state::file::watch(path.clone(), cfg.node.clone(), tx, metrics.clone())
                        .with_context(|| format!("failed to watch {}", path.display()))?;
                (
                    initial,
                    rx,
                    Some(Box::new(watcher) as Box<dyn std::any::Any>),
                    None,
                )
            }
            Source::Kube => {
                let opts = crate::kube::Options::from_config(&cfg, cgroup_root.clone());
                let k = crate::kube::start(opts).await?;
                let initial = k.updates.borrow().clone();
                (
                    initial,
                    k.updates,
                    Some(Box::new(k.guard) as Box<dyn std::any::Any>),
                    Some(k.client),
                )
            }
            Source::Istio => {
                let initial = IstioSource::empty(&cfg.istio.base(&cfg.node, &cfg.trust_domain));
                let (tx, rx) = watch::channel(initial.clone());
                istio_tx = Some(tx);
                (initial, rx, None, None)
            }
        };
    let mut istio_health = istio::Health::default();
    let ca: Arc<dyn CertificateSource> = match (cfg.ca(), &kube_client) {
        (Ca::Builtin, None) => Arc::new(BuiltinCa::load_or_create(
            &cfg.ca_dir,
            &initial.trust_domain,
            cfg.cert_lifetime,
        )?),
        (Ca::Builtin, Some(client)) => Arc::new(
            crate::kube::builtin_ca(
                client,
                &cfg.ca_secret,
                &initial.trust_domain,
                cfg.cert_lifetime,
            )
            .await?,
        ),
        (Ca::Istio, _) => {
            let ca = cfg.istio.ca(cfg.cert_lifetime)?;
            istio_health.ca = Some(ca.status());
            Arc::new(ca)
        }
    };
    let certs = Arc::new(CertificateManager::new(ca));
    let (results_tx, results_rx) = watch::channel(Default::default());
    let capture = Capture::load(
        cfg.capture,
        &ebpf::Options {
            pin_dir: cfg.bpf_pin_dir.clone(),
            own_cgroup: own_cgroup.clone(),
            fast_path: cfg.fast_path,
            dns: cfg.dns_capture,
        },
    )?;
    let scope = (capture.mode() == "ebpf").then(|| Scope {
        root: cgroup_root.clone(),
        own: own_cgroup,
    });
    let probes = Arc::new(crate::probes::ProbeSources::new(
        &cfg.probe_sources(),
        cfg.host_proc.join("1/ns/net"),
    ));
    if probes.follows_node() {
        tokio::spawn(follow_node_addresses(probes.clone()));
    }
    let proxy = Proxy::new(
        Store::new(initial.clone()),
        certs,
        metrics.clone(),
        probes,
        cfg.limits,
    )?;
    if cfg.dns_capture {
        let upstreams = crate::dns::read_resolv_conf(&cfg.dns_resolv_conf)?;
        tracing::info!(upstreams = ?upstreams, timeout = %humantime::format_duration(cfg.dns_upstream_timeout), "DNS proxy on: enrolled pods' :15053");
        proxy.set_dns(crate::dns::Dns::new(
            upstreams,
            cfg.dns_upstream_timeout,
            metrics.clone(),
        )?);
    }
    let shared = Arc::new_cyclic(|me| Shared {
        me: me.clone(),
        diagnostics: crate::diagnostics::Hub::default(),
        capture,
        proxy,
        pods: Mutex::default(),
        pending: Mutex::default(),
        deferred: Mutex::default(),
        scope,
        log,
        drain_request: watch::Sender::new(None),
        drain_asks: watch::Sender::new(0),
        enrol_results: results_tx,
        zds: std::sync::OnceLock::new(),
        handover: Handover {
            uncovered_since: Mutex::default(),
            blocked: Mutex::default(),
            socket: cfg.handover_socket.clone(),
            started,
            pod: if cfg.istio.pod_name == DEFAULT_POD_NAME {
                String::new()
            } else {
                cfg.istio.pod_name.clone()
            },
            predecessor_pod: Mutex::default(),
            predecessor: Mutex::default(),
            handed_over: AtomicBool::new(false),
            status: Mutex::new(HandoverStatus {
                state: "none".to_owned(),
                ..HandoverStatus::default()
            }),
        },
    });
    if let Some(table) = shared.capture.orig_dst_table()? {
        shared.proxy.set_orig_dst_table(table);
    }
    crate::diagnostics::spawn(shared.clone());
    // A ztunnel still serving this node hands the pods over; until it stops accepting,
    // its capture links stay next to ours.
    let (socket, pod) = (cfg.handover_socket.clone(), shared.handover.pod.clone());
    match tokio::task::spawn_blocking(move || handover::Predecessor::connect(&socket, &pod)).await?
    {
        Ok(Some(p)) => shared.taking_over(p),
        Ok(None) => {}
        Err(e) => shared.set_blocked(Some(crate::proxy::error_chain(&e))),
    }
    if let Some(tx) = istio_tx {
        let running = istio::start(&cfg.istio, &cfg.node, &cfg.trust_domain, tx, results_rx)?;
        istio_health.source = Some(running.source.clone());
        let _ = shared.zds.set(running.source.clone());
        source = Some(Box::new(running));
    }
    // Dropping it stops following the source.
    let _source = source;
    shared
        .proxy
        .set_inbound_redirected(shared.capture.inbound_is_redirected());
    let cfg = Arc::new(cfg);

    let (c, s) = (cfg.clone(), shared.clone());
    serve_port(cfg.admin_addr, "admin", move |l| admin::serve(l, c, s)).await?;
    let s = shared.clone();
    let health = istio_health.clone();
    let synced = istio_health.clone();
    let m = metrics.clone();
    let all = metrics.clone();
    serve_port(cfg.metrics_addr, "metrics", move |l| {
        crate::metrics::serve_metrics(l, all, move || {
            s.refresh_metrics();
            health.refresh_metrics(&m);
        })
    })
    .await?;
    let s = shared.clone();
    serve_port(cfg.readiness_addr, "readiness", move |l| {
        crate::metrics::serve_readiness(l, move || {
            s.readiness()?;
            istio_health.readiness()
        })
    })
    .await?;

    // Memory a burst of connections used (say, thousands of half-open handshakes until
    // their timeout) goes back to the kernel soon after, not only at the next reconcile.
    tokio::spawn(async {
        let mut every = tokio::time::interval(HEAP_RELEASE_EVERY);
        loop {
            every.tick().await;
            let _ = tokio::task::spawn_blocking(release_free_heap).await;
        }
    });

    // Signals only ask for the drain: readiness turns 503 at once, even while the main
    // loop is busy with a reconcile.
    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let s = shared.clone();
    tokio::spawn(async move {
        loop {
            let cause = tokio::select! {
                Some(()) = term.recv() => "SIGTERM",
                Some(()) = int.recv() => "SIGINT",
                else => return,
            };
            s.request_drain(cause, false);
        }
    });
    let mut drain_requested = shared.drain_request.subscribe();
    let drain_timeout = cfg.resolved_drain_timeout();
    let mut retry = tokio::time::interval(Duration::from_secs(2));
    tracing::info!(admin = %cfg.admin_addr, drain_timeout = %humantime::format_duration(drain_timeout), "ztunnel ready");
    let mut first = true;
    // Start-up's code is resident until the first reconcile is through.
    let mut code_held = true;
    // The handover waits for this view to cover the predecessor's pods.
    let mut waiting = false;
    // istiod's and istio-cni's removals are explicit and final (a ZDS `del` waits for the
    // unenrolment); the file and the Kubernetes API only ever show whole states, in
    // which a removal may be a moment's gap.
    let settle = match cfg.source {
        Source::File | Source::Kube => cfg.config_settle,
        Source::Istio => Duration::ZERO,
    };
    let mut settler = state::settle::Settler::new(initial, settle, &cfg.node);
    loop {
        let latest = rx.borrow_and_update().clone();
        let node = cfg.node.clone();
        // Settling and indexing a version take time linear in the cluster's size (tenths of
        // a second at 100,000 workloads): not on the runtime's workers, which carry the
        // connections.
        let (back, store, desired, known, wanted, wanted_addrs) =
            tokio::task::spawn_blocking(move || {
                settler.update(latest, std::time::Instant::now());
                let current = settler.effective().clone();
                let desired = current.local_enrolled(&node);
                // Pods the source places here, whether they can be enrolled yet or not.
                let wanted: BTreeSet<String> = current
                    .workloads
                    .iter()
                    .filter(|w| w.node == node && current.enrolled(w))
                    .map(|w| w.key())
                    .collect();
                let wanted_addrs: Vec<IpAddr> = current
                    .workloads
                    .iter()
                    .filter(|w| wanted.contains(&w.key()))
                    .flat_map(|w| w.addresses.iter().copied())
                    .collect();
                let known: Vec<(String, PathBuf)> = current
                    .workloads
                    .iter()
                    .filter_map(|w| Some((w.key(), w.cgroup.clone()?)))
                    .collect();
                (
                    settler,
                    Store::new(current),
                    desired,
                    known,
                    wanted,
                    wanted_addrs,
                )
            })
            .await?;
        settler = back;
        metrics.set_config_held(settler.held().len() as i64);
        shared.proxy.set_store(store);
        let s = shared.clone();
        let all_ok = tokio::task::spawn_blocking(move || s.reconcile(&desired, &known)).await?;
        // With ZDS, the pods are known only once istio-cni's snapshot is in.
        if synced.pods_known() {
            // Nothing is released while another ztunnel serves this node un-taken-over.
            if first && shared.blocked().is_none() {
                if shared.handover.predecessor().is_some() {
                    // A live predecessor serves pods with the capture this would release:
                    // a pod it serves that this ztunnel's view lacks (a wrong node name,
                    // a partial snapshot) would go uncaptured once it exits. Its capture
                    // stays pinned instead: fail closed until a ztunnel enrols the pod.
                    tracing::info!(
                        "a predecessor is serving: capture pinned for pods outside this ztunnel's view stays"
                    );
                } else {
                    // Capture a previous ztunnel left pinned for pods no longer wanted
                    // goes now; what it left for pods still wanted stays, enrolled or not.
                    shared.capture.release_unclaimed(
                        &wanted,
                        &wanted_addrs,
                        &shared.netns_cookies(),
                    );
                }
                first = false;
            }
            let s = shared.clone();
            waiting = tokio::task::spawn_blocking(move || s.advance_handover(all_ok)).await?;
        }
        release_free_heap();
        if code_held && !first {
            code_held = false;
            release_startup_code().await;
        }
        let settled = settler.next_deadline();
        tokio::select! {
            changed = rx.changed() => if changed.is_err() {
                shared.request_drain("the workload source ended", false);
                break;
            },
            _ = retry.tick(), if !all_ok || waiting => {}
            _ = tokio::time::sleep_until(settled.unwrap_or_else(std::time::Instant::now).into()), if settled.is_some() => {}
            _ = drain_requested.wait_for(Option::is_some) => break,
        }
    }
    let req = shared
        .drain_request
        .borrow()
        .clone()
        .unwrap_or_else(|| drain::Request {
            cause: "shutdown".to_owned(),
            successor: false,
        });
    shared.drain(&req, drain_timeout).await;
    if shared.handed_over() {
        // Exiting by itself would have the supervisor restart it (a DaemonSet pod's
        // container, a unit with Restart=), and a restarted ztunnel takes no node back
        // from the successor it handed over to: it goes when its pod or unit is stopped
        // (a drain request after the handover's own), as an old ztunnel's pod is once
        // the new one is ready.
        tracing::info!("handed over and drained; exits on SIGTERM, SIGINT or /quitquitquit");
        let mut asks = shared.drain_asks.subscribe();
        let _ = asks.wait_for(|n| *n >= 2).await;
    }
    let s = shared.clone();
    tokio::task::spawn_blocking(move || s.leave_all()).await?;
    tracing::info!("ztunnel exits");
    Ok(())
}
