//! The HBONE server: serves the CONNECT streams of one inbound connection (port 15008,
//! after TLS). Each stream runs in its own task: its request is checked
//! ([`parse_connect`]), the caller's handler decides where it goes (or rejects it), and
//! the tunnel is copied to the upstream the handler opened. A bad stream only fails
//! itself; the connection and its other streams carry on.

use std::future::{Future, poll_fn};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::header::HeaderValue;
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tracing::Instrument;

use super::copy::copy_bidirectional;
use super::keepalive;
use super::request::{BAGGAGE, Baggage, Rejection, Target, TargetAddr, parse_connect_on};
use super::stream::H2Stream;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("hbone handshake on the connection to {local} failed")]
    Handshake {
        local: IpAddr,
        #[source]
        source: h2::Error,
    },
    #[error("hbone handshake on the connection to {local} did not finish in time")]
    HandshakeTimeout {
        local: IpAddr,
        #[source]
        source: crate::limits::TimedOut,
    },
    #[error("hbone connection to {local} failed")]
    Connection {
        local: IpAddr,
        #[source]
        source: h2::Error,
    },
    #[error("hbone connection to {local} dropped: the client is unresponsive")]
    Keepalive {
        local: IpAddr,
        #[source]
        source: keepalive::Error,
    },
}

/// HTTP/2 settings of the server; the defaults are Istio's (`HBONE.md`, "HTTP/2").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerSettings {
    /// `SETTINGS_INITIAL_WINDOW_SIZE`: per-stream receive window.
    pub initial_stream_window: u32,
    /// Connection-level receive window (WINDOW_UPDATE on stream 0).
    pub connection_window: u32,
    pub max_frame_size: u32,
    pub max_header_list_size: u32,
    /// Streams the client may have open at once on one connection.
    pub max_concurrent_streams: u32,
    pub ping_interval: Duration,
    /// A ping unanswered for this long closes the connection.
    pub ping_timeout: Duration,
    /// A client that has not sent its connection preface within this long is dropped.
    pub handshake_timeout: Duration,
    /// Whether an IP `:authority` must be the address the connection arrived on (a pod's
    /// ztunnel: 400 otherwise). A waypoint takes authorities naming the service VIP or
    /// workload behind it, so it turns this off.
    pub authority_is_local: bool,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            initial_stream_window: super::INITIAL_STREAM_WINDOW,
            connection_window: super::CONNECTION_WINDOW,
            max_frame_size: super::MAX_FRAME_SIZE,
            max_header_list_size: super::SERVER_MAX_HEADER_LIST_SIZE,
            max_concurrent_streams: super::SERVER_MAX_CONCURRENT_STREAMS,
            ping_interval: super::PING_INTERVAL,
            ping_timeout: super::PING_TIMEOUT,
            handshake_timeout: super::HANDSHAKE_TIMEOUT,
            authority_is_local: true,
        }
    }
}

impl ServerSettings {
    fn builder(&self) -> h2::server::Builder {
        let mut b = h2::server::Builder::new();
        b.initial_window_size(self.initial_stream_window)
            .max_frame_size(self.max_frame_size)
            .max_header_list_size(self.max_header_list_size)
            .max_concurrent_streams(self.max_concurrent_streams);
        b
    }
}

/// A handler's yes: the upstream to copy the tunnel to, and the `baggage` describing the
/// destination workload for the 200 response.
pub struct Accepted<U> {
    pub upstream: U,
    pub baggage: Option<Baggage>,
}

impl<U> Accepted<U> {
    pub fn new(upstream: U) -> Self {
        Accepted {
            upstream,
            baggage: None,
        }
    }

    pub fn with_baggage(mut self, baggage: Baggage) -> Self {
        self.baggage = Some(baggage);
        self
    }
}

