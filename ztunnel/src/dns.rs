//! The DNS proxy (Istio ztunnel's `src/dns`): inside each enrolled pod's netns, UDP and
//! TCP on `127.0.0.1:15053` (and `[::1]:15053` for a pod with IPv6) answer A/AAAA for
//! every service hostname the store knows, in the forms a Kubernetes pod asks for them
//! (`<svc>`, `<svc>.<ns>`, `<svc>.<ns>.svc`, `<svc>.<ns>.svc.cluster.local`, and any
//! name with one of the pod's search domains appended); every other query is forwarded,
//! byte for byte, to the upstream resolvers of `--dns-resolv-conf` from inside the pod's
//! netns, and answered SERVFAIL when none answers within `--dns-upstream-timeout`.
//!
//! A service with a hostname of its own and no address has a VIP auto-allocated by the
//! store ([`crate::state::allocate_vips`], as Istio's auto-allocation), answered here and
//! routed like any VIP. Difference from Istio's ztunnel: per-pod counters are in
//! `/config_dump` (`dns`) rather than in extra metric labels.
use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{DNSClass, Name, RData, Record, RecordType, rdata},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::{Registry, Unit},
};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Socket, Type};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
};
use ztunnel_common::{ZTUNNEL_MARK, ports};

use crate::{
    limits::RateLimit,
    netns::{self, Netns},
    proxy::PodNet,
    state::Store,
};

/// The cluster domain service hostnames end in (as [`crate::state::Service::hostname`]).
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// TTL of the answers made here (Istio's `DEFAULT_TTL_SECONDS`).
const TTL: u32 = 30;
/// Where a resolver with no `nameserver` line sends its queries (glibc's default).
const DEFAULT_NAMESERVER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 53);
/// Queries of one pod being answered at once (UDP and TCP together); beyond that a query
/// is answered SERVFAIL at once and counted as a failure.
pub const MAX_INFLIGHT_PER_POD: usize = 256;
/// TCP connections of one pod held at once; beyond that a new one is closed at once.
pub const MAX_TCP_PER_POD: usize = 32;
/// A TCP client connection with no complete query for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// The largest UDP message taken in or forwarded (EDNS's practical maximum).
const MAX_UDP: usize = 4096;
/// A UDP answer without EDNS fits in this (RFC 1035).
const PLAIN_UDP: usize = 512;
/// The longest `--dns-upstream-timeout`.
pub const MAX_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to read resolver config {path}")]
    ResolvConf {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("resolver config {path} line {line}: nameserver {value:?} is not an IP address")]
    Nameserver {
        path: String,
        line: usize,
        value: String,
    },
    #[error("failed to open DNS listener {addr} in {netns}")]
    Listen {
        addr: SocketAddr,
        netns: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Netns(#[from] netns::Error),
}

/// The upstream resolvers a `resolv.conf` names (`nameserver` lines, port 53); glibc's
/// default (127.0.0.1) when it names none or does not exist, as glibc does.
pub fn read_resolv_conf(path: &Path) -> Result<Vec<SocketAddr>, Error> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            tracing::warn!(path = %path.display(), upstream = %DEFAULT_NAMESERVER, "no resolver config: the DNS proxy forwards to the resolver's default, as glibc does");
            String::new()
        }
        Err(source) => {
            return Err(Error::ResolvConf {
                path: path.display().to_string(),
                source,
            });
        }
    };
    parse_resolv_conf(&path.display().to_string(), &text)
}

fn parse_resolv_conf(path: &str, text: &str) -> Result<Vec<SocketAddr>, Error> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let value = words.next().unwrap_or_default();
        // A link-local IPv6 server may carry its interface (`fe80::1%eth0`).
        let ip: IpAddr = value
            .split('%')
            .next()
            .unwrap_or_default()
            .parse()
            .map_err(|_| Error::Nameserver {
                path: path.to_owned(),
                line: i + 1,
                value: value.to_owned(),
            })?;
        out.push(SocketAddr::new(ip, 53));
    }
    if out.is_empty() {
        out.push(DEFAULT_NAMESERVER);
    }
    Ok(out)
}

