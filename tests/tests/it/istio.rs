//! Istio mode: pods handed over by a fake istio-cni (ZDS, real netns fds), workloads,
//! services and policies from a fake istiod (delta xDS), certificates from its CA.
use std::{collections::HashMap, ffi::OsString};

use ztunnel::istio::proto::{
    ADDRESS_TYPE, AUTHORIZATION_TYPE,
    security::{self, string_match::MatchType},
    workload,
};
use ztunnel_tests::{
    Pod, PodProcess, Topology, Ztunnel,
    fake_cni::FakeCni,
    fake_istiod::{CLUSTER, FakeIstiod},
};

const HOST: &str = "web.default.svc.cluster.local";

pub(crate) fn xds_name(p: &Pod) -> String {
    format!("{CLUSTER}//Pod/default/{}", p.name)
}

pub(crate) fn zds_uid(p: &Pod) -> String {
    p.uid.clone()
}

/// istiod's view of a pod: HBONE, on node1, backing `web` when `backs_web`, with the
/// selector policies named.
fn workload_of(p: &Pod, backs_web: bool, policies: &[&str]) -> workload::Address {
    let mut services = HashMap::new();
    if backs_web {
        services.insert(
            format!("default/{HOST}"),
            workload::PortList {
                ports: vec![workload::Port {
                    service_port: 80,
                    target_port: 8080,
                }],
            },
        );
    }
    workload::Address {
        r#type: Some(workload::address::Type::Workload(workload::Workload {
            uid: xds_name(p),
            name: p.name.clone(),
            namespace: "default".into(),
            addresses: vec![p.ip4.octets().to_vec()],
            tunnel_protocol: workload::TunnelProtocol::Hbone as i32,
            service_account: p.service_account.clone(),
            node: "node1".into(),
            workload_type: workload::WorkloadType::Pod as i32,
            cluster_id: CLUSTER.into(),
            services,
            authorization_policies: policies.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })),
    }
}

/// A VIP on the pods' own subnet that no pod has: once it no longer routes through
/// ztunnel, a direct dial fails within seconds (no ARP answer) instead of timing out.
fn vip(t: &Topology) -> [u8; 4] {
    [10, t.subnet(), 1, 200]
}

fn web_service(vip: [u8; 4]) -> workload::Address {
    workload::Address {
        r#type: Some(workload::address::Type::Service(workload::Service {
            name: "web".into(),
            namespace: "default".into(),
            hostname: HOST.into(),
            addresses: vec![workload::NetworkAddress {
                network: String::new(),
                address: vip.to_vec(),
            }],
            ports: vec![workload::Port {
                service_port: 80,
                target_port: 8080,
            }],
            subject_alt_names: vec![],
            waypoint: None,
            weighted_waypoints: vec![],
        })),
    }
}

