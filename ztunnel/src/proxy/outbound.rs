//! :15001 — connections the connect hooks captured. The original destination comes
//! from `SO_ORIGINAL_DST`, answered by the kernel's getsockopt program.
use std::{
    io,
    mem::size_of,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsRawFd as _,
    sync::Arc,
    time::Instant,
};

use tokio::net::TcpStream;
use tracing::Instrument as _;

use super::{Direction, PodNet, PoolKey, Proxy, relay};
use crate::{
    hbone::{self, ConnectRequest},
    state::Route,
};

/// One captured connection's task: opened, then copied for the rest of its life. The
/// opening (finding the original destination, routing, the HBONE dial, a TLS handshake,
/// waiting for the CONNECT answer: kilobytes of state) is boxed in a pool of its own
/// (`opening.rs`: where many open at once, freed boxes would otherwise leave holes among
/// long-lived objects) and freed once the connection is open. This is a plain function
/// returning a future that captures only that box and the proxy: an `async fn` keeps its
/// arguments in its state for as long as it runs, and an inline `Box::pin(open(..)).await`
/// kept room for the unboxed opening too (the task was 2,560 bytes, of which the opening
/// 2,400). A long-lived connection's task holds only the sockets, the tunnel and the copy
/// (`hbone/copy.rs`).
pub(super) fn accept(
    proxy: Arc<Proxy>,
    pod: Arc<PodNet>,
    stream: TcpStream,
    src: SocketAddr,
) -> impl Future<Output = ()> + Send + 'static {
    let closer = proxy.clone();
    let opening = crate::opening::OPENINGS.boxed(async move {
        let (src, dst) = destination(&proxy, &pod, &stream, src)?;
        let span = tracing::info_span!("outbound", pod = %pod.name, %src, %dst);
        open(&proxy, &pod, stream, src, dst).instrument(span).await
    });
    // The `outbound` span names the connection in what the opening logs. The copy logs
    // nothing (the access line has no parent span), so it runs outside the span: no
    // span entered and left at every poll of a busy connection, and none kept by an idle
    // one (393 bytes of the client's share per connection in the heap profile above).
    async move {
        let Some(opened) = opening.await else {
            return;
        };
        copy(&closer, opened).await;
    }
}

/// The connection's original destination, and its source as the app sees it; `None`
/// (logged) when no original destination is known.
fn destination(
    proxy: &Proxy,
    pod: &PodNet,
    stream: &TcpStream,
    src: SocketAddr,
) -> Option<(SocketAddr, SocketAddr)> {
    let dst = match original_dst(stream) {
        Ok(d) => d,
        // No program answered: the listener was created by a predecessor that has
        // exited (see `ebpf::OrigDstTable`). Ask the map directly.
        Err(e) => match proxy.orig_dst_from_map(stream, src) {
            Some(d) => d,
            None => {
                tracing::warn!(pod = %pod.name, %src, error = %e, "no original destination for a captured connection; closing it");
                return None;
            }
        },
    };
    // The connect hook bound the app's socket to the pod's address, so `src` is already
    // what the app's `getsockname` shows (as Istio's ztunnel sees it after REDIRECT).
    // Where it could not (a socket the app bound to a port only, counted as
    // `connect_source_loopback`) the source is loopback; the connection is the pod's all
    // the same, so logs, records and the CONNECT name the pod's address with the app's
    // port.
    let src = if src.ip().is_loopback() {
        pod.addr_for(dst.ip())
            .map_or(src, |ip| SocketAddr::new(ip, src.port()))
    } else {
        src
    };
    Some((src, dst))
}

/// A connection opened upstream, to be copied for the rest of its life.
enum Opened {
    /// Tunnelled over HBONE.
    Tunnel {
        id: u64,
        started: Instant,
        stream: TcpStream,
        tunnel: hbone::H2Stream,
    },
    /// To a destination outside the mesh, in plain TCP.
    Relay {
        id: u64,
        started: Instant,
        stream: TcpStream,
        upstream: TcpStream,
    },
}

