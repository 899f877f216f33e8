//! The watch loop: one kube-runtime watcher per kind (list, then watch from the list's
//! resource version, resumed from the last bookmark when a watch ends, re-listed on
//! 410 Gone), mirrored into maps, rebuilt into a [`LocalConfig`] after each burst of events
//! and published when it changed. Local pods that should be enrolled but have no netns yet
//! are looked for again every second.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use futures_util::{FutureExt as _, StreamExt as _, stream::BoxStream};
use k8s_openapi::api::core::v1::{Namespace as KubeNamespace, Pod, Service as KubeService};
use kube::{
    Api, Client,
    core::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event},
    },
};
use tokio::sync::{oneshot, watch};

use super::{
    Error, Options,
    convert::{self, Placement, PodRecord},
    discovery::Discovery,
};
use crate::state::{LocalConfig, Namespace};

/// How often pods waiting for their netns are looked for again.
const RETRY: Duration = Duration::from_secs(1);

/// Stops the watchers when dropped.
pub struct Guard(tokio::task::JoinHandle<()>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum Ev {
    Pod(Box<Event<Pod>>),
    Namespace(Box<Event<KubeNamespace>>),
    Service(Box<Event<KubeService>>),
    Gateway(Box<Event<DynamicObject>>),
    /// Gateways cannot be listed: the Gateway API is not installed (404), or ztunnel's
    /// role does not grant it (403, a ClusterRole from before waypoints). No waypoints
    /// then; listed again with the watcher's backoff. Carries the API server's message.
    NoGatewayApi {
        forbidden: bool,
        message: String,
    },
    /// A waypoint's: HTTPRoutes and Istio's AuthorizationPolicies.
    Route(Box<Event<DynamicObject>>),
    AuthzPolicy(Box<Event<DynamicObject>>),
    /// One of the waypoint's kinds cannot be listed (404: its CRD is not installed; 403:
    /// not granted): none of it, listed again with the watcher's backoff.
    NoL7Kind {
        kind: L7Kind,
        forbidden: bool,
        message: String,
    },
}

/// The kinds only a waypoint watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum L7Kind {
    HttpRoute,
    AuthorizationPolicy,
}

impl L7Kind {
    fn resource(self) -> ApiResource {
        match self {
            L7Kind::HttpRoute => ApiResource::from_gvk(&GroupVersionKind::gvk(
                "gateway.networking.k8s.io",
                "v1",
                "HTTPRoute",
            )),
            L7Kind::AuthorizationPolicy => ApiResource::from_gvk(&GroupVersionKind::gvk(
                "security.istio.io",
                "v1",
                "AuthorizationPolicy",
            )),
        }
    }

    fn plural(self) -> &'static str {
        match self {
            L7Kind::HttpRoute => "httproutes.gateway.networking.k8s.io",
            L7Kind::AuthorizationPolicy => "authorizationpolicies.security.istio.io",
        }
    }
}

/// Gateway API Gateways (`gateway.networking.k8s.io/v1`), for waypoints: an optional CRD.
fn gateway_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "gateway.networking.k8s.io",
        "v1",
        "Gateway",
    ))
}

/// The objects of one kind, kept across relists: a relist builds a fresh map and swaps it
/// in when complete, so objects deleted while the watch was down disappear.
struct Mirror<T> {
    items: BTreeMap<String, T>,
    relisting: Option<BTreeMap<String, T>>,
    synced: bool,
}

impl<T> Default for Mirror<T> {
    fn default() -> Self {
        Self {
            items: BTreeMap::new(),
            relisting: None,
            synced: false,
        }
    }
}

impl<T> Mirror<T> {
    /// `convert` gives the object's key and what to keep of it (`None`: drop it).
    fn apply<K>(&mut self, ev: Event<K>, convert: impl Fn(&K) -> (String, Option<T>)) {
        match ev {
            Event::Init => self.relisting = Some(BTreeMap::new()),
            Event::InitApply(k) => {
                let (key, v) = convert(&k);
                if let (Some(map), Some(v)) = (self.relisting.as_mut(), v) {
                    map.insert(key, v);
                }
            }
            Event::InitDone => {
                if let Some(map) = self.relisting.take() {
                    self.items = map;
                }
                self.synced = true;
            }
            Event::Apply(k) => match convert(&k) {
                (key, Some(v)) => {
                    self.items.insert(key, v);
                }
                (key, None) => {
                    self.items.remove(&key);
                }
            },
            Event::Delete(k) => {
                self.items.remove(&convert(&k).0);
            }
        }
    }
}

