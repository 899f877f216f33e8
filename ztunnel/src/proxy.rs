//! The userspace data path inside each enrolled pod's netns: listeners on :15001
//! (outbound, captured connects), :15006 (inbound plaintext, steered by tc) and :15008
//! (HBONE), the HBONE client pool, and the copy between a captured connection and its
//! destination.
mod dial_port;
mod hbone_inbound;
mod inbound;
mod outbound;
mod relay;
pub mod return_path;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    future::Future,
    hash::BuildHasher as _,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex, RwLock, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};
use ztunnel_common::{ZTUNNEL_MARK, ports};

use crate::{
    config::Limits,
    hbone,
    identity::{CertificateManager, Identity},
    limits::{self, AcceptErrors, ListenerCap, RateLimit, Step},
    metrics::listener,
    netns::{self, Netns},
    state::Store,
    tls,
};

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
    #[error(transparent)]
    Dns(#[from] crate::dns::Error),
}

impl Error {
    /// Whether a listener's address was in use (another process holds the pod's port).
    pub fn addr_in_use(&self) -> bool {
        matches!(self, Error::Listen { source, .. } if source.kind() == io::ErrorKind::AddrInUse)
    }
}

/// A pod as the proxy sees it.
#[derive(Debug)]
pub struct PodNet {
    /// `namespace/name`.
    pub name: String,
    pub netns: Netns,
    pub addrs: Vec<IpAddr>,
    /// The pod's SPIFFE identity (its certificate's), shared with the HBONE pool's keys.
    pub identity: Arc<Identity>,
    /// [`Self::identity`] as its URI, for the connection records.
    pub spiffe: String,
    /// The pod's return path while it is enrolled (`None` once its listeners are gone):
    /// each inbound connection takes a lease and keeps it until it closes.
    pub return_path: Mutex<Option<return_path::Lease>>,
    /// The HBONE server config built from the pod's current certificate; rebuilt when
    /// the certificate is renewed, not per connection.
    pub server_tls: Mutex<
        Option<(
            Arc<crate::identity::WorkloadCertificate>,
            Arc<rustls::ServerConfig>,
        )>,
    >,
    /// The pod's local port range, for dials to its apps from their clients' addresses.
    pub dial_ports: dial_port::PodPorts,
}

impl PodNet {
    /// The server config for `cert`, from the cache when it was built for the same one.
    fn server_config(
        &self,
        cert: &Arc<crate::identity::WorkloadCertificate>,
    ) -> Result<Arc<rustls::ServerConfig>, tls::Error> {
        let mut cached = self.server_tls.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((c, config)) = cached.as_ref()
            && Arc::ptr_eq(c, cert)
        {
            return Ok(config.clone());
        }
        let config = tls::server_config(cert)?;
        *cached = Some((cert.clone(), config.clone()));
        Ok(config)
    }

    /// A lease on the pod's return path, for an inbound connection that dials the app from
    /// the client's address; `None` once the pod is unenrolled.
    fn return_path(&self) -> Option<return_path::Lease> {
        self.return_path
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn has_v6(&self) -> bool {
        self.addrs.iter().any(IpAddr::is_ipv6)
    }

    /// The pod's address of the same family as `peer`, to dial from.
    fn addr_for(&self, peer: IpAddr) -> Option<IpAddr> {
        self.addrs
            .iter()
            .find(|a| a.is_ipv4() == peer.is_ipv4())
            .copied()
    }
}

/// HBONE connections are pooled per (source pod, source identity, acceptable
/// destination identities, next hop): streams to the same pod share one connection
/// whether it was dialled directly or through a service VIP.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src_pod: String,
    /// The source pod's (its [`PodNet::identity`], shared).
    pub src_identity: Arc<Identity>,
    /// The identities the destination may present, as the route gives them; parsed by
    /// the dial (once per connection to the peer, not per stream), where one that does
    /// not parse is not accepted.
    pub dst_identities: Vec<String>,
    pub next_hop: SocketAddr,
    pub src_ip: IpAddr,
}

type HboneIo = tokio_rustls::client::TlsStream<tls::Transport>;
type DialFuture = Pin<Box<dyn Future<Output = io::Result<HboneIo>> + Send>>;
type Connector = Box<dyn Fn(&PoolKey) -> DialFuture + Send + Sync>;

/// Shared by every pod's listeners.
pub struct Proxy {
    home: Netns,
    pub connections: ConnectionLog,
    pub metrics: Arc<crate::metrics::Metrics>,
    store: RwLock<Arc<Store>>,
    pub certs: Arc<CertificateManager>,
    /// The HBONE dials' TLS client configs, per source certificate and expected identities.
    client_configs: tls::ClientConfigs,
    pods: RwLock<HashMap<String, Arc<PodNet>>>,
    pool: hbone::Pool<PoolKey, Connector>,
    /// `true` tells every HBONE server connection to drain (GOAWAY).
    drain: tokio::sync::watch::Sender<bool>,
    /// Whether listening sockets inherited from a predecessor are accepted on: not while
    /// the predecessor still accepts (a successor that crashes during the overlap then
    /// takes no connection with it); from the moment it is told to stop, or is gone.
    inherited_accepting: tokio::sync::watch::Sender<bool>,
    /// Inbound plaintext arrives NAT-redirected (iptables capture): its original
    /// destination comes from `SO_ORIGINAL_DST`, not from the local address.
    inbound_redirected: std::sync::atomic::AtomicBool,
    /// Every pod netns's return path, shared by its listeners and inbound connections.
    return_paths: Arc<return_path::Registry>,
    /// The client tuples of the plaintext inbound connections held: no dial to an app
    /// takes one (see [`inbound::ClientTuples`]).
    client_tuples: inbound::ClientTuples,
    /// Where the next dial from a client's address looks for its port.
    dial_port_cursor: dial_port::Cursor,
    /// The original-destination map, read directly when no `getsockopt` program answers
    /// (eBPF capture; see [`crate::ebpf::OrigDstTable`]).
    orig_dst_table: std::sync::OnceLock<crate::ebpf::OrigDstTable>,
    /// The pods' DNS proxy (`--dns-capture`); without it pods get no `:15053` listeners.
    dns: std::sync::OnceLock<Arc<crate::dns::Dns>>,
    /// Sources of kubelet probes (`--probe-sources`).
    pub probes: Arc<crate::probes::ProbeSources>,
    /// Timeouts and the per-listener cap.
    limits: Limits,
    /// Timeouts are logged at most once per [`limits::LOG_EVERY`] (they can come by the
    /// thousand from a misbehaving client); each is counted.
    timeout_log: Mutex<RateLimit>,
}

/// Direction of a proxied connection, from the pod's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
    /// The client's SPIFFE identity (mTLS), when known.
    #[serde(default)]
    pub src_identity: Option<String>,
    /// The server's SPIFFE identity (mTLS), when known.
    #[serde(default)]
    pub dst_identity: Option<String>,
    /// `mutual_tls` for HBONE, `unknown` for plain TCP (Istio's label values).
    #[serde(default)]
    pub security_policy: String,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Unix time in milliseconds.
    pub opened_ms: u64,
    pub duration_ms: Option<u64>,
    pub outcome: Option<String>,
    /// A kubelet probe (`--probe-sources`): carried without authorization and left out
    /// of Istio's metrics, as Istio's probes bypass its ztunnel.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub probe: bool,
    /// For HBONE, the stream's target (its `:authority`): the endpoint ztunnel tunnels to
    /// (outbound: after a service VIP was resolved) or the pod's address and port (inbound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hbone_addr: Option<SocketAddr>,
}

impl ConnectionRecord {
    /// A record opened now (its id is given by [`ConnectionLog`]).
    fn new(
        direction: Direction,
        pod: &str,
        src: SocketAddr,
        dst: SocketAddr,
        src_identity: Option<String>,
        dst_identity: Option<String>,
    ) -> Self {
        let opened_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        ConnectionRecord {
            id: 0,
            direction,
            pod: pod.to_owned(),
            src,
            dst,
            security_policy: if src_identity.is_some() || dst_identity.is_some() {
                crate::metrics::SECURITY_MUTUAL_TLS.to_owned()
            } else {
                crate::metrics::UNKNOWN.to_owned()
            },
            src_identity,
            dst_identity,
            bytes_sent: 0,
            bytes_received: 0,
            opened_ms,
            duration_ms: None,
            outcome: None,
            probe: false,
            hbone_addr: None,
        }
    }
}

/// Active connections and the most recent closed ones; feeds Istio's TCP metrics.
///
/// Opening, attaching and closing cost the same at one connection as at ten thousand: the
/// active ones are kept by id, and the metric labels (store lookups), the metrics and the
/// access log are done outside the lock, which is held only to insert or remove an entry.
pub struct ConnectionLog {
    next: AtomicU64,
    inner: Mutex<ConnState>,
    metrics: Arc<crate::metrics::Metrics>,
    /// The store the labels are computed from (the proxy's current one), and its
    /// generation (see [`ConnState::by_inputs`]).
    store: RwLock<(Arc<Store>, u64)>,
    /// Hashes a connection's [`TagsInputs`], once per connection, outside the lock.
    hasher: std::hash::RandomState,
}

