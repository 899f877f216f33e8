//! The workload file (`--workloads`): [`LocalConfig::parse`] on the file's text, and a
//! version it accepts used as the proxy uses it ([`super::exercise_store`]). The seeds
//! are the unit tests' and the README's files.
use std::path::Path;

use crate::state::LocalConfig;

const NODE: &str = "node1";

pub fn run(data: &[u8]) {
    // The loader reads the file with `read_to_string`, which refuses what is not UTF-8.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = LocalConfig::parse(Path::new("workloads.yaml"), text, NODE) {
        super::exercise_store(&cfg, NODE);
    }
}

/// The state unit tests' file (namespace and pod labels, several nodes).
const BASE: &str = r#"namespaces:
  - name: mesh
    labels: { istio.io/dataplane-mode: ambient }
  - name: plain
workloads:
  - name: a
    namespace: mesh
    node: node1
    addresses: [10.0.0.1]
    labels: { app: a }
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
    addresses: [10.0.1.4, fd00:1::4]
services:
  - name: web
    namespace: mesh
    addresses: [10.96.0.1]
    ports: [{port: 80, targetPort: 8080}]
    selector: { app: a }
    subjectAltNames: [spiffe://cluster.local/ns/mesh/sa/web]
  - name: empty
    namespace: mesh
    addresses: [10.96.0.2]
    ports: [{port: 80}]
    selector: { app: nobody }
"#;

/// The README's example, with its policies.
const README: &str = r#"trustDomain: cluster.local
cluster: Kubernetes
namespaces:
  - name: shop
    labels: { istio.io/dataplane-mode: ambient }
workloads:
  - name: web-1
    namespace: shop
    node: node1
    addresses: [10.1.0.11, fd00:1::11]
    serviceAccount: web
    labels: { app: web }
    netns: /var/run/netns/web-1
    cgroup: /sys/fs/cgroup/kubepods/pod-web-1
services:
  - name: web
    namespace: shop
    addresses: [10.96.0.20]
    ports: [{ port: 80, targetPort: 8080 }]
    selector: { app: web }
    subjectAltNames: []
policies:
  - name: allow-frontend
    namespace: shop
    scope: WORKLOAD_SELECTOR
    selector: { app: web }
    action: ALLOW
    rules:
      - from: [{ principals: [cluster.local/ns/shop/sa/frontend] }]
        to: [{ destinationPorts: [8080] }]
  - name: deny-outsiders
    namespace: istio-system
    scope: GLOBAL
    action: DENY
    rules:
      - from: [{ notNamespaces: [shop, "kube-*"] }]
        when: [{ notSourceIps: [10.9.0.0/16, "fd00::/8"] }]
peerAuthentications:
  - { name: strict, namespace: shop, mode: STRICT }
"#;

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    [
        ("base", BASE),
        ("readme", README),
        ("empty-list", "workloads: []\n"),
        (
            "syntax-error",
            "workloads:\n  - name: a\n    namespace: x\n    node: n\n    addresses: [not-an-ip]\n",
        ),
        (
            "unknown-field",
            "workloads:\n  - name: a\n    namespace: x\n    node: n\n    addresses: []\n    adresses: []\n",
        ),
    ]
    .into_iter()
    .map(|(name, text)| (name, text.as_bytes().to_vec()))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_seeds_parse_and_the_broken_ones_do_not() {
        for (name, seed) in seeds() {
            let text = std::str::from_utf8(&seed).expect("seeds are text");
            let parsed = LocalConfig::parse(Path::new("w.yaml"), text, NODE);
            let want_ok = !matches!(name, "syntax-error" | "unknown-field");
            assert_eq!(parsed.is_ok(), want_ok, "seed {name}: {parsed:?}");
            run(&seed);
        }
    }
}