/// The search domains of a pod in `namespace` (Kubernetes' `ClusterFirst` resolv.conf),
/// most specific first.
pub fn search_domains(namespace: &str) -> [String; 3] {
    [
        format!("{namespace}.svc.{CLUSTER_DOMAIN}"),
        format!("svc.{CLUSTER_DOMAIN}"),
        CLUSTER_DOMAIN.to_owned(),
    ]
}

/// The hostnames a query for `qname` from a pod in `namespace` may mean, in the order
/// they are tried: the name itself, its Kubernetes expansions (`<svc>` →
/// `<svc>.<ns>.svc.<domain>`, `<svc>.<ns>` → `<svc>.<ns>.svc.<domain>`, `<svc>.<ns>.svc`
/// → `+.<domain>`), then the name with each of the pod's search domains taken off (a
/// resolver appends them before asking for the bare name) and that name's expansions.
/// Lowercase, without the trailing dot.
pub fn aliases(namespace: &str, qname: &str) -> Vec<String> {
    let q = qname.trim_end_matches('.').to_ascii_lowercase();
    let mut out = Vec::new();
    let push = |name: String, out: &mut Vec<String>| {
        if !name.is_empty() && !out.contains(&name) {
            out.push(name);
        }
    };
    let expand = |name: &str| -> Option<String> {
        match name.split('.').count() {
            1 => Some(format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}")),
            2 => Some(format!("{name}.svc.{CLUSTER_DOMAIN}")),
            3 if name.ends_with(".svc") => Some(format!("{name}.{CLUSTER_DOMAIN}")),
            _ => None,
        }
    };
    push(q.clone(), &mut out);
    if let Some(e) = expand(&q) {
        push(e, &mut out);
    }
    for domain in search_domains(namespace) {
        if let Some(stripped) = q.strip_suffix(&format!(".{domain}")) {
            push(stripped.to_owned(), &mut out);
            if let Some(e) = expand(stripped) {
                push(e, &mut out);
            }
        }
    }
    out
}

/// Service hostnames and their VIPs, built from one store.
#[derive(Debug, Default)]
pub struct Names {
    hosts: HashMap<String, Vec<IpAddr>>,
}

impl Names {
    /// Every service with at least one VIP, by its hostname (lowercase); two services
    /// with one hostname answer with the VIPs of both.
    pub fn new(store: &Store) -> Self {
        let mut hosts: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for svc in &store.cfg.services {
            if svc.addresses.is_empty() {
                continue;
            }
            let vips = hosts
                .entry(svc.hostname().trim_end_matches('.').to_ascii_lowercase())
                .or_default();
            for a in &svc.addresses {
                if !vips.contains(a) {
                    vips.push(*a);
                }
            }
        }
        Self { hosts }
    }

    /// The hostname a query from a pod in `namespace` names, and its VIPs.
    pub fn resolve(&self, namespace: &str, qname: &str) -> Option<(String, &[IpAddr])> {
        aliases(namespace, qname)
            .into_iter()
            .find_map(|a| self.hosts.get(&a).map(|v| (a, v.as_slice())))
    }
}

/// Istio's DNS metric families (istio/ztunnel `src/dns/metrics.rs`), same names and labels.
#[derive(Debug)]
pub struct Metrics {
    requests: Family<DnsLabels, Counter>,
    upstream_requests: Family<DnsLabels, Counter>,
    upstream_failures: Family<DnsLabels, Counter>,
    upstream_duration: Family<DnsLabels, Histogram>,
}