#[derive(Default)]
struct ConnState {
    active: HashMap<u64, Active>,
    /// How many of `active` are outbound.
    outbound: usize,
    closed: VecDeque<ConnectionRecord>,
    opened_total: u64,
    /// The distinct label sets of the active connections, each held once and shared by
    /// every connection that has it (most of a node's connections share a handful): a
    /// set is 28 strings, two kilobytes per connection when each kept its own copy. A
    /// set leaves with the last connection holding it, so there are never more sets
    /// than active connections.
    tags: HashSet<Arc<Tags>>,
    /// The label set of each distinct [`TagsInputs`] among the active connections opened
    /// under the current store (generation `generation`), so that a connection like one
    /// already open is labelled without building its set (27 strings made, hashed and
    /// freed per connection, only to find the set shared). By the inputs' hash
    /// ([`ConnectionLog::hasher`]), the entries with that hash. Emptied when the store changes; an entry
    /// leaves with the last connection counted in it.
    by_inputs: HashMap<u64, Vec<Labelled>>,
    generation: u64,
}

/// What a connection's label set is computed from besides the store (the record's fields
/// that [`metric_labels`] reads), borrowed from a record.
#[derive(PartialEq, Eq, Hash)]
struct TagsInputs<'a> {
    direction: Direction,
    pod: &'a str,
    src: IpAddr,
    dst: IpAddr,
    hbone: Option<IpAddr>,
    src_identity: Option<&'a str>,
    dst_identity: Option<&'a str>,
}

impl<'a> TagsInputs<'a> {
    fn of(rec: &'a ConnectionRecord) -> Self {
        Self {
            direction: rec.direction,
            pod: &rec.pod,
            src: rec.src.ip(),
            dst: rec.dst.ip(),
            hbone: rec.hbone_addr.map(|a| a.ip()),
            src_identity: rec.src_identity.as_deref(),
            dst_identity: rec.dst_identity.as_deref(),
        }
    }
}

/// An entry of [`ConnState::by_inputs`]: the inputs (the record of the connection that
/// made it), the set, and how many active connections were labelled through it.
struct Labelled {
    rec: Arc<ConnectionRecord>,
    tags: Arc<Tags>,
    users: usize,
}

/// What a connection is counted and logged as, fixed when it opens (see
/// [`ConnState::tags`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Tags {
    /// Istio's metric labels.
    labels: crate::metrics::ConnLabels,
    /// The workloads' names for the access log (Istio's `src.workload`, `dst.workload`).
    peers: Peers,
}

impl ConnState {
    /// The shared copy of `tags`: the one an active connection already holds, or `tags`
    /// itself, kept from now on.
    fn intern(&mut self, tags: Tags) -> Arc<Tags> {
        if let Some(shared) = self.tags.get(&tags) {
            return shared.clone();
        }
        let shared = Arc::new(tags);
        self.tags.insert(shared.clone());
        shared
    }

    /// The label set made for a connection with `rec`'s inputs (whose hash is `hash`)
    /// under the current store, counting one more user of it; the generation the user is
    /// counted under.
    fn labelled_like(&mut self, rec: &ConnectionRecord, hash: u64) -> Option<(Arc<Tags>, u64)> {
        let inputs = TagsInputs::of(rec);
        let found = self
            .by_inputs
            .get_mut(&hash)?
            .iter_mut()
            .find(|e| TagsInputs::of(&e.rec) == inputs)?;
        found.users += 1;
        Some((found.tags.clone(), self.generation))
    }

    /// Keeps `tags` as the label set of connections with `rec`'s inputs, made under the
    /// store of `generation`, with `rec`'s connection as its first user. Returns whether
    /// it was kept: not when the store has changed since.
    fn remember(
        &mut self,
        rec: &Arc<ConnectionRecord>,
        hash: u64,
        tags: &Arc<Tags>,
        generation: u64,
    ) -> bool {
        if generation != self.generation {
            return false;
        }
        let inputs = TagsInputs::of(rec);
        let same = self.by_inputs.entry(hash).or_default();
        match same.iter_mut().find(|e| TagsInputs::of(&e.rec) == inputs) {
            // Made meanwhile by another connection like it: counted there instead.
            Some(e) => e.users += 1,
            None => same.push(Labelled {
                rec: rec.clone(),
                tags: tags.clone(),
                users: 1,
            }),
        }
        true
    }

    /// A new store: label sets are made afresh from it.
    fn new_generation(&mut self, generation: u64) {
        self.generation = generation;
        self.by_inputs.clear();
    }

    fn insert(&mut self, a: Active) {
        if a.rec.direction == Direction::Outbound {
            self.outbound += 1;
        }
        self.opened_total += 1;
        self.active.insert(a.rec.id, a);
    }

    fn remove(&mut self, id: u64) -> Option<Active> {
        let a = self.active.remove(&id)?;
        if a.rec.direction == Direction::Outbound {
            self.outbound -= 1;
        }
        if let Some((generation, hash)) = a.labelled_in
            && generation == self.generation
        {
            let inputs = TagsInputs::of(&a.rec);
            if let Some(same) = self.by_inputs.get_mut(&hash)
                && let Some(i) = same.iter().position(|e| TagsInputs::of(&e.rec) == inputs)
            {
                same[i].users -= 1;
                if same[i].users == 0 {
                    same.swap_remove(i);
                    if same.is_empty() {
                        self.by_inputs.remove(&hash);
                    }
                }
            }
        }
        // Held by `tags` and this entry only (an entry of `by_inputs` has users, which
        // hold it too), all under the lock: its last user.
        if Arc::strong_count(&a.tags) == 2 {
            self.tags.remove(&*a.tags);
        }
        Some(a)
    }
}

const CLOSED_KEPT: usize = 256;

/// An open connection: its record, and the sockets to shut down to end it early.
struct Active {
    /// Shared so that [`ConnectionLog::terminate`] can judge the connections outside the
    /// lock.
    rec: Arc<ConnectionRecord>,
    /// Raw descriptors of the connection's sockets. They stay valid while the entry
    /// exists: the owner removes it (under the lock) before dropping its sockets.
    fds: Vec<std::os::fd::RawFd>,
    /// Set when ztunnel ends the connection itself (e.g. a policy now denies it).
    closing: Option<String>,
    /// Its labels and peers, shared with the other active connections that have the same
    /// (see [`ConnState::tags`]).
    tags: Arc<Tags>,
    /// The store generation under which it is counted as a user of an entry of
    /// [`ConnState::by_inputs`], if it is, and its inputs' hash there.
    labelled_in: Option<(u64, u64)>,
}

/// The pod names of a connection's two ends, when they are workloads ztunnel knows.
#[derive(Debug, Default, Clone, PartialEq, Eq, Hash)]
pub struct Peers {
    pub src: Option<String>,
    pub dst: Option<String>,
}

impl ConnectionLog {
    fn new(metrics: Arc<crate::metrics::Metrics>, store: Arc<Store>) -> Self {
        Self {
            next: AtomicU64::new(0),
            inner: Mutex::default(),
            metrics,
            store: RwLock::new((store, 0)),
            hasher: std::hash::RandomState::new(),
        }
    }

    /// Labels the connections opened from now on from `store`.
    fn set_store(&self, store: Arc<Store>) {
        let mut current = self.store.write().unwrap_or_else(|p| p.into_inner());
        let generation = current.1 + 1;
        *current = (store, generation);
        // Under the store's lock: generations reach the state in order.
        self.lock().new_generation(generation);
    }

    /// Active connections by direction (`outbound`, `inbound`).
    pub fn active_counts(&self) -> (usize, usize) {
        let st = self.lock();
        (st.outbound, st.active.len() - st.outbound)
    }

