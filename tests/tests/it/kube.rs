//! `--source kube` on the node: each pod's cgroup found by its UID in the kubelet's layouts
//! (cgroupfs and systemd drivers; containerd and CRI-O scopes) and its network namespace
//! through a process in that cgroup, against real processes in test namespaces and cgroups.
use std::{
    collections::BTreeSet,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::Context as _;
use serde_json::json;
use ztunnel::kube::discovery::{Discovery, Error, cgroup_of};
use ztunnel_tests::{Pod, Topology};

// The same in-process API server ztunnel's unit tests use.
#[allow(dead_code)]
#[path = "../../../ztunnel/src/kube/fake_api.rs"]
mod fake_api;
use fake_api::FakeApi;
// What the fake API server's RBAC check reads (`super::Access` there).
use ztunnel::kube::Access;

const UID_CGROUPFS: &str = "6f1d2c3b-1111-4a2b-9c3d-0123456789ab";
const UID_SYSTEMD: &str = "6f1d2c3b-2222-4a2b-9c3d-0123456789ab";
const UID_CRIO: &str = "6f1d2c3b-3333-4a2b-9c3d-0123456789ab";
const UID_ABSENT: &str = "6f1d2c3b-4444-4a2b-9c3d-0123456789ab";

/// A process in the host network namespace, moved into `cgroup`; killed on drop.
struct HostProcess(Child);

impl HostProcess {
    fn start_in(cgroup: &Path) -> anyhow::Result<Self> {
        let child = Command::new("sleep")
            .arg("600")
            .stdin(Stdio::null())
            .spawn()
            .context("failed to start sleep")?;
        std::fs::write(cgroup.join("cgroup.procs"), child.id().to_string())
            .with_context(|| format!("failed to move sleep into {}", cgroup.display()))?;
        Ok(Self(child))
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ns_id(path: &Path) -> (u64, u64) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (m.dev(), m.ino())
}

/// The pod with its cgroup moved to `dir` (created), so processes spawned in it land there.
fn in_cgroup(pod: &Pod, dir: PathBuf) -> anyhow::Result<Pod> {
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    Ok(Pod {
        cgroup: dir,
        ..pod.clone()
    })
}

/// The topology's cgroup base (pods live in `<base>/kubepods/pod<uid>`), where the tests build
/// kubelet-shaped cgroup trees.
fn cgroup_base(p: &Pod) -> anyhow::Result<std::path::PathBuf> {
    Ok(p.cgroup
        .parent()
        .and_then(Path::parent)
        .context("pod cgroup base")?
        .to_owned())
}

#[test]
fn pods_are_found_by_uid_in_each_kubelet_cgroup_layout() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let b = t.add_pod("b", true, false)?;
    let c = t.add_pod("c", true, false)?;
    let base = cgroup_base(&a)?;

    // cgroupfs driver (containerd): kubepods/<qos>/pod<uid>/<container id>. A host-network
    // process joins the pod cgroup first (lowest pid): it must not be taken for the pod.
    let a_pod = base.join(format!("kubepods/burstable/pod{UID_CGROUPFS}"));
    std::fs::create_dir_all(&a_pod)?;
    let _a_host = HostProcess::start_in(&in_cgroup(&a, a_pod.join("0aa1host"))?.cgroup)?;
    let a_ctr = in_cgroup(&a, a_pod.join("0123abcd"))?;
    let _a_app = t.serve(&a_ctr, a.addr(8080))?;

    // systemd driver (containerd): kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice.
    let b_pod = base.join(format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
        UID_SYSTEMD.replace('-', "_")
    ));
    let b_ctr = in_cgroup(&b, b_pod.join("cri-containerd-4567cdef.scope"))?;
    let _b_app = t.serve(&b_ctr, b.addr(8080))?;

    // systemd driver (CRI-O, guaranteed QoS): conmon's scope sits in the pod slice but on
    // the host network.
    let c_pod = base.join(format!(
        "kubepods.slice/kubepods-pod{}.slice",
        UID_CRIO.replace('-', "_")
    ));
    let _conmon =
        HostProcess::start_in(&in_cgroup(&c, c_pod.join("crio-conmon-89ab.scope"))?.cgroup)?;
    let c_ctr = in_cgroup(&c, c_pod.join("crio-89ab.scope"))?;
    let _c_app = t.serve(&c_ctr, c.addr(8080))?;

    // The test's own network namespace is the "host" its non-pod processes run in (this
    // machine's pid 1 may not let us read its namespaces).
    let discovery = Discovery::new(base.clone(), PathBuf::from("/proc"))
        .with_host_netns(Path::new("/proc/self/ns/net"));
    let uids: BTreeSet<String> = [UID_CGROUPFS, UID_SYSTEMD, UID_CRIO, UID_ABSENT]
        .into_iter()
        .map(str::to_owned)
        .collect();
    let found = discovery.locate(&uids);
    for (uid, pod, cgroup) in [
        (UID_CGROUPFS, &a, &a_pod),
        (UID_SYSTEMD, &b, &b_pod),
        (UID_CRIO, &c, &c_pod),
    ] {
        let p = found[uid]
            .as_ref()
            .map_err(|e| anyhow::anyhow!("pod {} ({uid}) not found: {e}", pod.name))?;
        assert_eq!(&p.cgroup, cgroup, "pod {}", pod.name);
        assert_eq!(
            ns_id(&p.netns),
            ns_id(&pod.netns_path),
            "pod {}: {} is not its network namespace",
            pod.name,
            p.netns.display()
        );
        assert!(discovery.still_valid(p), "pod {}", pod.name);
    }
    assert!(
        matches!(found[UID_ABSENT], Err(Error::NoCgroup { .. })),
        "{:?}",
        found[UID_ABSENT]
    );

    // ztunnel finds its own cgroup the same way when its cgroup namespace hides the path.
    let app_pid: u32 = std::fs::read_to_string(b_ctr.cgroup.join("cgroup.procs"))?
        .lines()
        .next()
        .context("a process in b's container cgroup")?
        .parse()?;
    assert_eq!(cgroup_of(&base, app_pid), Some(b_ctr.cgroup.clone()));

    // The pod's process gone: the placement is stale and the pod has no process to find.
    let b_placement = found[UID_SYSTEMD]
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .clone();
    drop(_b_app);
    let gone = discovery.locate(&BTreeSet::from([UID_SYSTEMD.to_owned()]));
    assert!(
        matches!(gone[UID_SYSTEMD], Err(Error::NoProcess { .. })),
        "{:?}",
        gone[UID_SYSTEMD]
    );
    assert!(!discovery.still_valid(&b_placement));
    Ok(())
}