/// Serves one HBONE connection until the client closes it, it fails, or it is drained.
///
/// - `arrived_on`: the pod IP the client dialled; IP authorities must match it (400)
///   unless `settings.authority_is_local` is off.
/// - `peer`: whatever the caller knows about the client (TLS identity, address), passed
///   to `handler` with every stream.
/// - `handler`: decides each stream: resolves the target, checks policy, connects
///   upstream. Its [`Rejection`] is sent as the status (401, 503...).
/// - `drain`: once it reads `true` (or its sender is dropped) the server sends GOAWAY,
///   accepts no new streams and returns when the open ones have finished. To bound the
///   wait, drop the returned future; that closes the connection and fails what is left.
pub async fn serve<IO, P, H, F, U>(
    io: IO,
    settings: ServerSettings,
    arrived_on: IpAddr,
    peer: P,
    mut drain: watch::Receiver<bool>,
    handler: H,
) -> Result<(), Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    P: Clone + Send + Sync + 'static,
    H: Fn(Target, P) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Accepted<U>, Rejection>> + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let local = arrived_on;
    let handshake = settings.builder().handshake::<_, Bytes>(io);
    let mut conn = crate::limits::within(
        crate::limits::Step::H2Accept,
        settings.handshake_timeout,
        handshake,
    )
    .await
    .map_err(|source| Error::HandshakeTimeout { local, source })?
    .map_err(|source| Error::Handshake { local, source })?;
    conn.set_target_window_size(settings.connection_window);
    let keepalive = keepalive::run(
        conn.ping_pong(),
        settings.ping_interval,
        settings.ping_timeout,
    );
    tokio::pin!(keepalive);
    let handler = Arc::new(handler);
    let mut draining = false;

    loop {
        // The select only decides; acting on `conn` happens once its accept future is gone.
        let drain_now = tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    let span = tracing::debug_span!("hbone_stream", id = respond.stream_id().as_u32());
                    let check = settings.authority_is_local.then_some(arrived_on);
                    let stream = handle_stream(req, respond, check, peer.clone(), handler.clone());
                    tokio::spawn(stream.instrument(span));
                    false
                }
                None => return Ok(()),
                Some(Err(source)) => return Err(Error::Connection { local, source }),
            },
            dead = &mut keepalive => return Err(Error::Keepalive { local, source: dead }),
            () = drained(&mut drain), if !draining => true,
        };
        if drain_now {
            tracing::debug!(%local, "draining hbone connection");
            draining = true;
            // Keeps accepting: streams the client opened before it saw the GOAWAY still
            // arrive and are served.
            conn.graceful_shutdown();
        }
    }
}

async fn drained(drain: &mut watch::Receiver<bool>) {
    // A dropped sender means nobody can cancel the drain any more: drain as well.
    let _ = drain.wait_for(|draining| *draining).await;
}

/// One CONNECT stream: opened, then copied until both sides are done. The opening (the
/// request's headers, policy, the upstream dial: kilobytes) is boxed in the openings' pool
/// (`opening.rs`) and freed once answered. This is a plain function returning a future
/// that captures only that box: an `async fn` keeps its arguments (the request alone is
/// hundreds of bytes) in its state for as long as it runs, and an inline
/// `Box::pin(open_stream(..)).await` kept room for the unboxed opening too. A long-lived
/// stream's task holds only what the copy needs.
fn handle_stream<P, H, F, U>(
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    arrived_on: Option<IpAddr>,
    peer: P,
    handler: Arc<H>,
) -> impl Future<Output = ()>
where
    H: Fn(Target, P) -> F,
    F: Future<Output = Result<Accepted<U>, Rejection>>,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let opening =
        crate::opening::OPENINGS.boxed(open_stream(req, respond, arrived_on, peer, handler));
    async move {
        let Some((mut tunnel, upstream, dst)) = opening.await else {
            return;
        };
        match copy_bidirectional(&mut tunnel, upstream).await {
            Ok(t) => tracing::debug!(
                %dst,
                received = t.tunnel_to_socket,
                sent = t.socket_to_tunnel,
                "tunnel closed"
            ),
            Err(error) => tracing::debug!(%dst, %error, "tunnel failed"),
        }
    }
}