    /// Connections open now, both directions.
    pub fn open_count(&self) -> usize {
        self.lock().active.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open(&self, direction: Direction, pod: &str, src: SocketAddr, dst: SocketAddr) -> u64 {
        self.open_record(ConnectionRecord::new(direction, pod, src, dst, None, None))
    }

    /// Opens the record of a kubelet probe: no Istio metrics (see [`ConnectionRecord::probe`]).
    fn open_probe(&self, pod: &str, src: SocketAddr, dst: SocketAddr) -> u64 {
        self.open_record(ConnectionRecord {
            probe: true,
            ..ConnectionRecord::new(Direction::Inbound, pod, src, dst, None, None)
        })
    }

    /// Opens the record of an HBONE stream to (outbound) or from (inbound) `hbone_addr`.
    #[expect(
        clippy::too_many_arguments,
        reason = "the record's fields, named at the callers"
    )]
    fn open_hbone(
        &self,
        direction: Direction,
        pod: &str,
        src: SocketAddr,
        dst: SocketAddr,
        hbone_addr: SocketAddr,
        src_identity: Option<String>,
        dst_identity: Option<String>,
    ) -> u64 {
        let rec = ConnectionRecord {
            hbone_addr: Some(hbone_addr),
            ..ConnectionRecord::new(direction, pod, src, dst, src_identity, dst_identity)
        };
        self.open_record(rec)
    }

    fn open_record(&self, rec: ConnectionRecord) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let rec = ConnectionRecord { id, ..rec };
        let probe = rec.probe;
        let rec = Arc::new(rec);
        let hash = self.hasher.hash_one(TagsInputs::of(&rec));
        let found = self.lock().labelled_like(&rec, hash);
        let (tags, labelled_in) = match found {
            Some((tags, generation)) => (tags, Some((generation, hash))),
            None => {
                let (store, generation) =
                    self.store.read().unwrap_or_else(|p| p.into_inner()).clone();
                let (labels, peers) = metric_labels(&store, &rec);
                drop(store);
                let mut st = self.lock();
                let tags = st.intern(Tags { labels, peers });
                let kept = st.remember(&rec, hash, &tags, generation);
                (tags, kept.then_some((generation, hash)))
            }
        };
        // Counted before the entry exists: its close (which needs the id returned below)
        // cannot be counted first.
        if !probe {
            self.metrics.connection_opened(&tags.labels);
        }
        self.lock().insert(Active {
            rec,
            fds: Vec::new(),
            closing: None,
            tags,
            labelled_in,
        });
        id
    }

    /// Registers the sockets that carry connection `id`, so [`Self::terminate`] can end it.
    fn attach(&self, id: u64, fds: &[std::os::fd::RawFd]) {
        if let Some(a) = self.lock().active.get_mut(&id) {
            a.fds.extend_from_slice(fds);
        }
    }

    /// Ends every active connection for which `why` gives a reason: its sockets are shut
    /// down (the copy loops then finish) and the reason becomes its outcome. Returns how
    /// many were ended.
    ///
    /// `why` (a policy evaluation per connection on a store swap) runs outside the lock,
    /// on the connections open when it is called; only the chosen ones are then shut down
    /// under it, if they are still open. A connection opened meanwhile was authorized by
    /// its opener, as one opened just after the swap would be.
    pub fn terminate(&self, why: impl Fn(&ConnectionRecord) -> Option<String>) -> usize {
        let open: Vec<Arc<ConnectionRecord>> = self
            .lock()
            .active
            .values()
            .filter(|a| a.closing.is_none())
            .map(|a| a.rec.clone())
            .collect();
        let doomed: Vec<(u64, String)> = open
            .iter()
            .filter_map(|rec| Some((rec.id, why(rec)?)))
            .collect();
        drop(open);
        if doomed.is_empty() {
            return 0;
        }
        let mut st = self.lock();
        let mut n = 0;
        for (id, reason) in doomed {
            // Closed meanwhile, or ended by another swap: nothing to do.
            let Some(a) = st.active.get_mut(&id).filter(|a| a.closing.is_none()) else {
                continue;
            };
            for fd in &a.fds {
                // SAFETY: the fd belongs to a live socket (see `Active::fds`); shutdown
                // neither closes nor frees it.
                unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
            }
            tracing::warn!(pod = %a.rec.pod, src = %a.rec.src, dst = %a.rec.dst, reason = %reason, "closing connection");
            a.closing = Some(reason);
            n += 1;
        }
        n
    }

    /// Closes the record of every connection still open, as if each had ended now with
    /// no bytes counted beyond what its record holds: for the drain, whose process exits
    /// before their tasks would. The outcome is the reason they were ended with, else
    /// `outcome`. Returns how many.
    pub fn abandon(&self, outcome: &str) -> usize {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let open: Vec<(u64, u64, u64, Duration)> = self
            .lock()
            .active
            .values()
            .map(|a| {
                let age = Duration::from_millis(now.saturating_sub(a.rec.opened_ms));
                (a.rec.id, a.rec.bytes_sent, a.rec.bytes_received, age)
            })
            .collect();
        for (id, sent, received, age) in &open {
            tracing::warn!(id, "connection still open at exit; closing its record");
            self.close(*id, *sent, *received, *age, outcome.to_owned());
        }
        open.len()
    }

    fn close(&self, id: u64, sent: u64, received: u64, elapsed: Duration, outcome: String) {
        let Some(Active {
            rec, closing, tags, ..
        }) = self.lock().remove(id)
        else {
            return;
        };
        // Not shared any more but for a moment by a `terminate` pass, or as the inputs of
        // its label set's entry while connections like it are open (`by_inputs`): then a
        // copy.
        let mut rec = Arc::unwrap_or_clone(rec);
        rec.bytes_sent = sent;
        rec.bytes_received = received;
        rec.duration_ms = Some(elapsed.as_millis() as u64);
        let outcome = closing.unwrap_or(outcome);
        let flag = response_flag(&outcome);
        // The shared labels as they are when the flag is theirs (a connection that ended
        // well), a copy with the flag otherwise.
        let flagged;
        let labels = if tags.labels.response_flags == flag {
            &tags.labels
        } else {
            flagged = crate::metrics::ConnLabels {
                response_flags: flag.to_owned(),
                ..tags.labels.clone()
            };
            &flagged
        };
        rec.outcome = Some(outcome);
        // Istio counts "sent" from the destination back to the source and "received"
        // from the source to the destination, whichever side reports.
        if !rec.probe {
            self.metrics.connection_closed(labels, received, sent);
        }
        access_log(&rec, labels, &tags.peers);
        let mut st = self.lock();
        if st.closed.len() == CLOSED_KEPT {
            st.closed.pop_front();
        }
        st.closed.push_back(rec);
    }

    /// Active connections first (by when they opened), then recently closed ones, oldest
    /// first.
    pub fn snapshot(&self) -> (u64, Vec<ConnectionRecord>) {
        let st = self.lock();
        let mut active: Vec<&ConnectionRecord> = st.active.values().map(|a| &*a.rec).collect();
        active.sort_unstable_by_key(|r| r.id);
        let list = active
            .into_iter()
            .chain(st.closed.iter())
            .cloned()
            .collect();
        (st.opened_total, list)
    }
}

impl Proxy {
    pub fn new(
        store: Store,
        certs: Arc<CertificateManager>,
        metrics: Arc<crate::metrics::Metrics>,
        probes: Arc<crate::probes::ProbeSources>,
        limits: Limits,
    ) -> Result<Arc<Self>, Error> {
        let home = Netns::current()?;
        let store = Arc::new(store);
        Ok(Arc::new_cyclic(|me: &Weak<Proxy>| {
            let dialer = me.clone();
            let connector: Connector = Box::new(move |key: &PoolKey| {
                let (me, key) = (dialer.clone(), key.clone());
                Box::pin(async move {
                    let proxy = me
                        .upgrade()
                        .ok_or_else(|| io::Error::other("ztunnel is shutting down"))?;
                    proxy.dial_hbone(&key).await
                })
            });
            let settings = hbone::PoolSettings {
                dial_timeout: limits.hbone_dial_timeout,
                response_timeout: limits.connect_response_timeout,
                ..hbone::PoolSettings::default()
            };
            let me = me.clone();
            let pool = hbone::Pool::new(settings, connector).on_timeout(move |step| {
                if let Some(proxy) = me.upgrade() {
                    proxy.count_timeout(step, limits.timeout(step));
                }
            });
            Self {
                home,
                connections: ConnectionLog::new(metrics.clone(), store.clone()),
                metrics,
                store: RwLock::new(store),
                certs,
                client_configs: tls::ClientConfigs::new(tls::CLIENT_CONFIGS_LIMIT),
                pods: RwLock::default(),
                pool,
                drain: tokio::sync::watch::Sender::new(false),
                inherited_accepting: tokio::sync::watch::Sender::new(true),
                inbound_redirected: std::sync::atomic::AtomicBool::new(false),
                return_paths: Arc::default(),
                client_tuples: inbound::ClientTuples::default(),
                dial_port_cursor: dial_port::Cursor::default(),
                orig_dst_table: std::sync::OnceLock::new(),
                dns: std::sync::OnceLock::new(),
                probes,
                limits,
                timeout_log: Mutex::new(RateLimit::new(limits::LOG_EVERY)),
            }
        }))
    }