/// A pod object as the API server would hold it for a topology pod.
fn pod_object(pod: &Pod, uid: &str) -> serde_json::Value {
    json!({
        "metadata": {"name": pod.name, "namespace": "default", "uid": uid,
            "labels": {"app": pod.name}},
        "spec": {"nodeName": pod.node, "serviceAccountName": pod.service_account,
            "containers": [{"name": "app"}]},
        "status": {"phase": "Running", "podIP": pod.ip4.to_string(),
            "podIPs": [{"ip": pod.ip4.to_string()}]}
    })
}

fn namespace_object(ambient: bool) -> serde_json::Value {
    let labels = if ambient {
        json!({"istio.io/dataplane-mode": "ambient"})
    } else {
        json!({})
    };
    json!({"metadata": {"name": "default", "labels": labels}})
}

/// A pod UID unique to this run and test (`tag`): ztunnel walks the machine's whole cgroup
/// tree.
fn run_uid(tag: u16, n: u32) -> String {
    format!(
        "{:08x}-{tag:04}-4a2b-9c3d-0123456789ab",
        std::process::id() * 4 + n
    )
}

/// A kubeconfig pointing at `api`, in the topology's directory.
fn write_kubeconfig(t: &Topology, api: &FakeApi) -> anyhow::Result<PathBuf> {
    write_kubeconfig_for(t, api.addr, "kubeconfig.yaml")
}

