//! Cross-node traffic between two "nodes", each with its own ztunnel.
use ztunnel::proxy::Direction;
use ztunnel_tests::{Topology, assert_only_hbone};

const MARKER: &str = "plaintext-marker-";

#[test]
fn non_mesh_pod_is_reached_in_plain_tcp() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    t.add_node()?;
    let a = t.add_pod_on(1, "a", true, false)?;
    let c = t.add_pod_on(2, "c", false, false)?;
    let _srv = t.serve(&c, c.addr(8080))?;
    let z1 = t.start_ztunnel_on("node1", false)?;
    let _z2 = t.start_ztunnel_on("node2", false)?;

    let cap = t.tcpdump_wire()?;
    let out = t.call(&a, c.addr(8080), &["--bytes", "2000", "--pattern", MARKER])?;
    assert!(out.contains("match=true"), "{out}");
    let wire = cap.finish()?;
    // Captured by A's ztunnel, but C is outside the mesh: plain TCP to C:8080.
    assert!(
        wire.contains(MARKER),
        "expected plaintext on the wire:\n{wire}"
    );
    assert!(wire.contains(&format!("> {}.8080:", c.ip4)), "{wire}");
    let d = z1.wait_for("the outbound record", |d| {
        d.connections.list.iter().any(|r| r.outcome.is_some())
    })?;
    assert_eq!(d.connections.list[0].direction, Direction::Outbound);
    assert_eq!(d.connections.list[0].dst, c.addr(8080));
    Ok(())
}

/// Two nodes, A on node1 and B on node2, both enrolled, B serving :8080 (logging peers).
fn two_nodes() -> anyhow::Result<(Topology, ztunnel_tests::Pod, ztunnel_tests::Pod)> {
    let mut t = Topology::new()?;
    t.add_node()?;
    let a = t.add_pod_on(1, "a", true, false)?;
    let b = t.add_pod_on(2, "b", true, false)?;
    Ok((t, a, b))
}

