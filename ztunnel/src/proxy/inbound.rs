//! :15006 — connections tc steered to ztunnel. The accepted socket's local address is
//! the original destination (the pod's address and the app's port).
use std::{
    collections::{HashMap, VecDeque},
    hash::BuildHasher as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
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
    // Until it closes (and its TIME_WAIT ends, if ztunnel closes first), this connection
    // holds the tuple (dst, src) in the pod's netns: no dial to the app may take it (see
    // [`ClientTuples`]).
    let mut tuple = proxy.client_tuples.hold(dst, src);
    // From the client's own address, so the app sees who called (see return_path.rs).
    // Boxed: the dial's state is freed once connected (see outbound.rs).
    match Box::pin(proxy.connect_from_pod(pod, Some(src.ip()), dst, super::return_path::MARK)).await
    {
        Ok(upstream) => {
            if relay(proxy, id, started, stream, upstream).await {
                tuple.closed_first();
            }
        }
        Err(e) => {
            super::reset_on_drop(&stream);
            proxy
                .connections
                .close(id, 0, 0, started.elapsed(), format!("connect failed: {e}"))
        }
    }
}

/// The tuples of the client connections ztunnel accepted on `:15006` and still holds:
/// (the pod's address and the app's port, the client's address and port); and, for 60 s
/// after they close, those of the ones ztunnel closed first.
///
/// ztunnel dials the app from the client's address, and the pod's kernel picks the
/// dial's port by the dial's own tuple: nothing in the kernel keeps it from picking the
/// port of a client connection from that address to the same app port, whose accepted
/// socket (local: the app's port; remote: the client's) is exactly the socket the app
/// would need. The dial's SYN would then reach ztunnel's accepted socket (a challenge
/// ACK goes to the real client, the dial hears nothing) and the dial times out. An
/// accepted socket that sent the first FIN stays in TIME_WAIT for 60 s after it closes;
/// a dial's SYN meeting it is taken as a new connection only if its timestamp or
/// sequence number is newer than the client's, which from another node is a coin toss,
/// and otherwise waits for the client to reset the TIME_WAIT socket and the dial's
/// second SYN, a second later. A dial whose port is held here takes another (see
/// `Proxy::connect_from_pod`).
///
/// One process's connections only: during an upgrade's overlap a dial of one ztunnel
/// does not see the other's. Open tuples are counted, though the kernel lets one netns
/// hold a tuple once: a pod address can come back in another netns while the old one's
/// connections drain. Closed ones are kept by a hash of the tuple (a collision only
/// skips a port), at most [`TIME_WAIT_TUPLES_MAX`], the oldest let go first.
#[derive(Debug, Default)]
pub(super) struct ClientTuples {
    inner: Mutex<Tuples>,
    hasher: std::hash::RandomState,
    /// How many closed tuples are kept (`ztunnel_inbound_time_wait_tuples`).
    kept: prometheus_client::metrics::gauge::Gauge,
}

type Tuple = (SocketAddr, SocketAddr);

#[derive(Debug, Default)]
struct Tuples {
    open: HashMap<Tuple, u32>,
    /// A closed tuple's hash → when its TIME_WAIT ends.
    time_wait: HashMap<u64, Instant>,
    /// The same, oldest first.
    expiries: VecDeque<(Instant, u64)>,
}

/// How long an accepted socket that closed first keeps its tuple: Linux's TIME_WAIT,
/// fixed (`TCP_TIMEWAIT_LEN`).
pub(super) const TIME_WAIT: Duration = Duration::from_secs(60);

/// The most closed tuples kept (about 40 bytes each): 1,092 connections a second closed
/// by ztunnel first, for 60 s. Past it the oldest goes, and a dial meeting that
/// TIME_WAIT socket may wait a second.
pub(super) const TIME_WAIT_TUPLES_MAX: usize = 65_536;

impl ClientTuples {
    /// Empty, with `kept` showing how many closed tuples it keeps.
    pub(super) fn counted(kept: prometheus_client::metrics::gauge::Gauge) -> Self {
        Self {
            kept,
            ..Self::default()
        }
    }

