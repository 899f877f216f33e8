//! `ztunnel waypoint`: the L7 proxy that services and workloads naming a waypoint send
//! their traffic through (issue 17). The same binary as the node proxy, run as the
//! waypoint's own pod, configured by the same workload file.
//!
//! - **In**: HBONE on :15008 with the waypoint's SPIFFE identity (from the built-in CA,
//!   like the nodes' ztunnels). Each CONNECT names the destination as the client's
//!   ztunnel saw it — a service VIP:port or a workload address:port — never the
//!   waypoint's own address, so the server takes any IP authority
//!   ([`hbone::ServerSettings::authority_is_local`] off).
//! - **L4 or HTTP**, by the destination port's protocol ([`PortProtocol`]): Kubernetes'
//!   `appProtocol`, else the port's name (Istio's protocol selection). An HTTP stream is
//!   served by hyper (HTTP/1.1 or HTTP/2, detected), request by request; anything else is
//!   relayed as bytes.
//! - **Per request** ([`http`]): L7 authorization ([`authz`]; a denial is 403 `RBAC:
//!   access denied`, as Istio's waypoint answers), then the HTTPRoute ([`route`]) picks
//!   the backend service (else the destination service itself), then one of its endpoints
//!   in turn, and the request goes on over HBONE with the waypoint's identity (plain TCP
//!   to an endpoint outside the mesh), connections pooled per endpoint.
//! - **Telemetry**: Istio's HTTP metrics with `reporter="waypoint"` on :15020, an access
//!   log line per request.
//!
//! The waypoint's own outbound never goes through a waypoint: [`state::Store::route`] is
//! asked on behalf of the waypoint's own pod, which skips it.
pub mod authz;
mod http;
mod metrics;
pub mod route;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::hbone::{self, Accepted, ConnectRequest, Rejection, Target, TargetAddr};
use crate::identity::{BuiltinCa, Identity, WorkloadCertificate};
use crate::state::{self, LocalConfig, Route, Store};
use crate::tls;

pub use metrics::Metrics;

/// `ztunnel waypoint`'s options. The Gateway's namespace is also the pod's, as
/// `istioctl waypoint apply` deploys it.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Where workloads, services, routes and policies come from: the workload file, or
    /// the Kubernetes API (Gateways, HTTPRoutes, AuthorizationPolicies with `targetRefs`).
    #[arg(long, env = "ZTUNNEL_SOURCE", value_enum, default_value = "file")]
    pub source: crate::config::Source,
    /// The workload file (the nodes' ztunnels read the same one); with `--source file`.
    #[arg(long, env = "ZTUNNEL_WORKLOADS")]
    pub workloads: Option<PathBuf>,
    /// With `--source kube`: the Secret (`namespace/name`) holding the built-in CA's
    /// root, shared with the nodes' ztunnels.
    #[arg(long, env = "ZTUNNEL_CA_SECRET")]
    pub ca_secret: Option<String>,
    /// The waypoint's Gateway (`istio-waypoint` class): its name.
    #[arg(long, env = "GATEWAY_NAME")]
    pub gateway: String,
    /// The waypoint pod's namespace (also the Gateway's).
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// The waypoint pod's name: its entry in the workload file, whose own traffic skips
    /// the waypoint.
    #[arg(long, env = "POD_NAME")]
    pub pod: String,
    /// The waypoint's service account: its identity is
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    #[arg(long, env = "SERVICE_ACCOUNT")]
    pub service_account: String,
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// With `--source file`: the built-in CA's directory, shared with the nodes' ztunnels.
    #[arg(long, env = "ZTUNNEL_CA_DIR", default_value = "/var/lib/ztunnel/ca")]
    pub ca_dir: PathBuf,
    #[arg(long, env = "ZTUNNEL_CERT_LIFETIME", default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_lifetime: Duration,
    /// Where HBONE is served.
    #[arg(long, env = "WAYPOINT_HBONE_ADDR", default_value = "[::]:15008")]
    pub hbone_addr: SocketAddr,
    #[arg(long, env = "ZTUNNEL_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    #[arg(long, env = "ZTUNNEL_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: crate::config::LogFormat,
    /// HBONE connections open at once; one more is closed at once (and counted).
    #[arg(long, env = "WAYPOINT_MAX_CONNECTIONS", default_value_t = 16384)]
    pub max_connections: usize,
    /// On SIGTERM, how long open connections may run before they are closed (the pod's
    /// termination grace period, 30 s in deploy/waypoint, less a margin).
    #[arg(long, env = "WAYPOINT_DRAIN_TIMEOUT", default_value = "25s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// How long an upstream (the HBONE dial, or a TCP connect outside the mesh) may take.
    #[arg(long, env = "ZTUNNEL_HBONE_DIAL_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
}