#[derive(Clone, Hash, Debug, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    request_query_type: String,
    request_protocol: String,
    source_canonical_service: String,
    source_canonical_revision: String,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let requests = Family::default();
        registry.register(
            "istio_dns_requests",
            "Total number of DNS requests (unstable)",
            requests.clone(),
        );
        let upstream_requests = Family::default();
        registry.register(
            "istio_dns_upstream_requests",
            "Total number of DNS requests forwarded to upstream (unstable)",
            upstream_requests.clone(),
        );
        let upstream_failures = Family::default();
        registry.register(
            "istio_dns_upstream_failures",
            "Total number of DNS requests that failed to forward upstream (unstable)",
            upstream_failures.clone(),
        );
        let upstream_duration = Family::<DnsLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.0005f64, 0.001, 0.01, 0.1, 1.0, 5.0])
        });
        registry.register_with_unit(
            "istio_dns_upstream_request_duration",
            "Total time in seconds Istio takes to get DNS response from upstream (unstable)",
            Unit::Seconds,
            upstream_duration.clone(),
        );
        Self {
            requests,
            upstream_requests,
            upstream_failures,
            upstream_duration,
        }
    }
}

/// One pod's counters, for `/config_dump`.
#[derive(Debug, Default)]
pub struct PodStats {
    queries: AtomicU64,
    answered_locally: AtomicU64,
    forwarded: AtomicU64,
    failures: AtomicU64,
}

/// One pod's counters as `/config_dump` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatsDump {
    pub queries: u64,
    pub answered_locally: u64,
    pub forwarded: u64,
    /// Queries answered SERVFAIL: no upstream answered in time, or too many in flight.
    pub failures: u64,
}

/// The `/config_dump` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsDump {
    /// `--dns-capture`: whether enrolled pods get a DNS proxy.
    pub enabled: bool,
    pub upstreams: Vec<SocketAddr>,
    pub upstream_timeout_ms: u64,
    /// By pod (`namespace/name`).
    pub pods: BTreeMap<String, PodStatsDump>,
}

/// The DNS proxy of every enrolled pod.
pub struct Dns {
    home: Netns,
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    metrics: Arc<crate::metrics::Metrics>,
    /// The names of the last store seen, rebuilt when the store changes.
    names: Mutex<Option<(Arc<Store>, Arc<Names>)>>,
    pods: Mutex<BTreeMap<String, Weak<PodStats>>>,
    /// Upstream failures are logged at most once per [`crate::limits::LOG_EVERY`].
    fail_log: Mutex<RateLimit>,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns")
            .field("upstreams", &self.upstreams)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// What a pod's DNS tasks share.
struct PodCtx {
    dns: Arc<Dns>,
    pod: Arc<PodNet>,
    namespace: String,
    store: Arc<dyn Fn() -> Arc<Store> + Send + Sync>,
    stats: Arc<PodStats>,
    inflight: Arc<Semaphore>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Udp,
    Tcp,
}

impl Proto {
    fn label(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        }
    }
}