/// Copies an opened connection until both sides are done, then closes its record. A
/// plain function: an `async fn` keeps its argument in its state for as long as it runs,
/// and every idle tunnel's task kept the `Opened` (168 bytes) beside the fields taken out
/// of it and the copy (`copy` 1,088 bytes, the copy alone 560).
fn copy(proxy: &Proxy, opened: Opened) -> impl Future<Output = ()> + Send + '_ {
    match opened {
        Opened::Tunnel {
            id,
            started,
            stream,
            tunnel,
        } => futures_util::future::Either::Left(copy_tunnel(proxy, id, started, stream, tunnel)),
        Opened::Relay {
            id,
            started,
            stream,
            upstream,
        } => futures_util::future::Either::Right(boxed_relay(proxy, id, started, stream, upstream)),
    }
}

/// A plain function for the same reason, with the copy in an `async move` block that
/// borrows its captures in place: as an `async fn` (`mut` arguments) it stored the socket
/// and the tunnel twice (176 bytes more).
#[allow(clippy::manual_async_fn)]
fn copy_tunnel(
    proxy: &Proxy,
    id: u64,
    started: Instant,
    mut stream: TcpStream,
    mut tunnel: hbone::H2Stream,
) -> impl Future<Output = ()> + Send + '_ {
    async move {
        let (sent, received, outcome) =
            match hbone::copy_bidirectional(&mut tunnel, &mut stream).await {
                Ok(t) => (t.socket_to_tunnel, t.tunnel_to_socket, "ok".to_owned()),
                Err(e) => (0, 0, format!("error: {e}")),
            };
        proxy
            .connections
            .close(id, sent, received, started.elapsed(), outcome);
        drop(stream);
    }
}

/// [`relay`], boxed. The relay's state (two sockets' readiness and what each has not
/// taken yet) is larger than a tunnel's copy, and a connection's task is sized for the
/// larger of the two: unboxed, every idle tunnel kept room for a relay. A plain function,
/// so that `copy` keeps only the box (an inline `Box::pin(relay(..))` also keeps room for
/// the unboxed future).
fn boxed_relay(
    proxy: &Proxy,
    id: u64,
    started: Instant,
    stream: TcpStream,
    upstream: TcpStream,
) -> std::pin::Pin<Box<impl Future<Output = ()> + Send + '_>> {
    Box::pin(relay(proxy, id, started, stream, upstream))
}

