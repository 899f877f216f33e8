//! deploy/: each kustomize overlay rendered (resources + JSON 6902 patches, the only
//! kustomize features the overlays use; anything else fails the render) and validated
//! offline against the Kubernetes OpenAPI schemas by PyPI's kubernetes-validate, which
//! `cargo xtask setup` installs; and the standalone overlay's RBAC compared with the API
//! calls the Kubernetes source declares it makes.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

/// The Kubernetes version the manifests must be valid for: the oldest one k8s-openapi's
/// `v1_33` feature (ztunnel's client) supports.
const KUBERNETES_VERSION: &str = "1.33.0";

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("failed to read {}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            let v: serde_norway::Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: invalid yaml: {e}", path.display()));
            serde_json::to_value(v)
                .unwrap_or_else(|e| panic!("{}: not json-compatible: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Renders a kustomization directory the way `kustomize build` does for the features used.
fn render(dir: &Path) -> Vec<Value> {
    let path = dir.join("kustomization.yaml");
    let [k] = &yaml_docs(&path)[..] else {
        panic!("{}: expected one document", path.display());
    };
    let obj = k.as_object().expect("kustomization is a mapping");
    for key in obj.keys() {
        assert!(
            ["apiVersion", "kind", "resources", "patches"].contains(&key.as_str()),
            "{}: `{key}` is not supported by this test's renderer; keep overlays to resources and patches",
            path.display()
        );
    }
    let mut out = Vec::new();
    for r in obj["resources"].as_array().expect("resources list") {
        let p = dir.join(r.as_str().expect("resource path"));
        if p.is_dir() {
            out.extend(render(&p));
        } else {
            out.extend(yaml_docs(&p));
        }
    }
    for patch in obj
        .get("patches")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let file = dir.join(patch["path"].as_str().expect("patch path"));
        let [ops] = &yaml_docs(&file)[..] else {
            panic!("{}: expected one document", file.display());
        };
        let ops: json_patch::Patch = serde_json::from_value(ops.clone())
            .unwrap_or_else(|e| panic!("{}: not a JSON 6902 patch: {e}", file.display()));
        let (kind, name) = (&patch["target"]["kind"], &patch["target"]["name"]);
        let mut hits = 0;
        for doc in out
            .iter_mut()
            .filter(|d| &d["kind"] == kind && &d["metadata"]["name"] == name)
        {
            json_patch::patch(doc, &ops)
                .unwrap_or_else(|e| panic!("{}: does not apply: {e}", file.display()));
            hits += 1;
        }
        assert_eq!(
            hits,
            1,
            "{}: target {kind}/{name} must match one object",
            file.display()
        );
    }
    out
}

fn validator() -> PathBuf {
    let bin = std::env::var_os("KUBERNETES_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/kube-tools/venv/bin/kubernetes-validate")
        });
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo xtask setup` (it installs kubernetes-validate)",
        bin.display()
    );
    bin
}

fn env_of(daemonset: &Value) -> BTreeMap<String, String> {
    daemonset["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("env list")
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_owned(),
                e["value"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

/// Runs kubernetes-validate (strict, offline schemas) on `docs`, failing with its output
/// under `what`.
fn assert_valid_kubernetes(docs: &[&Value], what: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("rendered.yaml");
    let text: String = docs
        .iter()
        .map(|d| format!("---\n{}", serde_norway::to_string(d).expect("yaml")))
        .collect();
    std::fs::write(&file, text).expect("write rendered manifests");
    let out = Command::new(validator())
        .args([
            "--strict",
            "--quiet",
            "--kubernetes-version",
            KUBERNETES_VERSION,
        ])
        .arg(&file)
        .output()
        .expect("run kubernetes-validate");
    assert!(
        out.status.success(),
        "{what} is not valid for Kubernetes {KUBERNETES_VERSION}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

#[test]
fn overlays_are_valid_kubernetes_objects() {
    for overlay in ["standalone", "istio"] {
        let docs = render(&deploy().join("overlays").join(overlay));
        assert_valid_kubernetes(
            &docs.iter().collect::<Vec<_>>(),
            &format!("overlay {overlay}"),
        );
        let [ds] = find(&docs, "DaemonSet")[..] else {
            panic!("overlay {overlay}: expected one DaemonSet");
        };
        let env = env_of(ds);
        assert_eq!(
            env.get("ZTUNNEL_SOURCE").map(String::as_str),
            Some(if overlay == "standalone" {
                "kube"
            } else {
                "istio"
            })
        );
    }
}

#[test]
fn daemonset_keeps_istio_chart_names_and_node_proxy_settings() {
    let docs = render(&deploy().join("base"));
    let [ds] = find(&docs, "DaemonSet")[..] else {
        panic!("expected one DaemonSet");
    };
    let pod = &ds["spec"]["template"];
    let spec = &pod["spec"];
    let c = &spec["containers"][0];
    assert_eq!(ds["metadata"]["name"], "ztunnel");
    assert_eq!(c["name"], "istio-proxy");
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    assert_eq!(spec["hostPID"], true);
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        0
    );
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"], 1);
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], 15021);
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/port"],
        "15020"
    );
    assert_eq!(pod["metadata"]["labels"]["istio.io/dataplane-mode"], "none");
    let caps: BTreeSet<&str> = c["securityContext"]["capabilities"]["add"]
        .as_array()
        .expect("capabilities")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        caps,
        BTreeSet::from(["BPF", "NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"])
    );
    assert_eq!(c["securityContext"]["privileged"], false);
    let host_paths: BTreeSet<&str> = spec["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    assert_eq!(
        host_paths,
        BTreeSet::from(["/sys/fs/bpf", "/sys/fs/cgroup", "/var/run/ztunnel"])
    );
}

/// (namespaced, group, resource, verb) for every permission in a set of RBAC objects.
fn grants(docs: &[&Value]) -> BTreeSet<(bool, String, String, String)> {
    let mut out = BTreeSet::new();
    for role in docs {
        let namespaced = role["kind"] == "Role";
        for rule in role["rules"].as_array().expect("rules") {
            let list = |k: &str| -> Vec<String> {
                rule[k]
                    .as_array()
                    .unwrap_or_else(|| panic!("rule without {k}: {rule}"))
                    .iter()
                    .map(|v| v.as_str().expect("string").to_owned())
                    .collect()
            };
            for g in list("apiGroups") {
                for r in list("resources") {
                    for v in list("verbs") {
                        assert!(g != "*" && r != "*" && v != "*", "wildcard in {rule}");
                        out.insert((namespaced, g.clone(), r.clone(), v));
                    }
                }
            }
        }
    }
    out
}

/// The (namespaced, group, resource, verb) grants a list of API calls needs.
fn needed_grants(access: &[ztunnel::kube::Access]) -> BTreeSet<(bool, String, String, String)> {
    access
        .iter()
        .flat_map(|a| {
            a.verbs.iter().map(move |v| {
                (
                    a.namespaced,
                    a.group.to_owned(),
                    a.resource.to_owned(),
                    (*v).to_owned(),
                )
            })
        })
        .collect()
}

#[test]
fn standalone_rbac_grants_exactly_the_calls_the_watchers_make() {
    let docs = render(&deploy().join("overlays/standalone"));
    let roles: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
        .collect();
    let granted = grants(&roles);
    let needed = needed_grants(ztunnel::kube::API_ACCESS);
    assert_eq!(
        granted, needed,
        "deploy/overlays/standalone/rbac.yaml vs ztunnel::kube::API_ACCESS"
    );

    // Reading secrets is limited to the CA root the DaemonSet names.
    let [ds] = find(&docs, "DaemonSet")[..] else {
        panic!("expected one DaemonSet");
    };
    let secret = env_of(ds)["ZTUNNEL_CA_SECRET"].clone();
    let (ns, name) = secret.split_once('/').expect("namespace/name");
    for role in find(&docs, "Role") {
        assert_eq!(
            role["metadata"]["namespace"], ns,
            "the Role lives beside the Secret"
        );
        for rule in role["rules"].as_array().expect("rules") {
            if rule["verbs"]
                .as_array()
                .expect("verbs")
                .iter()
                .any(|v| v == "get")
            {
                assert_eq!(
                    rule["resourceNames"],
                    serde_json::json!([name]),
                    "get limited to {secret}"
                );
            }
        }
    }
    // Bindings name the DaemonSet's service account in its namespace.
    let sa = &ds["spec"]["template"]["spec"]["serviceAccountName"];
    for b in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding")
    {
        assert_eq!(&b["subjects"][0]["name"], sa);
        assert_eq!(b["subjects"][0]["namespace"], ds["metadata"]["namespace"]);
    }
    // The istio overlay needs no Kubernetes API access beyond its service account token.
    let istio = render(&deploy().join("overlays/istio"));
    assert!(
        istio
            .iter()
            .all(|d| !d["kind"].as_str().unwrap_or_default().contains("Role")),
        "the istio overlay grants no RBAC"
    );
}

/// The config the DaemonSet's literal env values give, parsed by ztunnel's own flags
/// (each variable passed as the flag that reads it; the node name, a fieldRef, given
/// here).
fn config_of(daemonset: &Value) -> ztunnel::config::Config {
    use clap::{Args as _, FromArgMatches as _};
    let cmd = ztunnel::config::Config::augment_args(clap::Command::new("ztunnel"));
    let flag_of: BTreeMap<String, String> = cmd
        .get_arguments()
        .filter_map(|a| {
            Some((
                a.get_env()?.to_string_lossy().into_owned(),
                a.get_long()?.to_owned(),
            ))
        })
        .collect();
    let mut argv = vec!["ztunnel".to_owned(), "--node=node-1".to_owned()];
    for (name, value) in env_of(daemonset) {
        if let Some(long) = flag_of.get(&name) {
            argv.push(format!("--{long}={value}"));
        }
    }
    let matches = cmd
        .try_get_matches_from(&argv)
        .unwrap_or_else(|e| panic!("the DaemonSet's settings {argv:?} do not parse: {e}"));
    ztunnel::config::Config::from_arg_matches(&matches)
        .unwrap_or_else(|e| panic!("the DaemonSet's settings {argv:?} do not parse: {e}"))
}

#[test]
fn drain_ends_before_the_termination_grace_period_and_updates_surge() {
    for overlay in ["standalone", "istio"] {
        let docs = render(&deploy().join("overlays").join(overlay));
        let [ds] = find(&docs, "DaemonSet")[..] else {
            panic!("expected one DaemonSet in {overlay}");
        };
        // A new ztunnel starts beside the old one, which then drains: never none.
        let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
        assert_eq!(rolling["maxSurge"], 1, "{overlay}");
        assert_eq!(rolling["maxUnavailable"], 0, "{overlay}");

        let grace = ds["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or_else(|| panic!("{overlay}: terminationGracePeriodSeconds must be set"));
        assert_eq!(
            env_of(ds)
                .get("TERMINATION_GRACE_PERIOD_SECONDS")
                .map(String::as_str),
            Some(grace.to_string().as_str()),
            "{overlay}: TERMINATION_GRACE_PERIOD_SECONDS must equal terminationGracePeriodSeconds (the downward API cannot expose it)"
        );
        let cfg = config_of(ds);
        cfg.validate()
            .unwrap_or_else(|e| panic!("{overlay}: the DaemonSet's settings are invalid: {e}"));
        let drain = cfg.resolved_drain_timeout();
        let longest = ztunnel::drain::longest(drain);
        assert!(
            longest < std::time::Duration::from_secs(grace),
            "{overlay}: a drain takes up to {longest:?} (--drain-timeout {drain:?}), not less than the {grace} s grace period"
        );
        // Istio's derivation, as its chart gets it: 5 s for closing what is left.
        assert_eq!(
            drain,
            std::time::Duration::from_secs(grace - 5),
            "{overlay}"
        );
    }
}

/// Environment variables the manifests may set that ztunnel's flags do not read: the log
/// filter, and a variable Istio's chart sets that we keep so values files carry over.
const ENV_NOT_FLAGS: &[&str] = &["RUST_LOG", "SERVICE_ACCOUNT"];

#[test]
fn every_environment_variable_in_the_manifests_is_one_ztunnel_reads() {
    use clap::Args as _;
    let known: BTreeSet<String> = ztunnel::config::Config::augment_args(clap::Command::new("z"))
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    for overlay in ["standalone", "istio"] {
        let docs = render(&deploy().join("overlays").join(overlay));
        let [ds] = find(&docs, "DaemonSet")[..] else {
            panic!("expected one DaemonSet in {overlay}");
        };
        let names: Vec<&str> = ds["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .expect("env list")
            .iter()
            .filter_map(|e| e["name"].as_str())
            .collect();
        assert!(names.contains(&"ZTUNNEL_SOURCE"), "{overlay}: {names:?}");
        for name in names {
            assert!(
                known.contains(name) || ENV_NOT_FLAGS.contains(&name),
                "{overlay}: the DaemonSet sets {name}, which no ztunnel flag reads (known: {known:?})"
            );
        }
    }
}

/// The waypoint's manifests (deploy/waypoint): Kubernetes objects valid for the schemas
/// (the Gateway, a CRD kind the validator has no schema for, checked by what the nodes'
/// ztunnels make of it), its RBAC exactly the calls `ztunnel waypoint --source kube`
/// makes, every environment variable one of its flags, and its Service selecting its pods.
#[test]
fn waypoint_manifests_are_valid_and_grant_exactly_the_waypoints_calls() {
    use clap::{Args as _, FromArgMatches as _};
    let docs = render(&deploy().join("waypoint"));
    let (gateways, builtin): (Vec<&Value>, Vec<&Value>) =
        docs.iter().partition(|d| d["kind"] == "Gateway");
    let [gw] = gateways[..] else {
        panic!("expected one Gateway");
    };
    let gw_obj: kube::core::DynamicObject =
        serde_json::from_value(gw.clone()).expect("the Gateway is a Kubernetes object");
    assert!(
        ztunnel::kube::convert::gateway(&gw_obj).is_some_and(|w| w.for_services),
        "the nodes' ztunnels take it as a waypoint for services: {gw}"
    );

    assert_valid_kubernetes(&builtin, "deploy/waypoint");

    let roles: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
        .collect();
    let needed = needed_grants(ztunnel::kube::WAYPOINT_API_ACCESS);
    assert_eq!(
        grants(&roles),
        needed,
        "deploy/waypoint/rbac.yaml vs ztunnel::kube::WAYPOINT_API_ACCESS"
    );

    let [deployment] = find(&docs, "Deployment")[..] else {
        panic!("expected one Deployment");
    };
    let pod = &deployment["spec"]["template"];
    assert_eq!(
        pod["spec"]["containers"][0]["args"],
        serde_json::json!(["waypoint"])
    );
    // The bindings name the Deployment's service account in its namespace.
    let sa = &pod["spec"]["serviceAccountName"];
    for b in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding")
    {
        assert_eq!(&b["subjects"][0]["name"], sa);
        assert_eq!(
            b["subjects"][0]["namespace"],
            deployment["metadata"]["namespace"]
        );
    }
    // The Service selects the waypoint's pods and serves HBONE on 15008.
    let [svc] = find(&docs, "Service")[..] else {
        panic!("expected one Service");
    };
    let labels = pod["metadata"]["labels"].as_object().expect("pod labels");
    for (k, v) in svc["spec"]["selector"].as_object().expect("selector") {
        assert_eq!(
            labels.get(k),
            Some(v),
            "the Service selects the waypoint's pods"
        );
    }
    assert!(
        svc["spec"]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .any(|p| p["port"] == 15008)
    );
    assert_eq!(
        labels.get("istio.io/dataplane-mode"),
        Some(&serde_json::json!("none")),
        "the waypoint is not captured"
    );

    // Every variable is one of `ztunnel waypoint`'s flags, and they parse (the fieldRef
    // ones given here as the kubelet would).
    let cmd = ztunnel::waypoint::Args::augment_args(clap::Command::new("waypoint"));
    let flag_of: BTreeMap<String, String> = cmd
        .get_arguments()
        .filter_map(|a| {
            Some((
                a.get_env()?.to_string_lossy().into_owned(),
                a.get_long()?.to_owned(),
            ))
        })
        .collect();
    let mut argv = vec!["waypoint".to_owned()];
    for e in pod["spec"]["containers"][0]["env"]
        .as_array()
        .expect("env list")
    {
        let name = e["name"].as_str().expect("env name");
        if name == "RUST_LOG" {
            continue;
        }
        let long = flag_of
            .get(name)
            .unwrap_or_else(|| panic!("the waypoint sets {name}, which no flag reads"));
        let value = e["value"].as_str().unwrap_or_else(|| match name {
            "POD_NAME" => "waypoint-5d8f7c9b4-abcde",
            "POD_NAMESPACE" => "default",
            "SERVICE_ACCOUNT" => "waypoint",
            other => panic!("{other} from a fieldRef the test does not know"),
        });
        argv.push(format!("--{long}={value}"));
    }
    let matches = cmd
        .try_get_matches_from(&argv)
        .unwrap_or_else(|e| panic!("the waypoint's settings {argv:?} do not parse: {e}"));
    let args = ztunnel::waypoint::Args::from_arg_matches(&matches)
        .unwrap_or_else(|e| panic!("the waypoint's settings {argv:?} do not parse: {e}"));
    assert_eq!(args.source, ztunnel::config::Source::Kube);
    assert_eq!(args.gateway, gw["metadata"]["name"].as_str().expect("name"));
    assert_eq!(
        args.ca_secret.as_deref(),
        Some("istio-system/ztunnel-ca-root")
    );
}
