//! The composition root: loads capture, follows the workload file, enrols and unenrols
//! this node's pods, serves the admin API, and drains on SIGTERM/SIGINT, `POST
//! /quitquitquit` or a successor's request ([`Shared::request_drain`]) before it exits.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::{net::TcpListener, signal::unix::SignalKind, sync::watch};

use crate::{
    admin,
    capture::{Capture, PodCapture},
    cgroup,
    config::{Ca, Config, Source},
    drain, ebpf,
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
    _listeners: PodListeners,
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
    scope: Option<Scope>,
    pub log: crate::telemetry::LogControl,
    /// The drain asked for, once one is (see [`Shared::request_drain`]).
    drain_request: watch::Sender<Option<drain::Request>>,
    /// Each reconcile's outcome per desired pod, for sources that answer per pod (ZDS).
    enrol_results: watch::Sender<crate::istio::source::EnrolResults>,
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
        let mut failed: BTreeMap<String, String> = BTreeMap::new();
        let stale: Vec<String> = pods
            .iter()
            .filter(|(k, e)| desired.get(*k) != Some(&e.spec))
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            if let (Some(new), Some(e)) = (desired.get(&key), pods.get(&key)) {
                // A new path to the same netns (another process of the pod found first)
                // is the same pod: nothing to redo.
                let same_pod = LocalPod {
                    netns: new.netns.clone(),
                    ..e.spec.clone()
                } == *new
                    && Netns::open(&new.netns)
                        .and_then(|n| n.id())
                        .is_ok_and(|id| id == e.netns_id);
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
            }
            if let Some(mut e) = pods.remove(&key) {
                // Capture first, so new connections go direct before the listeners close.
                if let Some(c) = e.capture.take() {
                    self.capture.unenrol(c);
                }
                tracing::info!(pod = %key, "pod unenrolled");
                self.proxy.metrics.pod_unenrolled();
            }
        }
        let mut ok = failed.is_empty();
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
        let pod = Arc::new(PodNet {
            name: spec.key.clone(),
            netns: Netns::open(&spec.netns)?,
            addrs: spec.addresses.clone(),
            identity,
            return_path: Mutex::default(),
            server_tls: Mutex::default(),
        });
        // Listeners first: a connect captured before they exist would be refused.
        let listeners = self.proxy.start_pod(pod)?;
        let capture = self
            .capture
            .enrol(&spec.key, &spec.netns, &spec.cgroup, &spec.addresses)?;
        Ok(Enrolled {
            spec: spec.clone(),
            netns_id,
            capture: Some(capture),
            _listeners: listeners,
        })
    }

    /// Starts a drain: readiness answers 503 from now on, and the main loop drains the
    /// data path (see [`crate::drain`]) and exits, leaving every pod's capture, pins and
    /// return path in place. The first request counts; later ones are logged. Callable
    /// from anywhere (signal handler, admin API, the handover).
    ///
    /// `successor`: another ztunnel already holds the pods' listening sockets and takes
    /// the new connections; without one they fail closed until the next ztunnel starts.
    pub fn request_drain(&self, cause: &str, successor: bool) {
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
            (
                ztunnel_common::fast_path::SOCKHASH,
                occ.fast_path_sockets as u64,
            ),
        ]);
        m.set_capture(&self.capture.stats(), &maps);
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
    cfg.validate()?;
    tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), "starting ztunnel");
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
    let shared = Arc::new(Shared {
        capture,
        proxy: Proxy::new(
            Store::new(initial.clone()),
            certs,
            metrics.clone(),
            probes,
            cfg.limits,
        )?,
        pods: Mutex::default(),
        pending: Mutex::default(),
        scope,
        log,
        drain_request: watch::Sender::new(None),
        enrol_results: results_tx,
    });
    if let Some(tx) = istio_tx {
        let running = istio::start(&cfg.istio, &cfg.node, &cfg.trust_domain, tx, results_rx)?;
        istio_health.source = Some(running.source.clone());
        source = Some(Box::new(running));
    }
    // Dropping it stops following the source.
    let _source = source;
    shared
        .proxy
        .set_inbound_redirected(shared.capture.inbound_is_redirected());
    let cfg = Arc::new(cfg);

    let admin = TcpListener::bind(cfg.admin_addr)
        .await
        .with_context(|| format!("failed to bind the admin API to {}", cfg.admin_addr))?;
    tokio::spawn(admin::serve(admin, cfg.clone(), shared.clone()));
    let listener = TcpListener::bind(cfg.metrics_addr)
        .await
        .with_context(|| format!("failed to bind the metrics port to {}", cfg.metrics_addr))?;
    let s = shared.clone();
    let health = istio_health.clone();
    let synced = istio_health.clone();
    let m = metrics.clone();
    tokio::spawn(crate::metrics::serve_metrics(
        listener,
        metrics.clone(),
        move || {
            s.refresh_metrics();
            health.refresh_metrics(&m);
        },
    ));
    let listener = TcpListener::bind(cfg.readiness_addr)
        .await
        .with_context(|| {
            format!(
                "failed to bind the readiness port to {}",
                cfg.readiness_addr
            )
        })?;
    let s = shared.clone();
    tokio::spawn(crate::metrics::serve_readiness(listener, move || {
        s.readiness()?;
        istio_health.readiness()
    }));

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
        let (back, store, desired, known) = tokio::task::spawn_blocking(move || {
            settler.update(latest, std::time::Instant::now());
            let current = settler.effective().clone();
            let desired = current.local_enrolled(&node);
            let known: Vec<(String, PathBuf)> = current
                .workloads
                .iter()
                .filter_map(|w| Some((w.key(), w.cgroup.clone()?)))
                .collect();
            (settler, Store::new(current), desired, known)
        })
        .await?;
        settler = back;
        metrics.set_config_held(settler.held().len() as i64);
        shared.proxy.set_store(store);
        let s = shared.clone();
        let all_ok = tokio::task::spawn_blocking(move || s.reconcile(&desired, &known)).await?;
        // With ZDS, the pods are known only once istio-cni's snapshot is in.
        if first && synced.pods_known() {
            // Capture a previous ztunnel left pinned for pods no longer wanted goes now.
            shared.capture.release_unclaimed(&shared.netns_cookies());
            first = false;
        }
        release_free_heap();
        let settled = settler.next_deadline();
        tokio::select! {
            changed = rx.changed() => if changed.is_err() {
                shared.request_drain("the workload source ended", false);
                break;
            },
            _ = retry.tick(), if !all_ok => {}
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
    let s = shared.clone();
    tokio::task::spawn_blocking(move || s.leave_all()).await?;
    tracing::info!("ztunnel exits");
    Ok(())
}