/// A kubeconfig (file `name`) pointing at the API server at `addr`.
fn write_kubeconfig_for(
    t: &Topology,
    addr: std::net::SocketAddr,
    name: &str,
) -> anyhow::Result<PathBuf> {
    let kubeconfig = t.dir.path().join(name);
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: 'http://{}'}}}}]\n\
             users: [{{name: fake, user: {{}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n",
            addr
        ),
    )?;
    Ok(kubeconfig)
}

/// node1's ztunnel with `--source kube` against `api` (a kubeconfig pointing at it), its
/// CA root in the Secret `default/ztunnel-ca-root`.
fn spawn_kube_ztunnel(t: &mut Topology, api: &FakeApi) -> anyhow::Result<ztunnel_tests::Ztunnel> {
    let kubeconfig = write_kubeconfig(t, api)?;
    let mut source = Command::new("");
    source
        .args(["--source", "kube", "--ca-secret", "default/ztunnel-ca-root"])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST");
    t.spawn_ztunnel_from("node1", false, &source)
}

#[test]
fn kube_source_enrols_by_namespace_label_and_unenrols_deleted_pods() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let api = rt.block_on(FakeApi::start());
    let mut t = Topology::new()?;
    let uid = |n: u32| run_uid(5555, n);
    let (uid_a, uid_b) = (uid(1), uid(2));
    let a = t.add_pod("a", true, false)?;
    let b = t.add_pod("b", true, false)?;
    let base = cgroup_base(&a)?;
    let a = in_cgroup(
        &a,
        base.join(format!("kubepods/besteffort/pod{uid_a}/0a0a")),
    )?;
    let b = in_cgroup(
        &b,
        base.join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-0b0b.scope",
            uid_b.replace('-', "_")
        )),
    )?;
    // The sandboxes' long-lived processes, which discovery finds the netns through.
    let _a_app = t.serve(&a, a.addr(9090))?;
    let _b_srv = t.serve(&b, b.addr(8080))?;

    api.apply("namespaces", namespace_object(false));
    api.apply("pods", pod_object(&a, &uid_a));
    api.apply("pods", pod_object(&b, &uid_b));
    let z = spawn_kube_ztunnel(&mut t, &api)?;
    let d = z.wait_for("both pods in the store", |d| d.workloads.len() == 2)?;
    assert!(
        d.enrolled_pods.is_empty(),
        "nothing is ambient yet: {:?}",
        d.enrolled_pods
    );
    assert!(
        api.secret("default/ztunnel-ca-root").is_some(),
        "the first ztunnel creates the CA root secret"
    );

    // Labelling the namespace enrols both running pods, found on the node by UID.
    api.apply("namespaces", namespace_object(true));
    let d = z.wait_enrolled(&[&a, &b])?;
    for e in &d.enrolled_pods {
        let pod_dir = if e.name == a.key() {
            a.cgroup.parent()
        } else {
            b.cgroup.parent()
        };
        assert_eq!(Some(e.cgroup.as_path()), pod_dir, "{e:?}");
    }
    z.wait_for("both certificates", |d| d.certificates.len() == 2)?;
    // Traffic between them now goes through HBONE with both identities.
    let out = t.call(&a, b.addr(8080), &[])?;
    assert!(out.contains("match=true"), "{out}");
    let d = z.wait_for("the closed connection", |d| {
        d.connections.list.iter().any(|r| r.outcome.is_some())
    })?;
    let rec = d
        .connections
        .list
        .iter()
        .find(|r| r.outcome.is_some())
        .context("a closed connection")?;
    assert_eq!(
        rec.src_identity.as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/a"),
        "{rec:?}"
    );
    assert_eq!(
        rec.dst_identity.as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/b"),
        "{rec:?}"
    );

    // Deleting a pod unenrols it; the other stays.
    api.delete("pods", "default/b", true);
    z.wait_enrolled(&[&a])?;
    api.assert_calls_granted(ztunnel::kube::API_ACCESS);
    Ok(())
}

/// A kube-mode waypoint setup: pods `a` and `b` (enrolled, in kubelet cgroups named by
/// UIDs of `tag`, with a's app on :9090) and `wp` (not enrolled: the waypoint's pod), and
/// the API objects: the ambient namespace, the three pods (wp labelled as the Gateway's),
/// the waypoint's Service and its Gateway (class `istio-waypoint`, for services).
struct WaypointMesh {
    a: Pod,
    b: Pod,
    wp: Pod,
    /// The VIP the test gives `web`.
    vip: String,
    _a_app: ztunnel_tests::PodProcess,
}

