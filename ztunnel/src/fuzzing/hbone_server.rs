//! The HBONE server (`:15008` after TLS) fed a raw byte stream: the input is everything a
//! client writes (HTTP/2 preface, frames, tunnel bytes) over an in-memory connection;
//! once the server has gone quiet the client half-closes, and the server's answers are
//! read and dropped. CONNECTs to port 503 and 401 are refused by the handler, the others
//! reach an echo upstream.
//!
//! Bounded: each input runs on its own single-threaded runtime, dropped at the end with
//! every task left on it, and the server must be done within [`super::DEADLINE`] of the
//! client's end of stream (it normally is at once: no timer is involved); otherwise it
//! would hold the connection open for a client that is gone, which is a finding. Input
//! size is bounded by libFuzzer (`-max_len`). The seeds are real sessions of h2's
//! client, recorded.
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, DuplexStream};
use tokio::sync::watch;

use crate::hbone::{
    Accepted, Baggage, ConnectRequest, H2Stream, Rejection, ServerSettings, Target, serve,
};

const POD: &str = "10.0.0.7";

fn pod_ip() -> IpAddr {
    POD.parse().expect("valid address")
}

/// Echoes everything back and half-closes when the other side does.
fn echo_upstream() -> DuplexStream {
    let (ours, theirs) = tokio::io::duplex(16 * 1024);
    tokio::spawn(async move {
        let (mut r, mut w) = tokio::io::split(theirs);
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    });
    ours
}

/// Serves `server` until the connection ends; `_drain` stays open, so no drain. Counts
/// the tunnels opened in `accepted`.
async fn serve_one(server: DuplexStream, accepted: Arc<AtomicUsize>) {
    let (_drain_tx, drain) = watch::channel(false);
    let handler = move |target: Target, _peer: ()| {
        let accepted = accepted.clone();
        async move {
            match target.addr.port() {
                503 => Err(Rejection::unavailable("no such port")),
                401 => Err(Rejection::unauthorized("denied by policy")),
                _ => {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    Ok(Accepted::new(echo_upstream()).with_baggage(Baggage {
                        namespace: "dst-ns".into(),
                        ..Baggage::default()
                    }))
                }
            }
        }
    };
    let _ = serve(
        server,
        ServerSettings::default(),
        pod_ip(),
        (),
        drain,
        handler,
    )
    .await;
}

pub fn run(data: &[u8]) {
    replay(data);
}

/// What a replay did: tunnels opened, and everything the server wrote.
#[cfg_attr(not(test), expect(dead_code, reason = "the unit tests read it"))]
struct Replay {
    accepted: usize,
    answer: Vec<u8>,
}

fn replay(data: &[u8]) -> Replay {
    super::runtime().block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mut read, mut write) = tokio::io::split(client);
        let accepted = Arc::new(AtomicUsize::new(0));
        let server = tokio::spawn(serve_one(server, accepted.clone()));
        let answered = Arc::new(AtomicUsize::new(0));
        let reader = tokio::spawn({
            let answered = answered.clone();
            async move {
                let (mut answer, mut buf) = (Vec::new(), [0; 16 * 1024]);
                while let Ok(n @ 1..) = read.read(&mut buf).await {
                    answer.extend_from_slice(&buf[..n]);
                    answered.fetch_add(n, Ordering::Relaxed);
                }
                answer
            }
        });
        // The server may stop reading (a connection error) before it has read everything.
        let _ = write.write_all(data).await;
        settle(&answered).await;
        let _ = write.shutdown().await;
        match tokio::time::timeout(super::DEADLINE, server).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => std::panic::resume_unwind(e.into_panic()),
            Err(_) => panic!(
                "hbone server still open {:?} after the client closed",
                super::DEADLINE
            ),
        }
        // The server is gone, so its end of the connection is closed: the read ends.
        let answer = reader.await.expect("the reader does not panic");
        Replay {
            accepted: accepted.load(Ordering::Relaxed),
            answer,
        }
    })
}

/// Lets the server act on what it was sent before the client closes (an end of stream
/// at once would end the connection before its streams reach the handler): yields to the
/// other tasks until the server has written nothing new for a while. Everything runs on
/// this thread over in-memory pipes, so there is no clock involved.
async fn settle(answered: &AtomicUsize) {
    const QUIET_ROUNDS: usize = 8;
    const MAX_ROUNDS: usize = 1000;
    let (mut last, mut quiet) = (answered.load(Ordering::Relaxed), 0);
    for _ in 0..MAX_ROUNDS {
        tokio::task::yield_now().await;
        let now = answered.load(Ordering::Relaxed);
        quiet = if now == last { quiet + 1 } else { 0 };
        if quiet == QUIET_ROUNDS {
            return;
        }
        last = now;
    }
}

