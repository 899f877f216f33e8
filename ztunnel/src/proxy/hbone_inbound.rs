//! :15008 — HBONE into an enrolled pod: mTLS with the pod's certificate (the client must
//! chain to our roots and share our trust domain), then one HTTP/2 CONNECT stream per
//! connection to the app, which is dialled inside the pod from the client's address.
use std::{
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tracing::Instrument as _;
use ztunnel_common::ports;

use super::{Direction, PodNet, Proxy, return_path};
use crate::{
    hbone::{self, Accepted, Rejection, Target, TargetAddr},
    identity::Identity,
    limits::Step,
    tls,
};

pub(super) async fn accept(
    proxy: Arc<Proxy>,
    pod: Arc<PodNet>,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let span = tracing::info_span!("hbone", pod = %pod.name, %peer);
    async move {
        if let Err(e) = connection(proxy, pod, stream, peer).await {
            let why = super::error_chain(&e);
            if e.kind() == io::ErrorKind::TimedOut {
                // Counted and logged (rate-limited) where it fired; a client can make
                // thousands of these.
                tracing::debug!(error = %why, "HBONE connection ended with an error");
            } else {
                tracing::info!(error = %why, "HBONE connection ended with an error");
            }
        }
    }
    .instrument(span)
    .await;
}

async fn connection(
    proxy: Arc<Proxy>,
    pod: Arc<PodNet>,
    stream: TcpStream,
    peer: SocketAddr,
) -> io::Result<()> {
    let arrived_on = stream.local_addr()?.ip();
    let _ = stream.set_nodelay(true);
    // One deadline from accept to the end of the TLS handshake, the certificate included:
    // until then the client is anonymous and holds only a socket and a small task. The
    // TLS state (rustls's read buffer, 4 to 8 KiB, and kilobytes of handshake future) is
    // made only once the client's whole first record has arrived.
    let handshake = async {
        tls::first_record(&stream).await?;
        Box::pin(async {
            let cert = proxy
                .certs
                .get(&pod.identity)
                .await
                .map_err(io::Error::other)?;
            let config = pod.server_config(&cert).map_err(io::Error::other)?;
            tokio_rustls::TlsAcceptor::from(config)
                .accept(crate::tls::transport(stream))
                .await
        })
        .await
    };
    let tls = proxy.step(Step::TlsAccept, handshake).await?;
    // What follows is boxed, and `tls` is not touched here: a connection still in its TLS
    // handshake must not carry the TLS session, the HTTP/2 server or their buffers in its
    // task (a borrowed local would keep its space in this function's state).
    Box::pin(serve(proxy, pod, tls, arrived_on, peer)).await
}

/// Serves an HBONE connection's CONNECT streams once TLS has authenticated the client.
async fn serve(
    proxy: Arc<Proxy>,
    pod: Arc<PodNet>,
    mut tls: tokio_rustls::server::TlsStream<tls::Transport>,
    arrived_on: IpAddr,
    peer: SocketAddr,
) -> io::Result<()> {
    let identity = tls::peer_identity(tls.get_ref().1)
        .ok_or_else(|| io::Error::other("client certificate has no SPIFFE identity"))?;
    let client = Arc::new(Client {
        spiffe: identity.to_string(),
        identity,
    });
    // Authenticated: now the connection gets its read buffer.
    tls.get_mut().0.authenticated();
    let drain = proxy.drain.subscribe();
    let handler_proxy = proxy.clone();
    let settings = hbone::ServerSettings {
        handshake_timeout: proxy.limits.h2_accept_timeout,
        ..hbone::ServerSettings::default()
    };
    let served = hbone::serve(
        tls,
        settings,
        arrived_on,
        (client, peer, arrived_on),
        drain,
        move |target: Target, (client, peer, arrived_on): (Arc<Client>, SocketAddr, IpAddr)| {
            let (proxy, pod) = (handler_proxy.clone(), pod.clone());
            async move { open_stream(proxy, pod, target, client, peer, arrived_on).await }
        },
    )
    .await;
    if let Err(hbone::server::Error::HandshakeTimeout { source, .. }) = &served {
        proxy.count_timeout(source.step, source.after);
    }
    served.map_err(io::Error::other)
}

/// The authenticated client of an HBONE connection, shared by its streams.
struct Client {
    identity: Identity,
    /// [`Self::identity`] as its URI, for the streams' records.
    spiffe: String,
}

async fn open_stream(
    proxy: Arc<Proxy>,
    pod: Arc<PodNet>,
    target: Target,
    client: Arc<Client>,
    peer: SocketAddr,
    arrived_on: IpAddr,
) -> Result<Accepted<Counted>, Rejection> {
    let dst = match &target.addr {
        TargetAddr::Ip(dst) => *dst,
        // A service hostname and port, as Istio accepts them: the service of that
        // hostname (this pod's namespace first), its target port for that port, on the
        // address the client dialled (this pod's).
        TargetAddr::Host { name, port } => {
            let store = proxy.store();
            let namespace = pod.name.split('/').next().unwrap_or_default();
            let Some(svc) = store.service_by_hostname(name, namespace) else {
                return Err(Rejection::unavailable(format!("unknown service {name}")));
            };
            let Some(target_port) = store.cfg.services[svc].target_port(*port) else {
                return Err(Rejection::unavailable(format!(
                    "service {name} has no port {port}"
                )));
            };
            SocketAddr::new(arrived_on, target_port)
        }
    };
    if ports::NEVER_CAPTURED.contains(&dst.port()) {
        return Err(Rejection::unavailable(format!(
            "port {} belongs to ztunnel",
            dst.port()
        )));
    }
    // The client as the app should see it: the tunnel's source (the calling pod).
    let src = SocketAddr::new(peer.ip(), target.forwarded_for.map_or(0, |f| f.port()));
    let started = Instant::now();
    let id = proxy.connections.open_hbone(
        Direction::Inbound,
        &pod.name,
        src,
        dst,
        dst,
        Some(client.spiffe.clone()),
        Some(pod.spiffe.clone()),
    );
    if let Err(reason) = proxy.authorize_inbound(&pod.name, src, Some(&client.identity), dst) {
        proxy
            .connections
            .close(id, 0, 0, started.elapsed(), format!("denied: {reason}"));
        return Err(Rejection::unauthorized(reason));
    }
    // The app's replies to the client's address need the return path until this stream
    // ends, also if the pod is unenrolled meanwhile; a pod already unenrolled takes no
    // new streams.
    let Some(lease) = pod.return_path() else {
        let why = "the pod is no longer enrolled".to_owned();
        proxy
            .connections
            .close(id, 0, 0, started.elapsed(), format!("refused: {why}"));
        return Err(Rejection::unavailable(why));
    };
    let upstream = match proxy
        .connect_from_pod(&pod, Some(peer.ip()), dst, return_path::MARK)
        .await
    {
        Ok(u) => u,
        Err(e) => {
            proxy
                .connections
                .close(id, 0, 0, started.elapsed(), format!("connect failed: {e}"));
            return Err(Rejection::unavailable(format!(
                "connect to {dst} failed: {e}"
            )));
        }
    };
    let baggage = super::workload_baggage(&proxy.store(), &pod.name);
    {
        use std::os::fd::AsRawFd as _;
        proxy.connections.attach(id, &[upstream.as_raw_fd()]);
    }
    let counted = Counted {
        inner: upstream,
        _return_path: lease,
        proxy,
        id,
        started,
        to_app: 0,
        from_app: 0,
    };
    Ok(match baggage {
        Some(b) => Accepted::new(counted).with_baggage(b),
        None => Accepted::new(counted),
    })
}

/// The app-side socket of a tunnelled stream, counting bytes each way; its drop closes
/// the connection record (and writes the access log line).
pub(super) struct Counted {
    inner: TcpStream,
    _return_path: return_path::Lease,
    proxy: Arc<Proxy>,
    id: u64,
    started: Instant,
    to_app: u64,
    from_app: u64,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.from_app += (buf.filled().len() - before) as u64;
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &r {
            self.to_app += *n as u64;
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.proxy.connections.close(
            self.id,
            self.to_app,
            self.from_app,
            self.started.elapsed(),
            "ok".to_owned(),
        );
    }
}