async fn open(
    proxy: &Proxy,
    pod: &PodNet,
    stream: TcpStream,
    src: SocketAddr,
    dst: SocketAddr,
) -> Option<Opened> {
    let started = Instant::now();
    let store = proxy.store();
    match store.route(Some(&pod.name), dst) {
        Route::Passthrough { dst } => {
            let id = proxy
                .connections
                .open(Direction::Outbound, &pod.name, src, dst);
            match proxy
                .connect_from_pod(pod, None, dst, ztunnel_common::ZTUNNEL_MARK)
                .await
            {
                Ok(upstream) => {
                    return Some(Opened::Relay {
                        id,
                        started,
                        stream,
                        upstream,
                    });
                }
                Err(e) => {
                    tracing::info!(error = %e, "upstream connect failed");
                    super::reset_on_drop(&stream);
                    proxy.connections.close(
                        id,
                        0,
                        0,
                        started.elapsed(),
                        format!("connect failed: {e}"),
                    );
                }
            }
        }
        Route::NoEndpoint { service, port } => {
            let id = proxy
                .connections
                .open(Direction::Outbound, &pod.name, src, dst);
            proxy.connections.close(
                id,
                0,
                0,
                started.elapsed(),
                format!("refused: service {service} has no endpoint for port {port}"),
            );
        }
        Route::NoWaypoint { target, waypoint } => {
            let id = proxy
                .connections
                .open(Direction::Outbound, &pod.name, src, dst);
            tracing::info!(%target, %waypoint, "waypoint not found; refusing the connection");
            proxy.connections.close(
                id,
                0,
                0,
                started.elapsed(),
                format!("refused: waypoint {waypoint} of {target} not found"),
            );
        }
        Route::Hbone {
            endpoint,
            next_hop,
            workload: _,
            identities,
            service,
            waypoint,
        } => {
            let Some(src_ip) = pod.addr_for(next_hop.ip()) else {
                tracing::warn!(%next_hop, "pod has no address of the next hop's family");
                return None;
            };
            if let Some(waypoint) = &waypoint {
                tracing::debug!(%waypoint, %next_hop, "through the destination's waypoint");
            }
            // The record names where the tunnel goes: the endpoint, or the waypoint pod.
            let upstream = match waypoint {
                Some(_) => next_hop,
                None => endpoint,
            };
            let id = proxy.connections.open_hbone(
                Direction::Outbound,
                &pod.name,
                src,
                dst,
                upstream,
                Some(pod.spiffe.clone()),
                identities.first().cloned(),
            );
            let key = PoolKey {
                src_pod: pod.name.clone(),
                src_identity: pod.identity.clone(),
                dst_identities: identities,
                next_hop,
                src_ip,
            };
            let mut req =
                ConnectRequest::new(endpoint.to_string(), SocketAddr::new(src_ip, src.port()));
            req.forwarded_host = service;
            if let Some(b) = super::workload_baggage(&store, &pod.name) {
                req.baggage = b;
            }
            match proxy.pool.connect(&key, req).await {
                Ok(tunnel) => {
                    let _ = stream.set_nodelay(true);
                    // So that the drain timeout can end it; the socket lives until the
                    // record is closed (the registered fd must stay valid).
                    proxy.connections.attach(id, &[stream.as_raw_fd()]);
                    return Some(Opened::Tunnel {
                        id,
                        started,
                        stream,
                        tunnel,
                    });
                }
                Err(e) => {
                    let why = super::error_chain(&e);
                    tracing::info!(error = %why, "HBONE connect failed");
                    super::reset_on_drop(&stream);
                    proxy.connections.close(
                        id,
                        0,
                        0,
                        started.elapsed(),
                        format!("hbone failed: {why}"),
                    );
                }
            }
        }
    }
    None
}

/// `getsockopt(SO_ORIGINAL_DST)` for IPv4 sockets, `IP6T_SO_ORIGINAL_DST` for IPv6.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    let fd = stream.as_raw_fd();
    let local = stream.local_addr()?;
    if local.is_ipv4() {
        // SAFETY: zeroed sockaddr_in is valid.
        let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: valid fd, buffer and its length.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IP,
                SO_ORIGINAL_DST,
                (&raw mut sa).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
        Ok(SocketAddrV4::new(ip, u16::from_be(sa.sin_port)).into())
    } else {
        // SAFETY: zeroed sockaddr_in6 is valid.
        let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        // SAFETY: valid fd, buffer and its length.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                SO_ORIGINAL_DST,
                (&raw mut sa).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
        let port = u16::from_be(sa.sin6_port);
        Ok(match ip.to_ipv4_mapped() {
            Some(v4) => SocketAddrV4::new(v4, port).into(),
            None => SocketAddrV6::new(ip, port, 0, 0).into(),
        })
    }
}

#[cfg(test)]
mod tests {
    /// The size of what `f` returns (a future), without making one.
    fn returned<A, B, C, D, Fut, F: FnOnce(A, B, C, D) -> Fut>(_: &F) -> usize {
        size_of::<Fut>()
    }

    /// An idle tunnelled connection's task is this future for the connection's whole
    /// life: its size is memory per connection (ARCHITECTURE.md, "Performance"). It was
    /// 1,120 bytes before `copy` stopped keeping its argument and the copy became a
    /// hand-written future.
    #[test]
    fn a_tunnelled_connections_task_stays_small() {
        let task = returned(&super::accept);
        assert!(task <= 512, "the connection's future is {task} bytes");
        let copy = size_of::<
            crate::hbone::copy::CopyBidirectional<'static, &'static mut tokio::net::TcpStream>,
        >();
        assert!(copy <= 256, "the copy is {copy} bytes");
    }
}
