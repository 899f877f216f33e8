//! The userspace data path inside each enrolled pod's netns: listeners on :15001
//! (outbound, captured connects) and :15006 (inbound, steered by tc), and the copy
//! between the captured connection and its destination. Until the HBONE tunnel lands,
//! both directions forward plain TCP from inside the pod's netns.
mod inbound;
mod outbound;

use std::{
    collections::VecDeque,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use ztunnel_common::{ZTUNNEL_MARK, ports};

use crate::netns::{self, Netns};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to open listener {addr} in {netns}")]
    Listen {
        addr: SocketAddr,
        netns: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Netns(#[from] netns::Error),
}

/// A pod as the proxy sees it.
#[derive(Debug)]
pub struct PodNet {
    /// `namespace/name`.
    pub name: String,
    pub netns: Netns,
    pub addrs: Vec<IpAddr>,
}

impl PodNet {
    fn has_v6(&self) -> bool {
        self.addrs.iter().any(IpAddr::is_ipv6)
    }
}

/// Shared by every pod's listeners.
pub struct Proxy {
    home: Netns,
    pub connections: ConnectionLog,
}

/// Direction of a proxied connection, from the pod's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

/// One connection ztunnel carried (or is carrying).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionRecord {
    pub id: u64,
    pub direction: Direction,
    pub pod: String,
    pub src: SocketAddr,
    /// The original destination.
    pub dst: SocketAddr,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Unix time in milliseconds.
    pub opened_ms: u64,
    pub duration_ms: Option<u64>,
    pub outcome: Option<String>,
}

/// Active connections and the most recent closed ones.
#[derive(Default)]
pub struct ConnectionLog {
    next: AtomicU64,
    inner: Mutex<ConnState>,
}

#[derive(Default)]
struct ConnState {
    active: Vec<ConnectionRecord>,
    closed: VecDeque<ConnectionRecord>,
    opened_total: u64,
}

const CLOSED_KEPT: usize = 256;

impl ConnectionLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, ConnState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open(&self, direction: Direction, pod: &str, src: SocketAddr, dst: SocketAddr) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let opened_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut st = self.lock();
        st.opened_total += 1;
        st.active.push(ConnectionRecord {
            id,
            direction,
            pod: pod.to_owned(),
            src,
            dst,
            bytes_sent: 0,
            bytes_received: 0,
            opened_ms,
            duration_ms: None,
            outcome: None,
        });
        id
    }

    fn close(&self, id: u64, sent: u64, received: u64, elapsed: Duration, outcome: String) {
        let mut st = self.lock();
        if let Some(pos) = st.active.iter().position(|c| c.id == id) {
            let mut rec = st.active.swap_remove(pos);
            rec.bytes_sent = sent;
            rec.bytes_received = received;
            rec.duration_ms = Some(elapsed.as_millis() as u64);
            rec.outcome = Some(outcome);
            tracing::info!(
                target: "access",
                direction = ?rec.direction,
                pod = %rec.pod,
                src = %rec.src,
                dst = %rec.dst,
                bytes_sent = rec.bytes_sent,
                bytes_received = rec.bytes_received,
                duration_ms = rec.duration_ms,
                outcome = rec.outcome.as_deref(),
                "connection closed"
            );
            if st.closed.len() == CLOSED_KEPT {
                st.closed.pop_front();
            }
            st.closed.push_back(rec);
        }
    }

    /// Active connections first, then recently closed ones, oldest first.
    pub fn snapshot(&self) -> (u64, Vec<ConnectionRecord>) {
        let st = self.lock();
        let list = st.active.iter().chain(st.closed.iter()).cloned().collect();
        (st.opened_total, list)
    }
}

impl Proxy {
    pub fn new() -> Result<Arc<Self>, Error> {
        Ok(Arc::new(Self {
            home: Netns::current()?,
            connections: ConnectionLog::default(),
        }))
    }

    /// Opens the pod's listeners and spawns their accept loops. The returned handle
    /// closes them when dropped.
    pub fn start_pod(self: &Arc<Self>, pod: Arc<PodNet>) -> Result<PodListeners, Error> {
        let mut tasks = Vec::new();
        let mut outbound = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, ports::OUTBOUND))];
        let mut inbound = vec![SocketAddr::from((
            Ipv4Addr::UNSPECIFIED,
            ports::INBOUND_PLAINTEXT,
        ))];
        if pod.has_v6() {
            outbound.push(SocketAddr::from((Ipv6Addr::LOCALHOST, ports::OUTBOUND)));
            inbound.push(SocketAddr::from((
                Ipv6Addr::UNSPECIFIED,
                ports::INBOUND_PLAINTEXT,
            )));
        }
        for addr in outbound {
            let l = self.listen(&pod, addr)?;
            tasks.push(tokio::spawn(outbound::serve(self.clone(), pod.clone(), l)));
        }
        for addr in inbound {
            let l = self.listen(&pod, addr)?;
            tasks.push(tokio::spawn(inbound::serve(self.clone(), pod.clone(), l)));
        }
        Ok(PodListeners { tasks })
    }

    fn listen(&self, pod: &PodNet, addr: SocketAddr) -> Result<TcpListener, Error> {
        let err = |source| Error::Listen {
            addr,
            netns: pod.netns.path().display().to_string(),
            source,
        };
        let std = pod
            .netns
            .run(&self.home, || -> io::Result<std::net::TcpListener> {
                let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
                if addr.is_ipv6() {
                    s.set_only_v6(true)?;
                }
                s.set_reuse_address(true)?;
                s.set_nonblocking(true)?;
                s.bind(&addr.into())?;
                s.listen(1024)?;
                Ok(s.into())
            })?
            .map_err(err)?;
        TcpListener::from_std(std).map_err(err)
    }

    /// A TCP connection to `dst` from inside the pod's netns, marked as ztunnel's.
    async fn connect_from_pod(&self, pod: &PodNet, dst: SocketAddr) -> io::Result<TcpStream> {
        let sock = pod
            .netns
            .run(&self.home, || -> io::Result<Socket> {
                let s = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
                s.set_mark(ZTUNNEL_MARK)?;
                s.set_tcp_nodelay(true)?;
                s.set_nonblocking(true)?;
                Ok(s)
            })
            .map_err(io::Error::other)??;
        TcpSocket::from_std_stream(sock.into()).connect(dst).await
    }
}

/// A pod's listeners; dropping it stops accepting (connections already accepted go on).
pub struct PodListeners {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for PodListeners {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Copies both ways until both sides are done, half-closing each direction as its
/// reader finishes, and records the outcome.
async fn relay(
    proxy: &Proxy,
    id: u64,
    started: Instant,
    mut downstream: TcpStream,
    mut upstream: TcpStream,
) {
    let _ = downstream.set_nodelay(true);
    let result = tokio::io::copy_bidirectional_with_sizes(
        &mut downstream,
        &mut upstream,
        64 << 10,
        64 << 10,
    )
    .await;
    let (sent, received, outcome) = match result {
        Ok((from_down, from_up)) => (from_down, from_up, "ok".to_owned()),
        Err(e) => (0, 0, format!("error: {e}")),
    };
    proxy
        .connections
        .close(id, sent, received, started.elapsed(), outcome);
}
