//! Byte-exact transfers through both captures (A outbound → B inbound), with the
//! same-node fast path off and on.
//!
//! With the fast path on, the app's socket sits in a SOCKHASH and its reads go through
//! the kernel's tcp_bpf receive path. On Linux 6.18 that path returns EAGAIN to a
//! *blocking* read woken by a state change without data (the peer's FIN, or the same
//! socket's `shutdown(SHUT_WR)` from another thread): tcp_bpf does not go back to sleep.
//! Event-loop apps (non-blocking sockets: tokio, Go, NIO, Envoy) retry on readiness and
//! are unaffected, so the fast-path transfers run as an event-loop app; blocking
//! full-duplex apps are exercised with the fast path off. This is why the fast path is
//! off by default (ARCHITECTURE.md, "Known limits").
use ztunnel_tests::Topology;

const MIB: usize = 1 << 20;

#[test]
fn byte_exact_transfers_with_and_without_fast_path() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let b = t.add_pod("b", true, false)?;
    let _srv = t.serve(&b, "0.0.0.0:8080".parse()?)?;
    let z = t.start_ztunnel(false)?;

    for fast_path in [false, true] {
        z.set_fast_path(fast_path)?;
        let before = z.dump()?.capture.counters;
        // 64 MiB each way (echoed), checksummed, ending in a half-close.
        let big = (64 * MIB).to_string();
        let mut args = vec!["--bytes", big.as_str(), "--seed", "7"];
        if fast_path {
            args.push("--event-loop");
        }
        let out = t.call(&a, b.addr(8080), &args)?;
        assert!(out.contains(&format!("received={big} match=true")), "{out}");
        // Many small writes.
        let mut args = vec!["--bytes", "100000", "--chunk", "7", "--seed", "9"];
        if fast_path {
            args.push("--event-loop");
        }
        let out = t.call(&a, b.addr(8080), &args)?;
        assert!(out.contains("received=100000 match=true"), "{out}");

        let after = z.dump()?.capture.counters;
        let redirects = after["fast_path_redirects"] - before["fast_path_redirects"];
        if fast_path {
            assert!(
                redirects > 0,
                "fast path on but nothing redirected: {after:?}"
            );
        } else {
            assert_eq!(redirects, 0, "fast path off but messages redirected");
        }
        assert_eq!(after["connect_captured"] - before["connect_captured"], 2);
        // B is in the mesh too: the tunnel goes to its :15008, which tc leaves alone.
        assert_eq!(after["inbound_steered"] - before["inbound_steered"], 0);
    }
    Ok(())
}

#[test]
fn ipv6_capture_on_dual_stack_pod() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, true)?;
    let b = t.add_pod("b", true, true)?;
    let _srv = t.serve(&b, "[::]:8080".parse()?)?;
    let z = t.start_ztunnel(false)?;

    let out = t.call(&a, b.addr6(8080), &["--bytes", "65536"])?;
    assert!(out.contains(&format!("peer={}", b.addr6(8080))), "{out}");
    assert!(out.contains("match=true"), "{out}");
    let d = z.wait_for("both records", |d| {
        d.connections
            .list
            .iter()
            .filter(|c| c.outcome.is_some())
            .count()
            == 2
    })?;
    for rec in &d.connections.list {
        assert_eq!(rec.dst, b.addr6(8080), "{rec:?}");
        assert_eq!(rec.security_policy, "mutual_tls", "{rec:?}");
    }
    assert_eq!(d.capture.counters["connect_captured"], 1);
    Ok(())
}