struct State {
    opts: Options,
    discovery: Discovery,
    pods: Mirror<PodRecord>,
    namespaces: Mirror<Namespace>,
    services: Mirror<KubeService>,
    /// Gateways of class `istio-waypoint`, by `namespace/name`.
    waypoints: Mirror<convert::Waypoint>,
    /// The Gateway API was missing at the last try (said once until it comes).
    no_gateway_api: bool,
    /// A waypoint's routes and L7 policies (only with `opts.waypoint_config`).
    routes: Mirror<crate::waypoint::route::HttpRoute>,
    l7_policies: Mirror<crate::waypoint::authz::WaypointPolicy>,
    /// The waypoint kinds that were missing at the last try (said once until they come).
    no_l7_kinds: BTreeSet<&'static str>,
    /// AuthorizationPolicies exist but may not be listed (403): the waypoint refuses
    /// every request until they can be (fail closed), rather than allow what a policy
    /// it cannot see might deny.
    l7_policies_forbidden: bool,
    /// By pod UID: local enrolled pods found on the node.
    placements: BTreeMap<String, Placement>,
    /// Some local pod should be enrolled but was not found on the node yet.
    unplaced: bool,
}

impl State {
    fn apply(&mut self, ev: Ev) {
        match ev {
            Ev::Pod(e) => self
                .pods
                .apply(*e, |p| (convert::key(&p.metadata), convert::pod(p))),
            Ev::Namespace(e) => self.namespaces.apply(*e, |n| {
                (
                    n.metadata.name.clone().unwrap_or_default(),
                    convert::namespace(n),
                )
            }),
            Ev::Service(e) => self
                .services
                .apply(*e, |s| (convert::key(&s.metadata), Some(s.clone()))),
            Ev::Gateway(e) => {
                if std::mem::take(&mut self.no_gateway_api) {
                    tracing::info!("the Gateway API is there now: waypoints are watched");
                }
                self.waypoints
                    .apply(*e, |g| (convert::key(&g.metadata), convert::gateway(g)))
            }
            Ev::NoGatewayApi { forbidden, message } => {
                if !self.no_gateway_api {
                    if forbidden {
                        tracing::warn!(%message, "not allowed to list gateways.gateway.networking.k8s.io (grant list and watch, as deploy/ does): no waypoints; tried again with backoff");
                    } else {
                        tracing::info!(%message, "the Gateway API is not installed (no gateways.gateway.networking.k8s.io): no waypoints; looked for again with backoff");
                    }
                }
                self.no_gateway_api = true;
                self.waypoints.items.clear();
                self.waypoints.relisting = None;
                self.waypoints.synced = true;
            }
            Ev::Route(e) => {
                if self.no_l7_kinds.remove(L7Kind::HttpRoute.plural()) {
                    tracing::info!("HTTPRoutes can be listed now: they are watched");
                }
                self.routes
                    .apply(*e, |o| (convert::key(&o.metadata), convert::http_route(o)))
            }
            Ev::AuthzPolicy(e) => {
                self.l7_policies_forbidden = false;
                if self
                    .no_l7_kinds
                    .remove(L7Kind::AuthorizationPolicy.plural())
                {
                    tracing::info!("AuthorizationPolicies can be listed now: they are watched");
                }
                self.l7_policies.apply(*e, |o| {
                    (convert::key(&o.metadata), convert::waypoint_policy(o))
                })
            }
            Ev::NoL7Kind {
                kind,
                forbidden,
                message,
            } => {
                if self.no_l7_kinds.insert(kind.plural()) {
                    let what = kind.plural();
                    if forbidden {
                        tracing::warn!(%message, "not allowed to list {what} (grant list and watch, as deploy/'s waypoint role does); tried again with backoff");
                    } else {
                        tracing::info!(%message, "{what} is not installed: none applied; looked for again with backoff");
                    }
                }
                let mirror_clear = |synced: &mut bool| *synced = true;
                match kind {
                    L7Kind::HttpRoute => {
                        self.routes.items.clear();
                        self.routes.relisting = None;
                        mirror_clear(&mut self.routes.synced);
                    }
                    L7Kind::AuthorizationPolicy => {
                        self.l7_policies_forbidden = forbidden;
                        self.l7_policies.items.clear();
                        self.l7_policies.relisting = None;
                        mirror_clear(&mut self.l7_policies.synced);
                    }
                }
            }
        }
    }