/// B's ztunnel dials B's app from A's address (transparently). A source port is refused
/// only where the whole 4-tuple is in use, as A's own kernel refuses it: A's connections
/// to other ports of B reuse source ports still held (in TIME_WAIT) by earlier ones.
/// Picked by the kernel at bind, each port would be B's to give once per TIME_WAIT (60 s)
/// for all of A's connections together: with two ports, the third connection would fail.
#[test]
fn inbound_dials_pick_the_source_port_by_the_whole_4_tuple() -> anyhow::Result<()> {
    let (mut t, a, b) = two_nodes()?;
    b.sysctl(&["net.ipv4.ip_local_port_range=40000 40001"])?;
    let ports = 8080..8084u16;
    let _servers = ports
        .clone()
        .map(|p| t.serve(&b, b.addr(p)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let _z1 = t.start_ztunnel_on("node1", false)?;
    let _z2 = t.start_ztunnel_on("node2", false)?;
    for p in ports {
        let out = t.call(&a, b.addr(p), &["--bytes", "100"])?;
        assert!(out.contains("match=true"), "connection to port {p}: {out}");
    }
    Ok(())
}

#[test]
fn pod_to_pod_across_nodes_is_mtls_on_the_wire_with_both_identities() -> anyhow::Result<()> {
    let (mut t, a, b) = two_nodes()?;
    let mut srv = t.serve_with(&b, b.addr(8080), &["--log-peers"])?;
    let z1 = t.start_ztunnel_on("node1", false)?;
    let z2 = t.start_ztunnel_on("node2", false)?;

    let cap = t.tcpdump_wire()?;
    let out = t.call(&a, b.addr(8080), &["--bytes", "20000", "--pattern", MARKER])?;
    assert!(out.contains(&format!("peer={}", b.addr(8080))), "{out}");
    assert!(out.contains("match=true"), "{out}");
    let wire = cap.finish()?;

    // Only TLS to B's :15008 crossed the wire: every packet is to or from port 15008,
    // and the payload never shows in clear.
    assert_only_hbone(&wire, b.ip4, MARKER);
    // The app in B sees A's address as the client.
    let peer = srv.read_line()?;
    assert!(peer.starts_with(&format!("conn from {}:", a.ip4)), "{peer}");

    // Both sides log both SPIFFE identities.
    let (ida, idb) = (
        "spiffe://cluster.local/ns/default/sa/a",
        "spiffe://cluster.local/ns/default/sa/b",
    );
    for z in [&z1, &z2] {
        let d = z.wait_for("the closed connection", |d| {
            d.connections.list.iter().any(|r| r.outcome.is_some())
        })?;
        let rec = &d.connections.list[0];
        assert_eq!(rec.src_identity.as_deref(), Some(ida), "{rec:?}");
        assert_eq!(rec.dst_identity.as_deref(), Some(idb), "{rec:?}");
        assert_eq!(rec.security_policy, "mutual_tls");
        assert_eq!(rec.dst, b.addr(8080));
        // The log is written by a thread of its own: the line may follow the record.
        let line = z.wait_log_line("\taccess\tconnection complete\t")?;
        assert!(
            line.contains(ida) && line.contains(idb),
            "access log: {line}"
        );
    }
    let d2 = z2.dump()?;
    assert_eq!(d2.connections.list[0].direction, Direction::Inbound);
    assert_eq!(d2.connections.list[0].src.ip(), a.addr(0).ip());
    Ok(())
}

#[test]
fn large_transfers_and_200_concurrent_connections_share_the_pool() -> anyhow::Result<()> {
    let (mut t, a, b) = two_nodes()?;
    let _srv = t.serve(&b, b.addr(8080))?;
    let z1 = t.start_ztunnel_on("node1", false)?;
    let _z2 = t.start_ztunnel_on("node2", false)?;

    let big = (64usize << 20).to_string();
    let out = t.call(&a, b.addr(8080), &["--bytes", &big, "--seed", "3"])?;
    assert!(out.contains(&format!("received={big} match=true")), "{out}");

    let dst = b.addr(8080).to_string();
    let mut many = t.spawn(&a, &["parallel", &dst, "--count", "200", "--secs", "2"])?;
    let line = many.read_line()?;
    assert_eq!(line, "open=200");
    let d = z1.dump()?;
    // 100 streams per connection at most: 200 open streams need exactly two.
    assert_eq!(d.connections.hbone_pool_streams, 200, "{:?}", d.connections);
    assert_eq!(
        d.connections.hbone_pool_connections, 2,
        "{:?}",
        d.connections
    );
    many.wait_ok()?;
    Ok(())
}

#[test]
fn service_vip_reaches_an_endpoint_on_the_other_node() -> anyhow::Result<()> {
    let (mut t, a, b) = two_nodes()?;
    let _srv = t.serve(&b, b.addr(8080))?;
    let vip = format!("10.{}.250.10", t.subnet());
    let mut yaml = t.workloads_yaml();
    yaml += &format!(
        "services:\n  - name: web\n    namespace: default\n    addresses: [{vip}]\n    ports: [{{port: 80, targetPort: 8080}}]\n    selector: {{ app: b }}\n"
    );
    let file = t.dir.path().join("with-service.yaml");
    std::fs::write(&file, &yaml)?;
    let z1 = t.start_ztunnel_with_file("node1", false, &file)?;
    let _z2 = t.start_ztunnel_with_file("node2", false, &file)?;

    let out = t.call(&a, format!("{vip}:80").parse()?, &["--bytes", "5000"])?;
    assert!(out.contains(&format!("peer={vip}:80")), "{out}");
    assert!(out.contains("match=true"), "{out}");
    let d = z1.wait_for("the closed connection", |d| {
        d.connections.list.iter().any(|r| r.outcome.is_some())
    })?;
    let rec = &d.connections.list[0];
    assert_eq!(rec.dst, format!("{vip}:80").parse()?);
    assert_eq!(
        rec.dst_identity.as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/b")
    );
    assert_eq!(rec.outcome.as_deref(), Some("ok"));
    Ok(())
}

#[test]
fn a_server_with_the_wrong_identity_is_refused() -> anyhow::Result<()> {
    let (mut t, a, b) = two_nodes()?;
    let _srv = t.serve(&b, b.addr(8080))?;
    // node2 believes B runs as `imposter`; node1 expects `b`.
    let lie = t
        .workloads_yaml()
        .replace("serviceAccount: b\n", "serviceAccount: imposter\n");
    let file2 = t.dir.path().join("node2.yaml");
    std::fs::write(&file2, lie)?;
    let z1 = t.start_ztunnel_on("node1", false)?;
    let _z2 = t.start_ztunnel_with_file("node2", false, &file2)?;

    let res = t.call(&a, b.addr(8080), &[]);
    assert!(res.is_err(), "the call must fail: {res:?}");
    let d = z1.wait_for("the refused connection", |d| {
        d.connections.list.iter().any(|r| r.outcome.is_some())
    })?;
    let outcome = d.connections.list[0].outcome.clone().unwrap_or_default();
    assert!(
        outcome.contains("spiffe://cluster.local/ns/default/sa/imposter is not one of"),
        "outcome: {outcome}"
    );
    Ok(())
}

#[test]
fn a_client_from_another_trust_domain_is_refused() -> anyhow::Result<()> {
    let (mut t, a, b) = two_nodes()?;
    let _srv = t.serve(&b, b.addr(8080))?;
    // node1 puts A in trust domain other.local (same root); B stays in cluster.local.
    let yaml = t.workloads_yaml().replace(
        "serviceAccount: b\n",
        "serviceAccount: b\n    trustDomain: cluster.local\n",
    );
    let file1 = t.dir.path().join("node1.yaml");
    std::fs::write(&file1, format!("trustDomain: other.local\n{yaml}"))?;
    let _z1 = t.start_ztunnel_with_file("node1", false, &file1)?;
    let z2 = t.start_ztunnel_on("node2", false)?;

    let res = t.call(&a, b.addr(8080), &[]);
    assert!(res.is_err(), "the call must fail: {res:?}");
    // B's ztunnel refused the handshake on the trust-domain rule; no stream was opened.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !z2.log_text().contains("other.local") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let log = z2.log_text();
    assert!(log.contains("other.local"), "node2's log:\n{log}");
    assert_eq!(z2.dump()?.connections.opened_total, 0);
    Ok(())
}

#[test]
fn malformed_connect_requests_get_their_codes_without_disturbing_other_streams()
-> anyhow::Result<()> {
    use std::time::Duration;

    use bytes::Bytes;
    use ztunnel::{
        hbone::ConnectRequest,
        identity::{BuiltinCa, Identity},
        netns::Netns,
        tls,
    };

    let (mut t, a, b) = two_nodes()?;
    let _srv = t.serve(&b, b.addr(8080))?;
    let _z1 = t.start_ztunnel_on("node1", false)?;
    let _z2 = t.start_ztunnel_on("node2", false)?;

    // A raw HBONE client holding A's identity from the nodes' shared root, dialling
    // from A's netns (so its source address is A's, as a ztunnel's would be).
    let ca = BuiltinCa::load_or_create(
        &t.dir.path().join("ca"),
        "cluster.local",
        Duration::from_secs(3600),
    )?;
    let cert = ca.issue(&Identity::new("cluster.local", "default", "a"))?;
    let config = tls::client_config(&cert, vec![Identity::new("cluster.local", "default", "b")])?;
    let hbone = b.addr(15008);
    let sock =
        Netns::open(&a.netns_path)?.run_on_thread(|| std::net::TcpStream::connect(hbone))??;
    sock.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::from_std(sock)?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(tls::server_name(hbone.ip()), tcp)
            .await?;
        let (mut client, conn) = h2::client::handshake(tls).await?;
        tokio::spawn(conn);

        // A good stream, kept open across the bad ones.
        let good = ConnectRequest::new(b.addr(8080).to_string(), a.addr(40000)).to_http()?;
        let (resp, mut body_out) = client.send_request(good, false)?;
        let resp = resp.await?;
        assert_eq!(resp.status(), 200);
        let mut body_in = resp.into_body();

        let other_ip = format!("10.{}.2.99:8080", t.subnet());
        let cases: [(&str, String, u16); 5] = [
            ("POST", format!("http://{}/", b.addr(8080)), 400),
            ("CONNECT", "no-port-here".to_owned(), 400),
            ("CONNECT", other_ip, 400),
            ("CONNECT", b.addr(15001).to_string(), 503),
            ("CONNECT", b.addr(9).to_string(), 503),
        ];
        for (method, uri, want) in cases {
            let req = http::Request::builder().method(method).uri(&uri).body(())?;
            let (resp, _) = client.send_request(req, true)?;
            let resp = resp.await?;
            assert_eq!(resp.status().as_u16(), want, "{method} {uri}");
        }

        // The good stream still echoes.
        body_out.send_data(Bytes::from_static(b"still here"), false)?;
        let mut got = Vec::new();
        while got.len() < 10 {
            let chunk = body_in
                .data()
                .await
                .ok_or_else(|| anyhow::anyhow!("stream ended early"))??;
            let _ = body_in.flow_control().release_capacity(chunk.len());
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, b"still here");
        anyhow::Ok(())
    })
}