impl Dns {
    /// Call from ztunnel's own netns (the one the pods' sockets return to).
    pub fn new(
        upstreams: Vec<SocketAddr>,
        timeout: Duration,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Arc<Self>, Error> {
        Ok(Arc::new(Self {
            home: Netns::current()?,
            upstreams,
            timeout,
            metrics,
            names: Mutex::default(),
            pods: Mutex::default(),
            fail_log: Mutex::new(RateLimit::new(crate::limits::LOG_EVERY)),
        }))
    }

    pub fn dump(&self) -> DnsDump {
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        DnsDump {
            enabled: true,
            upstreams: self.upstreams.clone(),
            upstream_timeout_ms: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
            pods: pods
                .iter()
                .filter_map(|(k, s)| {
                    let s = s.upgrade()?;
                    Some((
                        k.clone(),
                        PodStatsDump {
                            queries: s.queries.load(Ordering::Relaxed),
                            answered_locally: s.answered_locally.load(Ordering::Relaxed),
                            forwarded: s.forwarded.load(Ordering::Relaxed),
                            failures: s.failures.load(Ordering::Relaxed),
                        },
                    ))
                })
                .collect(),
        }
    }

    fn names(&self, store: Arc<Store>) -> Arc<Names> {
        let mut cached = self.names.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, names)) = cached.as_ref()
            && Arc::ptr_eq(s, &store)
        {
            return names.clone();
        }
        let names = Arc::new(Names::new(&store));
        *cached = Some((store, names.clone()));
        names
    }

    /// The addresses a pod's DNS listeners are bound to.
    pub fn listen_addrs(v6: bool) -> Vec<SocketAddr> {
        let mut out = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, ports::DNS))];
        if v6 {
            out.push(SocketAddr::from((Ipv6Addr::LOCALHOST, ports::DNS)));
        }
        out
    }

    /// Opens the pod's DNS listeners (UDP and TCP on each of [`Self::listen_addrs`]) in its
    /// netns and spawns their loops; `store` gives the current store. The sockets carry
    /// `SO_REUSEPORT`: a successor ztunnel opens its own next to them during an upgrade,
    /// and the pod's queries are answered by one or the other throughout.
    pub fn start_pod(
        self: &Arc<Self>,
        pod: Arc<PodNet>,
        store: Arc<dyn Fn() -> Arc<Store> + Send + Sync>,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, Error> {
        let stats = Arc::new(PodStats::default());
        {
            let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
            pods.retain(|_, s| s.strong_count() > 0);
            pods.insert(pod.name.clone(), Arc::downgrade(&stats));
        }
        let namespace = pod
            .name
            .split_once('/')
            .map_or(pod.name.as_str(), |(ns, _)| ns)
            .to_owned();
        let ctx = Arc::new(PodCtx {
            dns: self.clone(),
            pod: pod.clone(),
            namespace,
            store,
            stats,
            inflight: Arc::new(Semaphore::new(MAX_INFLIGHT_PER_POD)),
        });
        let mut sockets = Vec::new();
        for addr in Self::listen_addrs(pod.addrs.iter().any(IpAddr::is_ipv6)) {
            let err = |source| Error::Listen {
                addr,
                netns: pod.netns.path().display().to_string(),
                source,
            };
            let (udp, tcp) = pod
                .netns
                .run(&self.home, || -> io::Result<(Socket, Socket)> {
                    let open = |ty: Type| -> io::Result<Socket> {
                        let s = Socket::new(Domain::for_address(addr), ty, None)?;
                        if addr.is_ipv6() {
                            s.set_only_v6(true)?;
                        }
                        s.set_reuse_address(true)?;
                        s.set_reuse_port(true)?;
                        s.set_nonblocking(true)?;
                        s.bind(&addr.into())?;
                        Ok(s)
                    };
                    let udp = open(Type::DGRAM)?;
                    let tcp = open(Type::STREAM)?;
                    tcp.listen(128)?;
                    Ok((udp, tcp))
                })?
                .map_err(err)?;
            let udp = UdpSocket::from_std(udp.into()).map_err(err)?;
            let tcp = TcpListener::from_std(tcp.into()).map_err(err)?;
            sockets.push((udp, tcp));
        }
        let mut tasks = Vec::new();
        for (udp, tcp) in sockets {
            tasks.push(tokio::spawn(serve_udp(ctx.clone(), Arc::new(udp))));
            tasks.push(tokio::spawn(serve_tcp(ctx.clone(), tcp)));
        }
        Ok(tasks)
    }

    fn log_failure(&self, pod: &str, name: &str, why: &str) {
        let allowed = self
            .fail_log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allow(Instant::now());
        if let Some(suppressed) = allowed {
            tracing::warn!(
                pod,
                name,
                reason = why,
                suppressed,
                "DNS query answered SERVFAIL"
            );
        }
    }
}

async fn serve_udp(ctx: Arc<PodCtx>, sock: Arc<UdpSocket>) {
    let mut buf = vec![0u8; MAX_UDP];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // A UDP socket's errors are per datagram (an ICMP error of an earlier
                // send): nothing to back off from, but never spin.
                tracing::debug!(pod = %ctx.pod.name, error = %e, "DNS recv failed");
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        let query = buf[..n].to_vec();
        let Ok(permit) = ctx.inflight.clone().try_acquire_owned() else {
            if let Some(resp) = ctx.overloaded(&query) {
                let _ = sock.send_to(&resp, peer).await;
            }
            continue;
        };
        let (ctx, sock) = (ctx.clone(), sock.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(resp) = ctx.handle(&query, Proto::Udp).await
                && let Err(e) = sock.send_to(&resp, peer).await
            {
                tracing::debug!(pod = %ctx.pod.name, %peer, error = %e, "DNS answer not sent");
            }
        });
    }
}