    fn synced(&self) -> bool {
        self.pods.synced
            && self.namespaces.synced
            && self.services.synced
            && self.waypoints.synced
            && (!self.opts.waypoint_config || (self.routes.synced && self.l7_policies.synced))
    }

    fn build(&self) -> LocalConfig {
        let mut cfg = convert::local_config(
            &self.opts.trust_domain,
            &self.namespaces.items,
            &self.pods.items,
            &self.services.items,
            &self.waypoints.items,
            &self.placements,
        );
        cfg.http_routes = self.routes.items.values().cloned().collect();
        cfg.waypoint_policies = self.l7_policies.items.values().cloned().collect();
        if self.l7_policies_forbidden {
            cfg.waypoint_policies
                .push(convert::deny_all_waypoints(&cfg.root_namespace));
        }
        cfg
    }

    fn rebuild(&mut self) -> LocalConfig {
        let cfg = self.build();
        let wanted: BTreeSet<String> = self
            .pods
            .items
            .values()
            .filter(|p| {
                p.workload.node == self.opts.node
                    && !p.host_network
                    && !p.workload.addresses.is_empty()
                    && cfg.enrolled(&p.workload)
            })
            .map(|p| p.uid.clone())
            .collect();
        let discovery = &self.discovery;
        self.placements
            .retain(|uid, pl| wanted.contains(uid) && discovery.still_valid(pl));
        let missing: BTreeSet<String> = wanted
            .iter()
            .filter(|uid| !self.placements.contains_key(*uid))
            .cloned()
            .collect();
        if missing.is_empty() {
            self.unplaced = false;
            return cfg;
        }
        for (uid, found) in self.discovery.locate(&missing) {
            match found {
                Ok(p) => {
                    tracing::debug!(uid, netns = %p.netns.display(), cgroup = %p.cgroup.display(), "found pod on the node");
                    self.placements.insert(uid, p);
                }
                Err(e) => tracing::debug!(uid, error = %e, "pod not found on the node yet"),
            }
        }
        self.unplaced = self.placements.len() < wanted.len();
        self.build()
    }
}

/// Starts the watchers; returns once each has listed its kind.
pub(super) async fn spawn(
    client: Client,
    opts: Options,
) -> Result<(watch::Receiver<LocalConfig>, Guard), Error> {
    let (tx, mut rx) = watch::channel(LocalConfig {
        trust_domain: opts.trust_domain.clone(),
        ..LocalConfig::default()
    });
    let (synced_tx, synced_rx) = oneshot::channel();
    let guard = Guard(tokio::spawn(run(client, opts, tx, synced_tx)));
    synced_rx.await.map_err(|_| Error::Stopped)?;
    rx.mark_unchanged();
    Ok((rx, guard))
}

fn stream<K>(
    api: Api<K>,
    wrap: fn(Event<K>) -> Ev,
) -> BoxStream<'static, Result<Ev, watcher::Error>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .map(move |r| r.map(wrap))
        .boxed()
}