/// Records what is written through it.
struct Recorder {
    io: DuplexStream,
    written: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for Recorder {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Recorder {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, buf))?;
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What one recorded client does once connected.
#[derive(Clone, Copy)]
enum Session {
    /// One tunnel: a message echoed back, then end of stream.
    Echo,
    /// Refused requests (not CONNECT, another address, 503, 401) around a working tunnel.
    Refusals,
    /// A tunnel the client resets.
    Reset,
    /// Many tunnels at once.
    Many,
}

fn connect(authority: &str) -> Request<()> {
    ConnectRequest::new(authority, "10.0.0.1:41234".parse().expect("valid address"))
        .to_http()
        .expect("valid request")
}

async fn open(send: &mut h2::client::SendRequest<Bytes>, req: Request<()>) -> Option<H2Stream> {
    let mut ready = send.clone().ready().await.ok()?;
    let (resp, stream) = ready.send_request(req, false).ok()?;
    let resp = resp.await.ok()?;
    Some(H2Stream::new(stream, resp.into_body()))
}

async fn echo(tunnel: &mut H2Stream, msg: &[u8]) {
    tunnel.write_all(msg).await.expect("write to the tunnel");
    let mut got = vec![0; msg.len()];
    tunnel.read_exact(&mut got).await.expect("read the echo");
}

/// The bytes h2's client writes during `session` against the real server.
fn record(session: Session) -> Vec<u8> {
    let written = Arc::new(Mutex::new(Vec::new()));
    let recorded = written.clone();
    super::runtime().block_on(async move {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(serve_one(server, Arc::default()));
        let io = Recorder {
            io: client,
            written,
        };
        let (mut send, conn) = h2::client::handshake(io).await.expect("client handshake");
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let ok = format!("{POD}:8080");
        match session {
            Session::Echo => {
                let mut t = open(&mut send, connect(&ok)).await.expect("tunnel");
                echo(&mut t, b"hello through the tunnel").await;
                t.shutdown().await.expect("end of stream");
            }
            Session::Refusals => {
                let mut post = Request::new(());
                *post.method_mut() = Method::POST;
                *post.uri_mut() = format!("http://{POD}:8080/").parse().expect("uri");
                for req in [
                    post,
                    connect("10.0.0.8:8080"),
                    connect(&format!("{POD}:503")),
                    connect(&format!("{POD}:401")),
                ] {
                    let _ = open(&mut send, req).await;
                }
                let mut t = open(&mut send, connect(&ok)).await.expect("tunnel");
                echo(&mut t, b"still works").await;
            }
            Session::Reset => {
                let mut ready = send.clone().ready().await.expect("ready");
                let (resp, mut stream) = ready.send_request(connect(&ok), false).expect("send");
                let _ = resp.await;
                stream.send_reset(h2::Reason::CANCEL);
            }
            Session::Many => {
                let mut tunnels = Vec::new();
                for port in 8000..8010 {
                    tunnels.push(open(&mut send, connect(&format!("{POD}:{port}"))).await);
                }
                for t in tunnels.iter_mut().flatten() {
                    echo(t, b"x").await;
                }
            }
        }
        // Every request was answered, so everything the client wrote is recorded.
        drop(send);
        conn.abort();
        server.abort();
    });
    recorded.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("echo", record(Session::Echo)),
        ("refusals", record(Session::Refusals)),
        ("reset", record(Session::Reset)),
        ("many", record(Session::Many)),
        ("preface-only", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_sessions_start_with_the_preface_and_replay_cleanly() {
        for (name, seed) in seeds() {
            assert!(
                seed.starts_with(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
                "seed {name}"
            );
            run(&seed);
        }
    }

    #[test]
    fn a_replayed_session_reaches_the_upstream_and_is_echoed() {
        let msg = b"hello through the tunnel";
        let replayed = replay(&record(Session::Echo));
        assert_eq!(replayed.accepted, 1);
        assert!(
            replayed.answer.windows(msg.len()).any(|w| w == msg),
            "the echo comes back in a DATA frame"
        );
        let replayed = replay(&record(Session::Refusals));
        assert_eq!(replayed.accepted, 1, "only the last request opens a tunnel");
    }
}
