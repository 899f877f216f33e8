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

use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument as _;

use super::{Direction, PodNet, Proxy, relay};

pub(super) async fn serve(proxy: Arc<Proxy>, pod: Arc<PodNet>, listener: TcpListener) {
    loop {
        let (stream, src) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(pod = %pod.name, error = %e, "outbound accept failed");
                continue;
            }
        };
        let proxy = proxy.clone();
        let pod = pod.clone();
        tokio::spawn(async move {
            let dst = match original_dst(&stream) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(pod = %pod.name, %src, error = %e, "no original destination for a captured connection; closing it");
                    return;
                }
            };
            let span = tracing::info_span!("outbound", pod = %pod.name, %src, %dst);
            handle(&proxy, &pod, stream, src, dst)
                .instrument(span)
                .await;
        });
    }
}

async fn handle(proxy: &Proxy, pod: &PodNet, stream: TcpStream, src: SocketAddr, dst: SocketAddr) {
    let started = Instant::now();
    let id = proxy
        .connections
        .open(Direction::Outbound, &pod.name, src, dst);
    match proxy.connect_from_pod(pod, dst).await {
        Ok(upstream) => relay(proxy, id, started, stream, upstream).await,
        Err(e) => {
            tracing::info!(error = %e, "upstream connect failed");
            proxy
                .connections
                .close(id, 0, 0, started.elapsed(), format!("connect failed: {e}"));
        }
    }
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