async fn serve_tcp(ctx: Arc<PodCtx>, listener: TcpListener) {
    let conns = Arc::new(Semaphore::new(MAX_TCP_PER_POD));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!(pod = %ctx.pod.name, error = %e, "DNS accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // At the cap the connection is closed at once: the client retries, over UDP or later.
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            tcp_conn(ctx, stream).await;
        });
    }
}

/// Reads length-prefixed queries (RFC 7766) one after the other and answers each.
async fn tcp_conn(ctx: Arc<PodCtx>, mut stream: TcpStream) {
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let resp = match ctx.inflight.clone().try_acquire_owned() {
            Ok(_permit) => ctx.handle(&query, Proto::Tcp).await,
            Err(_) => ctx.overloaded(&query),
        };
        let Some(resp) = resp else { return };
        let Ok(n) = u16::try_from(resp.len()) else {
            return;
        };
        let mut out = Vec::with_capacity(resp.len() + 2);
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(&resp);
        if stream.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// A SERVFAIL (or FORMERR, `code`) answer to `req`, echoing its question.
fn error_answer(req: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut m = Message::error_msg(req.metadata.id, req.metadata.op_code, code);
    m.metadata.recursion_desired = req.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_queries(req.queries.iter().cloned());
    m.to_vec().ok()
}

/// FORMERR for bytes that are not a DNS query but carry a header (its id), else nothing.
fn format_error(query: &[u8]) -> Option<Vec<u8>> {
    let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
    if query.len() < 12 {
        return None;
    }
    Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
        .to_vec()
        .ok()
}

impl PodCtx {
    fn labels(&self, req: &Message, proto: Proto) -> DnsLabels {
        let store = (self.store)();
        let w = store.workload(&self.pod.name);
        DnsLabels {
            request_query_type: req
                .queries
                .first()
                .map_or_else(|| "unknown".to_owned(), |q| q.query_type.to_string())
                .to_ascii_lowercase(),
            request_protocol: proto.label().to_owned(),
            source_canonical_service: w.map_or_else(
                || crate::metrics::UNKNOWN.to_owned(),
                |w| w.canonical_name(),
            ),
            source_canonical_revision: w.map_or_else(
                || crate::metrics::UNKNOWN.to_owned(),
                |w| w.canonical_revision(),
            ),
        }
    }

    fn overloaded(&self, query: &[u8]) -> Option<Vec<u8>> {
        self.stats.queries.fetch_add(1, Ordering::Relaxed);
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        let req = Message::from_vec(query).ok()?;
        self.dns
            .log_failure(&self.pod.name, &qname(&req), "too many queries in flight");
        error_answer(&req, ResponseCode::ServFail)
    }

    /// The answer to one query: made here for a service hostname, else the upstream's.
    async fn handle(&self, query: &[u8], proto: Proto) -> Option<Vec<u8>> {
        self.stats.queries.fetch_add(1, Ordering::Relaxed);
        let Ok(req) = Message::from_vec(query) else {
            self.stats.answered_locally.fetch_add(1, Ordering::Relaxed);
            return format_error(query);
        };
        let labels = self.labels(&req, proto);
        self.dns.metrics.dns.requests.get_or_create(&labels).inc();
        if req.metadata.message_type != MessageType::Query {
            return None;
        }
        if let Some(answer) = self.local_answer(&req, proto) {
            self.stats.answered_locally.fetch_add(1, Ordering::Relaxed);
            return Some(answer);
        }
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        let m = &self.dns.metrics.dns;
        m.upstream_requests.get_or_create(&labels).inc();
        let started = Instant::now();
        match self.forward(query, req.metadata.id, proto).await {
            Ok(answer) => {
                m.upstream_duration
                    .get_or_create(&labels)
                    .observe(started.elapsed().as_secs_f64());
                Some(answer)
            }
            Err(why) => {
                m.upstream_failures.get_or_create(&labels).inc();
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                self.dns.log_failure(&self.pod.name, &qname(&req), &why);
                error_answer(&req, ResponseCode::ServFail)
            }
        }
    }

    /// The answer for a standard query of one question naming a service hostname (any
    /// record type: a type other than A/AAAA, or a family the service has no VIP of,
    /// gets no records and NOERROR, as the name exists).
    fn local_answer(&self, req: &Message, proto: Proto) -> Option<Vec<u8>> {
        if req.metadata.op_code != OpCode::Query || req.queries.len() != 1 {
            return None;
        }
        let q = req.queries.first()?;
        if q.query_class != DNSClass::IN {
            return None;
        }
        let names = self.dns.names((self.store)());
        let (host, vips) = names.resolve(&self.namespace, &q.name.to_ascii())?;
        let mut m = Message::response(req.metadata.id, OpCode::Query);
        m.metadata.recursion_desired = req.metadata.recursion_desired;
        m.metadata.recursion_available = true;
        m.metadata.authoritative = true;
        m.add_query(q.clone());
        // A name found as another (search domain taken off, or expanded) is an alias of it.
        let mut owner = q.name.clone();
        let asked = q.name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
        if asked != host {
            let mut target = Name::from_ascii(&host).ok()?;
            target.set_fqdn(true);
            m.add_answer(Record::from_rdata(
                owner,
                TTL,
                RData::CNAME(rdata::CNAME(target.clone())),
            ));
            owner = target;
        }
        for ip in vips {
            let rdata = match (q.query_type, ip) {
                (RecordType::A, IpAddr::V4(v4)) => RData::A(rdata::A(*v4)),
                (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(rdata::AAAA(*v6)),
                _ => continue,
            };
            m.add_answer(Record::from_rdata(owner.clone(), TTL, rdata));
        }
        let limit = match &req.edns {
            Some(edns) => {
                let mut e = hickory_proto::op::Edns::new();
                e.set_max_payload(edns.max_payload().max(PLAIN_UDP as u16));
                m.set_edns(e);
                usize::from(edns.max_payload()).max(PLAIN_UDP)
            }
            None => PLAIN_UDP,
        };
        let bytes = m.to_vec().ok()?;
        if proto == Proto::Udp && bytes.len() > limit {
            // Too big for the client's UDP buffer: TC, and it asks again over TCP.
            return m.truncate().to_vec().ok();
        }
        Some(bytes)
    }

    /// The first upstream answer to `query`, over the protocol it came on, sent from the
    /// pod's netns; the upstreams are tried in order, each with an equal share of what is
    /// left of the timeout.
    async fn forward(&self, query: &[u8], id: u16, proto: Proto) -> Result<Vec<u8>, String> {
        let deadline = Instant::now() + self.dns.timeout;
        let mut last = String::from("no upstream");
        let n = self.dns.upstreams.len();
        for (i, upstream) in self.dns.upstreams.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            let share = left / u32::try_from(n - i).unwrap_or(1);
            if share.is_zero() {
                break;
            }
            let attempt = async {
                match proto {
                    Proto::Udp => self.forward_udp(query, id, *upstream).await,
                    Proto::Tcp => self.forward_tcp(query, *upstream).await,
                }
            };
            match tokio::time::timeout(share, attempt).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(e)) => last = format!("upstream {upstream}: {e}"),
                Err(_) => {
                    last = format!(
                        "upstream {upstream}: no answer within {}",
                        humantime::format_duration(share)
                    )
                }
            }
        }
        Err(last)
    }

    /// A socket of `ty` for `upstream` inside the pod's netns, with ztunnel's mark (never
    /// captured).
    fn upstream_socket(&self, upstream: SocketAddr, ty: Type) -> io::Result<Socket> {
        self.pod
            .netns
            .run(&self.dns.home, || -> io::Result<Socket> {
                let s = Socket::new(Domain::for_address(upstream), ty, None)?;
                s.set_mark(ZTUNNEL_MARK)?;
                s.set_nonblocking(true)?;
                Ok(s)
            })
            .map_err(io::Error::other)?
    }

    async fn forward_udp(
        &self,
        query: &[u8],
        id: u16,
        upstream: SocketAddr,
    ) -> io::Result<Vec<u8>> {
        let s = self.upstream_socket(upstream, Type::DGRAM)?;
        let s = UdpSocket::from_std(s.into())?;
        s.connect(upstream).await?;
        s.send(query).await?;
        let mut buf = vec![0u8; MAX_UDP];
        loop {
            let n = s.recv(&mut buf).await?;
            // Only the answer to this query (a stray datagram does not end the wait).
            if n >= 12 && u16::from_be_bytes([buf[0], buf[1]]) == id {
                buf.truncate(n);
                return Ok(buf);
            }
        }
    }

    async fn forward_tcp(&self, query: &[u8], upstream: SocketAddr) -> io::Result<Vec<u8>> {
        let s = self.upstream_socket(upstream, Type::STREAM)?;
        let mut s = tokio::net::TcpSocket::from_std_stream(s.into())
            .connect(upstream)
            .await?;
        let len = u16::try_from(query.len()).map_err(io::Error::other)?;
        let mut out = Vec::with_capacity(query.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(query);
        s.write_all(&out).await?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await?;
        let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut answer).await?;
        Ok(answer)
    }
}