/// How a destination port is served: Istio's protocol selection (`appProtocol`, else the
/// port name's prefix up to the first `-`), for what a waypoint does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortProtocol {
    /// HTTP/1.1 to the backend (`http`).
    Http1,
    /// HTTP/2 to the backend (`http2`, `grpc`, `grpc-web`, `kubernetes.io/h2c`).
    Http2,
    /// Bytes, relayed (`tcp`, anything else, or no port information).
    Tcp,
}

impl PortProtocol {
    /// Istio's `protocol.Parse` on `appProtocol` (case-insensitive), else on the port
    /// name's part before the first `-`.
    pub fn of(port: &state::ServicePort) -> Self {
        let by = |p: &str| match p.to_ascii_lowercase().as_str() {
            "http" => Some(PortProtocol::Http1),
            "http2" | "grpc" | "grpc-web" | "kubernetes.io/h2c" => Some(PortProtocol::Http2),
            "tcp" | "tls" | "https" | "mongo" | "redis" | "mysql" | "udp" => {
                Some(PortProtocol::Tcp)
            }
            _ => None,
        };
        port.app_protocol
            .as_deref()
            .and_then(by)
            .or_else(|| {
                let name = port.name.as_deref()?;
                by(name.split('-').next().unwrap_or(name))
            })
            .unwrap_or(PortProtocol::Tcp)
    }

    pub fn is_http(self) -> bool {
        self != PortProtocol::Tcp
    }
}

/// One config version with what the waypoint derives from it.
struct Snapshot {
    store: Store,
    policies: authz::PolicyIndex,
    routes: route::RouteTable,
}

impl Snapshot {
    fn new(cfg: LocalConfig) -> Self {
        let policies = authz::PolicyIndex::new(&cfg.waypoint_policies, &cfg.root_namespace);

        let routes = route::RouteTable::new(&cfg.http_routes);
        Snapshot {
            store: Store::new(cfg),
            policies,
            routes,
        }
    }
}

/// Where an onward HBONE connection goes and whom it must reach: the pool's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Hop {
    next_hop: SocketAddr,
    identities: Vec<Identity>,
}

type HboneIo = tokio_rustls::client::TlsStream<tls::Transport>;
type DialFuture = Pin<Box<dyn Future<Output = io::Result<HboneIo>> + Send>>;
type Dialer = Box<dyn Fn(&Hop) -> DialFuture + Send + Sync>;

/// The running waypoint.
pub struct Waypoint {
    gateway: authz::ObjectRef,
    /// `namespace/name` of the waypoint's pod in the workload file.
    own_key: String,
    identity: Identity,
    creds: RwLock<Arc<Credentials>>,
    /// Onward dials' TLS client configs, per certificate and expected identities.
    client_configs: tls::ClientConfigs,
    snapshot: RwLock<Arc<Snapshot>>,
    pool: hbone::Pool<Hop, Dialer>,
    clients: http::Clients,
    metrics: Arc<Metrics>,
    connect_timeout: Duration,
    /// `true` once the waypoint drains: HBONE connections send GOAWAY, HTTP connections
    /// close after their request in flight.
    drain: watch::Sender<bool>,
}