/// DENY connections from `principal` into workloads that list `default/deny-a`.
fn deny_from(principal: &str) -> security::Authorization {
    security::Authorization {
        name: "deny-a".into(),
        namespace: "default".into(),
        scope: security::Scope::WorkloadSelector as i32,
        action: security::Action::Deny as i32,
        rules: vec![security::Rule {
            clauses: vec![security::Clause {
                matches: vec![security::Match {
                    principals: vec![security::StringMatch {
                        match_type: Some(MatchType::Exact(principal.into())),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
    }
}

/// Pods `a` (serving :9000) and `b` (serving :8080). A process in each pod matters: the
/// pod's cgroup is found from its netns through them.
pub(crate) fn two_serving_pods() -> anyhow::Result<(Topology, Pod, Pod, [PodProcess; 2])> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let b = t.add_pod("b", true, false)?;
    let servers = [t.serve(&a, a.addr(9000))?, t.serve(&b, b.addr(8080))?];
    Ok((t, a, b, servers))
}

/// istiod describes each pod as a plain workload (version "1").
pub(crate) fn describe(istiod: &FakeIstiod, pods: &[&Pod]) {
    for p in pods {
        istiod.put_message(ADDRESS_TYPE, &xds_name(p), "1", &workload_of(p, false, &[]));
    }
}

/// istio-cni hands the pods over (each add must be acked without an error) and says its
/// snapshot is complete.
pub(crate) fn hand_over(cni: &mut FakeCni, pods: &[&Pod]) -> anyhow::Result<()> {
    for p in pods {
        assert_eq!(cni.add(&zds_uid(p), p)?, "", "add {}", p.name);
    }
    assert_eq!(cni.snapshot_sent()?, "", "snapshot");
    Ok(())
}

fn ok(t: &mut Topology, from: &Pod, dst: std::net::SocketAddr) -> bool {
    matches!(t.call(from, dst, &[]), Ok(out) if out.contains("match=true"))
}

pub(crate) fn start_istio_ztunnel(
    t: &mut Topology,
    istiod: &FakeIstiod,
    cni: &FakeCni,
    cert_lifetime: &str,
) -> anyhow::Result<Ztunnel> {
    let args: Vec<OsString> = vec![
        "--source".into(),
        "istio".into(),
        "--zds-socket".into(),
        cni.path.clone().into(),
        "--xds-address".into(),
        istiod.url().into(),
        "--istio-root-cert".into(),
        istiod.root_cert.clone().into(),
        "--istio-token".into(),
        istiod.token.clone().into(),
        "--cluster-id".into(),
        CLUSTER.into(),
        "--cert-lifetime".into(),
        cert_lifetime.into(),
    ];
    t.spawn_ztunnel_with("node1", false, &args)
}

#[test]
fn istio_control_plane_drives_enrolment_routing_policy_and_certificates() -> anyhow::Result<()> {
    let (mut t, a, b, _servers) = two_serving_pods()?;

    let mut istiod = FakeIstiod::start(t.dir.path())?;
    istiod.put_message(
        ADDRESS_TYPE,
        &xds_name(&a),
        "1",
        &workload_of(&a, false, &[]),
    );
    istiod.put_message(
        ADDRESS_TYPE,
        &xds_name(&b),
        "1",
        &workload_of(&b, true, &["default/deny-a"]),
    );
    istiod.put_message(
        ADDRESS_TYPE,
        &format!("default/{HOST}"),
        "1",
        &web_service(vip(&t)),
    );
    let mut cni = FakeCni::listen(&t.dir.path().join("zds.sock"))?;
    let z = start_istio_ztunnel(&mut t, &istiod, &cni, "1h")?;

    // ZDS: ztunnel connects and says hello; each add is acked once the pod is enrolled.
    cni.accept()?;
    assert_eq!(cni.add(&zds_uid(&a), &a)?, "", "add a");
    assert_eq!(cni.add(&zds_uid(&b), &b)?, "", "add b");
    assert_eq!(cni.snapshot_sent()?, "", "snapshot");
    let d = z.wait_enrolled(&[&a, &b])?;
    let pa = d
        .enrolled_pods
        .iter()
        .find(|p| p.name == a.key())
        .expect("a enrolled");
    assert_eq!(pa.cgroup, a.cgroup, "cgroup found from the netns");
    assert!(pa.netns.starts_with("/proc/self/fd/"), "{:?}", pa.netns);
    let bad = cni.add_without_fd("uid-x", &a)?;
    assert!(bad.contains("exactly one netns fd"), "{bad}");
    z.wait_for("readiness", |_| z.ready().is_ok())?;

    // a → b through the tunnel, with certificates from the fake CA.
    assert!(ok(&mut t, &a, b.addr(8080)), "a → b\n{}", z.log_text());
    let d = z.wait_for("the inbound record", |d| {
        d.connections
            .list
            .iter()
            .any(|r| r.direction == ztunnel::proxy::Direction::Inbound && r.outcome.is_some())
    })?;
    let rec = d
        .connections
        .list
        .iter()
        .find(|r| r.direction == ztunnel::proxy::Direction::Inbound)
        .expect("inbound record");
    assert_eq!(rec.security_policy, "mutual_tls");
    assert_eq!(
        rec.src_identity.as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/a")
    );
    let issued = istiod.issued();
    for sa in ["a", "b"] {
        let id = format!("spiffe://cluster.local/ns/default/sa/{sa}");
        assert!(
            issued.contains(&id),
            "{id} not issued by the fake CA: {issued:?}"
        );
    }
    // The service VIP learned from xDS reaches b.
    let vip = std::net::SocketAddr::from((vip(&t), 80));
    assert!(ok(&mut t, &a, vip), "a → VIP");

    // A policy pushed over xDS is enforced; removed, it no longer is.
    istiod.put_message(
        AUTHORIZATION_TYPE,
        "default/deny-a",
        "1",
        &deny_from("cluster.local/ns/default/sa/a"),
    );
    z.wait_for("the policy", |d| {
        d.policies.iter().any(|p| p.name == "deny-a")
    })?;
    assert!(!ok(&mut t, &a, b.addr(8080)), "deny-a must refuse a → b");
    istiod.remove(AUTHORIZATION_TYPE, "default/deny-a");
    z.wait_for("the policy's removal", |d| d.policies.is_empty())?;
    assert!(
        ok(&mut t, &a, b.addr(8080)),
        "a → b after the policy's removal"
    );

    // An invalid resource is NACKed by name, with the reason, and nothing else changes.
    let mut broken = workload_of(&a, false, &[]);
    if let Some(workload::address::Type::Workload(w)) = &mut broken.r#type {
        w.addresses = vec![vec![1, 2, 3]];
    }
    istiod.put_message(ADDRESS_TYPE, &xds_name(&a), "2", &broken);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while istiod.nacks().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let nacks = istiod.nacks();
    assert!(
        nacks
            .iter()
            .any(|n| n.contains(&xds_name(&a)) && n.contains("3 bytes")),
        "{nacks:?}"
    );
    assert!(ok(&mut t, &a, b.addr(8080)), "a → b after the NACK");

    // A removal over xDS takes effect: the VIP is gone.
    istiod.remove(ADDRESS_TYPE, &format!("default/{HOST}"));
    z.wait_for("the service's removal", |d| d.services.is_empty())?;
    assert!(!ok(&mut t, &a, vip), "the VIP must no longer route");

    // istiod restarts; meanwhile the policy came back. ztunnel resubscribes with the
    // versions it holds and applies what changed.
    istiod.stop();
    istiod.put_quietly(
        AUTHORIZATION_TYPE,
        "default/deny-a",
        "2",
        &deny_from("cluster.local/ns/default/sa/a"),
    );
    let streams_before = istiod.initial_versions().len();
    istiod.resume()?;
    z.wait_for("the policy after istiod's restart", |d| {
        d.policies.iter().any(|p| p.name == "deny-a")
    })?;
    let resubscribed = istiod.initial_versions();
    let (_, versions) = resubscribed[streams_before..]
        .iter()
        .find(|(ty, _)| ty == ADDRESS_TYPE)
        .expect("address stream reopened");
    assert_eq!(
        versions.get(&xds_name(&b)).map(String::as_str),
        Some("1"),
        "{versions:?}"
    );
    assert_eq!(
        versions.get(&xds_name(&a)).map(String::as_str),
        Some("1"),
        "the NACKed version must not be claimed: {versions:?}"
    );
    assert!(
        !ok(&mut t, &a, b.addr(8080)),
        "deny-a enforced after the restart"
    );
    istiod.remove(AUTHORIZATION_TYPE, "default/deny-a");
    z.wait_for("the policy's removal", |d| d.policies.is_empty())?;

    // istio-cni restarts: its snapshot names only a, so b is unenrolled; a is untouched.
    let a_cookie = pa.netns_cookie;
    cni.disconnect();
    cni.accept()?;
    assert_eq!(cni.add(&zds_uid(&a), &a)?, "", "re-add a");
    assert_eq!(cni.snapshot_sent()?, "", "snapshot after the restart");
    let d = z.wait_enrolled(&[&a])?;
    assert_eq!(d.enrolled_pods[0].netns_cookie, a_cookie);

    // b again, then a delete over ZDS.
    assert_eq!(cni.add(&zds_uid(&b), &b)?, "", "add b again");
    z.wait_enrolled(&[&a, &b])?;
    assert_eq!(cni.keep(&zds_uid(&b))?, "", "keep b");
    assert_eq!(cni.del(&zds_uid(&b))?, "", "delete b");
    z.wait_enrolled(&[&a])?;
    let unknown = cni.del("uid-nobody")?;
    assert!(unknown.contains("unknown pod"), "{unknown}");
    Ok(())
}

/// Polls until `cond` holds on the readiness answer (`Ok(body)` or the error text).
fn wait_readiness(
    z: &Ztunnel,
    what: &str,
    cond: impl Fn(&Result<String, String>) -> bool,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    loop {
        let r = z.ready().map_err(|e| format!("{e:#}"));
        if cond(&r) {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}; last readiness: {r:?}\n{}",
            z.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn unreachable_ca_keeps_current_certificates_and_says_so() -> anyhow::Result<()> {
    let (mut t, a, b, _servers) = two_serving_pods()?;
    let mut istiod = FakeIstiod::start(t.dir.path())?;
    describe(&istiod, &[&a, &b]);
    let mut cni = FakeCni::listen(&t.dir.path().join("zds.sock"))?;
    // The fake CA backdates by a minute: 120 s asked → renewal due 30 s from issue,
    // with 90 s left on the certificate when it is.
    let z = start_istio_ztunnel(&mut t, &istiod, &cni, "120s")?;
    cni.accept()?;
    hand_over(&mut cni, &[&a, &b])?;
    z.wait_enrolled(&[&a, &b])?;
    wait_readiness(&z, "readiness", |r| r.is_ok())?;
    assert!(ok(&mut t, &a, b.addr(8080)), "a → b");

    istiod.stop();
    wait_readiness(
        &z,
        "the ca outage in readiness",
        |r| matches!(r, Err(e) if e.contains("istio ca unreachable")),
    )?;
    let metrics = z.metrics_text()?;
    assert!(
        metrics.contains("ztunnel_control_plane_up{component=\"ca\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ztunnel_control_plane_up{component=\"xds\"} 0"),
        "{metrics}"
    );
    // The certificates in hand still serve.
    assert!(ok(&mut t, &a, b.addr(8080)), "a → b during the outage");

    istiod.resume()?;
    wait_readiness(&z, "readiness after the ca is back", |r| r.is_ok())?;
    let metrics = z.metrics_text()?;
    assert!(
        metrics.contains("ztunnel_control_plane_up{component=\"ca\"} 1"),
        "{metrics}"
    );
    Ok(())
}

#[test]
fn file_workloads_can_take_certificates_from_istios_ca() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let b = t.add_pod("b", true, false)?;
    let _sb = t.serve(&b, b.addr(8080))?;
    let istiod = FakeIstiod::start(t.dir.path())?;
    t.write_workloads()?;
    let args: Vec<OsString> = vec![
        "--workloads".into(),
        t.workloads_path().into(),
        "--ca".into(),
        "istio".into(),
        "--ca-address".into(),
        istiod.url().into(),
        "--istio-root-cert".into(),
        istiod.root_cert.clone().into(),
        "--istio-token".into(),
        istiod.token.clone().into(),
        "--cluster-id".into(),
        CLUSTER.into(),
    ];
    let z = t.spawn_ztunnel_with("node1", false, &args)?;
    z.wait_enrolled(&[&a, &b])?;
    assert!(ok(&mut t, &a, b.addr(8080)), "a → b\n{}", z.log_text());
    let issued = istiod.issued();
    for sa in ["a", "b"] {
        let id = format!("spiffe://cluster.local/ns/default/sa/{sa}");
        assert!(
            issued.contains(&id),
            "{id} not issued by istio's ca: {issued:?}"
        );
    }
    Ok(())
}

#[test]
fn restarted_ztunnel_keeps_pods_closed_until_istio_cni_hands_them_over_again() -> anyhow::Result<()>
{
    let (mut t, a, b, _servers) = two_serving_pods()?;
    let istiod = FakeIstiod::start(t.dir.path())?;
    describe(&istiod, &[&a, &b]);
    let mut cni = FakeCni::listen(&t.dir.path().join("zds.sock"))?;
    let z = start_istio_ztunnel(&mut t, &istiod, &cni, "1h")?;
    cni.accept()?;
    hand_over(&mut cni, &[&a, &b])?;
    z.wait_enrolled(&[&a, &b])?;
    assert!(ok(&mut t, &a, b.addr(8080)), "a → b");
    z.crash();

    // The successor is connected to istio-cni but has no snapshot yet: the pinned
    // capture stays, so a's connects still fail closed.
    let z = start_istio_ztunnel(&mut t, &istiod, &cni, "1h")?;
    cni.accept()?;
    z.wait_for("the admin api", |_| true)?;
    let res = t.call(&a, b.addr(8080), &[]);
    let err = format!("{:?}", res.expect_err("no plaintext before the snapshot"));
    assert!(err.contains("Connection refused"), "{err}");

    hand_over(&mut cni, &[&a, &b])?;
    z.wait_enrolled(&[&a, &b])?;
    assert!(ok(&mut t, &a, b.addr(8080)), "a → b after the takeover");
    let progs = ztunnel_tests::cgroup_programs(&a.cgroup)?;
    assert_eq!(progs.matches("connect4_capture").count(), 1, "{progs}");
    Ok(())
}
