//! How a new config version takes effect (file and Kubernetes sources). What it adds or
//! changes applies at once; what it takes away waits until it is confirmed. An object
//! (workload, service, namespace, policy, peer authentication) missing from the new
//! version, and a workload or namespace the new version takes out of the mesh (no longer
//! HBONE, no longer captured on this node, no longer labelled ambient), stays in force as
//! it was until the versions have said so for the settle period (`--config-settle`). If
//! it comes back meanwhile, nothing happens.
//!
//! A half-written file, a Kubernetes relist or a pod briefly not found on the node all
//! look like removals; holding removals keeps every pod enrolled and every peer routed
//! through the tunnel meanwhile, while a real removal or relabel still takes effect,
//! one settle period later. Routing and authorization see the held objects as they
//! were: a caller keeps tunnelling to a workload that is held, and connections to it are
//! still authorized against it (not refused as "unknown workload").
//!
//! A held object yields at once to an object of the new version that claims one of its
//! addresses (a deleted pod's IP given to a new pod): the new version is consistent, the
//! held object only fills the gaps.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{AMBIENT, DATAPLANE_MODE, Enrolment, LocalConfig, Namespace, Protocol, Workload};

/// An object a version can take away.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Object {
    Workload(String),
    Service(String),
    Namespace(String),
    Policy(String),
    PeerAuthentication(String),
}

impl fmt::Display for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Object::Workload(k) => write!(f, "workload {k}"),
            Object::Service(k) => write!(f, "service {k}"),
            Object::Namespace(k) => write!(f, "namespace {k}"),
            Object::Policy(k) => write!(f, "policy {k}"),
            Object::PeerAuthentication(k) => write!(f, "peer authentication {k}"),
        }
    }
}

/// Turns the versions a source publishes into the config in force.
#[derive(Debug)]
pub struct Settler {
    period: Duration,
    node: String,
    latest: LocalConfig,
    effective: LocalConfig,
    /// Held objects, and since when the versions have wanted each gone.
    since: BTreeMap<Object, Instant>,
}

fn ambient_label(ns: &Namespace) -> bool {
    ns.labels.get(DATAPLANE_MODE).is_some_and(|m| m == AMBIENT)
}

fn addresses_clash(addrs: &[IpAddr], claimed: &BTreeSet<IpAddr>) -> bool {
    addrs.iter().any(|a| claimed.contains(a))
}

impl Settler {
    /// Starts from `initial`, which is in force at once. A zero `period` passes every
    /// version through unchanged.
    pub fn new(initial: LocalConfig, period: Duration, node: &str) -> Self {
        Self {
            period,
            node: node.to_owned(),
            latest: initial.clone(),
            effective: initial,
            since: BTreeMap::new(),
        }
    }

    /// The config in force.
    pub fn effective(&self) -> &LocalConfig {
        &self.effective
    }

    /// Objects held in force although the latest version lacks them (or took them out of
    /// the mesh), by name.
    pub fn held(&self) -> Vec<String> {
        self.since.keys().map(ToString::to_string).collect()
    }