fn waypoint_mesh(t: &mut Topology, api: &FakeApi, tag: u16) -> anyhow::Result<WaypointMesh> {
    let uid = |n: u32| run_uid(tag, n);
    let (uid_a, uid_b, uid_wp) = (uid(1), uid(2), uid(3));
    let a = t.add_pod("a", true, false)?;
    let b = t.add_pod("b", true, false)?;
    let wp = t.add_pod("wp", false, false)?;
    let base = cgroup_base(&a)?;
    let a = in_cgroup(
        &a,
        base.join(format!("kubepods/besteffort/pod{uid_a}/0a0a")),
    )?;
    let b = in_cgroup(
        &b,
        base.join(format!("kubepods/besteffort/pod{uid_b}/0b0b")),
    )?;
    let a_app = t.serve(&a, a.addr(9090))?;
    let s = t.subnet();
    let (vip, wp_vip) = (format!("10.{s}.250.10"), format!("10.{s}.250.15"));
    api.apply("namespaces", namespace_object(true));
    api.apply("pods", pod_object(&a, &uid_a));
    api.apply("pods", pod_object(&b, &uid_b));
    let mut wp_pod = pod_object(&wp, &uid_wp);
    wp_pod["metadata"]["labels"] = json!({"app": "wp", "istio.io/dataplane-mode": "none",
        "gateway.networking.k8s.io/gateway-name": "waypoint"});
    api.apply("pods", wp_pod);
    api.apply(
        "services",
        json!({"metadata": {"name": "waypoint", "namespace": "default",
                "labels": {"gateway.networking.k8s.io/gateway-name": "waypoint"}},
            "spec": {"selector": {"gateway.networking.k8s.io/gateway-name": "waypoint"},
                "clusterIP": wp_vip, "ports": [{"name": "mesh", "port": 15008}]}}),
    );
    api.apply(
        "gateways",
        json!({"metadata": {"name": "waypoint", "namespace": "default",
                "labels": {"istio.io/waypoint-for": "service"}},
            "spec": {"gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}),
    );
    Ok(WaypointMesh {
        a,
        b,
        wp,
        vip,
        _a_app: a_app,
    })
}

/// Kube mode, waypoints (issue 17): Service `web` (b) and the waypoint `waypoint`, a Gateway
/// of class `istio-waypoint` whose pod `wp` (outside the mesh, an HBONE server: a fake
/// one here) its Service `waypoint` selects. Labelling `web` with `istio.io/use-waypoint`
/// sends a's calls to web's VIP through the waypoint (a CONNECT for the VIP, with a's
/// identity), with no pod restarted; `none` sends them directly to b again.
#[test]
fn a_use_waypoint_label_sends_a_services_traffic_through_its_waypoint_without_a_restart()
-> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let api = rt.block_on(FakeApi::start());
    api.install_gateway_api();
    let mut t = Topology::new()?;
    let m = waypoint_mesh(&mut t, &api, 6666)?;
    let (a, b, wp, vip) = (m.a.clone(), m.b.clone(), m.wp.clone(), m.vip.clone());
    let _b_srv = t.serve(&b, b.addr(8080))?;

    // The CA root every node shares, created first so the fake waypoint's certificate
    // chains to what ztunnel trusts.
    let ca = rt.block_on(async {
        ztunnel::kube::ca_secret::load_or_create(
            &api.client(),
            "default",
            "ztunnel-ca-root",
            "cluster.local",
            std::time::Duration::from_secs(3600),
        )
        .await
    })?;
    let wp_identity: ztunnel::identity::Identity =
        "spiffe://cluster.local/ns/default/sa/wp".parse()?;
    let waypoint = crate::waypoint::fake_waypoint(&wp, ca.issue(&wp_identity)?)?;

    let web = |labels: serde_json::Value| {
        json!({"metadata": {"name": "web", "namespace": "default", "labels": labels},
            "spec": {"selector": {"app": "b"}, "clusterIP": vip, "ports": [{"port": 80, "targetPort": 8080}]}})
    };
    api.apply("services", web(json!({})));
    let z = spawn_kube_ztunnel(&mut t, &api)?;
    z.wait_enrolled(&[&a, &b])?;
    let dst: std::net::SocketAddr = format!("{vip}:80").parse()?;
    let call = |t: &mut Topology| -> anyhow::Result<()> {
        let out = t.call(&a, dst, &[])?;
        anyhow::ensure!(out.contains("match=true"), "a → web: {out}");
        Ok(())
    };

    // No label: directly to b.
    call(&mut t)?;
    assert!(waypoint.seen().is_empty(), "{:?}", waypoint.seen());

    // The label, and nothing restarted: through the waypoint, a CONNECT for the VIP.
    api.apply(
        "services",
        web(json!({"istio.io/use-waypoint": "waypoint"})),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while waypoint.seen().is_empty() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "a's calls never reached the waypoint\n{}",
            z.log_text()
        );
        call(&mut t)?;
    }
    let seen = waypoint.wait_seen(1)?;
    assert_eq!(
        seen[0],
        (
            dst.to_string(),
            "spiffe://cluster.local/ns/default/sa/a".to_owned()
        )
    );
    let enrolled: Vec<String> = z
        .dump()?
        .enrolled_pods
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(
        enrolled,
        [a.key(), b.key()],
        "the waypoint pod is outside the mesh"
    );

    // `none` opts the service out: directly to b again.
    api.apply("services", web(json!({"istio.io/use-waypoint": "none"})));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let before = waypoint.seen().len();
        call(&mut t)?;
        if waypoint.seen().len() == before {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "calls still go through the waypoint after the opt-out"
        );
    }
    Ok(())
}