    /// The current workload store.
    pub fn store(&self) -> Arc<Store> {
        self.store.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Swaps in a new store; inbound connections the new policies deny are closed, as
    /// Istio's ztunnel does.
    pub fn set_store(&self, store: Store) {
        let store = Arc::new(store);
        *self.store.write().unwrap_or_else(|p| p.into_inner()) = store.clone();
        self.connections.set_store(store.clone());
        let closed = self.connections.terminate(|rec| {
            // A pod gone from the config is unenrolled; its connections run until they
            // close, as after any unenrolment.
            if rec.direction != Direction::Inbound || store.workload(&rec.pod).is_none() {
                return None;
            }
            let conn = crate::policy::Connection {
                src_ip: rec.src.ip(),
                src_identity: rec.src_identity.clone(),
                dst: rec.dst,
            };
            match store.authorize(&rec.pod, &conn) {
                crate::policy::Decision::Allow => None,
                crate::policy::Decision::Deny { reason, .. } => {
                    Some(format!("closed: policy changed: {reason}"))
                }
            }
        });
        if closed > 0 {
            tracing::info!(closed, "closed connections the new policies deny");
        }
    }

    /// Counts a denial in `ztunnel_policy_denials_total`, by kind of reason.
    fn count_denial(&self, policy: &str, reason: &str) {
        use crate::metrics::deny_reason;
        let kind = if reason.contains("STRICT mTLS") {
            deny_reason::STRICT_MTLS
        } else if reason.starts_with("unknown workload") {
            deny_reason::UNKNOWN_WORKLOAD
        } else {
            deny_reason::POLICY
        };
        self.metrics.policy_denied(kind, policy);
    }

    /// Authorizes an inbound connection into `pod` from `src` (with the client's SPIFFE
    /// identity for HBONE, none for plaintext). A denial is logged with the policy and
    /// rule that decided it, counted, and returned as its reason.
    fn authorize_inbound(
        &self,
        pod: &str,
        src: SocketAddr,
        src_identity: Option<&Identity>,
        dst: SocketAddr,
    ) -> Result<(), String> {
        let conn = crate::policy::Connection {
            src_ip: src.ip(),
            src_identity: src_identity.map(ToString::to_string),
            dst,
        };
        match self.store().authorize(pod, &conn) {
            crate::policy::Decision::Allow => Ok(()),
            crate::policy::Decision::Deny {
                policy,
                rule,
                reason,
            } => {
                tracing::warn!(
                    pod, %src, %dst, client = conn.src_identity.as_deref().unwrap_or("-"),
                    policy = %policy, rule, reason = %reason, "connection denied by policy"
                );
                self.count_denial(&policy, &reason);
                Err(reason)
            }
        }
    }

    /// Counts a step that timed out and logs it, at most once per [`limits::LOG_EVERY`].
    fn count_timeout(&self, step: Step, after: Duration) {
        self.metrics.timed_out(step);
        let allowed = self
            .timeout_log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allow(Instant::now());
        if let Some(suppressed) = allowed {
            tracing::warn!(
                %step,
                after = %humantime::format_duration(after),
                flag = step.flag(),
                suppressed,
                "a data-path step timed out; its connection was ended (ztunnel_timeouts_total counts every one)"
            );
        }
    }

    /// Runs one step of a connection under its timeout; a timeout is counted, logged
    /// (rate-limited) and returned as an `io::Error` of kind `TimedOut` that names the step.
    async fn step<T>(&self, step: Step, fut: impl Future<Output = io::Result<T>>) -> io::Result<T> {
        let after = self.limits.timeout(step);
        match limits::within(step, after, fut).await {
            Ok(result) => result,
            Err(timed_out) => {
                self.count_timeout(step, after);
                Err(timed_out.into())
            }
        }
    }

    /// Gives the proxy its own reading of the original-destination map.
    pub fn set_orig_dst_table(&self, table: crate::ebpf::OrigDstTable) {
        let _ = self.orig_dst_table.set(table);
    }

    /// The original destination of a captured connection from the map itself, keyed by
    /// the socket's netns and the app's end (`src`); counted by result.
    fn orig_dst_from_map(&self, stream: &TcpStream, src: SocketAddr) -> Option<SocketAddr> {
        use std::os::fd::AsFd as _;
        let table = self.orig_dst_table.get()?;
        let cookie = crate::netns::socket_cookie(stream.as_fd()).ok().flatten()?;
        let found = table.lookup(cookie, src);
        self.metrics
            .orig_dst_from_map(if found.is_some() { "hit" } else { "miss" });
        found
    }

    /// Says whether inbound plaintext arrives NAT-redirected (iptables capture).
    /// Gives every pod enrolled from now on a DNS proxy.
    pub fn set_dns(&self, dns: Arc<crate::dns::Dns>) {
        let _ = self.dns.set(dns);
    }

    /// The DNS proxy, when `--dns-capture` is on.
    pub fn dns(&self) -> Option<&Arc<crate::dns::Dns>> {
        self.dns.get()
    }

    pub fn set_inbound_redirected(&self, on: bool) {
        self.inbound_redirected.store(on, Ordering::Relaxed);
    }

    /// Opens or closes the gate of the accept loops on inherited listening sockets (see
    /// `Proxy::inherited_accepting`); loops already past it keep accepting.
    pub fn set_inherited_accepting(&self, open: bool) {
        self.inherited_accepting.send_replace(open);
    }

    /// Starts the drain of the data path: every pod listener stops accepting (taking
    /// what the kernel had already queued) and closes, every inbound HBONE connection
    /// sends GOAWAY and finishes its streams, and the outbound pool gives its connections
    /// no new streams and closes each after its last. Established connections run on.
    pub fn start_drain(&self) {
        self.drain.send_replace(true);
        self.pool.drain();
    }

    /// From now on no pod's return path is removed: ztunnel is exiting, and the return
    /// paths stay for the next ztunnel, like the capture.
    pub fn keep_return_paths(&self) {
        self.return_paths.keep_installed();
    }

    pub fn pool_stats(&self) -> hbone::PoolStats {
        self.pool.stats()
    }

    /// TLS client configs the HBONE dials keep (`tls::ClientConfigs`).
    pub fn client_configs_held(&self) -> usize {
        self.client_configs.len()
    }

    /// Dials an HBONE connection for `key`: TCP from the source pod's netns to the next
    /// hop's :15008, then mTLS as the source identity, accepting only the expected
    /// destination identities.
    async fn dial_hbone(&self, key: &PoolKey) -> io::Result<HboneIo> {
        let pod = self
            .pods
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key.src_pod)
            .cloned()
            .ok_or_else(|| io::Error::other(format!("pod {} is not enrolled", key.src_pod)))?;
        let cert = self
            .certs
            .get(&key.src_identity)
            .await
            .map_err(io::Error::other)?;
        let expected: Vec<Identity> = key
            .dst_identities
            .iter()
            .filter_map(|i| i.parse().ok())
            .collect();
        let config = self
            .client_configs
            .get(&cert, &expected)
            .map_err(io::Error::other)?;
        let tcp = self
            .connect_from_pod(&pod, Some(key.src_ip), key.next_hop, ZTUNNEL_MARK)
            .await?;
        let handshake = tokio_rustls::TlsConnector::from(config)
            .connect(tls::server_name(key.next_hop.ip()), tls::transport(tcp));
        let mut tls = self.step(Step::TlsConnect, handshake).await?;
        // The server proved its identity: now the connection gets its read buffer.
        tls.get_mut().0.authenticated();
        Ok(tls)
    }

