//! ztunnel routing through waypoints. Our own waypoint proxy does not exist yet, so a fake
//! one plays it: an HBONE server on the waypoint pod's :15008 with the waypoint's real
//! identity from the nodes' built-in CA, which records each CONNECT's `:authority` and the
//! client's SPIFFE identity, answers 200 and echoes the stream.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use ztunnel::{
    hbone::ConnectRequest,
    identity::{BuiltinCa, Identity, WorkloadCertificate},
    netns::Netns,
    tls,
};
use ztunnel_tests::{
    Pod, Topology,
    in_pod::{self, InPodServer},
};

/// What the fake waypoint saw: each CONNECT's `:authority` and the client's identity.
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// A fake waypoint on `pod`'s :15008, served until dropped.
pub(crate) struct FakeWaypoint {
    seen: Seen,
    _server: InPodServer,
}

impl FakeWaypoint {
    pub(crate) fn seen(&self) -> Vec<(String, String)> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits (generously) until the waypoint has seen `n` CONNECTs.
    pub(crate) fn wait_seen(&self, n: usize) -> anyhow::Result<Vec<(String, String)>> {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let seen = self.seen();
            if seen.len() >= n {
                return Ok(seen);
            }
            if Instant::now() > end {
                bail!("the fake waypoint saw {seen:?}, expected {n} CONNECTs");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

pub(crate) fn fake_waypoint(pod: &Pod, cert: WorkloadCertificate) -> anyhow::Result<FakeWaypoint> {
    let config = tls::server_config(&cert)?;
    let seen: Seen = Arc::default();
    let recorded = seen.clone();
    let server = in_pod::serve(pod, pod.addr(15008), move |tcp| {
        let (config, seen) = (config.clone(), recorded.clone());
        async move {
            let Ok(tls) = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await else {
                return;
            };
            let client = tls::peer_identity(tls.get_ref().1)
                .map(|i| i.to_string())
                .unwrap_or_default();
            let Ok(mut conn) = h2::server::handshake(tls).await else {
                return;
            };
            while let Some(Ok((request, mut respond))) = conn.accept().await {
                let authority = request
                    .uri()
                    .authority()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                if let Ok(mut s) = seen.lock() {
                    s.push((authority, client.clone()));
                }
                tokio::spawn(async move {
                    let mut body = request.into_body();
                    let Ok(mut send) = respond.send_response(http::Response::new(()), false) else {
                        return;
                    };
                    while let Some(Ok(data)) = body.data().await {
                        let _ = body.flow_control().release_capacity(data.len());
                        if send.send_data(data, false).is_err() {
                            return;
                        }
                    }
                    let _ = send.send_data(Bytes::new(), true);
                });
            }
        }
    })?;
    Ok(FakeWaypoint {
        seen,
        _server: server,
    })
}

fn ca(t: &Topology) -> anyhow::Result<BuiltinCa> {
    Ok(BuiltinCa::load_or_create(
        &t.dir.path().join("ca"),
        "cluster.local",
        Duration::from_secs(3600),
    )?)
}

/// node1: `a` (enrolled, the client). node2: `b` (enrolled, serving :8080) and `wp` (not
/// enrolled: the waypoint's pod). Service `web` (VIP, 80 → 8080) selects b and names the
/// waypoint by `waypoint` (a YAML flow mapping); service `waypoint` selects wp.
struct Mesh {
    t: Topology,
    a: Pod,
    b: Pod,
    wp: Pod,
    vip: SocketAddr,
}

fn mesh() -> anyhow::Result<Mesh> {
    let mut t = Topology::new()?;
    t.add_node()?;
    let a = t.add_pod_on(1, "a", true, false)?;
    let b = t.add_pod_on(2, "b", true, false)?;
    let wp = t.add_pod_on(2, "wp", false, false)?;
    let vip: SocketAddr = format!("10.{}.250.10:80", t.subnet()).parse()?;
    Ok(Mesh { t, a, b, wp, vip })
}

impl Mesh {
    /// Writes the workload file with service `web` naming `waypoint` (and `extra` after).
    fn write(&self, waypoint: &str, extra: &str) -> anyhow::Result<()> {
        let wp_vip = format!("10.{}.250.15", self.t.subnet());
        let yaml = format!(
            "{}services:\n  - name: web\n    namespace: default\n    addresses: [{}]\n    ports: [{{port: 80, targetPort: 8080}}]\n    selector: {{ app: b }}\n    waypoint: {waypoint}\n  - name: waypoint\n    namespace: default\n    addresses: [{wp_vip}]\n    ports: [{{port: 15008}}]\n    selector: {{ app: wp }}\n{extra}",
            self.t.workloads_yaml(),
            self.vip.ip(),
        );
        self.t.write_workloads_text(&yaml)
    }
}

const BY_HOSTNAME: &str = "{ hostname: waypoint.default.svc.cluster.local }";

#[test]
fn a_call_to_a_waypoint_fronted_service_reaches_the_waypoint_as_a_connect_for_the_vip()
-> anyhow::Result<()> {
    let mut m = mesh()?;
    let ca = ca(&m.t)?;
    let waypoint = fake_waypoint(
        &m.wp,
        ca.issue(&Identity::new("cluster.local", "default", "wp"))?,
    )?;
    let _srv = m.t.serve(&m.b, m.b.addr(8080))?;
    m.write(BY_HOSTNAME, "")?;
    let file = m.t.workloads_path();
    let z1 = m.t.start_ztunnel_with_file("node1", false, &file)?;
    let z2 = m.t.start_ztunnel_with_file("node2", false, &file)?;

    let out = m.t.call(&m.a, m.vip, &["--bytes", "5000"])?;
    assert!(out.contains("match=true"), "{out}");
    let seen = waypoint.wait_seen(1)?;
    assert_eq!(
        seen,
        [(
            m.vip.to_string(),
            "spiffe://cluster.local/ns/default/sa/a".to_owned()
        )],
        "the waypoint gets a CONNECT for the VIP:port the app dialled, from a's identity"
    );
    let d = z1.wait_for("the closed connection", |d| {
        d.connections.list.iter().any(|r| r.outcome.is_some())
    })?;
    // /config_dump shows the service's waypoint as Istio's ztunnel does.
    let web = d
        .services
        .iter()
        .find(|s| s.name == "web")
        .context("web in the dump")?;
    assert_eq!(
        web.waypoint,
        Some(ztunnel::admin::GatewayAddressDump {
            destination: "default/waypoint.default.svc.cluster.local".to_owned(),
            hbone_mtls_port: 15008,
        })
    );
    let rec = &d.connections.list[0];
    assert_eq!(rec.dst, m.vip);
    assert_eq!(rec.outcome.as_deref(), Some("ok"));
    assert_eq!(
        rec.dst_identity.as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/wp")
    );

    // A config change moves the service to another waypoint, named by its pod's address.
    let wp2 = m.t.add_pod_on(2, "wp2", false, false)?;
    let waypoint2 = fake_waypoint(
        &wp2,
        ca.issue(&Identity::new("cluster.local", "default", "wp2"))?,
    )?;
    m.write(&format!("{{ address: {} }}", wp2.ip4), "")?;
    let end = Instant::now() + Duration::from_secs(30);
    while waypoint2.seen().is_empty() {
        let out = m.t.call(&m.a, m.vip, &["--bytes", "100"])?;
        assert!(out.contains("match=true"), "{out}");
        anyhow::ensure!(
            Instant::now() < end,
            "no call reached the waypoint named by address"
        );
    }
    assert_eq!(
        waypoint2.seen()[0],
        (
            m.vip.to_string(),
            "spiffe://cluster.local/ns/default/sa/a".to_owned()
        )
    );
    // Nothing went to the endpoint: b's ztunnel opened no connection.
    assert_eq!(z2.dump()?.connections.opened_total, 0);
    Ok(())
}

/// Issue 18's last part: a hostname-only service (ServiceEntry-like, no address) that
/// names a waypoint. An enrolled pod resolves the name through the captured DNS to the
/// service's auto-allocated VIP, and its call to that VIP goes to the waypoint with the
/// VIP:port as `:authority`, as Istio's ztunnel sends it (a hostname authority only goes
/// through east-west gateways); nothing goes to the endpoint directly.
#[test]
fn a_hostname_only_service_behind_a_waypoint_is_resolved_and_tunnelled_to_it() -> anyhow::Result<()>
{
    let mut m = mesh()?;
    let ca = ca(&m.t)?;
    let waypoint = fake_waypoint(
        &m.wp,
        ca.issue(&Identity::new("cluster.local", "default", "wp"))?,
    )?;
    let _srv = m.t.serve(&m.b, m.b.addr(8080))?;
    let wp_vip = format!("10.{}.250.15", m.t.subnet());
    let yaml = format!(
        "{}services:\n  - name: db\n    namespace: default\n    hostname: db.example.internal\n    addresses: []\n    ports: [{{port: 80, targetPort: 8080}}]\n    selector: {{ app: b }}\n    waypoint: {BY_HOSTNAME}\n  - name: waypoint\n    namespace: default\n    addresses: [{wp_vip}]\n    ports: [{{port: 15008}}]\n    selector: {{ app: wp }}\n",
        m.t.workloads_yaml(),
    );
    m.t.write_workloads_text(&yaml)?;
    let file = m.t.workloads_path();
    let z1 = m.t.start_ztunnel_with_file("node1", false, &file)?;
    let z2 = m.t.start_ztunnel_with_file("node2", false, &file)?;

    let d = z1.dump()?;
    let db = d
        .services
        .iter()
        .find(|s| s.hostname == "db.example.internal")
        .context("the hostname service")?;
    let [vip] = db.vips.as_slice() else {
        anyhow::bail!("one auto-allocated VIP: {db:?}");
    };
    let vip = vip.rsplit('/').next().unwrap_or(vip).to_owned();
    // Any server the pod asks: the capture answers from the mesh.
    let asked: SocketAddr = "192.0.2.53:53".parse()?;
    let (_, rcode, answer) = crate::dns::query(&mut m.t, &m.a, asked, "db.example.internal", "")?;
    assert_eq!(
        (rcode.as_str(), answer.as_str()),
        ("No Error", vip.as_str())
    );

    let dst: SocketAddr = format!("{vip}:80").parse()?;
    let out = m.t.call(&m.a, dst, &["--bytes", "3000"])?;
    assert!(out.contains("match=true"), "{out}");
    assert_eq!(
        waypoint.wait_seen(1)?,
        [(
            dst.to_string(),
            "spiffe://cluster.local/ns/default/sa/a".to_owned()
        )],
        "the waypoint gets a CONNECT for the auto-allocated VIP:port"
    );
    assert_eq!(
        z2.dump()?.connections.opened_total,
        0,
        "b was reached directly"
    );
    Ok(())
}

#[test]
fn with_the_waypoint_down_calls_fail_and_nothing_goes_to_the_endpoint() -> anyhow::Result<()> {
    let mut m = mesh()?;
    let _srv = m.t.serve(&m.b, m.b.addr(8080))?;
    // The waypoint's pod is known but nothing listens on its :15008.
    m.write(BY_HOSTNAME, "")?;
    let file = m.t.workloads_path();
    let z1 = m.t.start_ztunnel_with_file("node1", false, &file)?;
    let z2 = m.t.start_ztunnel_with_file("node2", false, &file)?;

    let res = m.t.call(&m.a, m.vip, &[]);
    assert!(res.is_err(), "the call must fail: {res:?}");
    let d = z1.wait_for("the failed connection", |d| {
        d.connections.list.iter().any(|r| r.outcome.is_some())
    })?;
    let rec = &d.connections.list[0];
    let outcome = rec.outcome.clone().unwrap_or_default();
    assert!(outcome.starts_with("hbone failed"), "{outcome}");
    // The tunnel went to the waypoint's pod, not to b.
    assert_eq!(rec.hbone_addr, Some(m.wp.addr(15008)), "{rec:?}");

    // A waypoint no one knows: refused at once, never sent to the endpoint.
    m.write("{ hostname: gone.default.svc.cluster.local }", "")?;
    let end = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let res = m.t.call(&m.a, m.vip, &[]);
        assert!(res.is_err(), "the call must fail: {res:?}");
        let d = z1.dump()?;
        if let Some(o) = d
            .connections
            .list
            .iter()
            .filter_map(|r| r.outcome.clone())
            .find(|o| o.contains("waypoint"))
        {
            break o;
        }
        anyhow::ensure!(Instant::now() < end, "no refusal for the unknown waypoint");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        refused.contains("refused: waypoint default/gone.default.svc.cluster.local:15008")
            || refused.contains("refused: waypoint gone.default.svc.cluster.local:15008"),
        "{refused}"
    );
    assert!(
        refused.contains("web.default.svc.cluster.local not found"),
        "{refused}"
    );
    // Nothing bypassed the waypoint: b's ztunnel opened no connection.
    assert_eq!(z2.dump()?.connections.opened_total, 0);
    Ok(())
}

/// Opens an HBONE connection from `from`'s netns to `to`'s :15008 as `cert`, asks for
/// `authority`; returns the CONNECT's status and, on 200, whether 1,000 bytes echo back.
fn hbone_call(
    from: &Pod,
    to: &Pod,
    cert: &WorkloadCertificate,
    authority: &str,
) -> anyhow::Result<(u16, bool)> {
    let config = tls::client_config(
        cert,
        vec![Identity::new("cluster.local", "default", &to.name)],
    )?;
    let hbone = to.addr(15008);
    let sock =
        Netns::open(&from.netns_path)?.run_on_thread(|| std::net::TcpStream::connect(hbone))??;
    sock.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let authority = authority.to_owned();
    let src = from.addr(40000);
    rt.block_on(async move {
        tokio::time::timeout(Duration::from_secs(30), async move {
            let tcp = tokio::net::TcpStream::from_std(sock)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(tls::server_name(hbone.ip()), tcp)
                .await?;
            let (mut client, conn) = h2::client::handshake(tls).await?;
            tokio::spawn(conn);
            let req = ConnectRequest::new(authority, src).to_http()?;
            let (resp, mut body_out) = client.send_request(req, false)?;
            let resp = resp.await?;
            let status = resp.status().as_u16();
            if status != 200 {
                return Ok((status, false));
            }
            let payload = Bytes::from(vec![7u8; 1000]);
            body_out.send_data(payload.clone(), true)?;
            let mut body_in = resp.into_body();
            let mut got = Vec::new();
            while let Some(chunk) = body_in.data().await {
                let chunk = chunk?;
                let _ = body_in.flow_control().release_capacity(chunk.len());
                got.extend_from_slice(&chunk);
            }
            anyhow::Ok((status, got == payload))
        })
        .await
        .context("the HBONE call took more than 30 s")?
    })
}

#[test]
fn inbound_from_a_peer_that_skipped_the_waypoint_is_policed_as_istio_does() -> anyhow::Result<()> {
    let mut m = mesh()?;
    let c = m.t.add_pod_on(1, "c", false, false)?;
    let _srv = m.t.serve(&m.b, m.b.addr(8080))?;
    m.write(BY_HOSTNAME, "")?;
    let file = m.t.workloads_path();
    let z2 = m.t.start_ztunnel_with_file("node2", false, &file)?;
    let ca = ca(&m.t)?;
    let waypoint = ca.issue(&Identity::new("cluster.local", "default", "wp"))?;
    let other = ca.issue(&Identity::new("cluster.local", "default", "c"))?;
    let b_ip = m.b.addr(8080).to_string();

    // No policy: b's ztunnel accepts HBONE from its waypoint and, as Istio's ztunnel does,
    // from a peer that skipped the waypoint (only policy can refuse it).
    assert_eq!(hbone_call(&m.wp, &m.b, &waypoint, &b_ip)?, (200, true));
    assert_eq!(hbone_call(&c, &m.b, &other, &b_ip)?, (200, true));
    // A service hostname authority, as Istio accepts it: b's target port for port 80.
    assert_eq!(
        hbone_call(&m.wp, &m.b, &waypoint, "web.default.svc.cluster.local:80")?,
        (200, true)
    );
    assert_eq!(
        hbone_call(&m.wp, &m.b, &waypoint, "nope.default.svc.cluster.local:80")?.0,
        503
    );
    assert_eq!(
        hbone_call(&m.wp, &m.b, &waypoint, "web.default.svc.cluster.local:81")?.0,
        503
    );

    // Istio's way to make the waypoint unskippable: an ALLOW policy on b naming only the
    // waypoint's identity. The peer that skipped it is then refused; the waypoint is not.
    m.write(
        BY_HOSTNAME,
        "policies:\n  - name: only-waypoint\n    namespace: default\n    scope: WORKLOAD_SELECTOR\n    selector: { app: b }\n    action: ALLOW\n    rules:\n      - from:\n          - principals: [cluster.local/ns/default/sa/wp]\n",
    )?;
    z2.wait_for("the policy", |d| {
        d.authorization_policies
            .iter()
            .any(|p| p.name == "only-waypoint")
    })?;
    assert_eq!(hbone_call(&c, &m.b, &other, &b_ip)?.0, 401);
    assert_eq!(hbone_call(&m.wp, &m.b, &waypoint, &b_ip)?, (200, true));
    Ok(())
}

#[test]
fn waypoint_fields_from_istiod_route_to_the_waypoint() -> anyhow::Result<()> {
    use ztunnel::istio::proto::{ADDRESS_TYPE, workload};
    use ztunnel_tests::{
        fake_cni::FakeCni,
        fake_istiod::{CLUSTER, FakeIstiod},
    };

    use crate::istio::{hand_over, start_istio_ztunnel, two_serving_pods, xds_name};

    let (mut t, a, b, _servers) = two_serving_pods()?;
    let wp = t.add_pod("wp", false, false)?;
    let istiod = FakeIstiod::start(t.dir.path())?;
    let waypoint = fake_waypoint(
        &wp,
        istiod.issue(&Identity::new("cluster.local", "default", "wp"))?,
    )?;
    let wp_vip = [10, t.subnet(), 1, 215];
    let web_vip = [10, t.subnet(), 1, 210];
    // istiod names a waypoint by its service's VIP and the HBONE port.
    let via_waypoint = || workload::GatewayAddress {
        destination: Some(workload::gateway_address::Destination::Address(
            workload::NetworkAddress {
                network: String::new(),
                address: wp_vip.to_vec(),
            },
        )),
        hbone_mtls_port: 15008,
    };
    let pod = |p: &Pod, mode: workload::TunnelProtocol, backs: Option<(&str, u32, u32)>| {
        let mut services = std::collections::HashMap::new();
        if let Some((host, port, target)) = backs {
            services.insert(
                format!("default/{host}"),
                workload::PortList {
                    ports: vec![workload::Port {
                        service_port: port,
                        target_port: target,
                    }],
                },
            );
        }
        workload::Workload {
            uid: xds_name(p),
            name: p.name.clone(),
            namespace: "default".into(),
            addresses: vec![p.ip4.octets().to_vec()],
            tunnel_protocol: mode as i32,
            service_account: p.service_account.clone(),
            node: "node1".into(),
            workload_type: workload::WorkloadType::Pod as i32,
            cluster_id: CLUSTER.into(),
            services,
            ..Default::default()
        }
    };
    let service = |name: &str, vip: [u8; 4], port: u32, target: u32, waypoint| workload::Address {
        r#type: Some(workload::address::Type::Service(workload::Service {
            name: name.into(),
            namespace: "default".into(),
            hostname: format!("{name}.default.svc.cluster.local"),
            addresses: vec![workload::NetworkAddress {
                network: String::new(),
                address: vip.to_vec(),
            }],
            ports: vec![workload::Port {
                service_port: port,
                target_port: target,
            }],
            waypoint,
            ..Default::default()
        })),
    };
    let address = |w: workload::Workload| workload::Address {
        r#type: Some(workload::address::Type::Workload(w)),
    };
    let hbone = workload::TunnelProtocol::Hbone;
    istiod.put_message(
        ADDRESS_TYPE,
        &xds_name(&a),
        "1",
        &address(pod(&a, hbone, None)),
    );
    // b backs web, and names the waypoint for traffic to its own address.
    let mut b_wl = pod(&b, hbone, Some(("web.default.svc.cluster.local", 80, 8080)));
    b_wl.waypoint = Some(via_waypoint());
    istiod.put_message(ADDRESS_TYPE, &xds_name(&b), "1", &address(b_wl));
    // The waypoint's pod: not in the mesh's capture, backing the waypoint service.
    let wp_wl = pod(
        &wp,
        workload::TunnelProtocol::None,
        Some(("waypoint.default.svc.cluster.local", 15008, 15008)),
    );
    istiod.put_message(ADDRESS_TYPE, &xds_name(&wp), "1", &address(wp_wl));
    istiod.put_message(
        ADDRESS_TYPE,
        "default/waypoint.default.svc.cluster.local",
        "1",
        &service("waypoint", wp_vip, 15008, 15008, None),
    );
    istiod.put_message(
        ADDRESS_TYPE,
        "default/web.default.svc.cluster.local",
        "1",
        &service("web", web_vip, 80, 8080, Some(via_waypoint())),
    );
    let mut cni = FakeCni::listen(&t.dir.path().join("zds.sock"))?;
    let z = start_istio_ztunnel(&mut t, &istiod, &cni, "1h")?;
    cni.accept()?;
    hand_over(&mut cni, &[&a, &b])?;
    z.wait_enrolled(&[&a, &b])?;
    assert!(istiod.nacks().is_empty(), "{:?}", istiod.nacks());

    // To the service: the waypoint gets a CONNECT for VIP:port, from a's identity.
    let web: SocketAddr = SocketAddr::from((web_vip, 80));
    let out = t.call(&a, web, &["--bytes", "3000"])?;
    assert!(out.contains("match=true"), "{out}");
    // To b's own address: b's workload waypoint, the authority b's address as dialled.
    let out = t.call(&a, b.addr(8080), &["--bytes", "3000"])?;
    assert!(out.contains("match=true"), "{out}");
    let a_id = "spiffe://cluster.local/ns/default/sa/a".to_owned();
    assert_eq!(
        waypoint.wait_seen(2)?,
        [
            (web.to_string(), a_id.clone()),
            (b.addr(8080).to_string(), a_id)
        ]
    );
    // Nothing reached b: its ztunnel's inbound side opened no connection.
    let d = z.dump()?;
    assert!(
        d.connections
            .list
            .iter()
            .all(|r| r.direction == ztunnel::proxy::Direction::Outbound),
        "{:?}",
        d.connections.list
    );
    Ok(())
}
