//! The waypoint's HTTP side: one hyper server per tunnelled stream (HTTP/1.1 or HTTP/2,
//! detected), and per request: policy, route, endpoint, onward request, telemetry.
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::authz::{Decision, ObjectRef, RequestAttrs};
use super::metrics::{REPORTER_WAYPOINT, RequestLabels};
use super::{Destination, Peer, PortProtocol, Upstream, Waypoint};
use crate::metrics::ConnLabels;
use crate::state::{Route, Store};

/// How long a request's headers may take to arrive (HTTP/1.1; HTTP/2 streams are bounded
/// by their connection's).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle onward connections kept per endpoint.
const IDLE_PER_ENDPOINT: usize = 32;

/// Streams one client HTTP/2 connection may have open at once: what an HBONE connection
/// carries.
fn hbone_streams() -> u32 {
    crate::hbone::SERVER_MAX_CONCURRENT_STREAMS
}

/// The in-memory pipe between a tunnelled stream and its HTTP server.
pub(super) const PIPE_BUFFER: usize = 64 * 1024;

/// Istio's waypoint (Envoy RBAC) answers a denied request with this body.
const RBAC_DENIED: &str = "RBAC: access denied";
/// Envoy's bodies for requests with nowhere to go, which Istio users know.
const NO_HEALTHY_UPSTREAM: &str = "no healthy upstream";
const CONNECT_FAILURE: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: connection failure";
const REQUEST_TIMEOUT: &str = "upstream request timeout";

type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(super) type Body = BoxBody<Bytes, BoxError>;

/// One tunnelled stream served as HTTP.
pub(super) struct StreamContext {
    pub waypoint: Arc<Waypoint>,
    pub peer: Peer,
    /// The app that made the requests (`forwarded: for=`), else the HBONE peer.
    pub client: SocketAddr,
    pub dst: Destination,
}

/// Serves HTTP on `io` until the client's side closes.
pub(super) async fn serve(ctx: StreamContext, io: tokio::io::DuplexStream) {
    let mut drain = ctx.waypoint.drain.subscribe();
    let ctx = Arc::new(ctx);
    let svc = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(ctx, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // A client that opens a request and never finishes its headers is dropped.
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(hbone_streams());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    // On drain, the request in flight is answered and the connection closed after it
    // (HTTP/1.1 `connection: close`, HTTP/2 GOAWAY).
    let served = tokio::select! {
        served = conn.as_mut() => served,
        () = async { drop(drain.wait_for(|d| *d).await) } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(error) = served {
        tracing::debug!(%error, "waypoint http connection ended with an error");
    }
}

/// The onward HTTP clients (connections pooled per endpoint `ip:port`).
pub(super) struct Clients {
    http1: Client<Connector, Body>,
    http2: Client<Connector, Body>,
}

impl Clients {
    pub(super) fn new(waypoint: Weak<Waypoint>) -> Self {
        let connector = Connector { waypoint };
        Clients {
            http1: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(IDLE_PER_ENDPOINT)
                .build(connector.clone()),
            http2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .pool_idle_timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(IDLE_PER_ENDPOINT)
                .build(connector),
        }
    }
}

/// Dials an endpoint (the URI's `ip:port`) the way the waypoint's own pod would.
#[derive(Clone)]
struct Connector {
    waypoint: Weak<Waypoint>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = Conn;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Conn>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let waypoint = self.waypoint.clone();
        Box::pin(async move {
            let w = waypoint
                .upgrade()
                .ok_or_else(|| io::Error::other("the waypoint is shutting down"))?;
            let endpoint: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| io::Error::other(format!("{uri} does not name an endpoint")))?;
            // The tunnel is shared by requests from several clients: it is the waypoint's
            // own, from its pod's address.
            let snap = w.snapshot();
            let own = snap
                .store
                .workload(&w.own_key)
                .and_then(|wl| {
                    wl.addresses
                        .iter()
                        .find(|a| a.is_ipv4() == endpoint.is_ipv4())
                        .copied()
                })
                .unwrap_or(endpoint.ip());
            let up = w
                .connect_upstream(endpoint, SocketAddr::new(own, 0))
                .await
                .map_err(|e| io::Error::new(io::ErrorKind::ConnectionRefused, e.to_string()))?;
            Ok(Conn(TokioIo::new(up)))
        })
    }
}