    /// The addresses a pod's listeners are bound to: HBONE, outbound and inbound, IPv4
    /// and, for a pod with an IPv6 address, IPv6.
    pub fn pod_listen_addrs(v6: bool) -> Vec<SocketAddr> {
        let mut out = vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, ports::HBONE))];
        if v6 {
            out.push(SocketAddr::from((Ipv6Addr::UNSPECIFIED, ports::HBONE)));
        }
        out.push(SocketAddr::from((Ipv4Addr::LOCALHOST, ports::OUTBOUND)));
        if v6 {
            out.push(SocketAddr::from((Ipv6Addr::LOCALHOST, ports::OUTBOUND)));
        }
        out.push(SocketAddr::from((
            Ipv4Addr::UNSPECIFIED,
            ports::INBOUND_PLAINTEXT,
        )));
        if v6 {
            out.push(SocketAddr::from((
                Ipv6Addr::UNSPECIFIED,
                ports::INBOUND_PLAINTEXT,
            )));
        }
        out
    }

    /// Opens the pod's listeners and spawns their accept loops. A listening socket in
    /// `inherited` (a predecessor's, handed over: same socket, same accept queue) is
    /// used for its address instead of binding a new one. The returned handle closes
    /// them when dropped; the pod's return path stays (see [`PodListeners::leave_mesh`]).
    pub fn start_pod(
        self: &Arc<Self>,
        pod: Arc<PodNet>,
        inherited: Vec<(SocketAddr, std::net::TcpListener)>,
    ) -> Result<PodListeners, Error> {
        self.open_pod(pod, inherited, true)
    }

    /// Starts a re-enrolled pod (same netns, changed spec) on `own`, this process's
    /// listening sockets the pod's current listeners also hold (see
    /// [`PodListeners::dup_sockets`]): the same sockets and accept queues, accepted on at
    /// once, so no connection is refused or lost while one set of listeners replaces
    /// the other. The new `pod` takes the old one's place in the proxy.
    pub fn restart_pod(
        self: &Arc<Self>,
        pod: Arc<PodNet>,
        own: Vec<(SocketAddr, std::net::TcpListener)>,
    ) -> Result<PodListeners, Error> {
        self.open_pod(pod, own, false)
    }

    /// `gated`: the sockets in `inherited` are a predecessor's, accepted on only once
    /// the gate opens; otherwise they are this process's own.
    fn open_pod(
        self: &Arc<Self>,
        pod: Arc<PodNet>,
        mut inherited: Vec<(SocketAddr, std::net::TcpListener)>,
        gated: bool,
    ) -> Result<PodListeners, Error> {
        let lease = self.return_paths.lease(&pod.netns, pod.has_v6())?;
        *pod.return_path.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease);
        let mut listeners = PodListeners {
            tasks: Vec::new(),
            dns_tasks: Vec::new(),
            sockets: Vec::new(),
            inherited: 0,
            pod: pod.clone(),
            proxy: Arc::downgrade(self),
        };
        self.pods
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pod.name.clone(), pod.clone());
        for addr in Self::pod_listen_addrs(pod.has_v6()) {
            let (l, gate) = match inherited.iter().position(|(a, _)| *a == addr) {
                Some(i) => {
                    let (_, l) = inherited.swap_remove(i);
                    let l = TcpListener::from_std(l).map_err(|source| Error::Listen {
                        addr,
                        netns: pod.netns.path().display().to_string(),
                        source,
                    })?;
                    if !gated {
                        (l, None)
                    } else {
                        listeners.inherited += 1;
                        (l, Some(self.inherited_accepting.subscribe()))
                    }
                }
                None => (self.listen(&pod, addr)?, None),
            };
            let l = Arc::new(l);
            let task = match addr.port() {
                ports::HBONE => tokio::spawn(accept_loop(
                    self.clone(),
                    pod.clone(),
                    l.clone(),
                    gate,
                    listener::HBONE,
                    hbone_inbound::accept,
                )),
                ports::OUTBOUND => tokio::spawn(accept_loop(
                    self.clone(),
                    pod.clone(),
                    l.clone(),
                    gate,
                    listener::OUTBOUND,
                    outbound::accept,
                )),
                _ => tokio::spawn(accept_loop(
                    self.clone(),
                    pod.clone(),
                    l.clone(),
                    gate,
                    listener::INBOUND,
                    inbound::accept,
                )),
            };
            listeners.tasks.push(task);
            listeners.sockets.push((addr, Arc::downgrade(&l)));
        }
        if let Some(dns) = self.dns.get() {
            let me = Arc::downgrade(self);
            let store: Arc<dyn Fn() -> Arc<Store> + Send + Sync> =
                Arc::new(move || me.upgrade().map(|p| p.store()).unwrap_or_default());
            listeners.dns_tasks = dns.start_pod(pod.clone(), store)?;
        }
        Ok(listeners)
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
                s.listen(LISTEN_BACKLOG)?;
                Ok(s.into())
            })?
            .map_err(err)?;
        TcpListener::from_std(std).map_err(err)
    }

    /// A TCP connection to `dst` from inside the pod's netns with `mark`. With `src` it
    /// is bound to that address first; an address that is not the pod's own (the
    /// original client's, for source preservation) needs `IP_TRANSPARENT` and gets its
    /// port from [`Proxy::dial_from_client`].
    async fn connect_from_pod(
        &self,
        pod: &PodNet,
        src: Option<IpAddr>,
        dst: SocketAddr,
        mark: u32,
    ) -> io::Result<TcpStream> {
        let transparent = src.filter(|ip| !pod.addrs.contains(ip));
        let (sock, local) = pod
            .netns
            .run(
                &self.home,
                || -> io::Result<(Socket, Option<SocketAddr>)> {
                    let socket = || -> io::Result<Socket> {
                        // Non-blocking from the start: no fcntl pair per dial.
                        let s = Socket::new(
                            Domain::for_address(dst),
                            Type::STREAM.nonblocking(),
                            None,
                        )?;
                        s.set_mark(mark)?;
                        s.set_tcp_nodelay(true)?;
                        s.set_tcp_keepalive(
                            &TcpKeepalive::new().with_time(Duration::from_secs(180)),
                        )?;
                        Ok(s)
                    };
                    if let Some(ip) = transparent {
                        let (s, from) = self.dial_from_client(pod, ip, dst, socket)?;
                        return Ok((s, Some(from)));
                    }
                    let s = socket()?;
                    if let Some(ip) = src {
                        // The pod's own address: the port is picked at connect, by the whole
                        // 4-tuple (a port bound with no destination yet is the namespace's
                        // to give once, until its TIME_WAIT ends, for every destination).
                        nix::sys::socket::setsockopt(
                            &s,
                            nix::sys::socket::sockopt::IpBindAddressNoPort,
                            &true,
                        )?;
                        s.bind(&SocketAddr::new(ip, 0).into())?;
                    }
                    connect_started(&s, dst)?;
                    Ok((s, None))
                },
            )
            .map_err(io::Error::other)??;
        // The connect is under way: the stream is writable once it is established, and
        // its error tells why not (what tokio's own connect does).
        let stream = TcpStream::from_std(std::net::TcpStream::from(sock))?;
        self.step(Step::TcpConnect, async {
            stream.writable().await?;
            match stream.take_error()? {
                Some(e) => Err(e),
                None => Ok(stream),
            }
        })
        .await
        // A dial from the client's address names its port: the access log then shows
        // both ends of the tuple that failed.
        .map_err(|e| match local {
            Some(from) => io::Error::new(e.kind(), format!("{e} (dialled from {from})")),
            None => e,
        })
    }

    /// Starts a dial to `dst` from the client's address `ip` (transparent), from a port
    /// ztunnel chooses before the SYN (see [`dial_port`]): odd ports of the pod's range
    /// first, never one whose tuple a client connection ztunnel holds
    /// ([`inbound::ClientTuples`]) or the kernel has in use. Runs in the pod's netns.
    fn dial_from_client(
        &self,
        pod: &PodNet,
        ip: IpAddr,
        dst: SocketAddr,
        socket: impl Fn() -> io::Result<Socket>,
    ) -> io::Result<(Socket, SocketAddr)> {
        let range = pod.dial_ports.current()?;
        let mut tried = 0;
        for port in range.candidates(&self.dial_port_cursor) {
            let from = SocketAddr::new(ip, port);
            if self.client_tuples.contains(dst, from) {
                self.metrics.dial_port_skipped();
                continue;
            }
            tried += 1;
            let s = socket()?;
            if ip.is_ipv4() {
                s.set_ip_transparent_v4(true)?;
            } else {
                set_ipv6_transparent(&s)?;
            }
            // Other destinations may still use the port (as with a port picked at
            // connect); `connect` refuses it only where this tuple is in use.
            s.set_reuse_address(true)?;
            match s.bind(&from.into()).and_then(|()| connect_started(&s, dst)) {
                Ok(()) => return Ok((s, from)),
                Err(e) if port_taken(&e) => {
                    tracing::debug!(%dst, %from, "the dial's port is in use; dialling from another");
                }
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "no source port for {dst} from {ip}: the {tried} ports of the pod's range \
                 {range} tried were in use (ports of client connections and reserved \
                 ports passed over)"
            ),
        ))
    }
}

/// Whether `bind` or `connect` refused a dial's port because its tuple is in use (a
/// listener on it, or this tuple open or in TIME_WAIT).
fn port_taken(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EADDRINUSE | libc::EADDRNOTAVAIL)
    )
}

/// Starts a non-blocking connect: `EINPROGRESS` is the connect under way.
fn connect_started(s: &Socket, dst: SocketAddr) -> io::Result<()> {
    match s.connect(&dst.into()) {
        Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => Err(e),
        _ => Ok(()),
    }
}

/// The pod listeners' accept queue (`listen()` backlog).
const LISTEN_BACKLOG: i32 = 1024;