/// Kube mode with our own waypoint (`ztunnel waypoint --source kube`): `web` (b, HTTP on
/// its port named `http`) labelled to use the Gateway `waypoint`, whose pod `wp` runs the
/// waypoint; an AuthorizationPolicy targeting `web` allows only GET. a's GET is answered
/// by b through the waypoint, its POST refused there with 403; a DENY policy created
/// afterwards applies live; the waypoint read the nodes' CA root and created nothing.
#[test]
fn our_waypoint_follows_gateways_routes_and_policies_from_the_api_server() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let api = rt.block_on(FakeApi::start());
    api.install_gateway_api();
    api.install_istio_crds();
    let mut t = Topology::new()?;
    let m = waypoint_mesh(&mut t, &api, 7777)?;
    let (a, b, wp, vip) = (m.a.clone(), m.b.clone(), m.wp.clone(), m.vip.clone());
    let b_addr = b.addr(8080).to_string();
    let mut b_srv = t.spawn(&b, &["http-serve", &b_addr, "--name", "b"])?;
    anyhow::ensure!(b_srv.read_line()?.starts_with("ready"), "b's HTTP server");

    api.apply(
        "services",
        json!({"metadata": {"name": "web", "namespace": "default",
                "labels": {"istio.io/use-waypoint": "waypoint"}},
            "spec": {"selector": {"app": "b"}, "clusterIP": vip,
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
    );
    api.apply(
        "authorizationpolicies",
        json!({"metadata": {"name": "web-read", "namespace": "default"},
            "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": "web"}],
                "action": "ALLOW",
                "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}}),
    );
    // node1's ztunnel creates the CA root; the waypoint reads it.
    let z = spawn_kube_ztunnel(&mut t, &api)?;
    z.wait_enrolled(&[&a, &b])?;
    // The waypoint runs in its pod's network namespace: the API server answers there too
    // (as a cluster's does on the pod network).
    let in_wp = ztunnel::netns::Netns::open(&wp.netns_path)?;
    let api_in_wp = wp.addr(6443);
    let listener = in_wp.run(&ztunnel::netns::Netns::current()?, || {
        std::net::TcpListener::bind(api_in_wp)
    })??;
    rt.block_on(async { api.serve_on(listener) })?;
    let kubeconfig = write_kubeconfig_for(&t, api_in_wp, "kubeconfig-waypoint.yaml")?;
    let w = ztunnel_tests::waypoint::Waypoint::start_kube(
        &mut t,
        &wp,
        "waypoint",
        &kubeconfig,
        "default/ztunnel-ca-root",
    )?;

    let dst = format!("{vip}:80");
    let get = |t: &mut Topology, extra: &[&str]| -> anyhow::Result<String> {
        let mut args = vec!["http-get", dst.as_str()];
        args.extend_from_slice(extra);
        t.spawn(&a, &args)?.wait_ok()
    };
    let out = get(&mut t, &["--path", "/items", "--count", "5"])?;
    assert!(
        out.contains("summary {\"200 b\":5}"),
        "{out}\n{}",
        w.log_text()
    );
    let out = get(
        &mut t,
        &["--path", "/items", "--method", "POST", "--body", "x"],
    )?;
    assert!(
        out.contains("status=403 body=RBAC: access denied"),
        "{out}\n{}",
        w.log_text()
    );

    // A DENY policy on the Gateway itself, created now: every request refused, live.
    api.apply(
        "authorizationpolicies",
        json!({"metadata": {"name": "lockdown", "namespace": "default"},
            "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}],
                "action": "DENY", "rules": [{}]}}),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let out = get(&mut t, &["--path", "/items"])?;
        if out.contains("status=403") {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the DENY policy never applied: {out}\n{}",
            w.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // Only node1's ztunnel created anything (the CA root); the waypoint's calls are the
    // ones its role grants.
    let creates: Vec<_> = api
        .calls()
        .into_iter()
        .filter(|c| c.verb == "create")
        .collect();
    assert_eq!(creates.len(), 1, "{creates:?}");
    let mut both: Vec<Access> = ztunnel::kube::API_ACCESS.to_vec();
    both.extend_from_slice(ztunnel::kube::WAYPOINT_API_ACCESS);
    api.assert_calls_granted(&both);
    Ok(())
}