/// An onward connection as hyper's client sees it.
struct Conn(TokioIo<Upstream>);

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

fn local(status: StatusCode, text: &str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(text.to_owned()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// The request's host: `Host`, else the URI's authority (HTTP/2's `:authority`).
fn host_of<B>(req: &Request<B>) -> String {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default()
}

/// What a finished request reports: its labels so far, and when and how it ended.
struct Report {
    ctx: Arc<StreamContext>,
    labels: RequestLabels,
    method: http::Method,
    path: String,
    start: Instant,
    req_bytes: Arc<AtomicU64>,
    resp_bytes: u64,
    /// Why the waypoint answered itself, if it did.
    detail: Option<String>,
}

impl Drop for Report {
    /// Counted once the response has gone (or the client went away).
    fn drop(&mut self) {
        let ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let req_bytes = self.req_bytes.load(Ordering::Relaxed);
        self.ctx
            .waypoint
            .metrics
            .record(&self.labels, ms, req_bytes, self.resp_bytes);
        let l = &self.labels;
        tracing::info!(
            target: "access",
            src_addr = %self.ctx.client,
            src_identity = %l.conn.source_principal,
            dst_service = %l.conn.destination_service,
            dst_workload = %l.conn.destination_workload,
            method = %self.method,
            path = %self.path,
            status = %l.response_code,
            duration_ms = format!("{ms:.1}"),
            request_bytes = req_bytes,
            response_bytes = self.resp_bytes,
            detail = self.detail.as_deref().unwrap_or("-"),
            "request"
        );
    }
}

/// A body that counts its data bytes into a shared counter.
struct CountIn {
    inner: Incoming,
    bytes: Arc<AtomicU64>,
}

impl hyper::body::Body for CountIn {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The response body going back to the client, which reports the request when it is done.
struct CountOut {
    inner: Body,
    report: Option<Report>,
}

impl hyper::body::Body for CountOut {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(r)) = (frame.data_ref(), self.report.as_mut()) {
                    r.resp_bytes += data.len() as u64;
                }
                if let Some(trailers) = frame.trailers_ref()
                    && let (Some(status), Some(r)) =
                        (trailers.get("grpc-status"), self.report.as_mut())
                {
                    r.labels.grpc_response_status = status.to_str().unwrap_or_default().to_owned();
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                // Done: report now rather than when hyper drops the body.
                self.report.take();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Labels for a request from the stream's client to `endpoint` of `service`.
/// A request's labels as far as the source and the service dialled are known; the
/// backend and its endpoint are filled in once chosen.
fn labels(
    store: &Store,
    ctx: &StreamContext,
    service: Option<&crate::state::Service>,
    headers: &http::HeaderMap,
) -> RequestLabels {
    let mut l = ConnLabels {
        reporter: REPORTER_WAYPOINT.to_owned(),
        request_protocol: if is_grpc(headers) { "grpc" } else { "http" }.to_owned(),
        ..ConnLabels::default()
    };
    if let Some(w) = store.workload_by_addr(ctx.client.ip()) {
        l.set_source(w, &store.cfg.cluster);
    }
    if let Some(id) = &ctx.peer.identity {
        l.source_principal = id.to_string();
    }
    if let Some(svc) = service {
        l.set_destination_service(svc);
    }
    l.connection_security_policy = crate::metrics::SECURITY_MUTUAL_TLS.to_owned();
    RequestLabels {
        conn: l,
        response_code: String::new(),
        grpc_response_status: String::new(),
    }
}

/// Decides and forwards one request.
async fn handle(ctx: Arc<StreamContext>, mut req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    // An HTTP/1.1 upgrade (WebSocket): once the backend answers 101, the two upgraded
    // connections are joined byte for byte.
    let upgrade = (req.version() == http::Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE))
    .then(|| hyper::upgrade::on(&mut req));
    let w = ctx.waypoint.clone();
    let snap = w.snapshot();
    let store = &snap.store;
    let (parts, body) = req.into_parts();
    let req_bytes = Arc::new(AtomicU64::new(0));
    let dst_service = ctx.dst.service.as_ref().and_then(|s| service(store, s));
    let mut report = Report {
        ctx: ctx.clone(),
        labels: labels(store, &ctx, dst_service, &parts.headers),
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        start,
        req_bytes: req_bytes.clone(),
        resp_bytes: 0,
        detail: None,
    };
    let finish = |mut report: Report, resp: Response<Body>| -> Response<Body> {
        report.labels.response_code = resp.status().as_u16().to_string();
        let (head, inner) = resp.into_parts();
        Response::from_parts(
            head,
            CountOut {
                inner,
                report: Some(report),
            }
            .boxed(),
        )
    };

    // Istio's path normalisation: what policy and routes see is what the backend gets;
    // a path it cannot normalise (`%00`) is refused with 400, as Istio refuses it.
    let mut parts = parts;
    match super::authz::normalize_path(parts.uri.path()) {
        Err(e) => {
            report.detail = Some(e.to_string());
            return finish(report, local(StatusCode::BAD_REQUEST, "bad request\n"));
        }
        Ok(std::borrow::Cow::Owned(normal)) => {
            let pq = match parts.uri.query() {
                Some(q) => format!("{normal}?{q}"),
                None => normal,
            };
            let mut uri = http::uri::Parts::from(parts.uri.clone());
            match pq.parse() {
                Ok(pq) => {
                    uri.path_and_query = Some(pq);
                    if let Ok(u) = Uri::from_parts(uri) {
                        parts.uri = u;
                    }
                }
                Err(e) => {
                    report.detail = Some(format!("normalised path {pq:?}: {e}"));
                    return finish(report, local(StatusCode::BAD_REQUEST, "bad request\n"));
                }
            }
            report.path = parts.uri.path().to_owned();
        }
        Ok(std::borrow::Cow::Borrowed(_)) => {}
    }
    let host = {
        let r = Request::from_parts(parts.clone(), ());
        host_of(&r)
    };
    let principal = ctx.peer.identity.as_ref().map(ToString::to_string);
    let attrs = RequestAttrs {
        method: &parts.method,
        path: parts.uri.path(),
        host: &host,
        port: ctx.dst.addr.port(),
        headers: &parts.headers,
        source_principal: principal.as_deref(),
        source_ip: ctx.client.ip(),
        destination_ip: ctx.dst.addr.ip(),
    };
    if let Decision::Deny { policy, reason } =
        snap.policies
            .evaluate(&w.gateway, ctx.dst.service.as_ref(), &attrs)
    {
        report.detail = Some(format!("denied by {policy}: {reason}"));
        return finish(report, local(StatusCode::FORBIDDEN, RBAC_DENIED));
    }

    // The backend: the route's choice, else the service the client dialled.
    let Some(dst_ref) = ctx.dst.service.as_ref() else {
        report.detail = Some("no service for an HTTP stream".to_owned());
        return finish(
            report,
            local(StatusCode::SERVICE_UNAVAILABLE, NO_HEALTHY_UPSTREAM),
        );
    };
    let chosen = match snap
        .routes
        .select(&w.gateway, dst_ref, ctx.dst.addr.port(), &parts)
    {
        Ok(c) => c,
        Err(no) => {
            report.detail = Some(no.to_string());
            let body = if no.status == StatusCode::NOT_FOUND {
                ""
            } else {
                "no backend\n"
            };
            return finish(report, local(no.status, body));
        }
    };
    // No route attaches: the service dialled, with Istio's default retries.
    let plan = match &chosen {
        Some(c) => Plan {
            backend: c.service.clone(),
            port: c.port.unwrap_or(ctx.dst.addr.port()),
            timeout: c.timeout,
            try_timeout: c.try_timeout,
            retries: c.retries,
            retry_codes: c.retry_codes.clone(),
            backoff: c.retry_backoff.unwrap_or(DEFAULT_BACKOFF),
        },
        None => Plan {
            backend: dst_ref.clone(),
            port: ctx.dst.addr.port(),
            timeout: None,
            try_timeout: None,
            retries: super::route::DEFAULT_RETRIES,
            retry_codes: super::route::DEFAULT_RETRY_CODES.to_vec(),
            backoff: DEFAULT_BACKOFF,
        },
    };
    let Some(backend) = service(store, &plan.backend) else {
        report.detail = Some(format!("backend service {} not found", plan.backend));
        return finish(
            report,
            local(StatusCode::INTERNAL_SERVER_ERROR, "no backend\n"),
        );
    };
    let port = plan.port;
    let protocol = backend
        .ports
        .iter()
        .find(|p| p.port == port)
        .map(PortProtocol::of)
        .filter(|p| p.is_http())
        .unwrap_or(ctx.dst.protocol);
    let Some(vip) = backend.addresses.first().copied() else {
        report.detail = Some(format!("backend service {} has no address", backend.key()));
        return finish(
            report,
            local(StatusCode::SERVICE_UNAVAILABLE, NO_HEALTHY_UPSTREAM),
        );
    };
    report.labels.conn.set_destination_service(backend);

    // A request without a body can be sent again; one with a body goes once (it is not
    // buffered).
    let replayable = body.is_end_stream();
    let mut body = Some(
        CountIn {
            inner: body,
            bytes: req_bytes,
        }
        .boxed(),
    );
    let client = if protocol == PortProtocol::Http2 {
        &w.clients.http2
    } else {
        &w.clients.http1
    };
    let tries = if replayable { 1 + plan.retries } else { 1 };
    let deadline = plan.timeout.map(|t| tokio::time::Instant::now() + t);
    let mut last: Option<Response<Body>> = None;
    for attempt in 0..tries {
        if attempt > 0 {
            tokio::time::sleep(backoff(plan.backoff, attempt)).await;
        }
        let endpoint = match w.onward_route(store, SocketAddr::new(vip, port)) {
            Route::Hbone { endpoint, .. } => endpoint,
            Route::Passthrough { dst } => dst,
            Route::NoWaypoint { target, waypoint } => {
                report.detail = Some(format!("waypoint {waypoint} of {target} not found"));
                return finish(
                    report,
                    local(StatusCode::SERVICE_UNAVAILABLE, NO_HEALTHY_UPSTREAM),
                );
            }
            Route::NoEndpoint { service, port } => {
                report.detail = Some(format!("service {service} has no endpoint for port {port}"));
                return finish(
                    report,
                    local(StatusCode::SERVICE_UNAVAILABLE, NO_HEALTHY_UPSTREAM),
                );
            }
        };
        if let Some(wl) = store.workload_by_addr(endpoint.ip()) {
            report.labels.conn.set_destination(wl, &store.cfg.cluster);
            report.labels.conn.destination_principal = store.identity(wl);
        }
        let mut onward = Request::from_parts(parts.clone(), body.take().unwrap_or_else(empty));
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        *onward.uri_mut() = match Uri::builder()
            .scheme("http")
            .authority(endpoint.to_string())
            .path_and_query(path)
            .build()
        {
            Ok(u) => u,
            Err(e) => {
                report.detail = Some(format!("bad onward uri: {e}"));
                return finish(report, local(StatusCode::BAD_REQUEST, "bad request\n"));
            }
        };
        if !onward.headers().contains_key(header::HOST)
            && let Ok(h) = HeaderValue::from_str(&host)
        {
            onward.headers_mut().insert(header::HOST, h);
        }
        *onward.version_mut() = http::Version::HTTP_11;
        if upgrade.is_none() {
            strip_hop_by_hop(onward.headers_mut());
        }
        // This try's bound: the rule's per-try timeout, within what is left of the whole.
        let now = tokio::time::Instant::now();
        let try_deadline = [plan.try_timeout.map(|t| now + t), deadline]
            .into_iter()
            .flatten()
            .min();
        let sent = client.request(onward);
        let result = match try_deadline {
            Some(at) => match tokio::time::timeout_at(at, sent).await {
                Ok(r) => r,
                Err(_) if Some(at) == deadline || attempt + 1 >= tries => {
                    report.detail = Some("no response in time (timeouts.request)".to_owned());
                    return finish(report, local(StatusCode::GATEWAY_TIMEOUT, REQUEST_TIMEOUT));
                }
                Err(_) => {
                    // Envoy retries a per-try timeout like a reset.
                    report.detail =
                        Some("no response in time (timeouts.backendRequest)".to_owned());
                    last = Some(local(StatusCode::GATEWAY_TIMEOUT, REQUEST_TIMEOUT));
                    continue;
                }
            },
            None => sent.await,
        };
        match result {
            Ok(resp)
                if plan.retry_codes.contains(&resp.status().as_u16()) && attempt + 1 < tries =>
            {
                tracing::debug!(%endpoint, attempt, status = %resp.status(), "retrying");
                last = Some(resp.map(|b| b.map_err(Into::into).boxed()));
            }
            Ok(mut resp) => {
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                    && let Some(down) = upgrade
                {
                    let up = hyper::upgrade::on(&mut resp);
                    tokio::spawn(join_upgraded(down, up));
                }
                let resp = resp.map(|b| b.map_err(Into::into).boxed());
                return finish(report, resp);
            }
            Err(error) => {
                let why = super::error_chain(&error);
                tracing::debug!(%endpoint, attempt, error = %why, "onward request failed");
                report.detail = Some(why);
                last = None;
                if !replayable {
                    break;
                }
            }
        }
    }
    match last {
        Some(resp) => finish(report, resp),
        None => finish(
            report,
            local(StatusCode::SERVICE_UNAVAILABLE, CONNECT_FAILURE),
        ),
    }
}

/// Envoy's default base interval between retries.
const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);

/// Where and how one request goes: from the route, or Istio's defaults.
struct Plan {
    backend: ObjectRef,
    port: u16,
    timeout: Option<Duration>,
    try_timeout: Option<Duration>,
    retries: u32,
    retry_codes: Vec<u16>,
    backoff: Duration,
}

/// Envoy's retry back-off: fully jittered, exponential from `base`, capped at ten times
/// it.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let ceiling = base
        .saturating_mul(1 << attempt.min(10))
        .min(base.saturating_mul(10));
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::random_range(0..=nanos))
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

/// gRPC is HTTP/2 with this content type (`application/grpc`, `application/grpc+proto`,
/// …), which is how Istio tells `grpc` from `http` in `request_protocol`.
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Headers that describe one connection, not the request (RFC 9110 §7.6.1): not
/// forwarded, except for an upgrade, which needs `connection` and `upgrade`.
fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let named: Vec<http::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| http::HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
    ] {
        headers.remove(n);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// Copies between the client's and the backend's upgraded connections until both end.
async fn join_upgraded(down: hyper::upgrade::OnUpgrade, up: hyper::upgrade::OnUpgrade) {
    let (down, up) = match tokio::try_join!(down, up) {
        Ok(both) => both,
        Err(error) => {
            tracing::debug!(%error, "upgrade failed");
            return;
        }
    };
    let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
    match tokio::io::copy_bidirectional(&mut down, &mut up).await {
        Ok((to_backend, to_client)) => {
            tracing::debug!(to_backend, to_client, "upgraded connection closed");
        }
        Err(error) => tracing::debug!(%error, "upgraded connection failed"),
    }
}

/// A service by namespace and name.
fn service<'s>(store: &'s Store, r: &ObjectRef) -> Option<&'s crate::state::Service> {
    store.service(&r.namespace, &r.name)
}