/// A waypoint kind's watch; a 404 or 403 on its list is "none of it" (optional CRDs).
fn l7_stream(client: Client, kind: L7Kind) -> BoxStream<'static, Result<Ev, watcher::Error>> {
    watcher::watcher(
        Api::<DynamicObject>::all_with(client, &kind.resource()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(move |r| match r {
        Ok(e) => Ok(match kind {
            L7Kind::HttpRoute => Ev::Route(Box::new(e)),
            L7Kind::AuthorizationPolicy => Ev::AuthzPolicy(Box::new(e)),
        }),
        Err(watcher::Error::InitialListFailed(kube::Error::Api(s)))
            if s.is_not_found() || s.code == 403 =>
        {
            Ok(Ev::NoL7Kind {
                kind,
                forbidden: s.code == 403,
                message: s.message.clone(),
            })
        }
        Err(e) => Err(e),
    })
    .boxed()
}

async fn run(
    client: Client,
    opts: Options,
    tx: watch::Sender<LocalConfig>,
    synced: oneshot::Sender<()>,
) {
    let mut streams = vec![
        stream(Api::<Pod>::all(client.clone()), |e| Ev::Pod(Box::new(e))),
        stream(Api::<KubeNamespace>::all(client.clone()), |e| {
            Ev::Namespace(Box::new(e))
        }),
        stream(Api::<KubeService>::all(client.clone()), |e| {
            Ev::Service(Box::new(e))
        }),
        watcher::watcher(
            Api::<DynamicObject>::all_with(client.clone(), &gateway_resource()),
            watcher::Config::default(),
        )
        .default_backoff()
        .map(|r| match r {
            Ok(e) => Ok(Ev::Gateway(Box::new(e))),
            Err(watcher::Error::InitialListFailed(kube::Error::Api(s)))
                if s.is_not_found() || s.code == 403 =>
            {
                Ok(Ev::NoGatewayApi {
                    forbidden: s.code == 403,
                    message: s.message.clone(),
                })
            }
            Err(e) => Err(e),
        })
        .boxed(),
    ];
    if opts.waypoint_config {
        for kind in [L7Kind::HttpRoute, L7Kind::AuthorizationPolicy] {
            streams.push(l7_stream(client.clone(), kind));
        }
    }
    let mut events = futures_util::stream::select_all(streams);
    let mut state = State {
        discovery: Discovery::new(opts.cgroup_root.clone(), opts.host_proc.clone()),
        opts,
        pods: Mirror::default(),
        namespaces: Mirror::default(),
        services: Mirror::default(),
        waypoints: Mirror::default(),
        no_gateway_api: false,
        routes: Mirror::default(),
        l7_policies: Mirror::default(),
        no_l7_kinds: BTreeSet::new(),
        l7_policies_forbidden: false,
        placements: BTreeMap::new(),
        unplaced: false,
    };
    let mut synced = Some(synced);
    let mut retry = tokio::time::interval(RETRY);
    loop {
        let mut next = tokio::select! {
            ev = events.next() => match ev {
                Some(ev) => Some(ev),
                None => break,
            },
            _ = retry.tick(), if state.unplaced => None,
        };
        // Take the whole burst (a relist, a namespace's pods) before rebuilding once.
        while let Some(ev) = next {
            match ev {
                Ok(ev) => state.apply(ev),
                Err(e) => {
                    tracing::warn!(error = %e, "kubernetes watch failed; retrying with backoff")
                }
            }
            next = events.next().now_or_never().flatten();
        }
        if !state.synced() {
            continue;
        }
        let cfg = state.rebuild();
        tx.send_if_modified(|current| {
            let changed = *current != cfg;
            if changed {
                *current = cfg;
            }
            changed
        });
        if let Some(s) = synced.take() {
            tracing::info!(
                pods = state.pods.items.len(),
                namespaces = state.namespaces.items.len(),
                services = state.services.items.len(),
                waypoints = state.waypoints.items.len(),
                "kubernetes objects listed"
            );
            let _ = s.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use serde_json::json;

    use super::super::{API_ACCESS, Kube, fake_api::FakeApi};
    use super::*;

    const NODE: &str = "node1";
    const WEB_UID: &str = "0a1b2c3d-0000-4000-8000-00000000000a";
    const DB_UID: &str = "0a1b2c3d-0000-4000-8000-00000000000b";

    fn pod(name: &str, uid: &str, node: &str, ip: &str) -> serde_json::Value {
        json!({
            "metadata": {"name": name, "namespace": "shop", "uid": uid, "labels": {"app": name}},
            "spec": {"nodeName": node, "serviceAccountName": name, "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
        })
    }

    fn namespace(ambient: bool) -> serde_json::Value {
        let labels = if ambient {
            json!({"istio.io/dataplane-mode": "ambient"})
        } else {
            json!({})
        };
        json!({"metadata": {"name": "shop", "labels": labels}})
    }

    /// A node shaped like a systemd-driver kubelet's: `<root>/kubepods.slice/…-pod<uid>.slice`
    /// with a container scope holding a (made-up) pid, and a procfs whose entries are plain
    /// files, so each has its own inode like a real namespace.
    struct FakeNode {
        dir: tempfile::TempDir,
    }

    impl FakeNode {
        fn new() -> Self {
            let node = Self {
                dir: tempfile::tempdir().expect("tempdir"),
            };
            node.process(1);
            node
        }

        fn cgroup_root(&self) -> PathBuf {
            self.dir.path().join("cgroup")
        }

        fn proc_root(&self) -> PathBuf {
            self.dir.path().join("proc")
        }

        fn process(&self, pid: u32) -> PathBuf {
            let ns = self.proc_root().join(pid.to_string()).join("ns");
            std::fs::create_dir_all(&ns).expect("proc dir");
            std::fs::write(ns.join("net"), b"").expect("netns file");
            ns.join("net")
        }

        fn pod(&self, uid: &str, pid: u32) -> PathBuf {
            let pod = self
                .cgroup_root()
                .join("kubepods.slice/kubepods-besteffort.slice")
                .join(format!(
                    "kubepods-besteffort-pod{}.slice",
                    uid.replace('-', "_")
                ));
            let scope = pod.join("cri-containerd-abc.scope");
            std::fs::create_dir_all(&scope).expect("pod cgroup");
            std::fs::write(scope.join("cgroup.procs"), format!("{pid}\n")).expect("procs");
            self.process(pid);
            pod
        }
    }

    async fn start(api: &FakeApi, node: &FakeNode) -> Kube {
        start_as(api, node, false).await
    }

    /// [`start`], as a waypoint (`waypoint_config`) or a node's ztunnel.
    async fn start_as(api: &FakeApi, node: &FakeNode, waypoint_config: bool) -> Kube {
        super::super::start_with(
            api.client(),
            Options {
                node: NODE.to_owned(),
                trust_domain: "cluster.local".to_owned(),
                cgroup_root: node.cgroup_root(),
                host_proc: node.proc_root(),
                waypoint_config,
            },
        )
        .await
        .expect("watchers list and start")
    }

    /// Waits for a configuration that satisfies `want` (the bound only stops a broken
    /// test from hanging).
    async fn wait_for(
        k: &mut Kube,
        what: &str,
        want: impl Fn(&LocalConfig) -> bool,
    ) -> LocalConfig {
        let wait = async {
            loop {
                {
                    let cfg = k.updates.borrow_and_update();
                    if want(&cfg) {
                        return cfg.clone();
                    }
                }
                k.updates.changed().await.expect("watch loop alive");
            }
        };
        match tokio::time::timeout(Duration::from_secs(60), wait).await {
            Ok(cfg) => cfg,
            Err(_) => panic!("timed out waiting for {what}: {:?}", k.updates.borrow()),
        }
    }

    fn enrolled(cfg: &LocalConfig) -> Vec<String> {
        cfg.local_enrolled(NODE).into_keys().collect()
    }

    fn netns(p: &Path) -> String {
        p.display().to_string()
    }

    #[tokio::test]
    async fn namespace_label_enrols_and_pod_deletion_unenrols() {
        let api = FakeApi::start().await;
        let node = FakeNode::new();
        api.apply("namespaces", namespace(false));
        api.apply("pods", pod("web", WEB_UID, NODE, "10.1.0.11"));
        api.apply(
            "pods",
            pod(
                "remote",
                "ffffffff-0000-4000-8000-000000000001",
                "node2",
                "10.1.1.11",
            ),
        );
        api.apply(
            "services",
            json!({"metadata": {"name": "web", "namespace": "shop"},
                "spec": {"selector": {"app": "web"}, "clusterIP": "10.96.0.20", "ports": [{"port": 80, "targetPort": 8080}]}}),
        );
        let web_cgroup = node.pod(WEB_UID, 4242);
        let mut k = start(&api, &node).await;

        let first = k.updates.borrow().clone();
        assert_eq!(first.workloads.len(), 2, "both nodes' pods are known");
        assert_eq!(first.services.len(), 1);
        assert!(enrolled(&first).is_empty(), "nothing is ambient yet");
        let store = crate::state::Store::new(first.clone());
        let remote = store.workload("shop/remote").expect("remote pod");
        assert_eq!(
            store.identity(remote),
            "spiffe://cluster.local/ns/shop/sa/remote"
        );

        // The namespace label enrols its local pod, found on the node by UID.
        api.apply("namespaces", namespace(true));
        let cfg = wait_for(&mut k, "shop/web enrolled", |c| enrolled(c) == ["shop/web"]).await;
        let web = &cfg.local_enrolled(NODE)["shop/web"];
        assert_eq!(
            netns(&web.netns),
            netns(&node.proc_root().join("4242/ns/net"))
        );
        assert_eq!(web.cgroup, web_cgroup);
        assert_eq!(web.identity, "spiffe://cluster.local/ns/shop/sa/web");

        // A pod whose cgroup appears only after it is listed is found by the retry.
        api.apply("pods", pod("db", DB_UID, NODE, "10.1.0.12"));
        node.pod(DB_UID, 4343);
        wait_for(&mut k, "shop/db enrolled", |c| {
            enrolled(c) == ["shop/db", "shop/web"]
        })
        .await;

        // Its own label opts one pod out.
        let mut opted_out = pod("db", DB_UID, NODE, "10.1.0.12");
        opted_out["metadata"]["labels"]["istio.io/dataplane-mode"] = json!("none");
        api.apply("pods", opted_out);
        wait_for(&mut k, "shop/db opted out", |c| enrolled(c) == ["shop/web"]).await;

        // Deleting the pod unenrols it.
        api.delete("pods", "shop/web", true);
        wait_for(&mut k, "shop/web unenrolled", |c| enrolled(c).is_empty()).await;

        // Every call is one the RBAC rules grant.
        api.assert_calls_granted(API_ACCESS);
    }

    #[tokio::test]
    async fn watches_resume_from_bookmarks_and_relist_after_410() {
        let api = FakeApi::start().await;
        let node = FakeNode::new();
        api.apply("namespaces", namespace(true));
        api.apply("pods", pod("web", WEB_UID, NODE, "10.1.0.11"));
        node.pod(WEB_UID, 4242);
        let mut k = start(&api, &node).await;
        wait_for(&mut k, "shop/web enrolled", |c| enrolled(c) == ["shop/web"]).await;

        // A watch that ends resumes from the last bookmark, not from a new list.
        let lists_before = api
            .calls()
            .iter()
            .filter(|c| c.verb == "list" && c.resource == "pods")
            .count();
        let bookmark = api.bookmark("pods");
        // The bookmark has no visible effect; an event after it proves it was consumed.
        api.apply("pods", pod("db", DB_UID, NODE, "10.1.0.12"));
        node.pod(DB_UID, 4343);
        wait_for(&mut k, "shop/db enrolled", |c| enrolled(c).len() == 2).await;
        let after_db = api.bookmark("pods");
        api.close_watches("pods");
        api.delete("pods", "shop/db", true);
        wait_for(&mut k, "shop/db gone after the resumed watch", |c| {
            enrolled(c) == ["shop/web"]
        })
        .await;
        let calls = api.calls();
        assert!(
            calls.iter().any(|c| c.verb == "watch"
                && c.resource == "pods"
                && c.resource_version.as_deref() == Some(&after_db)),
            "no watch resumed from bookmark {after_db} (first bookmark {bookmark}): {calls:?}"
        );
        let lists = calls
            .iter()
            .filter(|c| c.verb == "list" && c.resource == "pods")
            .count();
        assert_eq!(lists, lists_before, "a resumed watch needs no relist");

        // History compacted while a deletion was missed: 410 Gone, relist, the pod is gone.
        api.delete("pods", "shop/web", false);
        api.expire("pods");
        wait_for(&mut k, "shop/web gone after the relist", |c| {
            enrolled(c).is_empty()
        })
        .await;
        let lists = api
            .calls()
            .iter()
            .filter(|c| c.verb == "list" && c.resource == "pods")
            .count();
        assert_eq!(lists, lists_before + 1, "410 Gone relists once");
    }

    #[tokio::test]
    async fn a_waypoint_watches_routes_and_targeted_policies_and_a_node_does_not() {
        let api = FakeApi::start().await;
        let node = FakeNode::new();
        api.apply("namespaces", namespace(true));
        // Without the CRDs a waypoint still syncs, with no routes and no policies.
        let mut k = start_as(&api, &node, true).await;
        let cfg = k.updates.borrow().clone();
        assert!(cfg.http_routes.is_empty() && cfg.waypoint_policies.is_empty());

        api.install_gateway_api();
        api.install_istio_crds();
        api.apply(
            "httproutes",
            json!({
                "metadata": {"name": "db-split", "namespace": "shop"},
                "spec": {
                    "parentRefs": [{"group": "", "kind": "Service", "name": "db"}],
                    "rules": [{"backendRefs": [
                        {"name": "db-v1", "port": 80, "weight": 90},
                        {"name": "db-v2", "port": 80, "weight": 10}
                    ]}]
                }
            }),
        );
        // Invalid: a path match of a type Gateway API does not have. Left out, warned.
        api.apply(
            "httproutes",
            json!({
                "metadata": {"name": "bad", "namespace": "shop"},
                "spec": {
                    "parentRefs": [{"group": "", "kind": "Service", "name": "db"}],
                    "rules": [{"matches": [{"path": {"type": "Glob", "value": "/x"}}],
                               "backendRefs": [{"name": "db-v1", "port": 80}]}]
                }
            }),
        );
        api.apply(
            "authorizationpolicies",
            json!({
                "metadata": {"name": "orders-read", "namespace": "shop"},
                "spec": {
                    "targetRefs": [{"group": "", "kind": "Service", "name": "db"}],
                    "action": "ALLOW",
                    "rules": [{"to": [{"operation": {"methods": ["GET"], "paths": ["/orders/*"]}}]}]
                }
            }),
        );
        // A node ztunnel's policy (a selector, no targetRefs): not the waypoint's.
        api.apply(
            "authorizationpolicies",
            json!({
                "metadata": {"name": "l4", "namespace": "shop"},
                "spec": {"selector": {"matchLabels": {"app": "db"}}, "action": "DENY",
                         "rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]}
            }),
        );
        let cfg = wait_for(&mut k, "the route and the policy", |c| {
            !c.http_routes.is_empty() && !c.waypoint_policies.is_empty()
        })
        .await;
        let routes: Vec<_> = cfg.http_routes.iter().map(|r| r.name.clone()).collect();
        assert_eq!(routes, ["db-split"], "the invalid route is left out");
        let policies: Vec<_> = cfg
            .waypoint_policies
            .iter()
            .map(|p| p.name.clone())
            .collect();
        assert_eq!(policies, ["orders-read"]);
        api.assert_calls_granted(super::super::WAYPOINT_API_ACCESS);

        // A node's ztunnel never asks for them.
        drop(k);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = api
            .calls()
            .iter()
            .filter(|c| c.resource == "httproutes" || c.resource == "authorizationpolicies")
            .count();
        let node2 = FakeNode::new();
        let k2 = start_as(&api, &node2, false).await;
        assert!(k2.updates.borrow().http_routes.is_empty());
        let after = api
            .calls()
            .iter()
            .filter(|c| c.resource == "httproutes" || c.resource == "authorizationpolicies")
            .count();
        assert_eq!(before, after, "a node ztunnel listed waypoint kinds");
    }

    #[tokio::test]
    async fn a_waypoint_that_may_not_read_policies_denies_every_request() {
        use crate::waypoint::authz::{Decision, ObjectRef, PolicyIndex, RequestAttrs};
        let api = FakeApi::start().await;
        let node = FakeNode::new();
        api.apply("namespaces", namespace(true));
        api.install_gateway_api();
        api.install_istio_crds();
        api.forbid("authorizationpolicies");
        let k = start_as(&api, &node, true).await;
        let cfg = k.updates.borrow().clone();
        let names: Vec<_> = cfg
            .waypoint_policies
            .iter()
            .map(|p| p.name.clone())
            .collect();
        assert_eq!(names, [convert::DENY_ALL_UNREADABLE]);
        let index = PolicyIndex::new(&cfg.waypoint_policies, &cfg.root_namespace);
        let headers = http::HeaderMap::new();
        let decision = index.evaluate(
            &ObjectRef::new("shop", "waypoint"),
            Some(&ObjectRef::new("shop", "db")),
            &RequestAttrs {
                method: &http::Method::GET,
                path: "/",
                host: "db",
                port: 80,
                headers: &headers,
                source_principal: Some("spiffe://cluster.local/ns/shop/sa/web"),
                source_ip: "10.1.0.11".parse().expect("ip"),
                destination_ip: "10.96.0.30".parse().expect("ip"),
            },
        );
        assert!(
            matches!(&decision, Decision::Deny { policy, .. } if policy.contains(convert::DENY_ALL_UNREADABLE)),
            "{decision:?}"
        );
    }

    #[tokio::test]
    async fn waypoints_come_from_gateways_and_labels_once_the_gateway_api_is_there() {
        let api = FakeApi::start().await;
        let node = FakeNode::new();
        let mut ns = namespace(true);
        api.apply("namespaces", ns.clone());
        api.apply("pods", pod("web", WEB_UID, NODE, "10.1.0.11"));
        let mut svc = json!({
            "metadata": {"name": "web", "namespace": "shop", "labels": {}},
            "spec": {"selector": {"app": "web"}, "clusterIP": "10.96.0.20", "ports": [{"port": 80}]}
        });
        svc["metadata"]["labels"]["istio.io/use-waypoint"] = json!("wp");
        api.apply("services", svc.clone());
        // Without the Gateway API the watchers still sync (no waypoints).
        let mut k = start(&api, &node).await;
        let waypoint = |c: &LocalConfig| c.services.first().and_then(|s| s.waypoint.clone());
        let cfg = wait_for(&mut k, "the service", |c| c.services.len() == 1).await;
        assert_eq!(waypoint(&cfg), None, "no Gateway API: no waypoint");

        // The CRDs are installed and the waypoint created: the labelled service uses it.
        api.install_gateway_api();
        let gw = json!({
            "metadata": {"name": "wp", "namespace": "shop"},
            "spec": {"gatewayClassName": "istio-waypoint", "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}
        });
        api.apply("gateways", gw);
        let cfg = wait_for(&mut k, "the service's waypoint", |c| waypoint(c).is_some()).await;
        assert_eq!(
            waypoint(&cfg).and_then(|w| w.hostname),
            Some("wp.shop.svc.cluster.local".to_owned())
        );
        assert_eq!(
            cfg.workloads[0].waypoint, None,
            "a service waypoint takes no pod's traffic"
        );

        // `none` on the service opts it out even when its namespace names the waypoint.
        svc["metadata"]["labels"]["istio.io/use-waypoint"] = json!("none");
        api.apply("services", svc);
        ns["metadata"]["labels"]["istio.io/use-waypoint"] = json!("wp");
        api.apply("namespaces", ns);
        wait_for(&mut k, "the opt-out", |c| {
            waypoint(c).is_none()
                && c.namespaces
                    .iter()
                    .any(|n| n.labels.contains_key("istio.io/use-waypoint"))
        })
        .await;

        // The Gateway goes: so does the waypoint of everything that named it.
        api.apply(
            "services",
            json!({
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"selector": {"app": "web"}, "clusterIP": "10.96.0.20", "ports": [{"port": 80}]}
            }),
        );
        wait_for(&mut k, "the namespace's waypoint", |c| {
            waypoint(c).is_some()
        })
        .await;
        api.delete("gateways", "shop/wp", true);
        wait_for(&mut k, "no waypoint after the Gateway's deletion", |c| {
            waypoint(c).is_none()
        })
        .await;
        api.assert_calls_granted(API_ACCESS);
    }
}