/// Parses the CONNECT, lets the handler decide and connect upstream, and answers: the
/// tunnel and its upstream when accepted, `None` once rejected or abandoned. Its state
/// (the request's headers, policy, the upstream dial) is kilobytes a stream must not
/// carry for its whole life, so [`handle_stream`] boxes it and frees it once answered.
async fn open_stream<P, H, F, U>(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    arrived_on: Option<IpAddr>,
    peer: P,
    handler: Arc<H>,
) -> Option<(H2Stream, U, TargetAddr)>
where
    H: Fn(Target, P) -> F,
    F: Future<Output = Result<Accepted<U>, Rejection>>,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let target = match parse_connect_on(&req, arrived_on) {
        Ok(target) => target,
        Err(rejection) => {
            reject(respond, rejection);
            return None;
        }
    };
    let dst = target.addr.clone();
    // Connecting upstream can take a while; stop if the client gives up meanwhile.
    let decided = tokio::select! {
        decided = handler(target, peer) => Some(decided),
        reset = poll_fn(|cx| respond.poll_reset(cx)) => {
            tracing::debug!(%dst, ?reset, "client reset the stream before the tunnel opened");
            None
        }
    };
    let accepted = match decided? {
        Err(rejection) => {
            reject(respond, rejection);
            return None;
        }
        Ok(accepted) => accepted,
    };

    let mut resp = Response::new(());
    if let Some(baggage) = accepted.baggage.filter(|b| !b.is_empty()) {
        match HeaderValue::try_from(baggage.to_string()) {
            Ok(value) => {
                resp.headers_mut().insert(BAGGAGE, value);
            }
            Err(error) => tracing::debug!(%error, "leaving out unencodable baggage"),
        }
    }
    let send = match respond.send_response(resp, false) {
        Ok(send) => send,
        Err(error) => {
            tracing::debug!(%dst, %error, "failed to answer the CONNECT");
            return None;
        }
    };
    Some((H2Stream::new(send, req.into_body()), accepted.upstream, dst))
}