/// The waypoint's certificate and the TLS server config built from it once (not per
/// connection); replaced together at renewal.
struct Credentials {
    cert: Arc<WorkloadCertificate>,
    server: Arc<rustls::ServerConfig>,
}

impl Credentials {
    fn new(cert: WorkloadCertificate) -> anyhow::Result<Self> {
        let server = tls::server_config(&cert)
            .with_context(|| format!("no TLS server config for {}", cert.identity))?;
        Ok(Credentials {
            cert: Arc::new(cert),
            server,
        })
    }
}

/// What the waypoint knows of the client of one HBONE connection.
#[derive(Debug, Clone)]
struct Peer {
    identity: Option<Identity>,
    addr: SocketAddr,
}

/// The stream's destination as the waypoint resolved it.
#[derive(Debug, Clone)]
struct Destination {
    /// As the client's ztunnel sent it (the `:authority`).
    addr: SocketAddr,
    /// The service behind the VIP, if the client dialled one.
    service: Option<authz::ObjectRef>,
    protocol: PortProtocol,
}

impl Waypoint {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn creds(&self) -> Arc<Credentials> {
        self.creds.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Dials an onward HBONE connection: TCP to the next hop, then mTLS as the waypoint,
    /// accepting only the expected identities.
    async fn dial(&self, hop: &Hop) -> io::Result<HboneIo> {
        let config = self
            .client_configs
            .get(&self.creds().cert, &hop.identities)
            .map_err(io::Error::other)?;
        let dial = async {
            let tcp = TcpStream::connect(hop.next_hop).await?;
            tcp.set_nodelay(true)?;
            let mut tls = tokio_rustls::TlsConnector::from(config)
                .connect(tls::server_name(hop.next_hop.ip()), tls::transport(tcp))
                .await?;
            tls.get_mut().0.authenticated();
            Ok(tls)
        };
        tokio::time::timeout(self.connect_timeout, dial)
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "connecting to {} took longer than {:?}",
                        hop.next_hop, self.connect_timeout
                    ),
                )
            })?
    }

    /// Where the waypoint sends traffic for `dst`: as its own pod would, which skips its
    /// waypoint. A route that still goes through a waypoint means the waypoint's own pod
    /// is not in the config (a wrong `--pod`) — or a backend names another waypoint: it
    /// is refused, never sent back through a waypoint (a loop through itself).
    fn onward_route(&self, store: &Store, dst: SocketAddr) -> Route {
        match store.route(Some(&self.own_key), dst) {
            Route::Hbone {
                waypoint: Some(wp), ..
            } => Route::NoWaypoint {
                target: dst.to_string(),
                waypoint: format!(
                    "{wp}: not through a waypoint again (is this waypoint's pod {} in the config?)",
                    self.own_key
                ),
            },
            route => route,
        }
    }

    /// Opens the path to `endpoint` (a workload's address and target port) as the
    /// waypoint's own pod would: an HBONE tunnel to a mesh workload, plain TCP to one
    /// outside the mesh.
    async fn connect_upstream(
        &self,
        endpoint: SocketAddr,
        forwarded_for: SocketAddr,
    ) -> Result<Upstream, UpstreamError> {
        let route = self.onward_route(&self.snapshot().store, endpoint);
        match route {
            Route::Hbone {
                endpoint,
                next_hop,
                identities,
                ..
            } => {
                let identities = identities
                    .iter()
                    .filter_map(|i| i.parse().ok())
                    .collect::<Vec<Identity>>();
                let hop = Hop {
                    next_hop,
                    identities,
                };
                let req = ConnectRequest::new(endpoint.to_string(), forwarded_for);
                let stream = self
                    .pool
                    .connect(&hop, req)
                    .await
                    .map_err(|e| UpstreamError::Connect(error_chain(&e)))?;
                Ok(Upstream::Hbone(Box::new(stream)))
            }
            Route::Passthrough { dst } => {
                let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(dst))
                    .await
                    .map_err(|_| {
                        UpstreamError::Connect(format!(
                            "connecting to {dst} took longer than {:?}",
                            self.connect_timeout
                        ))
                    })?
                    .map_err(|e| UpstreamError::Connect(format!("connecting to {dst}: {e}")))?;
                let _ = tcp.set_nodelay(true);
                Ok(Upstream::Tcp(tcp))
            }
            Route::NoWaypoint { target, waypoint } => Err(UpstreamError::NoRoute(format!(
                "waypoint {waypoint} of {target} not found"
            ))),
            Route::NoEndpoint { service, port } => Err(UpstreamError::NoRoute(format!(
                "service {service} has no endpoint for port {port}"
            ))),
        }
    }

    /// Resolves a CONNECT's destination: a service VIP (its port must exist) or a
    /// workload's address. Anything else is not behind this waypoint: 503, as a ztunnel
    /// answers an unknown destination.
    fn destination(&self, target: &Target) -> Result<Destination, Rejection> {
        let TargetAddr::Ip(addr) = &target.addr else {
            // Istio's ztunnel sends hostname authorities only through an east-west
            // gateway (double HBONE), which is not built here.
            return Err(Rejection::bad_request(format!(
                "authority {} is not an address; this waypoint serves service VIPs and workload addresses",
                target.addr
            )));
        };
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        let snap = self.snapshot();
        let store = &snap.store;
        if let Some(i) = store.service_by_vip(addr.ip()) {
            let svc = &store.cfg.services[i];
            let port = svc
                .ports
                .iter()
                .find(|p| p.port == addr.port())
                .ok_or_else(|| {
                    Rejection::unavailable(format!(
                        "service {} has no port {}",
                        svc.key(),
                        addr.port()
                    ))
                })?;
            return Ok(Destination {
                addr,
                service: Some(authz::ObjectRef {
                    namespace: svc.namespace.clone(),
                    name: svc.name.clone(),
                }),
                protocol: PortProtocol::of(port),
            });
        }
        if store.workload_by_addr(addr.ip()).is_some() {
            // A workload dialled by address: its port's protocol is not known (no service
            // port describes it), so it is relayed as bytes.
            return Ok(Destination {
                addr,
                service: None,
                protocol: PortProtocol::Tcp,
            });
        }
        Err(Rejection::unavailable(format!(
            "{addr} is neither a service VIP nor a workload address"
        )))
    }

    /// Decides one CONNECT stream: HTTP streams are handed to the HTTP server through an
    /// in-memory pipe; TCP ones are authorized as a connection and relayed to an
    /// endpoint.
    async fn open(
        self: Arc<Self>,
        target: Target,
        peer: Peer,
    ) -> Result<Accepted<Downstream>, Rejection> {
        let dst = self.destination(&target)?;
        let client = target.forwarded_for.unwrap_or(peer.addr);
        if dst.protocol.is_http() {
            let (ours, theirs) = tokio::io::duplex(http::PIPE_BUFFER);
            let ctx = http::StreamContext {
                waypoint: self.clone(),
                peer,
                client,
                dst,
            };
            tokio::spawn(http::serve(ctx, theirs));
            return Ok(Accepted::new(Downstream::Http(ours)));
        }
        let snap = self.snapshot();
        let principal = peer.identity.as_ref().map(|i| i.to_string());
        let conn = authz::ConnectionAttrs {
            port: dst.addr.port(),
            source_principal: principal.as_deref(),
            source_ip: client.ip(),
            destination_ip: dst.addr.ip(),
        };
        if let authz::Decision::Deny { policy, reason } =
            snap.policies
                .evaluate_connection(&self.gateway, dst.service.as_ref(), &conn)
        {
            self.metrics.tcp_denied();
            tracing::info!(src = %client, dst = %dst.addr, %policy, %reason, "connection denied by waypoint policy");
            return Err(Rejection::unauthorized(format!(
                "denied by {policy}: {reason}"
            )));
        }
        let endpoint = match self.onward_route(&snap.store, dst.addr) {
            Route::Hbone { endpoint, .. } => endpoint,
            Route::Passthrough { dst } => dst,
            Route::NoWaypoint { target, waypoint } => {
                return Err(Rejection::unavailable(format!(
                    "waypoint {waypoint} of {target} not found"
                )));
            }
            Route::NoEndpoint { service, port } => {
                return Err(Rejection::unavailable(format!(
                    "service {service} has no endpoint for port {port}"
                )));
            }
        };
        let upstream = self
            .connect_upstream(endpoint, client)
            .await
            .map_err(|e| Rejection::unavailable(e.to_string()))?;
        Ok(Accepted::new(Downstream::Tcp(upstream)))
    }
}

