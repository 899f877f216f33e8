//! :15006 — connections tc steered to ztunnel. The accepted socket's local address is
//! the original destination (the pod's address and the app's port).
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

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
    // Until it closes, this connection holds the tuple (dst, src) in the pod's netns: no
    // dial to the app may take it (see [`ClientTuples`]).
    let _tuple = proxy.client_tuples.hold(dst, src);
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

/// The tuples of the client connections ztunnel accepted on `:15006` and still holds:
/// (the pod's address and the app's port, the client's address and port).
///
/// ztunnel dials the app from the client's address, and the pod's kernel picks the
/// dial's port by the dial's own tuple: nothing in the kernel keeps it from picking the
/// port of a client connection from that address to the same app port, whose accepted
/// socket (local: the app's port; remote: the client's) is exactly the socket the app
/// would need. The dial's SYN would then reach ztunnel's accepted socket (a challenge
/// ACK goes to the real client, the dial hears nothing) and the dial times out. A dial
/// whose port is held here takes another (see `Proxy::connect_from_pod`).
///
/// One process's connections only: during an upgrade's overlap a dial of one ztunnel
/// does not see the other's. Counted per tuple, though the kernel lets one netns hold a
/// tuple once: a pod address can come back in another netns while the old one's
/// connections drain.
#[derive(Debug, Default)]
pub(super) struct ClientTuples(Mutex<HashMap<(SocketAddr, SocketAddr), u32>>);

impl ClientTuples {
    /// Records the tuple until the returned guard drops.
    pub(super) fn hold(&self, app: SocketAddr, client: SocketAddr) -> HeldTuple<'_> {
        *self.lock().entry((app, client)).or_default() += 1;
        HeldTuple {
            tuples: self,
            key: (app, client),
        }
    }

    /// Whether a client connection ztunnel holds is `client` → `app`.
    pub(super) fn contains(&self, app: SocketAddr, client: SocketAddr) -> bool {
        self.lock().contains_key(&(app, client))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(SocketAddr, SocketAddr), u32>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A tuple [`ClientTuples`] holds until this drops.
pub(super) struct HeldTuple<'a> {
    tuples: &'a ClientTuples,
    key: (SocketAddr, SocketAddr),
}

impl Drop for HeldTuple<'_> {
    fn drop(&mut self) {
        let mut map = self.tuples.lock();
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ClientTuples;

    #[test]
    fn a_tuple_is_held_until_its_last_guard_drops() {
        let tuples = ClientTuples::default();
        let app = "10.0.0.1:8080".parse().expect("address");
        let client = "10.0.0.2:40000".parse().expect("address");
        let other = "10.0.0.2:40002".parse().expect("address");
        let first = tuples.hold(app, client);
        let second = tuples.hold(app, client);
        assert!(tuples.contains(app, client));
        assert!(!tuples.contains(app, other));
        assert!(
            !tuples.contains(other, client),
            "the app's end is part of the tuple"
        );
        drop(first);
        assert!(
            tuples.contains(app, client),
            "the second connection still holds it"
        );
        drop(second);
        assert!(!tuples.contains(app, client));
        assert!(tuples.lock().is_empty(), "nothing left behind");
    }
}