/// Once up, each ztunnel lets go of its start-up code: its executable's read-only
/// mappings are unmapped and marked for no read-ahead (`rr`), its resident memory drops,
/// and the code that runs afterwards (a tunnelled connection through both) comes back as
/// it is used.
#[test]
fn ztunnels_release_start_up_code_and_keep_tunnelling() -> anyhow::Result<()> {
    let (mut t, a, b) = two_nodes()?;
    let _srv = t.serve(&b, b.addr(8080))?;
    let z1 = t.start_ztunnel_on("node1", false)?;
    let z2 = t.start_ztunnel_on("node2", false)?;
    for z in [&z1, &z2] {
        let line = z.wait_log_line("\treleased start-up code\t")?;
        let field = |name: &str| -> u64 {
            line.split(['\t', ' '])
                .find_map(|f| f.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
        };
        let (before, after) = (field("rss_kib_before"), field("rss_kib_after"));
        assert!(after < before, "{line}");
        assert!(field("segments_kib") > 0, "{line}");
        // Every read-only mapping of the executable is marked; the writable ones are not.
        let exe = std::fs::read_link(format!("/proc/{}/exe", z.pid()))?;
        let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", z.pid()))?;
        let mut readonly = 0;
        let mut mapping = String::new();
        for l in smaps.lines() {
            if let Some(flags) = l.strip_prefix("VmFlags:") {
                if !mapping.ends_with(exe.to_str().unwrap_or("?")) {
                    continue;
                }
                let perms = mapping.split_whitespace().nth(1).unwrap_or("");
                let random = flags.split_whitespace().any(|f| f == "rr");
                if perms.contains('w') || flags.split_whitespace().any(|f| f == "ac") {
                    assert!(!random, "a writable mapping marked: {mapping}");
                } else {
                    assert!(
                        random,
                        "a read-only mapping not marked: {mapping} ({flags})"
                    );
                    readonly += 1;
                }
            } else if l.split_whitespace().next().is_some_and(|f| f.contains('-')) {
                mapping = l.to_string();
            }
        }
        assert!(
            readonly >= 2,
            "code and read-only data: {readonly} mappings\n{smaps}"
        );
    }
    // The data path's code comes back as it runs.
    let out = t.call(&a, b.addr(8080), &["--bytes", "20000", "--pattern", MARKER])?;
    assert!(out.contains("match=true"), "{out}");
    Ok(())
}