/// An onward connection: a tunnel to a mesh endpoint, or TCP to one outside the mesh.
pub(crate) enum Upstream {
    Hbone(Box<hbone::H2Stream>),
    Tcp(TcpStream),
}

/// Why no onward connection was made.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// Nowhere to send it (503 `no healthy upstream`).
    #[error("{0}")]
    NoRoute(String),
    /// The dial or the CONNECT failed (503, retried where the route allows).
    #[error("{0}")]
    Connect(String),
}

/// What the HBONE server copies a stream to: the HTTP server's end of a pipe, or the
/// upstream itself.
enum Downstream {
    Http(tokio::io::DuplexStream),
    Tcp(Upstream),
}

macro_rules! delegate_io {
    ($t:ty, $($variant:path),+) => {
        impl tokio::io::AsyncRead for $t {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<io::Result<()>> {
                match self.get_mut() {
                    $($variant(s) => Pin::new(s).poll_read(cx, buf),)+
                }
            }
        }
        impl tokio::io::AsyncWrite for $t {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<io::Result<usize>> {
                match self.get_mut() {
                    $($variant(s) => Pin::new(s).poll_write(cx, buf),)+
                }
            }
            fn poll_flush(
                self: Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<io::Result<()>> {
                match self.get_mut() {
                    $($variant(s) => Pin::new(s).poll_flush(cx),)+
                }
            }
            fn poll_shutdown(
                self: Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<io::Result<()>> {
                match self.get_mut() {
                    $($variant(s) => Pin::new(s).poll_shutdown(cx),)+
                }
            }
        }
    };
}

delegate_io!(Upstream, Upstream::Hbone, Upstream::Tcp);
delegate_io!(Downstream, Downstream::Http, Downstream::Tcp);

/// An error and its sources on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Runs the waypoint until SIGTERM or SIGINT.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let identity = Identity::new(&args.trust_domain, &args.namespace, &args.service_account);
    let metrics = Metrics::new();
    // A waypoint pod is on no node of its own: with an empty node name every pod is
    // "elsewhere", so no pod needs the netns and cgroup a node's pods do.
    let (ca, initial, mut rx, _source): (_, _, _, Box<dyn std::any::Any + Send>) = match args.source
    {
        crate::config::Source::File => {
            let path = args
                .workloads
                .clone()
                .context("--workloads is required with --source file")?;
            let ca =
                BuiltinCa::load_or_create(&args.ca_dir, &args.trust_domain, args.cert_lifetime)
                    .with_context(|| {
                        format!(
                            "failed to load the built-in CA from {}",
                            args.ca_dir.display()
                        )
                    })?;
            let initial = state::file::load_settled(&path, "")
                .with_context(|| format!("failed to read {}", path.display()))?;
            let (tx, rx) = watch::channel(initial.clone());
            let watch = state::file::watch(
                path.clone(),
                String::new(),
                tx,
                crate::metrics::Metrics::new(),
            )
            .with_context(|| format!("failed to watch {}", path.display()))?;
            (ca, initial, rx, Box::new(watch))
        }
        crate::config::Source::Kube => {
            let secret = args
                .ca_secret
                .clone()
                .context("--ca-secret is required with --source kube")?;
            let opts = crate::kube::Options {
                node: String::new(),
                trust_domain: args.trust_domain.clone(),
                cgroup_root: PathBuf::from("/sys/fs/cgroup"),
                host_proc: PathBuf::from("/proc"),
                waypoint_config: true,
            };
            let k = crate::kube::start(opts).await?;
            let ca = crate::kube::builtin_ca_existing(
                &k.client,
                &secret,
                &args.trust_domain,
                args.cert_lifetime,
            )
            .await?;
            let initial = k.updates.borrow().clone();
            (ca, initial, k.updates, Box::new(k.guard))
        }
        crate::config::Source::Istio => anyhow::bail!(
            "a waypoint follows the workload file or the Kubernetes API; with istiod, Istio's own waypoint serves"
        ),
    };
    let cert = ca
        .issue(&identity)
        .with_context(|| format!("failed to issue a certificate for {identity}"))?;
    let creds = Credentials::new(cert)?;

    let waypoint = Arc::new_cyclic(|me: &Weak<Waypoint>| {
        let dialer_of = me.clone();
        let dialer: Dialer = Box::new(move |hop: &Hop| {
            let (me, hop) = (dialer_of.clone(), hop.clone());
            Box::pin(async move {
                let w = me
                    .upgrade()
                    .ok_or_else(|| io::Error::other("the waypoint is shutting down"))?;
                w.dial(&hop).await
            })
        });
        let settings = hbone::PoolSettings {
            dial_timeout: args.connect_timeout,
            ..hbone::PoolSettings::default()
        };
        Waypoint {
            gateway: authz::ObjectRef {
                namespace: args.namespace.clone(),
                name: args.gateway.clone(),
            },
            own_key: format!("{}/{}", args.namespace, args.pod),
            identity: identity.clone(),
            creds: RwLock::new(Arc::new(creds)),
            client_configs: tls::ClientConfigs::new(tls::CLIENT_CONFIGS_LIMIT),
            snapshot: RwLock::new(Arc::new(Snapshot::new(initial))),
            pool: hbone::Pool::new(settings, dialer),
            clients: http::Clients::new(me.clone()),
            metrics: metrics.clone(),
            connect_timeout: args.connect_timeout,
            drain: watch::Sender::new(false),
        }
    });

    // Config versions.
    let w = waypoint.clone();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let cfg = rx.borrow_and_update().clone();
            let snap = Arc::new(Snapshot::new(cfg));
            *w.snapshot.write().unwrap_or_else(|p| p.into_inner()) = snap;
            tracing::info!("waypoint config updated");
        }
    });
    // Certificate renewal at about half-life, like the nodes' certificate manager.
    let w = waypoint.clone();
    tokio::spawn(async move {
        loop {
            let at = w.creds().cert.refresh_at();
            let wait = at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or(Duration::from_secs(1));
            tokio::time::sleep(wait).await;
            match ca
                .issue(&w.identity)
                .map_err(anyhow::Error::from)
                .and_then(Credentials::new)
            {
                Ok(creds) => {
                    *w.creds.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(creds);
                    tracing::info!(identity = %w.identity, "waypoint certificate renewed");
                }
                Err(error) => {
                    tracing::warn!(identity = %w.identity, %error, "waypoint certificate renewal failed; retrying in 10s");
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
            }
        }
    });

    let metrics_listener = TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("failed to bind the metrics port {}", args.metrics_addr))?;
    let m = metrics.clone();
    tokio::spawn(crate::metrics::serve_encoded(metrics_listener, move || {
        m.encode()
    }));

    let listener = bind_hbone(args.hbone_addr).await?;
    tracing::info!(identity = %identity, gateway = %format!("{}/{}", args.namespace, args.gateway), addr = %args.hbone_addr, "waypoint serving");
    let drain_rx = waypoint.drain.subscribe();
    let tracker = tokio_util::task::TaskTracker::new();
    let connections = tracker.clone();
    let w = waypoint.clone();
    let max_connections = args.max_connections;
    let mut over_limit_log: Option<std::time::Instant> = None;
    // Owns the listener: when the select below drops it, the port is closed.
    let accept = async move {
        loop {
            let (tcp, peer_addr) = match listener.accept().await {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if connections.len() >= max_connections {
                w.metrics.over_limit.inc();
                let said_lately = over_limit_log
                    .is_some_and(|t: std::time::Instant| t.elapsed() < Duration::from_secs(60));
                if !said_lately {
                    over_limit_log = Some(std::time::Instant::now());
                    tracing::warn!(max_connections, peer = %peer_addr, "waypoint at its connection limit: closing new connections (logged once a minute)");
                }
                drop(tcp);
                continue;
            }
            let open = w.metrics.connections.clone();
            open.inc();
            let served = serve_connection(w.clone(), tcp, peer_addr, drain_rx.clone());
            connections.spawn(async move {
                served.await;
                open.dec();
            });
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let cause = tokio::select! {
        () = accept => "accept loop ended",
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    };
    // Drain, as Istio's waypoint does on termination: no new connections (the port is
    // closed), GOAWAY on the open ones, each HTTP connection closed after its request in
    // flight; what is still open after the drain timeout is closed.
    let open = tracker.len();
    tracing::info!(cause, connections = open, timeout = ?args.drain_timeout, "waypoint draining");
    let _ = waypoint.drain.send(true);
    tracker.close();
    match tokio::time::timeout(args.drain_timeout, tracker.wait()).await {
        Ok(()) => tracing::info!("waypoint drained: every connection ended"),
        Err(_) => tracing::warn!(
            connections = tracker.len(),
            timeout = ?args.drain_timeout,
            "waypoint drain timed out; closing what is left"
        ),
    }
    Ok(())
}

/// One inbound HBONE connection: mTLS as the waypoint, then its CONNECT streams.
async fn serve_connection(
    w: Arc<Waypoint>,
    tcp: TcpStream,
    peer_addr: SocketAddr,
    drain: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let local = match tcp.local_addr() {
        Ok(a) => a.ip(),
        Err(_) => return,
    };
    let handshake =
        tokio_rustls::TlsAcceptor::from(w.creds().server.clone()).accept(tls::transport(tcp));
    let tls = match tokio::time::timeout(hbone::HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(mut tls)) => {
            tls.get_mut().0.authenticated();
            tls
        }
        Ok(Err(error)) => {
            tracing::debug!(peer = %peer_addr, %error, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %peer_addr, "TLS handshake timed out");
            return;
        }
    };
    let peer = Peer {
        identity: tls::peer_identity(tls.get_ref().1),
        addr: peer_addr,
    };
    let settings = hbone::ServerSettings {
        authority_is_local: false,
        ..hbone::ServerSettings::default()
    };
    let served = hbone::serve(tls, settings, local, peer, drain, move |target, peer| {
        w.clone().open(target, peer)
    })
    .await;
    if let Err(error) = served {
        tracing::debug!(peer = %peer_addr, error = %error_chain(&error), "hbone connection ended");
    }
}

/// Binds the HBONE port; `[::]` falls back to `0.0.0.0` in a pod without IPv6.
async fn bind_hbone(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if addr.ip() == IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED) => {
            let v4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, addr.port()));
            tracing::info!(error = %e, "no IPv6 here: serving HBONE on {v4}");
            TcpListener::bind(v4)
                .await
                .with_context(|| format!("failed to bind the HBONE port {v4}"))
        }
        Err(e) => Err(e).with_context(|| format!("failed to bind the HBONE port {addr}")),
    }
}