    /// When the next held object's settle period ends.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.since.values().min().map(|t| *t + self.period)
    }

    /// Takes a new version from the source. Returns whether the config in force changed.
    pub fn update(&mut self, latest: LocalConfig, now: Instant) -> bool {
        self.latest = latest;
        self.recompute(now)
    }

    /// Lets settle periods that have ended take effect. Returns whether the config in
    /// force changed.
    pub fn tick(&mut self, now: Instant) -> bool {
        self.recompute(now)
    }

    fn recompute(&mut self, now: Instant) -> bool {
        if self.period.is_zero() {
            // Nothing is ever held: each version is in force as it is, without the passes
            // below (linear in the cluster's size, for every xDS response).
            let changed = self.latest != self.effective;
            self.effective = self.latest.clone();
            return changed;
        }
        let (prev, latest, node) = (&self.effective, &self.latest, self.node.as_str());
        let mut held: BTreeMap<Object, Instant> = BTreeMap::new();
        let (period, since) = (self.period, &self.since);
        let mut keep = |obj: Object| -> bool {
            let t = since.get(&obj).copied().unwrap_or(now);
            let keep = now.saturating_duration_since(t) < period;
            if keep {
                held.insert(obj, t);
            }
            keep
        };
        let mut next = latest.clone();
        // Lookups by name instead of scans, so that a version costs time linear in its size:
        // each index also takes what is pushed, as the scans it replaces saw it.
        let (prev_modes, latest_modes) = (Enrolment::of(prev), Enrolment::of(latest));

        let mut namespace_at: HashMap<String, usize> = HashMap::new();
        for (i, n) in next.namespaces.iter().enumerate() {
            namespace_at.entry(n.name.clone()).or_insert(i);
        }
        for ns in &prev.namespaces {
            let obj = Object::Namespace(ns.name.clone());
            match namespace_at.get(&ns.name) {
                None => {
                    if keep(obj) {
                        namespace_at.insert(ns.name.clone(), next.namespaces.len());
                        next.namespaces.push(ns.clone());
                    }
                }
                Some(&i) => {
                    if ambient_label(ns) && !ambient_label(&next.namespaces[i]) && keep(obj) {
                        next.namespaces[i] = ns.clone();
                    }
                }
            }
        }

        // Each workload with the object it is held as (its old version), if held.
        let mut workloads: Vec<(Arc<Workload>, Option<Object>)> =
            latest.workloads.iter().map(|w| (w.clone(), None)).collect();
        let mut latest_at: HashMap<String, usize> = HashMap::new();
        for (i, w) in latest.workloads.iter().enumerate() {
            latest_at.entry(w.key()).or_insert(i);
        }
        let mut workload_at = latest_at.clone();
        for w in &prev.workloads {
            let key = w.key();
            let obj = Object::Workload(key.clone());
            match workload_at.get(&key) {
                None => {
                    if keep(obj.clone()) {
                        workload_at.insert(key, workloads.len());
                        workloads.push((w.clone(), Some(obj)));
                    }
                }
                Some(&i) => {
                    let l = &workloads[i].0;
                    let leaves = (prev_modes.protocol(w) == Protocol::Hbone
                        && latest_modes.protocol(l) != Protocol::Hbone)
                        || (prev_modes.captured_on(w, node) && !latest_modes.captured_on(l, node));
                    if leaves && keep(obj.clone()) {
                        workloads[i] = (w.clone(), Some(obj));
                    }
                }
            }
        }
        let mut services: Vec<(super::Service, Option<Object>)> =
            latest.services.iter().map(|s| (s.clone(), None)).collect();
        let mut service_keys: HashSet<String> = latest.services.iter().map(|s| s.key()).collect();
        for s in &prev.services {
            let key = s.key();
            if !service_keys.contains(&key) && keep(Object::Service(key.clone())) {
                service_keys.insert(key.clone());
                services.push((s.clone(), Some(Object::Service(key))));
            }
        }
        let mut policy_names: HashSet<(&str, &str)> = latest
            .policies
            .iter()
            .map(|p| (p.namespace.as_str(), p.name.as_str()))
            .collect();
        for p in &prev.policies {
            let key = format!("{}/{}", p.namespace, p.name);
            let present = policy_names.contains(&(p.namespace.as_str(), p.name.as_str()));
            if !present && keep(Object::Policy(key)) {
                policy_names.insert((p.namespace.as_str(), p.name.as_str()));
                next.policies.push(p.clone());
            }
        }
        let mut peer_auth_keys: HashSet<String> = latest
            .peer_authentications
            .iter()
            .map(|p| p.key())
            .collect();
        for p in &prev.peer_authentications {
            let present = peer_auth_keys.contains(&p.key());
            if !present && keep(Object::PeerAuthentication(p.key())) {
                peer_auth_keys.insert(p.key());
                next.peer_authentications.push(p.clone());
            }
        }

        // Held objects yield to the new version's claims on their addresses.
        let mut yielded = Vec::new();
        loop {
            let claimed: BTreeSet<IpAddr> = workloads
                .iter()
                .filter(|(_, h)| h.is_none())
                .flat_map(|(w, _)| w.addresses.iter().copied())
                .chain(
                    services
                        .iter()
                        .filter(|(_, h)| h.is_none())
                        .flat_map(|(s, _)| s.addresses.iter().copied()),
                )
                .collect();
            let clash_w = workloads
                .iter()
                .position(|(w, h)| h.is_some() && addresses_clash(&w.addresses, &claimed));
            let clash_s = services
                .iter()
                .position(|(s, h)| h.is_some() && addresses_clash(&s.addresses, &claimed));
            if let Some(i) = clash_w {
                let key = workloads[i].0.key();
                if let Some(obj) = workloads[i].1.take() {
                    held.remove(&obj);
                    yielded.push(obj);
                }
                match latest_at.get(&key).map(|l| &latest.workloads[*l]) {
                    Some(l) => workloads[i].0 = l.clone(),
                    None => {
                        workloads.remove(i);
                    }
                }
            } else if let Some(i) = clash_s {
                if let Some(obj) = services[i].1.take() {
                    held.remove(&obj);
                    yielded.push(obj);
                }
                services.remove(i);
            } else {
                break;
            }
        }
        next.workloads = workloads.into_iter().map(|(w, _)| w).collect();
        next.services = services.into_iter().map(|(s, _)| s).collect();

        for obj in held.keys().filter(|o| !self.since.contains_key(*o)) {
            tracing::info!(object = %obj, settle_ms = self.period.as_millis() as u64, "the new config version takes this away; it stays in force until the change has held for the settle period");
        }
        for (obj, t) in &self.since {
            if held.contains_key(obj) {
                continue;
            }
            if yielded.contains(obj) {
                tracing::info!(object = %obj, "removed at once: the new config version gives its address to another object");
            } else if now.saturating_duration_since(*t) >= self.period {
                tracing::info!(object = %obj, "removal confirmed: the change held for the settle period");
            } else {
                tracing::info!(object = %obj, "back in the config before its settle period ended; nothing changed");
            }
        }
        self.since = held;
        let changed = next != self.effective;
        self.effective = next;
        changed
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::state::LocalPod;

    const SETTLE: Duration = Duration::from_secs(3);

    /// node1: a (enrolled by its namespace), b (its own label); node2: c. A service
    /// selecting a, a DENY policy and a STRICT peer authentication.
    const FULL: &str = r#"
namespaces:
  - name: mesh
    labels: { istio.io/dataplane-mode: ambient }
workloads:
  - name: a
    namespace: mesh
    node: node1
    addresses: [10.0.0.1]
    labels: { app: a }
    netns: /run/netns/a
    cgroup: /sys/fs/cgroup/a
  - name: b
    namespace: other
    node: node1
    addresses: [10.0.0.2]
    labels: { istio.io/dataplane-mode: ambient }
    netns: /run/netns/b
    cgroup: /sys/fs/cgroup/b
  - name: c
    namespace: mesh
    node: node2
    addresses: [10.0.1.3]
services:
  - name: web
    namespace: mesh
    addresses: [10.96.0.1]
    ports: [{ port: 80 }]
    selector: { app: a }
policies:
  - name: deny-x
    namespace: mesh
    scope: NAMESPACE
    action: DENY
    rules:
      - from:
          - namespaces: [x]
peerAuthentications:
  - name: strict
    namespace: mesh
    mode: STRICT
"#;

    fn cfg(text: &str) -> LocalConfig {
        LocalConfig::parse(Path::new("w.yaml"), text, "node1").expect("valid")
    }

    fn enrolled(s: &Settler) -> Vec<String> {
        s.effective().local_enrolled("node1").into_keys().collect()
    }

    /// `FULL` with everything after `cut` left off, as a file being written looks.
    fn prefix(cut: &str) -> LocalConfig {
        cfg(&FULL[..FULL.find(cut).expect("cut point")])
    }

    #[test]
    fn removals_wait_for_the_settle_period_and_a_return_changes_nothing() {
        let t0 = Instant::now();
        let mut s = Settler::new(cfg(FULL), SETTLE, "node1");
        // A version cut before b: b, c, the service and both policies are missing.
        assert!(
            !s.update(prefix("  - name: b"), t0),
            "nothing may go at once"
        );
        assert_eq!(enrolled(&s), ["mesh/a", "other/b"]);
        assert_eq!(s.effective().services.len(), 1);
        assert_eq!(s.effective().policies.len(), 1);
        assert_eq!(s.effective().peer_authentications.len(), 1);
        assert_eq!(s.held().len(), 5, "{:?}", s.held());
        assert_eq!(s.next_deadline(), Some(t0 + SETTLE));
        // A later, still partial version does not restart the clocks.
        s.update(prefix("services:"), t0 + Duration::from_secs(1));
        assert_eq!(s.next_deadline(), Some(t0 + SETTLE));
        // The whole file comes back: nothing changed, nothing held.
        assert!(!s.update(cfg(FULL), t0 + Duration::from_secs(2)));
        assert!(s.held().is_empty());
        assert!(!s.tick(t0 + Duration::from_secs(10)));
        assert_eq!(*s.effective(), cfg(FULL));
    }

    #[test]
    fn a_real_removal_takes_effect_after_the_settle_period() {
        let t0 = Instant::now();
        let mut s = Settler::new(cfg(FULL), SETTLE, "node1");
        let without_b = cfg(&FULL
            .replace("  - name: b\n", "  - name: b2\n")
            .replace("10.0.0.2", "10.0.0.9"));
        // b2 is new and applies at once; b is held.
        assert!(s.update(without_b.clone(), t0));
        assert_eq!(enrolled(&s), ["mesh/a", "other/b", "other/b2"]);
        assert!(!s.tick(t0 + SETTLE - Duration::from_millis(1)));
        assert!(s.tick(t0 + SETTLE));
        assert_eq!(enrolled(&s), ["mesh/a", "other/b2"]);
        assert_eq!(*s.effective(), without_b);
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn leaving_the_mesh_waits_but_other_changes_apply_at_once() {
        let t0 = Instant::now();
        let mut s = Settler::new(cfg(FULL), SETTLE, "node1");
        // b relabelled out; the namespace label gone, which takes a (local) and c
        // (remote) out of the mesh too: all held as they were.
        let text = FULL
            .replace(
                "labels: { istio.io/dataplane-mode: ambient }\n    netns: /run/netns/b",
                "labels: { istio.io/dataplane-mode: none }\n    netns: /run/netns/b",
            )
            .replace(
                "  - name: mesh\n    labels: { istio.io/dataplane-mode: ambient }\n",
                "  - name: mesh\n",
            );
        assert!(!s.update(cfg(&text), t0));
        assert_eq!(enrolled(&s), ["mesh/a", "other/b"]);
        let eff = s.effective();
        let c = eff.workloads.iter().find(|w| w.name == "c").expect("c");
        assert_eq!(
            eff.protocol(c),
            Protocol::Hbone,
            "c still routed through the tunnel"
        );
        let mut held = s.held();
        held.sort();
        assert_eq!(
            held,
            [
                "namespace mesh",
                "workload mesh/a",
                "workload mesh/c",
                "workload other/b"
            ]
        );
        assert!(s.tick(t0 + SETTLE));
        assert_eq!(*s.effective(), cfg(&text));
        assert!(enrolled(&s).is_empty());

        // A change that keeps the workload in the mesh applies at once.
        let mut s = Settler::new(cfg(FULL), SETTLE, "node1");
        assert!(s.update(cfg(&FULL.replace("10.0.0.1]", "10.0.0.11]")), t0));
        assert!(s.held().is_empty());
        let a = &s.effective().workloads[0];
        assert_eq!(a.addresses, ["10.0.0.11".parse::<IpAddr>().expect("ip")]);
    }

    #[test]
    fn a_local_pod_briefly_not_found_on_the_node_stays_enrolled() {
        let t0 = Instant::now();
        let mut s = Settler::new(cfg(FULL), SETTLE, "node1");
        let unplaced = FULL.replace(
            "    netns: /run/netns/a\n    cgroup: /sys/fs/cgroup/a\n",
            "",
        );
        // Not valid as a file (a local pod needs both), but a Kubernetes version looks
        // like this while discovery misses the pod.
        let v: LocalConfig = serde_norway::from_str(&unplaced).expect("yaml");
        s.update(v, t0);
        assert_eq!(enrolled(&s), ["mesh/a", "other/b"]);
        s.update(cfg(FULL), t0 + Duration::from_secs(1));
        assert!(s.held().is_empty());
    }

    #[test]
    fn a_held_workload_yields_its_address_to_a_new_one() {
        let t0 = Instant::now();
        let mut s = Settler::new(cfg(FULL), SETTLE, "node1");
        // b deleted and its IP given to d at once (a relist after a pod replacement).
        let text = FULL.replace("  - name: b\n", "  - name: d\n");
        assert!(s.update(cfg(&text), t0));
        assert_eq!(enrolled(&s), ["mesh/a", "other/d"]);
        assert!(s.held().is_empty());
        crate::state::Store::new(s.effective().clone());
    }

    /// The file the test fixture writes for two nodes with one enrolled pod each.
    const FIXTURE: &str = "namespaces:
  - name: default
workloads:
  - name: a
    namespace: default
    node: node1
    serviceAccount: a
    addresses: [10.101.1.10]
    labels: { app: a, istio.io/dataplane-mode: ambient }
    netns: /var/run/netns/zt1x0-a
    cgroup: /sys/fs/cgroup/zt1x0-test/kubepods/pod00000001-0065-4000-8000-00000000000a
  - name: b
    namespace: default
    node: node2
    serviceAccount: b
    addresses: [10.101.2.11]
    labels: { app: b, istio.io/dataplane-mode: ambient }
    netns: /var/run/netns/zt1x0-b
    cgroup: /sys/fs/cgroup/zt1x0-test/kubepods/pod00000001-0065-4000-8000-00000000000b
";

    /// Every prefix of the file (what a reader can see while it is written in place)
    /// that parses at all keeps, on either node, every pod enrolled and every peer
    /// tunnelled. A prefix can still cut the last path short; the enrolment refuses
    /// such a spec and keeps the current one (app.rs `Shared::check`).
    #[test]
    fn no_prefix_of_a_file_being_written_unenrols_or_detunnels_anything() {
        let t0 = Instant::now();
        let mut versions = 0;
        for node in ["node1", "node2"] {
            let full = LocalConfig::parse(Path::new("w.yaml"), FIXTURE, node).expect("valid");
            let want = full.local_enrolled(node);
            for cut in 0..FIXTURE.len() {
                let Ok(prefix) = LocalConfig::parse(Path::new("w.yaml"), &FIXTURE[..cut], node)
                else {
                    continue;
                };
                versions += 1;
                let mut s = Settler::new(full.clone(), SETTLE, node);
                s.update(prefix, t0);
                let eff = s.effective();
                let have = eff.local_enrolled(node);
                assert_eq!(
                    have.keys().collect::<Vec<_>>(),
                    want.keys().collect::<Vec<_>>(),
                    "{node}, cut at {cut}"
                );
                for (key, spec) in &have {
                    let w = &want[key];
                    let same_but_paths = LocalPod {
                        netns: w.netns.clone(),
                        cgroup: w.cgroup.clone(),
                        ..spec.clone()
                    } == *w;
                    assert!(same_but_paths, "{node}, cut at {cut}: {spec:?}");
                    for (got, full) in [(&spec.netns, &w.netns), (&spec.cgroup, &w.cgroup)] {
                        assert!(
                            full.to_string_lossy().starts_with(&*got.to_string_lossy()),
                            "{node}, cut at {cut}: {got:?} is no truncation of {full:?}"
                        );
                    }
                }
                for w in &full.workloads {
                    let now = eff.workloads.iter().find(|e| e.key() == w.key());
                    assert!(
                        now.is_some_and(|e| eff.protocol(e) == Protocol::Hbone),
                        "{node}, cut at {cut}: {} no longer tunnelled",
                        w.key()
                    );
                }
            }
        }
        assert!(
            versions > 10,
            "only {versions} prefixes parsed: the test covers nothing"
        );
    }

    #[test]
    fn a_zero_period_passes_versions_through() {
        let t0 = Instant::now();
        let mut s = Settler::new(cfg(FULL), Duration::ZERO, "node1");
        let v = prefix("  - name: b");
        assert!(s.update(v.clone(), t0));
        assert_eq!(*s.effective(), v);
        assert!(s.held().is_empty());
        assert_eq!(s.next_deadline(), None);
    }

    /// `recompute` as it was before its lookups by name: scans of the versions.
    fn scanned(
        prev: &LocalConfig,
        latest: &LocalConfig,
        since: &BTreeMap<Object, Instant>,
        period: Duration,
        now: Instant,
        node: &str,
    ) -> (LocalConfig, BTreeMap<Object, Instant>) {
        let mut held: BTreeMap<Object, Instant> = BTreeMap::new();
        let mut keep = |obj: Object| -> bool {
            let t = since.get(&obj).copied().unwrap_or(now);
            let keep = now.saturating_duration_since(t) < period;
            if keep {
                held.insert(obj, t);
            }
            keep
        };
        let mut next = latest.clone();
        for ns in &prev.namespaces {
            let obj = Object::Namespace(ns.name.clone());
            match next.namespaces.iter().position(|n| n.name == ns.name) {
                None => {
                    if keep(obj) {
                        next.namespaces.push(ns.clone());
                    }
                }
                Some(i) => {
                    if ambient_label(ns) && !ambient_label(&next.namespaces[i]) && keep(obj) {
                        next.namespaces[i] = ns.clone();
                    }
                }
            }
        }
        let mut workloads: Vec<(Arc<Workload>, Option<Object>)> =
            latest.workloads.iter().map(|w| (w.clone(), None)).collect();
        for w in &prev.workloads {
            let obj = Object::Workload(w.key());
            match workloads.iter().position(|(l, _)| l.key() == w.key()) {
                None => {
                    if keep(obj.clone()) {
                        workloads.push((w.clone(), Some(obj)));
                    }
                }
                Some(i) => {
                    let l = &workloads[i].0;
                    let leaves = (prev.protocol(w) == Protocol::Hbone
                        && latest.protocol(l) != Protocol::Hbone)
                        || (prev.captured_on(w, node) && !latest.captured_on(l, node));
                    if leaves && keep(obj.clone()) {
                        workloads[i] = (w.clone(), Some(obj));
                    }
                }
            }
        }
        let mut services: Vec<(crate::state::Service, Option<Object>)> =
            latest.services.iter().map(|s| (s.clone(), None)).collect();
        for s in &prev.services {
            let obj = Object::Service(s.key());
            if !services.iter().any(|(l, _)| l.key() == s.key()) && keep(obj.clone()) {
                services.push((s.clone(), Some(obj)));
            }
        }
        for p in &prev.policies {
            let key = format!("{}/{}", p.namespace, p.name);
            let present = next
                .policies
                .iter()
                .any(|l| l.namespace == p.namespace && l.name == p.name);
            if !present && keep(Object::Policy(key)) {
                next.policies.push(p.clone());
            }
        }
        for p in &prev.peer_authentications {
            let present = next.peer_authentications.iter().any(|l| l.key() == p.key());
            if !present && keep(Object::PeerAuthentication(p.key())) {
                next.peer_authentications.push(p.clone());
            }
        }
        loop {
            let claimed: BTreeSet<IpAddr> = workloads
                .iter()
                .filter(|(_, h)| h.is_none())
                .flat_map(|(w, _)| w.addresses.iter().copied())
                .chain(
                    services
                        .iter()
                        .filter(|(_, h)| h.is_none())
                        .flat_map(|(s, _)| s.addresses.iter().copied()),
                )
                .collect();
            let clash_w = workloads
                .iter()
                .position(|(w, h)| h.is_some() && addresses_clash(&w.addresses, &claimed));
            let clash_s = services
                .iter()
                .position(|(s, h)| h.is_some() && addresses_clash(&s.addresses, &claimed));
            if let Some(i) = clash_w {
                let key = workloads[i].0.key();
                if let Some(obj) = workloads[i].1.take() {
                    held.remove(&obj);
                }
                match latest.workloads.iter().find(|l| l.key() == key) {
                    Some(l) => workloads[i].0 = l.clone(),
                    None => {
                        workloads.remove(i);
                    }
                }
            } else if let Some(i) = clash_s {
                if let Some(obj) = services[i].1.take() {
                    held.remove(&obj);
                }
                services.remove(i);
            } else {
                break;
            }
        }
        next.workloads = workloads.into_iter().map(|(w, _)| w).collect();
        next.services = services.into_iter().map(|(s, _)| s).collect();
        (next, held)
    }

    /// The next version: most objects kept, some relabelled or moved, some new.
    fn evolve(rng: &mut impl rand::Rng, cfg: &LocalConfig) -> LocalConfig {
        let fresh = crate::state::tests::generated(rng);
        let mut next = cfg.clone();
        next.namespaces.retain(|_| rng.random_bool(0.8));
        next.workloads.retain(|_| rng.random_bool(0.8));
        next.services.retain(|_| rng.random_bool(0.8));
        next.policies.retain(|_| rng.random_bool(0.8));
        next.peer_authentications.retain(|_| rng.random_bool(0.8));
        for ns in &mut next.namespaces {
            if rng.random_bool(0.2) {
                ns.labels.remove(DATAPLANE_MODE);
            }
        }
        for w in &mut next.workloads {
            let w = Arc::make_mut(w);
            if rng.random_bool(0.1) {
                w.labels
                    .insert(DATAPLANE_MODE.to_owned(), crate::state::NONE.to_owned());
            }
            if rng.random_bool(0.1) {
                w.node = "node2".to_owned();
            }
        }
        let take = rng.random_range(0..4);
        next.namespaces
            .extend(fresh.namespaces.into_iter().take(take));
        next.workloads
            .extend(fresh.workloads.into_iter().take(take * 3));
        next.services.extend(fresh.services.into_iter().take(take));
        next.policies.extend(fresh.policies.into_iter().take(take));
        next.peer_authentications
            .extend(fresh.peer_authentications.into_iter().take(take));
        next
    }

    #[test]
    fn versions_settle_as_the_scans_settled_them_on_generated_configs() {
        use rand::SeedableRng as _;
        let mut rng = rand::rngs::StdRng::seed_from_u64(16);
        let (t0, mut held_seen) = (Instant::now(), 0);
        for _ in 0..200 {
            let mut version = crate::state::tests::generated(&mut rng);
            let mut s = Settler::new(version.clone(), SETTLE, "node1");
            let (mut effective, mut since) = (version.clone(), BTreeMap::new());
            for step in 1..8u64 {
                let now = t0 + Duration::from_secs(step);
                version = evolve(&mut rng, &version);
                s.update(version.clone(), now);
                (effective, since) = scanned(&effective, &version, &since, SETTLE, now, "node1");
                assert_eq!(*s.effective(), effective, "step {step}");
                assert_eq!(s.since, since, "step {step}");
                held_seen += since.len();
            }
        }
        assert!(held_seen > 1_000, "only {held_seen} objects held");
    }

    #[test]
    fn a_zero_period_settles_as_the_full_pass_on_generated_configs() {
        use rand::SeedableRng as _;
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let (t0, mut changes) = (Instant::now(), 0);
        for _ in 0..200 {
            let mut version = crate::state::tests::generated(&mut rng);
            let mut s = Settler::new(version.clone(), Duration::ZERO, "node1");
            let mut effective = version.clone();
            for step in 1..8u64 {
                let now = t0 + Duration::from_secs(step);
                version = evolve(&mut rng, &version);
                let changed = s.update(version.clone(), now);
                let (expected, since) = scanned(
                    &effective,
                    &version,
                    &BTreeMap::new(),
                    Duration::ZERO,
                    now,
                    "node1",
                );
                assert!(since.is_empty(), "step {step}: nothing is held");
                assert_eq!(*s.effective(), expected, "step {step}");
                assert_eq!(changed, expected != effective, "step {step}");
                assert!(s.held().is_empty());
                changes += usize::from(changed);
                effective = expected;
            }
        }
        assert!(changes > 1_000, "only {changes} versions changed anything");
    }
}