    /// Records the tuple until the returned guard drops.
    pub(super) fn hold(&self, app: SocketAddr, client: SocketAddr) -> HeldTuple<'_> {
        *self.lock().open.entry((app, client)).or_default() += 1;
        HeldTuple {
            tuples: self,
            key: (app, client),
            closed_first: false,
        }
    }

    /// Whether a client connection ztunnel holds, or one it closed first less than
    /// [`TIME_WAIT`] ago, is `client` → `app`.
    pub(super) fn contains(&self, app: SocketAddr, client: SocketAddr) -> bool {
        let inner = self.lock();
        if inner.open.contains_key(&(app, client)) {
            return true;
        }
        if inner.time_wait.is_empty() {
            return false;
        }
        inner
            .time_wait
            .get(&self.hasher.hash_one((app, client)))
            .is_some_and(|until| *until > Instant::now())
    }

    /// Closed tuples kept.
    #[cfg(test)]
    fn time_wait_len(&self) -> usize {
        self.lock().time_wait.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tuples> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn release(&self, key: Tuple, closed_first: bool, now: Instant) {
        let hash = closed_first.then(|| self.hasher.hash_one(key));
        let mut inner = self.lock();
        if let Some(n) = inner.open.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                inner.open.remove(&key);
            }
        }
        // Expired ones first, then the oldest past the cap.
        while let Some(&(until, h)) = inner.expiries.front() {
            let full = inner.expiries.len() >= TIME_WAIT_TUPLES_MAX && hash.is_some();
            if until > now && !full {
                break;
            }
            inner.expiries.pop_front();
            if inner.time_wait.get(&h) == Some(&until) {
                inner.time_wait.remove(&h);
            }
        }
        if let Some(h) = hash {
            let until = now + TIME_WAIT;
            inner.time_wait.insert(h, until);
            inner.expiries.push_back((until, h));
        }
        self.kept.set(inner.time_wait.len() as i64);
    }
}

/// A tuple [`ClientTuples`] holds until this drops (and for [`TIME_WAIT`] after, if
/// ztunnel closed the connection first).
pub(super) struct HeldTuple<'a> {
    tuples: &'a ClientTuples,
    key: Tuple,
    closed_first: bool,
}

impl HeldTuple<'_> {
    /// ztunnel sent the connection's first FIN: its socket keeps the tuple in TIME_WAIT.
    pub(super) fn closed_first(&mut self) {
        self.closed_first = true;
    }
}

impl Drop for HeldTuple<'_> {
    fn drop(&mut self) {
        self.tuples
            .release(self.key, self.closed_first, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        time::{Duration, Instant},
    };

    use super::{ClientTuples, TIME_WAIT, TIME_WAIT_TUPLES_MAX};

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
        let inner = tuples.lock();
        assert!(inner.open.is_empty(), "nothing left behind");
        assert!(
            inner.time_wait.is_empty(),
            "neither closed first: nothing kept"
        );
    }

    #[test]
    fn a_tuple_ztunnel_closed_first_is_kept_for_its_time_wait() {
        let tuples = ClientTuples::default();
        let app = "10.0.0.1:8080".parse().expect("address");
        let client = "10.0.0.2:40000".parse().expect("address");
        let mut held = tuples.hold(app, client);
        held.closed_first();
        drop(held);
        assert!(tuples.contains(app, client), "in TIME_WAIT");
        assert_eq!(tuples.time_wait_len(), 1);
        assert_eq!(tuples.kept.get(), 1, "the gauge follows");
        // Another tuple's release past the 60 s lets the first one go.
        let other = "10.0.0.2:40002".parse().expect("address");
        drop(tuples.hold(app, other));
        tuples.release(
            (app, other),
            false,
            Instant::now() + TIME_WAIT + Duration::from_secs(1),
        );
        assert!(!tuples.contains(app, client));
        assert_eq!(tuples.time_wait_len(), 0);
        assert_eq!(tuples.kept.get(), 0);
    }

    #[test]
    fn closed_tuples_past_the_cap_let_the_oldest_go() {
        let tuples = ClientTuples::default();
        let app: SocketAddr = "10.0.0.1:8080".parse().expect("address");
        let client = |i: usize| {
            SocketAddr::new(
                std::net::Ipv4Addr::from(0x0a00_0000 + u32::try_from(i).expect("small")).into(),
                40000,
            )
        };
        let now = Instant::now();
        for i in 0..=TIME_WAIT_TUPLES_MAX {
            tuples.release((app, client(i)), true, now);
        }
        assert_eq!(tuples.time_wait_len(), TIME_WAIT_TUPLES_MAX);
        assert!(!tuples.contains(app, client(0)), "the oldest went");
        assert!(tuples.contains(app, client(1)));
        assert!(tuples.contains(app, client(TIME_WAIT_TUPLES_MAX)));
    }
}