/// Accepts on a pod's listener until the drain starts, handing each connection to
/// `handle` on its own task. At most `--max-connections-per-listener` connections are
/// held at once: at the cap the loop stops accepting until one closes, and the kernel's
/// backlog holds the rest. A failed accept is counted and, when it is about resources
/// (EMFILE, ENFILE, ENOBUFS, ENOMEM), waited out with backoff instead of retried in a hot
/// loop. When the drain starts, the connections already in the accept queue (their
/// clients see them established) are taken as far as the cap allows, and the listener is
/// closed: a successor holding the same listening socket gets every new connection;
/// without one, new connections find no listener and fail closed. A socket inherited
/// from a predecessor is accepted on only once `gate` opens (the kernel queues
/// connections meanwhile, and the predecessor accepts them).
async fn accept_loop<H, F>(
    proxy: Arc<Proxy>,
    pod: Arc<PodNet>,
    listener: Arc<TcpListener>,
    gate: Option<tokio::sync::watch::Receiver<bool>>,
    what: &'static str,
    handle: H,
) where
    H: Fn(Arc<Proxy>, Arc<PodNet>, TcpStream, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    if let Some(mut gate) = gate {
        let _ = gate.wait_for(|open| *open).await;
    }
    let mut cap = ListenerCap::new(
        proxy.limits.max_connections_per_listener,
        what,
        pod.name.clone(),
        proxy.metrics.clone(),
    );
    let mut errors = AcceptErrors::new(what, pod.name.clone(), proxy.metrics.clone());
    let mut drain = proxy.drain.subscribe();
    let serve = |stream: TcpStream, peer: SocketAddr, held: limits::Held| {
        let conn = handle(proxy.clone(), pod.clone(), stream, peer);
        // `map`, not `async move { conn.await; drop(held) }`: awaiting a captured future
        // moves it into a second slot of the block's state, and every task was twice the
        // connection's future (2,176 bytes for a 1,016-byte one).
        tokio::spawn(futures_util::FutureExt::map(conn, move |()| drop(held)));
    };
    loop {
        let slot = tokio::select! {
            slot = cap.reserve() => slot,
            () = drain_started(&mut drain) => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = drain_started(&mut drain) => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                errors.accepted();
                serve(stream, peer, cap.hold(slot));
            }
            Err(e) => {
                drop(slot);
                errors.failed(&e).await;
            }
        }
    }
    // The loop holds the only strong reference to the listener ([`PodListeners`] keeps
    // a weak one): it closes when this returns, unless a successor holds it too.
    let sock = socket2::SockRef::from(&*listener);
    let mut taken = 0;
    while taken < LISTEN_BACKLOG {
        let Some(slot) = cap.try_reserve() else { break };
        // Non-blocking (tokio's listener is): WouldBlock once the queue is empty.
        let accepted = sock.accept().and_then(|(s, peer)| {
            let peer = peer
                .as_socket()
                .ok_or_else(|| io::Error::other("accepted a socket without an inet peer"))?;
            s.set_nonblocking(true)?;
            Ok((TcpStream::from_std(std::net::TcpStream::from(s))?, peer))
        });
        match accepted {
            Ok((stream, peer)) => {
                serve(stream, peer, cap.hold(slot));
                taken += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => {
                tracing::debug!(pod = %pod.name, listener = what, error = %e, "accept of a queued connection failed while draining");
                break;
            }
        }
    }
    tracing::debug!(pod = %pod.name, listener = what, queued = taken, "listener closed for the drain");
}

/// Resolves once the drain has started (or nobody can start it any more).
async fn drain_started(drain: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = drain.wait_for(|draining| *draining).await;
}

impl crate::drain::Drainable for Proxy {
    fn open_connections(&self) -> usize {
        self.connections.open_count()
    }

    fn busy(&self) -> bool {
        // Every accepted connection holds a listener slot until its task ends: HBONE
        // connections until their GOAWAY is through, any connection still in its TLS
        // handshake or before its record exists.
        self.metrics.listener_connections_held() > 0
    }

    fn force_close(&self, outcome: &str) -> usize {
        self.connections.terminate(|_| Some(outcome.to_owned()))
    }

    fn abandon(&self, outcome: &str) -> usize {
        self.connections.abandon(outcome)
    }
}

/// Istio's TCP metric labels for a connection, from the store, and its ends' pod names:
/// the reporter is the source for outbound and the destination for inbound; unknown
/// values stay `unknown`. The destination workload is the HBONE target's (the endpoint
/// chosen for a service VIP), else the original destination's; the destination service is
/// the VIP's, else the first service the destination backs. Every lookup is by hash.
/// Public for the benchmarks (`benches/lookups.rs`).
pub fn metric_labels(store: &Store, rec: &ConnectionRecord) -> (crate::metrics::ConnLabels, Peers) {
    use crate::metrics::{ConnLabels, REPORTER_DESTINATION, REPORTER_SOURCE};
    let mut l = ConnLabels::default();
    let dst_ip = rec.hbone_addr.unwrap_or(rec.dst).ip();
    let (src_w, dst_w) = match rec.direction {
        Direction::Outbound => {
            l.reporter = REPORTER_SOURCE.to_owned();
            (store.workload(&rec.pod), store.workload_by_addr(dst_ip))
        }
        Direction::Inbound => {
            l.reporter = REPORTER_DESTINATION.to_owned();
            (
                store.workload_by_addr(rec.src.ip()),
                store.workload(&rec.pod),
            )
        }
    };
    if let Some(w) = src_w {
        l.set_source(w, &store.cfg.cluster);
    }
    let vip_service = store
        .service_by_vip(rec.dst.ip())
        .map(|i| &store.cfg.services[i]);
    if let Some(w) = dst_w {
        l.set_destination(w, &store.cfg.cluster);
    }
    let service = vip_service.or_else(|| store.service_of(dst_w?));
    if let Some(svc) = service {
        l.set_destination_service(svc);
    }
    if let Some(p) = &rec.src_identity {
        l.source_principal = p.clone();
    }
    if let Some(p) = &rec.dst_identity {
        l.destination_principal = p.clone();
    }
    if rec.src_identity.is_some() || rec.dst_identity.is_some() {
        l.connection_security_policy = crate::metrics::SECURITY_MUTUAL_TLS.to_owned();
    }
    let peers = Peers {
        src: src_w.map(|w| w.name.clone()),
        dst: dst_w.map(|w| w.name.clone()),
    };
    (l, peers)
}

/// The `response_flags` of a connection that ended with `outcome`, as istio/ztunnel
/// derives them from its errors: a policy's denial (also a later one) is `DENY`; a
/// connection that could not be made or carried is `CONNECT`, or `TLS_FAILURE`,
/// `H2_HANDSHAKE_FAILURE`, `IDENTITY_ERROR` for an HBONE dial that failed at that step.
/// The drain's end is no failure (Istio records it without a flag).
fn response_flag(outcome: &str) -> &'static str {
    use crate::metrics::response_flag as f;
    if outcome == "ok" || outcome == crate::drain::OUTCOME {
        return f::NONE;
    }
    if outcome.starts_with("denied:") || outcome.starts_with("closed: policy changed") {
        return f::DENY;
    }
    if let Some(why) = outcome.strip_prefix("hbone failed: ") {
        // The pool's and the dial's error texts (hbone::pool::Error, Proxy::dial_hbone).
        if why.contains("hbone handshake with the peer") || why.starts_with("CONNECT to ") {
            return f::H2_HANDSHAKE_FAILURE;
        }
        if why.contains("certificate for ") && why.contains("spiffe://") {
            return f::IDENTITY_ERROR;
        }
        let lower = why.to_ascii_lowercase();
        if ["tls_connect", "tls", "peer certificate", "alert"]
            .iter()
            .any(|w| lower.contains(w))
        {
            return f::TLS_FAILURE;
        }
    }
    f::CONNECT
}

/// Writes the connection's access log line, Istio ztunnel's "connection complete": its
/// fields, names, order and byte directions. Unknown values are left out, as Istio does;
/// identities only for mTLS. Istio's `bytes_sent`/`bytes_recv` are the reporter's: what
/// ztunnel sent toward the peer on the network and received from it, so an outbound line
/// counts the app's upload as sent and an inbound line as received. A failed connection
/// is an `error` line with the reason; a kubelet probe's line ends with `probe=true`
/// (Istio's probes never reach its ztunnel).
fn access_log(rec: &ConnectionRecord, labels: &crate::metrics::ConnLabels, peers: &Peers) {
    let known = |v: &str| (v != crate::metrics::UNKNOWN && !v.is_empty()).then(|| v.to_owned());
    let mtls = rec.security_policy == crate::metrics::SECURITY_MUTUAL_TLS;
    let (bytes_sent, bytes_recv) = match rec.direction {
        // The record counts client→server as sent, server→client as received.
        Direction::Outbound => (rec.bytes_sent, rec.bytes_received),
        Direction::Inbound => (rec.bytes_received, rec.bytes_sent),
    };
    let direction = match rec.direction {
        Direction::Outbound => "outbound",
        Direction::Inbound => "inbound",
    };
    // Istio's dst.addr is the address dialled on the wire: the peer's :15008 for HBONE.
    let dst_addr = rec
        .hbone_addr
        .map_or(rec.dst, |h| SocketAddr::new(h.ip(), ports::HBONE));
    let src_workload = peers
        .src
        .clone()
        .or_else(|| known(&labels.source_canonical_service));
    let dst_workload = peers
        .dst
        .clone()
        .or_else(|| known(&labels.destination_canonical_service));
    let src_identity = rec.src_identity.clone().filter(|_| mtls);
    let dst_identity = rec.dst_identity.clone().filter(|_| mtls);
    let duration = format!("{}ms", rec.duration_ms.unwrap_or(0));
    let probe = rec.probe.then_some(true);
    let error = rec.outcome.as_deref().filter(|o| *o != "ok");
    macro_rules! line {
        ($level:expr, $($error:tt)*) => {
            tracing::event!(
                target: "access",
                parent: None,
                $level,
                src.addr = %rec.src,
                src.workload = src_workload,
                src.namespace = known(&labels.source_workload_namespace),
                src.identity = src_identity,
                src.cluster = known(&labels.source_cluster),
                dst.addr = %dst_addr,
                dst.hbone_addr = rec.hbone_addr.map(tracing::field::display),
                dst.service = known(&labels.destination_service),
                dst.workload = dst_workload,
                dst.namespace = known(&labels.destination_workload_namespace),
                dst.identity = dst_identity,
                dst.cluster = known(&labels.destination_cluster),
                direction,
                bytes_sent,
                bytes_recv,
                duration,
                $($error)*
                probe,
                "connection complete"
            )
        };
    }
    match error {
        None => line!(tracing::Level::INFO,),
        Some(error) => line!(tracing::Level::ERROR, error,),
    }
}