fn qname(req: &Message) -> String {
    req.queries
        .first()
        .map(|q| q.name.to_ascii())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{LocalConfig, Service};

    fn store(services: Vec<Service>) -> Store {
        Store::new(LocalConfig {
            services,
            ..LocalConfig::default()
        })
    }

    /// A service on port 80 (the state tests' fixture; DNS reads only its names and VIPs).
    fn service(name: &str, ns: &str, hostname: Option<&str>, vips: &[&str]) -> Service {
        crate::state::tests::svc(name, ns, hostname, vips)
    }

    fn ips(v: &[&str]) -> Vec<IpAddr> {
        v.iter().map(|v| v.parse().expect("ip")).collect()
    }

    #[test]
    fn every_form_a_pod_asks_for_names_the_service() {
        let names = Names::new(&store(vec![
            service("web", "shop", None, &["10.96.0.10", "fd00::10"]),
            service("db", "data", None, &["10.96.0.20"]),
        ]));
        let full = "web.shop.svc.cluster.local";
        for q in [
            "web",
            "web.shop",
            "web.shop.svc",
            "web.shop.svc.cluster.local",
            "web.shop.svc.cluster.local.",
            "WEB.Shop.SVC.cluster.LOCAL.",
            // A resolver appends the search domains before asking for the name as is.
            "web.shop.shop.svc.cluster.local",
            "web.shop.svc.cluster.local",
            "web.shop.svc.svc.cluster.local",
            "web.shop.svc.cluster.local.cluster.local",
        ] {
            let (host, vips) = names.resolve("shop", q).unwrap_or_else(|| panic!("{q}"));
            assert_eq!(host, full, "{q}");
            assert_eq!(vips, ips(&["10.96.0.10", "fd00::10"]), "{q}");
        }
        // The short name means the service of the asking pod's namespace only.
        assert!(names.resolve("data", "web").is_none());
        assert!(
            names
                .resolve("data", "web.data.svc.cluster.local")
                .is_none()
        );
        assert_eq!(
            names.resolve("shop", "db.data").map(|(h, _)| h).as_deref(),
            Some("db.data.svc.cluster.local")
        );
        // Other namespaces' search domains are not the pod's.
        assert!(
            names
                .resolve("shop", "db.other.svc.cluster.local")
                .is_none()
        );
    }

    #[test]
    fn names_that_are_not_services_are_not_matched() {
        let names = Names::new(&store(vec![service("web", "shop", None, &["10.96.0.10"])]));
        for q in [
            "example.com",
            "web.example.com",
            "web.shop.svc.cluster",
            "eb.shop.svc.cluster.local",
            "xweb.shop.svc.cluster.local",
            "web.shop.svc.cluster.local.example.com",
            "",
            ".",
        ] {
            assert!(names.resolve("shop", q).is_none(), "{q:?} matched");
        }
    }

    #[test]
    fn hostname_services_match_by_their_hostname_and_with_search_domains_appended() {
        let names = Names::new(&store(vec![
            service("ext", "shop", Some("api.example.com"), &["240.240.0.1"]),
            // Hostname only: its VIP is auto-allocated by the store.
            service("bare", "shop", Some("bare.example.com"), &[]),
            // A headless Kubernetes service: no VIP, nothing to answer (forwarded).
            service("headless", "shop", None, &[]),
        ]));
        for q in [
            "api.example.com",
            "api.example.com.shop.svc.cluster.local",
            "api.example.com.svc.cluster.local",
            "api.example.com.cluster.local",
        ] {
            let (host, vips) = names.resolve("shop", q).unwrap_or_else(|| panic!("{q}"));
            assert_eq!(host, "api.example.com");
            assert_eq!(vips, ips(&["240.240.0.1"]));
        }
        let (_, bare) = names.resolve("shop", "bare.example.com").expect("auto VIP");
        assert!(
            matches!(bare, [IpAddr::V4(v)] if v.octets()[..2] == crate::state::AUTO_VIP_PREFIX),
            "{bare:?}"
        );
        assert!(names.resolve("shop", "headless").is_none());
        assert!(
            names
                .resolve("shop", "api.example.com.other.svc.cluster.local")
                .is_none()
        );
    }

    #[test]
    fn services_sharing_a_hostname_answer_with_every_vip_once() {
        let names = Names::new(&store(vec![
            service(
                "a",
                "x",
                Some("shared.example.com"),
                &["240.0.0.1", "240.0.0.2"],
            ),
            service(
                "b",
                "y",
                Some("Shared.Example.com"),
                &["240.0.0.2", "240.0.0.3"],
            ),
        ]));
        let (_, vips) = names.resolve("x", "shared.example.com").expect("found");
        assert_eq!(vips, ips(&["240.0.0.1", "240.0.0.2", "240.0.0.3"]));
    }

    #[test]
    fn aliases_expand_then_strip_the_pods_search_domains() {
        assert_eq!(
            aliases("ns", "a"),
            ["a", "a.ns.svc.cluster.local"].map(str::to_owned)
        );
        assert_eq!(
            aliases("ns", "a.b.ns.svc.cluster.local."),
            [
                "a.b.ns.svc.cluster.local",
                "a.b",
                "a.b.svc.cluster.local",
                "a.b.ns",
                "a.b.ns.svc",
            ]
            .map(str::to_owned)
        );
        assert_eq!(
            aliases("ns", "a.b.svc"),
            ["a.b.svc", "a.b.svc.cluster.local"].map(str::to_owned)
        );
    }

    #[test]
    fn resolv_conf_nameservers_in_order_and_glibcs_default_without_any() {
        let text = "# comment\nsearch a.svc.cluster.local svc.cluster.local\nnameserver 10.0.0.10\n\
                    options ndots:5\nnameserver fe80::1%eth0\nnameserver   2001:db8::53\n";
        assert_eq!(
            parse_resolv_conf("r", text).expect("valid"),
            vec![
                "10.0.0.10:53".parse::<SocketAddr>().expect("addr"),
                "[fe80::1]:53".parse().expect("addr"),
                "[2001:db8::53]:53".parse().expect("addr"),
            ]
        );
        assert_eq!(
            parse_resolv_conf("r", "search x\n").expect("valid"),
            vec![DEFAULT_NAMESERVER]
        );
        let err = parse_resolv_conf(
            "/etc/resolv.conf",
            "nameserver 10.0.0.10\nnameserver kube-dns\n",
        )
        .expect_err("not an address");
        assert_eq!(
            err.to_string(),
            "resolver config /etc/resolv.conf line 2: nameserver \"kube-dns\" is not an IP address"
        );
    }
}