/// Answers with the rejection's status: HEADERS with END_STREAM and no body.
fn reject(mut respond: SendResponse<Bytes>, rejection: Rejection) {
    tracing::debug!(status = %rejection.status, reason = %rejection.reason, "rejecting CONNECT");
    let mut resp = Response::new(());
    *resp.status_mut() = if rejection.status == StatusCode::OK {
        // A rejection must not read as success; callers should never build one with 200.
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        rejection.status
    };
    if let Err(error) = respond.send_response(resp, true) {
        tracing::debug!(%error, "failed to send the rejection");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hbone::request::ConnectRequest;
    use crate::hbone::test_wire::{self, read_frame, window_increment};
    use http::Method;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::task::JoinHandle;

    const POD: &str = "10.0.0.7";

    fn pod_ip() -> IpAddr {
        POD.parse().expect("test ip")
    }

    /// Echoes everything back and half-closes when the other side does.
    fn echo_upstream() -> DuplexStream {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(theirs);
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
        ours
    }

    /// Serves over an in-memory connection: port 503 is rejected with 503, anything
    /// else reaches an echo upstream and is answered with the destination's baggage.
    fn start(
        settings: ServerSettings,
        drain: watch::Receiver<bool>,
    ) -> (DuplexStream, JoinHandle<Result<(), Error>>) {
        let (client, server) = tokio::io::duplex(1024 * 1024);
        let handler = |target: Target, _peer: ()| async move {
            if target.addr.port() == 503 {
                return Err(Rejection::unavailable("no such port"));
            }
            Ok(Accepted::new(echo_upstream()).with_baggage(Baggage {
                namespace: "dst-ns".into(),
                ..Baggage::default()
            }))
        };
        let task = tokio::spawn(serve(server, settings, pod_ip(), (), drain, handler));
        (client, task)
    }

    async fn client(io: DuplexStream) -> h2::client::SendRequest<Bytes> {
        let (send, conn) = h2::client::handshake(io).await.expect("client handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        send
    }

    async fn open(
        send: &mut h2::client::SendRequest<Bytes>,
        req: Request<()>,
    ) -> Result<(Response<RecvStream>, h2::SendStream<Bytes>), h2::Error> {
        let mut ready = send.clone().ready().await?;
        let (resp, stream) = ready.send_request(req, false)?;
        Ok((resp.await?, stream))
    }

    fn connect(port: u16) -> Request<()> {
        ConnectRequest::new(
            format!("{POD}:{port}"),
            "10.0.0.1:1234".parse().expect("addr"),
        )
        .to_http()
        .expect("valid request")
    }

    async fn echo_once(tunnel: &mut H2Stream, msg: &[u8]) {
        tunnel.write_all(msg).await.expect("write");
        let mut got = vec![0; msg.len()];
        tunnel.read_exact(&mut got).await.expect("read echo");
        assert_eq!(got, msg);
    }

    #[tokio::test]
    async fn bad_streams_do_not_disturb_a_working_one() {
        let (_tx, drain) = watch::channel(false);
        let (io, _server) = start(ServerSettings::default(), drain);
        let mut send = client(io).await;

        let (resp, stream) = open(&mut send, connect(8080)).await.expect("tunnel");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[BAGGAGE], "k8s.namespace.name=dst-ns");
        let mut tunnel = H2Stream::new(stream, resp.into_body());
        echo_once(&mut tunnel, b"before").await;

        let mut post = Request::new(());
        *post.method_mut() = Method::POST;
        *post.uri_mut() = format!("http://{POD}:8080/").parse().expect("uri");
        let wrong_ip = ConnectRequest::new("10.0.0.8:8080", "10.0.0.1:1".parse().expect("addr"))
            .to_http()
            .expect("valid request");
        for (req, want) in [
            (post, StatusCode::BAD_REQUEST),
            (wrong_ip, StatusCode::BAD_REQUEST),
            (connect(503), StatusCode::SERVICE_UNAVAILABLE),
        ] {
            let (resp, _stream) = open(&mut send, req).await.expect("answered");
            assert_eq!(resp.status(), want);
            // No body: the status came with END_STREAM.
            assert!(resp.body().is_end_stream());
        }

        echo_once(&mut tunnel, b"after").await;
    }

    #[tokio::test]
    async fn drain_refuses_new_streams_and_lets_open_ones_finish() {
        let (tx, drain) = watch::channel(false);
        let (io, server) = start(ServerSettings::default(), drain);
        let mut send = client(io).await;
        let (resp, stream) = open(&mut send, connect(8080)).await.expect("tunnel");
        let mut tunnel = H2Stream::new(stream, resp.into_body());

        tx.send(true).expect("server is listening");
        // The final GOAWAY follows a ping round trip; wait until new streams fail.
        let mut refused = false;
        for _ in 0..100 {
            if open(&mut send, connect(8080)).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(refused, "new streams are refused while draining");

        echo_once(&mut tunnel, b"still here").await;
        assert!(!server.is_finished(), "waits for the open stream");
        tunnel.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        tunnel.read_to_end(&mut rest).await.expect("eof");
        drop(tunnel);
        drop(send);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server finishes after the last stream")
            .expect("server task")
            .expect("clean shutdown");
    }

    #[tokio::test]
    async fn a_client_that_never_sends_its_preface_is_dropped_at_the_handshake_timeout() {
        let settings = ServerSettings {
            handshake_timeout: Duration::from_millis(100),
            ..ServerSettings::default()
        };
        let (_tx, drain) = watch::channel(false);
        let (mut io, server) = start(settings, drain);
        // Half a preface, then nothing.
        io.write_all(b"PRI * HTTP/2.0\r\n")
            .await
            .expect("partial preface");
        let result = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server gives up on its own")
            .expect("server task");
        match result {
            Err(Error::HandshakeTimeout { source, .. }) => {
                assert_eq!(source.step, crate::limits::Step::H2Accept);
            }
            other => panic!("expected a handshake timeout, got {other:?}"),
        }
        // The server's end is gone: the client reads EOF.
        let mut rest = Vec::new();
        let _ = io.read_to_end(&mut rest).await;
    }

    #[tokio::test]
    async fn announces_istio_settings_and_drops_a_silent_client() {
        let settings = ServerSettings {
            ping_interval: Duration::from_millis(50),
            ping_timeout: Duration::from_millis(100),
            ..ServerSettings::default()
        };
        let (_tx, drain) = watch::channel(false);
        let (mut io, server) = start(settings, drain);
        // A client that says hello and then never answers anything, pings included.
        io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .expect("preface");

        let (kind, _, stream, payload) = read_frame(&mut io).await;
        assert_eq!((kind, stream), (0x4, 0), "SETTINGS first");
        let params = test_wire::settings(&payload);
        for want in [(0x3, 200), (0x4, 4 << 20), (0x5, 1 << 20), (0x6, 64 << 10)] {
            assert!(params.contains(&want), "{want:?} in {params:?}");
        }
        // Our SETTINGS get acknowledged somewhere around here.
        let (kind, stream, payload) = loop {
            match read_frame(&mut io).await {
                (0x4, flags, _, _) if flags & 0x1 == 0x1 => continue,
                (kind, _, stream, payload) => break (kind, stream, payload),
            }
        };
        assert_eq!((kind, stream), (0x8, 0), "connection WINDOW_UPDATE");
        let increment = window_increment(&payload);
        assert_eq!(increment, (16 << 20) - 65_535);

        // Keep reading (and ignoring) so the server is never blocked on writes.
        let reader = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = io.read_to_end(&mut sink).await;
        });
        let result = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server gives up on the silent client")
            .expect("server task");
        assert!(matches!(result, Err(Error::Keepalive { .. })), "{result:?}");
        reader.abort();
    }
}
