//! :15006 — connections tc steered to ztunnel. The accepted socket's local address is
//! the original destination (the pod's address and the app's port).
use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::TcpStream;
use tracing::Instrument as _;

use super::{Direction, PodNet, Proxy, relay};

pub(super) async fn accept(
    proxy: Arc<Proxy>,
    pod: Arc<PodNet>,
    stream: TcpStream,
    src: SocketAddr,
) {
    // eBPF capture hands the SYN over untouched (the local address is the original
    // destination); iptables REDIRECT rewrites it and conntrack remembers the original.
    let dst = if proxy
        .inbound_redirected
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        super::outbound::original_dst(&stream)
    } else {
        stream.local_addr()
    };
    let dst = match dst {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(pod = %pod.name, %src, error = %e, "inbound socket has no local address");
            return;
        }
    };
    let span = tracing::info_span!("inbound", pod = %pod.name, %src, %dst);
    handle(&proxy, &pod, stream, src, dst)
        .instrument(span)
        .await;
}

async fn handle(proxy: &Proxy, pod: &PodNet, stream: TcpStream, src: SocketAddr, dst: SocketAddr) {
    let started = Instant::now();
    let probe = proxy.probes.contains(src.ip());
    let id = if probe {
        proxy.connections.open_probe(&pod.name, src, dst)
    } else {
        proxy
            .connections
            .open(Direction::Inbound, &pod.name, src, dst)
    };
    if ztunnel_common::ports::NEVER_CAPTURED.contains(&dst.port()) {
        // Forwarding to one of ztunnel's own ports would loop back into ztunnel.
        proxy.connections.close(
            id,
            0,
            0,
            started.elapsed(),
            format!("refused: port {} belongs to ztunnel", dst.port()),
        );
        return;
    }
    if probe {
        // Istio lets probes past ztunnel entirely (istio-cni's SNAT address), so no
        // policy applies to them there either.
        tracing::debug!("kubelet probe: carried without authorization");
    } else if let Err(reason) = proxy.authorize_inbound(&pod.name, src, None, dst) {
        // A reset, not a clean close: the client must not mistake it for an empty answer.
        let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
        proxy
            .connections
            .close(id, 0, 0, started.elapsed(), format!("denied: {reason}"));
        return;
    }
    if !pod.addrs.contains(&dst.ip()) {
        proxy.connections.close(
            id,
            0,
            0,
            started.elapsed(),
            format!("refused: {} is not an address of this pod", dst.ip()),
        );
        return;
    }
    // The app's replies to the client's address need the return path until this
    // connection closes, also if the pod is unenrolled meanwhile.
    let Some(_return_path) = pod.return_path() else {
        proxy.connections.close(
            id,
            0,
            0,
            started.elapsed(),
            "refused: the pod is no longer enrolled".to_owned(),
        );
        return;
    };
    // From the client's own address, so the app sees who called (see return_path.rs).
    // Boxed: the dial's state is freed once connected (see outbound.rs).
    match Box::pin(proxy.connect_from_pod(pod, Some(src.ip()), dst, super::return_path::MARK)).await
    {
        Ok(upstream) => relay(proxy, id, started, stream, upstream).await,
        Err(e) => {
            super::reset_on_drop(&stream);
            proxy
                .connections
                .close(id, 0, 0, started.elapsed(), format!("connect failed: {e}"))
        }
    }
}