/// The baggage describing a workload (HBONE.md, "The CONNECT request").
fn workload_baggage(store: &Store, key: &str) -> Option<hbone::Baggage> {
    let w = store.workload(key)?;
    Some(hbone::Baggage {
        cluster: store.cfg.cluster.clone(),
        namespace: w.namespace.clone(),
        workload_type: w.workload_type(),
        workload_name: w.workload_name(),
        service: w.canonical_name(),
        revision: w.canonical_revision(),
    })
}

/// An error and its causes on one line (`a: b: c`), for logs and connection outcomes.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = c.source();
    }
    out
}

/// Makes dropping `stream` send a RST instead of a FIN: an app whose connection could
/// not be carried (connect failed or timed out, tunnel refused) must not read a clean,
/// empty answer.
fn reset_on_drop(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// `IPV6_TRANSPARENT` (socket2 only wraps the IPv4 option).
fn set_ipv6_transparent(s: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let on: libc::c_int = 1;
    // SAFETY: valid socket and an int-sized option value.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_IPV6,
            libc::IPV6_TRANSPARENT,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A pod's listeners; dropping it stops accepting (connections already accepted go on)
/// and gives up the listeners' lease on the pod's return path, which stays installed:
/// it belongs to the pod, and only [`Self::leave_mesh`] lets it go.
pub struct PodListeners {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The DNS proxy's loops: they go on through a drain (a successor's sockets share the
    /// port, `SO_REUSEPORT`) and end with the pod's listeners.
    dns_tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The listening sockets, for a successor to take: weak, so that a listener closes
    /// when its accept loop ends (a drain without a successor fails closed at once).
    sockets: Vec<(SocketAddr, Weak<TcpListener>)>,
    /// How many were a predecessor's.
    pub inherited: usize,
    pod: Arc<PodNet>,
    proxy: Weak<Proxy>,
}

impl PodListeners {
    /// The listening sockets still open and their addresses (none once accepting has
    /// stopped).
    pub fn sockets(&self) -> Vec<(SocketAddr, Arc<TcpListener>)> {
        self.sockets
            .iter()
            .filter_map(|(a, l)| Some((*a, l.upgrade()?)))
            .collect()
    }

    /// The `:15006` listening sockets (inbound plaintext), for the TIME_WAIT hand-over map.
    pub fn inbound(&self) -> Vec<(SocketAddr, Arc<TcpListener>)> {
        self.sockets()
            .into_iter()
            .filter(|(a, _)| a.port() == ports::INBOUND_PLAINTEXT)
            .collect()
    }

    /// Another descriptor of each listening socket still open, for [`Proxy::restart_pod`].
    pub fn dup_sockets(&self) -> io::Result<Vec<(SocketAddr, std::net::TcpListener)>> {
        use std::os::fd::AsFd as _;
        self.sockets()
            .into_iter()
            .map(|(a, l)| {
                Ok((
                    a,
                    std::net::TcpListener::from(l.as_fd().try_clone_to_owned()?),
                ))
            })
            .collect()
    }

    /// Puts this pod back in the proxy's place after a replacement that failed (and whose
    /// listeners, dropped, took the place away).
    pub fn reinstate(&self) {
        if let Some(proxy) = self.proxy.upgrade() {
            proxy
                .pods
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(self.pod.name.clone(), self.pod.clone());
        }
    }

    /// Stops accepting for good: the accept loops end and this process's descriptors of
    /// the listening sockets close. A successor holding the same sockets keeps accepting
    /// from their queues; without one they close. Returns the loops to wait for.
    pub fn stop_accepting(&mut self) -> Vec<tokio::task::JoinHandle<()>> {
        for t in &self.tasks {
            t.abort();
        }
        self.sockets.clear();
        std::mem::take(&mut self.tasks)
    }

    /// The pod leaves the mesh (its source says so): closes the listeners, and its return
    /// path goes once the last inbound connection using it has closed.
    pub fn leave_mesh(self) {
        let lease = self
            .pod
            .return_path
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(lease) = lease {
            lease.leave_mesh();
        }
    }
}

impl Drop for PodListeners {
    fn drop(&mut self) {
        for t in self.tasks.iter().chain(&self.dns_tasks) {
            t.abort();
        }
        drop(
            self.pod
                .return_path
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        if let Some(proxy) = self.proxy.upgrade() {
            let mut pods = proxy.pods.write().unwrap_or_else(|p| p.into_inner());
            // A re-enrolled pod's new listeners may hold the place already.
            if pods
                .get(&self.pod.name)
                .is_some_and(|p| Arc::ptr_eq(p, &self.pod))
            {
                pods.remove(&self.pod.name);
            }
        }
    }
}

/// Copies both ways until both sides are done, half-closing each direction as its
/// reader finishes, and records the outcome.
async fn relay(
    proxy: &Proxy,
    id: u64,
    started: Instant,
    downstream: TcpStream,
    upstream: TcpStream,
) {
    let _ = downstream.set_nodelay(true);
    {
        use std::os::fd::AsRawFd as _;
        proxy
            .connections
            .attach(id, &[downstream.as_raw_fd(), upstream.as_raw_fd()]);
    }
    let result = relay::relay(&downstream, &upstream).await;
    let (sent, received, outcome) = match result {
        Ok((from_down, from_up)) => (from_down, from_up, "ok".to_owned()),
        Err(e) => (0, 0, format!("error: {e}")),
    };
    proxy
        .connections
        .close(id, sent, received, started.elapsed(), outcome);
}

#[cfg(test)]
mod tests {
    use std::{io::Read as _, os::fd::AsRawFd as _, os::unix::net::UnixStream};

    use super::*;

    fn log() -> ConnectionLog {
        ConnectionLog::new(crate::metrics::Metrics::new(), Arc::new(Store::default()))
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    fn ids(list: &[ConnectionRecord]) -> Vec<u64> {
        list.iter().map(|r| r.id).collect()
    }

    #[test]
    fn log_counts_and_lists_connections_by_id() {
        let log = log();
        let a = log.open(Direction::Outbound, "ns/a", addr(1), addr(80));
        let b = log.open(Direction::Inbound, "ns/b", addr(2), addr(80));
        let c = log.open(Direction::Outbound, "ns/c", addr(3), addr(80));
        let p = log.open_probe("ns/b", addr(4), addr(8080));
        assert_eq!(log.active_counts(), (2, 2));

        log.close(b, 10, 20, Duration::from_millis(5), "done".into());
        // An unknown (or already closed) id changes nothing.
        log.close(b, 1, 1, Duration::ZERO, "again".into());
        log.close(999, 1, 1, Duration::ZERO, "never opened".into());
        assert_eq!(log.active_counts(), (2, 1));

        let (opened, list) = log.snapshot();
        assert_eq!(opened, 4);
        // Active ones in the order they opened, then the closed one.
        assert_eq!(ids(&list), [a, c, p, b]);
        let closed = &list[3];
        assert_eq!(
            (closed.bytes_sent, closed.bytes_received, closed.duration_ms),
            (10, 20, Some(5))
        );
        assert_eq!(closed.outcome.as_deref(), Some("done"));
        assert!(list[2].probe);

        for id in [a, c, p] {
            log.close(id, 0, 0, Duration::ZERO, "done".into());
        }
        assert_eq!(log.active_counts(), (0, 0));
        assert_eq!(ids(&log.snapshot().1), [b, a, c, p]);
    }

    #[test]
    fn log_keeps_the_last_closed_connections_only() {
        let log = log();
        let n = CLOSED_KEPT as u64 + 10;
        for _ in 0..n {
            let id = log.open(Direction::Outbound, "ns/a", addr(1), addr(80));
            log.close(id, 0, 0, Duration::ZERO, "done".into());
        }
        let (opened, list) = log.snapshot();
        assert_eq!(opened, n);
        assert_eq!(list.len(), CLOSED_KEPT);
        assert_eq!(list.first().map(|r| r.id), Some(10));
        assert_eq!(list.last().map(|r| r.id), Some(n - 1));
    }

    #[test]
    fn terminate_shuts_down_the_chosen_connections_once() {
        let log = log();
        let (mine, mut peer) = UnixStream::pair().expect("socketpair");
        let (other, _other_peer) = UnixStream::pair().expect("socketpair");
        let doomed = log.open(Direction::Inbound, "ns/b", addr(1), addr(80));
        let kept = log.open(Direction::Inbound, "ns/b", addr(2), addr(80));
        log.attach(doomed, &[mine.as_raw_fd()]);
        log.attach(kept, &[other.as_raw_fd()]);

        let why = |rec: &ConnectionRecord| (rec.src == addr(1)).then(|| "denied".to_owned());
        assert_eq!(log.terminate(why), 1);
        // Already closing: not counted again.
        assert_eq!(log.terminate(why), 0);
        // The doomed connection's socket is shut down: its peer reads end of stream.
        let mut buf = [0u8; 1];
        assert_eq!(peer.read(&mut buf).expect("read"), 0);

        // The reason, not the copy's own outcome, is what the record says.
        log.close(doomed, 0, 0, Duration::ZERO, "copy ended".into());
        let (_, list) = log.snapshot();
        assert_eq!(ids(&list), [kept, doomed]);
        assert_eq!(list[1].outcome.as_deref(), Some("denied"));
        assert_eq!(list[0].outcome, None);
    }

    #[test]
    fn connections_with_the_same_labels_share_one_copy_until_the_last_closes() {
        let log = log();
        let tags_of = |id: u64| log.lock().active.get(&id).map(|a| a.tags.clone());
        let a = log.open(Direction::Outbound, "ns/a", addr(1), addr(80));
        let b = log.open(Direction::Outbound, "ns/a", addr(2), addr(80));
        // Another direction reports from the other side: other labels.
        let c = log.open(Direction::Inbound, "ns/a", addr(3), addr(80));
        let (ta, tb, tc) = (tags_of(a), tags_of(b), tags_of(c));
        let (Some(ta), Some(tb), Some(tc)) = (ta, tb, tc) else {
            panic!("an open connection has no tags");
        };
        assert!(Arc::ptr_eq(&ta, &tb), "same labels, one copy");
        assert!(!Arc::ptr_eq(&ta, &tc), "other labels, their own copy");
        assert_eq!(ta.labels.reporter, crate::metrics::REPORTER_SOURCE);
        assert_eq!(tc.labels.reporter, crate::metrics::REPORTER_DESTINATION);
        drop((ta, tb, tc));
        assert_eq!(log.lock().tags.len(), 2);

        log.close(a, 0, 0, Duration::ZERO, "done".into());
        assert_eq!(log.lock().tags.len(), 2, "b still holds the outbound set");
        log.close(b, 0, 0, Duration::ZERO, "done".into());
        assert_eq!(log.lock().tags.len(), 1, "the outbound set left with b");
        // A later connection with those labels gets a fresh copy, equal to the old one.
        let d = log.open(Direction::Outbound, "ns/a", addr(4), addr(80));
        assert_eq!(log.lock().tags.len(), 2);
        for id in [c, d] {
            log.close(id, 0, 0, Duration::ZERO, "done".into());
        }
        assert!(
            log.lock().tags.is_empty(),
            "no active connection, no label set"
        );
        assert_eq!(log.snapshot().1.len(), 4, "every close still recorded");
    }

    #[test]
    fn like_connections_reuse_a_label_set_until_the_store_changes() {
        let store = |name: &str| {
            let yaml = format!(
                "namespaces:\n  - name: mesh\nworkloads:\n  - name: {name}\n    namespace: mesh\n    node: node2\n    addresses: [10.0.0.9]\n"
            );
            let cfg =
                crate::state::LocalConfig::parse(std::path::Path::new("w.yaml"), &yaml, "node1")
                    .expect("valid workload file");
            Arc::new(Store::new(cfg))
        };
        let log = ConnectionLog::new(crate::metrics::Metrics::new(), store("old"));
        let to = SocketAddr::from(([10, 0, 0, 9], 80));
        let dst_of = |id: u64| {
            log.lock()
                .active
                .get(&id)
                .map(|a| a.tags.labels.destination_workload.clone())
        };
        let users = |log: &ConnectionLog| -> Vec<usize> {
            log.lock()
                .by_inputs
                .values()
                .flatten()
                .map(|e| e.users)
                .collect()
        };
        // Two connections from one pod to one address (other source ports): one entry.
        let a = log.open(Direction::Outbound, "ns/a", addr(1), to);
        let b = log.open(Direction::Outbound, "ns/a", addr(2), to);
        assert_eq!(users(&log), [2]);
        assert_eq!(dst_of(a).as_deref(), Some("old"));
        assert_eq!(dst_of(b).as_deref(), Some("old"));

        // The destination's workload is now called "new": the next connection says so.
        log.set_store(store("new"));
        assert!(
            users(&log).is_empty(),
            "sets of the old store are not reused"
        );
        let c = log.open(Direction::Outbound, "ns/a", addr(3), to);
        assert_eq!(dst_of(c).as_deref(), Some("new"));
        assert_eq!(
            dst_of(a).as_deref(),
            Some("old"),
            "an open connection keeps its labels"
        );
        assert_eq!(users(&log), [1]);
        assert_eq!(log.lock().tags.len(), 2);

        // The old store's connections closing leave the new entry's count alone.
        for id in [a, b] {
            log.close(id, 0, 0, Duration::ZERO, "done".into());
        }
        assert_eq!(users(&log), [1]);
        assert_eq!(log.lock().tags.len(), 1);
        let d = log.open(Direction::Outbound, "ns/a", addr(4), to);
        assert_eq!(users(&log), [2]);
        for id in [c, d] {
            log.close(id, 0, 0, Duration::ZERO, "done".into());
        }
        assert!(users(&log).is_empty(), "the entry left with its last user");
        assert!(log.lock().tags.is_empty());
    }

    #[test]
    fn terminate_judges_outside_the_lock_and_skips_connections_closed_meanwhile() {
        let log = log();
        let a = log.open(Direction::Inbound, "ns/b", addr(1), addr(80));
        let b = log.open(Direction::Inbound, "ns/b", addr(2), addr(80));
        // `why` runs outside the log's lock, so it may take it: here it closes `a` while
        // judging it, as `a`'s copy loop finishing at that moment would.
        let ended = log.terminate(|rec| {
            if rec.id == a {
                log.close(a, 0, 0, Duration::ZERO, "copy ended".into());
            }
            Some("denied".to_owned())
        });
        assert_eq!(ended, 1, "only b was still open to be ended");
        let (_, list) = log.snapshot();
        assert_eq!(ids(&list), [b, a]);
        assert_eq!(list[1].outcome.as_deref(), Some("copy ended"));
        log.close(b, 0, 0, Duration::ZERO, "copy ended".into());
        let (_, list) = log.snapshot();
        assert_eq!(ids(&list), [a, b]);
        assert_eq!(list[1].outcome.as_deref(), Some("denied"));
    }
}

#[cfg(test)]
mod response_flag_tests {
    use super::response_flag;

    #[test]
    fn outcomes_map_to_istios_response_flags() {
        for (outcome, flag) in [
            ("ok", "-"),
            ("drain timeout", "-"),
            ("denied: no ALLOW policy matches", "DENY"),
            ("closed: policy changed: deny-all", "DENY"),
            (
                "connect failed: Connection refused (os error 111)",
                "CONNECT",
            ),
            ("refused: port 15008 belongs to ztunnel", "CONNECT"),
            ("error: Connection reset by peer (os error 104)", "CONNECT"),
            (
                "hbone failed: hbone peer answered 503 Service Unavailable to CONNECT 10.0.0.2:7070",
                "CONNECT",
            ),
            (
                "hbone failed: failed to connect to the hbone peer for 10.0.0.2:80: tls_connect timed out after 10s (--tls-connect-timeout)",
                "TLS_FAILURE",
            ),
            (
                "hbone failed: failed to connect to the hbone peer for 10.0.0.2:80: invalid peer certificate: BadSignature",
                "TLS_FAILURE",
            ),
            (
                "hbone failed: hbone handshake with the peer for 10.0.0.2:80 failed: connection reset",
                "H2_HANDSHAKE_FAILURE",
            ),
            (
                "hbone failed: CONNECT to 10.0.0.2:80 failed: stream no longer needed",
                "H2_HANDSHAKE_FAILURE",
            ),
            (
                "hbone failed: failed to connect to the hbone peer for 10.0.0.2:80: certificate for spiffe://td/ns/a/sa/b is unavailable",
                "IDENTITY_ERROR",
            ),
            (
                "hbone failed: failed to connect to the hbone peer for 10.0.0.2:80: tcp_connect timed out after 10s (--tcp-connect-timeout)",
                "CONNECT",
            ),
        ] {
            assert_eq!(response_flag(outcome), flag, "{outcome}");
        }
    }
}
