//! A small app for the privileged tests to run inside "pods": an echo server and
//! clients that check what comes back byte for byte.
use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use rand::{RngCore as _, SeedableRng as _, rngs::StdRng};
use sha2::{Digest as _, Sha256};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo every connection's bytes back, then half-close.
    Serve {
        addr: SocketAddr,
        /// Print `conn from <peer>` for each accepted connection.
        #[arg(long)]
        log_peers: bool,
        /// Read everything and answer nothing (a sink), then close.
        #[arg(long)]
        discard: bool,
        /// One event loop (tokio, one thread) instead of a thread per connection: what a
        /// server taking many short connections does.
        #[arg(long, conflicts_with_all = ["log_peers", "discard"])]
        event_loop: bool,
    },
    /// Send `bytes` zero bytes, half-close, read whatever comes back until EOF. Prints
    /// `sent=… received=…`.
    Upload {
        addr: SocketAddr,
        #[arg(long)]
        bytes: u64,
    },
    /// Send `bytes` pseudo-random bytes in `chunk`-sized writes, half-close, read the echo
    /// and compare checksums. Prints `peer=…` and `sent=… received=… match=true`.
    Call {
        addr: SocketAddr,
        #[arg(long, default_value_t = 1024)]
        bytes: usize,
        #[arg(long, default_value_t = 65536)]
        chunk: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Send this text repeated instead of random bytes (to look for it on the wire).
        #[arg(long)]
        pattern: Option<String>,
        /// Run as an event-loop app (non-blocking socket, tokio) instead of a blocking
        /// writer thread plus a blocking reader.
        #[arg(long)]
        event_loop: bool,
        /// After sending this many bytes, print `paused` and stop writing until
        /// `--resume-file` exists (the echo is still read meanwhile).
        #[arg(long, requires = "resume_file")]
        pause_at: Option<usize>,
        #[arg(long)]
        resume_file: Option<std::path::PathBuf>,
        /// Bind the socket to this address (port 0: any) before connecting, as an app
        /// choosing its source does.
        #[arg(long, conflicts_with_all = ["pattern", "event_loop"])]
        bind: Option<SocketAddr>,
    },
    /// Keep one connection and ping through it every 50 ms for `secs` seconds, or
    /// until `--stop-file` exists (then at most `secs`).
    Hold {
        addr: SocketAddr,
        #[arg(long)]
        secs: u64,
        #[arg(long)]
        stop_file: Option<std::path::PathBuf>,
        /// A ping whose echo takes longer fails the hold.
        #[arg(long, default_value_t = 10)]
        timeout_secs: u64,
    },
    /// New connections at a steady rate: one every 1/`per_sec` s, each sending
    /// `bytes` and checking the echo, for `secs` seconds or until `--stop-file` exists.
    /// Prints `started` once under way, then one JSON line with the counts and the
    /// first failures (each with its time since the start); never fails itself.
    Rate {
        addr: SocketAddr,
        #[arg(long)]
        per_sec: u32,
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value_t = 64)]
        bytes: usize,
        #[arg(long)]
        stop_file: Option<std::path::PathBuf>,
        /// A connection that takes longer (connect, write or read) fails.
        #[arg(long, default_value_t = 10)]
        timeout_secs: u64,
    },
    /// Open `count` connections at once, echo one byte on each, print `open=<count>`, and
    /// keep them open for `secs` seconds.
    Parallel {
        addr: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        secs: u64,
    },
    /// Open `count` short connections one after another, one byte each way.
    Many {
        addr: SocketAddr,
        #[arg(long)]
        count: usize,
    },
    /// Connect two sockets bound to the same local port (SO_REUSEADDR) to `addr`, so
    /// the second connect fails in the kernel (its 4-tuple is taken); print each
    /// outcome (`first=ok second=<error>`), then close both.
    SamePort {
        addr: SocketAddr,
        #[arg(long)]
        port: u16,
    },
    /// A fake upstream DNS resolver on UDP and TCP `addr`: `external.example.org` has A
    /// 198.51.100.7, `big.example.org` has 60 A records (truncated over UDP without room
    /// for them), every other name is NXDOMAIN. Prints `ready`.
    DnsUpstream { addr: SocketAddr },
    /// Ask `server` for `name`'s A records from an unconnected UDP socket (`sendto`,
    /// `recvfrom`), a connected one with `--connect` (`send`, `recv`, the source from
    /// `getpeername`), or over TCP with `--tcp`; print `from=<answer's source>
    /// rcode=<code> a=<ip>,<ip>…`.
    DnsQuery {
        server: SocketAddr,
        name: String,
        #[arg(long)]
        tcp: bool,
        #[arg(long)]
        connect: bool,
    },
    /// Back-to-back UDP queries for `name` to `server` for `secs` seconds, each answer
    /// checked for the one A record `expect`; prints one JSON line (`queries`, `per_sec`,
    /// `p50_us`, `p99_us`, `wrong`: answers missing or not `expect`).
    DnsRr {
        server: SocketAddr,
        name: String,
        #[arg(long)]
        expect: String,
        #[arg(long)]
        secs: f64,
    },
    /// Request/response latency on one connection: write `size` bytes, read the echo,
    /// repeat for `secs` seconds; back to back, or at `rate` requests per second with each
    /// latency counted from the request's scheduled time. Prints one JSON line.
    Rr {
        addr: SocketAddr,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long)]
        secs: f64,
        #[arg(long)]
        rate: Option<u32>,
    },
    /// An HTTP server (HTTP/1.1 and HTTP/2, detected) on `addr`: every request is
    /// answered 200 with `<name> <method> <path> <version> host=<host>` and a newline
    /// (header `x-served-by: <name>`), except `/status/<code>`, answered with that code,
    /// `/slow/<ms>` and `/sleep/<ms>`, answered after that long, and a request with an `Upgrade` header,
    /// answered 101 and then echoed byte for byte. Prints `ready <addr>`.
    HttpServe {
        addr: SocketAddr,
        #[arg(long)]
        name: String,
        /// Answer every `n`th request 503 (a flaky backend).
        #[arg(long)]
        fail_every: Option<u64>,
    },
    /// `count` HTTP requests to `addr` (one connection, kept alive), printing one line per
    /// answer, `status=<code> body=<first line>`, then `summary {"<status> <served-by>":
    /// count, …}` as JSON. `--h2` speaks HTTP/2 (prior knowledge). A request that fails is
    /// a line `error=<reason>` and the client connects again.
    HttpGet(HttpGet),
    /// An HTTP/1.1 upgrade to `addr` (`Upgrade: echo`, as a WebSocket client asks for
    /// one), then `bytes` pseudo-random bytes through the upgraded connection, read back
    /// and compared. Prints `status=<code> sent=… received=… match=true|false`.
    HttpUpgrade {
        addr: SocketAddr,
        #[arg(long, default_value_t = 4096)]
        bytes: usize,
    },
    /// HTTP request/response latency on one kept-alive HTTP/1.1 connection: `GET path`,
    /// read the whole answer (it must be 200), repeat for `secs` seconds; back to back, or
    /// at `rate` requests per second with each latency counted from the request's
    /// scheduled time. Prints one JSON line, as `rr` does.
    HttpRr {
        addr: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long)]
        secs: f64,
        #[arg(long)]
        rate: Option<u32>,
    },
    /// New connections per second: one event loop keeping `concurrency` connections in
    /// flight, each a connect, one byte each way and a close, for `secs` seconds. Prints
    /// one JSON line; a connection that fails or times out fails the run.
    Conns {
        addr: SocketAddr,
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Serve {
            addr,
            event_loop: true,
            ..
        } => serve_event_loop(addr),
        Cmd::Serve {
            addr,
            log_peers,
            discard,
            event_loop: false,
        } => serve(addr, log_peers, discard),
        Cmd::Upload { addr, bytes } => upload(addr, bytes),
        Cmd::Parallel { addr, count, secs } => parallel(addr, count, secs),
        Cmd::Call {
            addr,
            bytes,
            chunk,
            seed,
            pattern,
            event_loop,
            pause_at,
            resume_file,
            bind,
        } => {
            if let Some(p) = pattern {
                call_pattern(addr, bytes, &p)
            } else if event_loop {
                call_event_loop(addr, bytes, chunk, seed)
            } else {
                let pause = pause_at.zip(resume_file);
                call(addr, bind, bytes, chunk, seed, pause)
            }
        }
        Cmd::Hold {
            addr,
            secs,
            stop_file,
            timeout_secs,
        } => hold(
            addr,
            secs,
            stop_file.as_deref(),
            Duration::from_secs(timeout_secs),
        ),
        Cmd::Rate {
            addr,
            per_sec,
            secs,
            bytes,
            stop_file,
            timeout_secs,
        } => rate(
            addr,
            per_sec,
            Duration::from_secs_f64(secs),
            bytes,
            stop_file.as_deref(),
            Duration::from_secs(timeout_secs),
        ),
        Cmd::Many { addr, count } => many(addr, count),
        Cmd::SamePort { addr, port } => same_port(addr, port),
        Cmd::DnsUpstream { addr } => dns_upstream(addr),
        Cmd::DnsRr {
            server,
            name,
            expect,
            secs,
        } => dns_rr(server, &name, &expect, Duration::from_secs_f64(secs)),
        Cmd::DnsQuery {
            server,
            name,
            tcp,
            connect,
        } => dns_query(server, &name, tcp, connect),
        Cmd::Rr {
            addr,
            size,
            secs,
            rate,
        } => rr(addr, size, Duration::from_secs_f64(secs), rate),
        Cmd::Conns {
            addr,
            secs,
            concurrency,
        } => conns(addr, Duration::from_secs_f64(secs), concurrency),
        Cmd::HttpServe {
            addr,
            name,
            fail_every,
        } => http_serve(addr, name, fail_every),
        Cmd::HttpUpgrade { addr, bytes } => http_upgrade(addr, bytes),
        Cmd::HttpRr {
            addr,
            path,
            secs,
            rate,
        } => http_rr(addr, &path, Duration::from_secs_f64(secs), rate),
        Cmd::HttpGet(o) => http_get(&o),
    }
}

/// A tokio listener on `addr`, announced with `ready <addr>` once it listens.
async fn listen_announced(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to bind {addr}"))?;
    println!("ready {addr}");
    std::io::stdout().flush()?;
    Ok(l)
}

/// See [`Cmd::HttpServe`].
fn http_serve(addr: SocketAddr, name: String, fail_every: Option<u64>) -> anyhow::Result<()> {
    use http_body_util::Full;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let l = listen_announced(addr).await?;
        let name = std::sync::Arc::new(name);
        let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        loop {
            let (tcp, _) = l.accept().await?;
            let (name, served) = (name.clone(), served.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |mut req: hyper::Request<hyper::body::Incoming>| {
                        let name = name.clone();
                        let n = served.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                        async move {
                            if let Some(proto) = req.headers().get(hyper::header::UPGRADE).cloned()
                            {
                                let on = hyper::upgrade::on(&mut req);
                                tokio::spawn(async move {
                                    if let Ok(up) = on.await {
                                        let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                                        let _ = tokio::io::copy(&mut r, &mut w).await;
                                    }
                                });
                                let resp = hyper::Response::builder()
                                    .status(101)
                                    .header(hyper::header::CONNECTION, "upgrade")
                                    .header(hyper::header::UPGRADE, proto)
                                    .header("x-served-by", name.as_str())
                                    .body(Full::new(bytes::Bytes::new()))?;
                                return anyhow::Ok(resp);
                            }
                            let path = req.uri().path().to_owned();
                            let host = req
                                .headers()
                                .get(hyper::header::HOST)
                                .and_then(|h| h.to_str().ok())
                                .map(str::to_owned)
                                .or_else(|| req.uri().authority().map(|a| a.to_string()))
                                .unwrap_or_default();
                            let mut status = 200u16;
                            if fail_every.is_some_and(|every| every > 0 && n % every == 0) {
                                status = 503;
                            }
                            if let Some(code) = path.strip_prefix("/status/") {
                                status = code.parse().unwrap_or(400);
                            }
                            if let Some(ms) = path
                                .strip_prefix("/slow/")
                                .or_else(|| path.strip_prefix("/sleep/"))
                            {
                                let ms: u64 = ms.parse().unwrap_or(0);
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            let text = format!(
                                "{name} {} {path} {:?} host={host}\n",
                                req.method(),
                                req.version()
                            );
                            let resp = hyper::Response::builder()
                                .status(status)
                                .header("x-served-by", name.as_str())
                                .body(Full::new(bytes::Bytes::from(text)))?;
                            anyhow::Ok(resp)
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    })
}

/// See [`Cmd::HttpRr`].
fn http_rr(addr: SocketAddr, path: &str, secs: Duration, rate: Option<u32>) -> anyhow::Result<()> {
    use http_body_util::{BodyExt as _, Empty};
    use hyper_util::rt::TokioIo;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("failed to connect to {addr}"))?;
        tcp.set_nodelay(true)?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1_000, 10_000_000_000, 3)?;
        let interval = rate.map(|r| Duration::from_secs_f64(1.0 / f64::from(r.max(1))));
        let start = tokio::time::Instant::now();
        let mut n = 0u64;
        while start.elapsed() < secs {
            // The clock starts at the scheduled time. Waiting with the thread's sleep, as
            // `rr` does: tokio's timer has a 1 ms granularity, which would add up to a
            // millisecond to every latency (nothing else runs on this runtime between
            // requests).
            let t0 = match interval {
                Some(i) => {
                    let due = start + i * u32::try_from(n)?;
                    if let Some(wait) = due.checked_duration_since(tokio::time::Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    due
                }
                None => tokio::time::Instant::now(),
            };
            send.ready().await?;
            let req = hyper::Request::builder()
                .uri(path)
                .header(hyper::header::HOST, addr.to_string())
                .body(Empty::<bytes::Bytes>::new())?;
            let resp = send
                .send_request(req)
                .await
                .with_context(|| format!("request {n}"))?;
            let status = resp.status();
            resp.into_body().collect().await?;
            if status != hyper::StatusCode::OK {
                bail!("request {n}: {status}");
            }
            hist.saturating_record(u64::try_from(t0.elapsed().as_nanos())?.max(1_000));
            n += 1;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let us = |q: f64| hist.value_at_quantile(q) as f64 / 1_000.0;
        println!(
            "{}",
            serde_json::json!({
                "requests": n,
                "per_sec": n as f64 / elapsed,
                "p50_us": us(0.50),
                "p90_us": us(0.90),
                "p99_us": us(0.99),
                "max_us": hist.max() as f64 / 1_000.0,
            })
        );
        anyhow::Ok(())
    })
}

/// See [`Cmd::HttpUpgrade`].
fn http_upgrade(addr: SocketAddr, bytes: usize) -> anyhow::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
    )?;
    // The response head, byte by byte: nothing after it may be consumed here.
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b)? == 0 {
            bail!(
                "connection closed in the response head: {:?}",
                String::from_utf8_lossy(&head)
            );
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let status = head.split(' ').nth(1).unwrap_or("?").to_owned();
    if status != "101" {
        println!("status={status} sent=0 received=0 match=false");
        return Ok(());
    }
    let mut payload = vec![0u8; bytes];
    StdRng::seed_from_u64(7).fill_bytes(&mut payload);
    let mut writer = s.try_clone()?;
    let sent = payload.clone();
    let w = std::thread::spawn(move || writer.write_all(&sent));
    let mut got = vec![0u8; bytes];
    s.read_exact(&mut got)?;
    w.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    println!(
        "status=101 sent={bytes} received={} match={}",
        got.len(),
        got == payload
    );
    Ok(())
}

// `podapp http-get`'s options (its help is `Cmd::HttpGet`'s).
#[derive(clap::Args)]
struct HttpGet {
    addr: SocketAddr,
    #[arg(long, default_value = "/")]
    path: String,
    #[arg(long, default_value = "GET")]
    method: String,
    #[arg(long, default_value_t = 1)]
    count: usize,
    #[arg(long)]
    h2: bool,
    /// Extra request headers, `name:value`.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// The `Host` header (default: `addr`).
    #[arg(long)]
    host: Option<String>,
    /// Send this text as the body.
    #[arg(long)]
    body: Option<String>,
}

/// See [`Cmd::HttpGet`].
fn http_get(o: &HttpGet) -> anyhow::Result<()> {
    use http_body_util::{BodyExt as _, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    type Sender = Box<
        dyn FnMut(
            hyper::Request<Full<bytes::Bytes>>,
        ) -> std::pin::Pin<
            Box<
                dyn std::future::Future<
                        Output = hyper::Result<hyper::Response<hyper::body::Incoming>>,
                    > + Send,
            >,
        >,
    >;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let connect = || async {
            let tcp = tokio::time::timeout(
                Duration::from_secs(10),
                tokio::net::TcpStream::connect(o.addr),
            )
            .await
            .context("connect timed out")??;
            let sender: Sender = if o.h2 {
                let (send, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                        .await?;
                tokio::spawn(conn);
                Box::new(move |r| {
                    let mut send = send.clone();
                    Box::pin(async move { send.send_request(r).await })
                })
            } else {
                let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(conn);
                let send = std::sync::Arc::new(tokio::sync::Mutex::new(send));
                Box::new(move |r| {
                    let send = send.clone();
                    Box::pin(async move {
                        let mut s = send.lock().await;
                        s.ready().await?;
                        s.send_request(r).await
                    })
                })
            };
            anyhow::Ok(sender)
        };
        let mut summary = std::collections::BTreeMap::<String, usize>::new();
        let mut sender = None;
        for _ in 0..o.count {
            if sender.is_none() {
                match connect().await {
                    Ok(s) => sender = Some(s),
                    Err(e) => {
                        println!("error=connect: {e:#}");
                        *summary.entry("error".to_owned()).or_default() += 1;
                        continue;
                    }
                }
            }
            let Some(send) = sender.as_mut() else {
                continue;
            };
            let host = o.host.clone().unwrap_or_else(|| o.addr.to_string());
            let uri = if o.h2 {
                format!("http://{host}{}", o.path)
            } else {
                o.path.clone()
            };
            let mut b = hyper::Request::builder().method(o.method.as_str()).uri(uri);
            if !o.h2 {
                b = b.header(hyper::header::HOST, host);
            }
            for h in &o.headers {
                let (k, v) = h.split_once(':').context("--header wants name:value")?;
                b = b.header(k.trim(), v.trim());
            }
            let body = o.body.clone().unwrap_or_default();
            let req = b.body(Full::new(bytes::Bytes::from(body)))?;
            let answer = tokio::time::timeout(Duration::from_secs(30), async {
                let resp = send(req).await?;
                let status = resp.status().as_u16();
                let by = resp
                    .headers()
                    .get("x-served-by")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_owned();
                let body = resp.into_body().collect().await?.to_bytes();
                anyhow::Ok((status, by, String::from_utf8_lossy(&body).into_owned()))
            })
            .await;
            match answer {
                Ok(Ok((status, by, body))) => {
                    println!("status={status} body={}", body.lines().next().unwrap_or(""));
                    *summary.entry(format!("{status} {by}")).or_default() += 1;
                }
                Ok(Err(e)) => {
                    println!("error={e:#}");
                    *summary.entry("error".to_owned()).or_default() += 1;
                    sender = None;
                }
                Err(_) => {
                    println!("error=no answer within 30s");
                    *summary.entry("error".to_owned()).or_default() += 1;
                    sender = None;
                }
            }
        }
        println!("summary {}", serde_json::to_string(&summary)?);
        std::io::stdout().flush()?;
        anyhow::Ok(())
    })
}

/// See [`Cmd::Upload`].
fn upload(addr: SocketAddr, bytes: u64) -> anyhow::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(30))
        .with_context(|| format!("failed to connect to {addr}"))?;
    let chunk = vec![0u8; 64 << 10];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n]).context("failed to send")?;
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut received = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match s.read(&mut buf).context("failed to read the answer")? {
            0 => break,
            n => received += n as u64,
        }
    }
    println!("sent={bytes} received={received}");
    Ok(())
}

fn serve(addr: SocketAddr, log_peers: bool, discard: bool) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr).with_context(|| format!("failed to bind {addr}"))?;
    println!("ready {addr}");
    std::io::stdout().flush()?;
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        if log_peers {
            println!("conn from {}", s.peer_addr()?);
            std::io::stdout().flush()?;
        }
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if discard => {}
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = s.shutdown(Shutdown::Write);
        });
    }
    Ok(())
}

/// [`serve`]'s echo on one event loop (see [`Cmd::Serve`]).
fn serve_event_loop(addr: SocketAddr) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let l = listen_announced(addr).await?;
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                // Out of descriptors or memory: wait instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 << 10];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    })
}

/// The pseudo-random payload a client sends, chunk by chunk, with its running checksum.
struct Payload {
    rng: StdRng,
    hash: Sha256,
    buf: Vec<u8>,
    left: usize,
    total: usize,
}

impl Payload {
    fn new(bytes: usize, chunk: usize, seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            hash: Sha256::new(),
            buf: vec![0u8; chunk.max(1)],
            left: bytes,
            total: bytes,
        }
    }

    /// Bytes handed out so far.
    fn sent(&self) -> usize {
        self.total - self.left
    }

    /// The next chunk (already hashed), or `None` when all bytes are out.
    fn next_chunk(&mut self) -> Option<&[u8]> {
        if self.left == 0 {
            return None;
        }
        let n = self.left.min(self.buf.len());
        self.rng.fill_bytes(&mut self.buf[..n]);
        self.hash.update(&self.buf[..n]);
        self.left -= n;
        Some(&self.buf[..n])
    }

    fn digest(self) -> String {
        format!("{:x}", self.hash.finalize())
    }
}

/// The echo as it comes back: its length and checksum.
#[derive(Default)]
struct Echo {
    hash: Sha256,
    got: usize,
}

impl Echo {
    fn add(&mut self, data: &[u8]) {
        self.hash.update(data);
        self.got += data.len();
    }

    /// Prints the verdict line the tests read, and fails when the echo differs.
    fn verdict(self, bytes: usize, sent: &str) -> anyhow::Result<()> {
        let (got, received) = (self.got, format!("{:x}", self.hash.finalize()));
        let ok = sent == received && got == bytes;
        println!("sent={bytes} received={got} match={ok}");
        if !ok {
            bail!("echo differs: sent {bytes} bytes ({sent}), received {got} ({received})");
        }
        Ok(())
    }
}

/// Waits (at most ten minutes) for `file` to exist: the upgrade test writes it once the
/// handover is over, which took 97 s in an emulated VM (7.3, stop 32: the successor's
/// eBPF programs loaded in 68 s), past the two minutes this waited before.
fn wait_for_file(file: &std::path::Path) -> anyhow::Result<()> {
    const LIMIT: Duration = Duration::from_secs(600);
    let deadline = Instant::now() + LIMIT;
    while !file.exists() {
        if Instant::now() > deadline {
            bail!("{} did not appear within {LIMIT:?}", file.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn call(
    addr: SocketAddr,
    bind: Option<SocketAddr>,
    bytes: usize,
    chunk: usize,
    seed: u64,
    mut pause: Option<(usize, std::path::PathBuf)>,
) -> anyhow::Result<()> {
    let s = match bind {
        None => TcpStream::connect(addr),
        Some(local) => connect_from(local, addr),
    }
    .with_context(|| format!("failed to connect to {addr}"))?;
    println!("peer={} local={}", s.peer_addr()?, s.local_addr()?);
    std::io::stdout().flush()?;
    let mut w = s.try_clone()?;
    let writer = std::thread::spawn(move || -> anyhow::Result<String> {
        let mut payload = Payload::new(bytes, chunk, seed);
        loop {
            let sent = payload.sent();
            if let Some((at, file)) = pause.take_if(|(at, _)| sent >= *at) {
                println!("paused sent={sent} at={at}");
                std::io::stdout().flush()?;
                wait_for_file(&file)?;
            }
            let Some(data) = payload.next_chunk() else {
                break;
            };
            w.write_all(data)
                .with_context(|| format!("write failed after {sent} bytes"))?;
        }
        w.shutdown(Shutdown::Write)?;
        Ok(payload.digest())
    });
    let mut r = s;
    let mut echo = Echo::default();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = r
            .read(&mut buf)
            .with_context(|| format!("read failed after {} bytes", echo.got))?;
        if n == 0 {
            break;
        }
        echo.add(&buf[..n]);
    }
    let sent = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    echo.verdict(bytes, &sent)
}

/// A connect from a socket bound to `local` first.
fn connect_from(local: SocketAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.bind(&local.into())?;
    s.connect(&addr.into())?;
    Ok(s.into())
}

fn call_pattern(addr: SocketAddr, bytes: usize, pattern: &str) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("failed to connect to {addr}"))?;
    println!("peer={} local={}", s.peer_addr()?, s.local_addr()?);
    let data: Vec<u8> = pattern.bytes().cycle().take(bytes).collect();
    s.write_all(&data)?;
    s.shutdown(Shutdown::Write)?;
    let mut back = Vec::new();
    s.read_to_end(&mut back)?;
    let ok = back == data;
    println!("sent={bytes} received={} match={ok}", back.len());
    if !ok {
        bail!("echo differs");
    }
    Ok(())
}

fn call_event_loop(addr: SocketAddr, bytes: usize, chunk: usize, seed: u64) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let s = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("failed to connect to {addr}"))?;
        println!("peer={} local={}", s.peer_addr()?, s.local_addr()?);
        let (mut r, mut w) = s.into_split();
        let writer = tokio::spawn(async move {
            let mut payload = Payload::new(bytes, chunk, seed);
            loop {
                let sent = payload.sent();
                let Some(data) = payload.next_chunk() else {
                    break;
                };
                w.write_all(data)
                    .await
                    .with_context(|| format!("write failed after {sent} bytes"))?;
            }
            w.shutdown().await?;
            anyhow::Ok(payload.digest())
        });
        let mut echo = Echo::default();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = r
                .read(&mut buf)
                .await
                .with_context(|| format!("read failed after {} bytes", echo.got))?;
            if n == 0 {
                break;
            }
            echo.add(&buf[..n]);
        }
        let sent = writer.await??;
        echo.verdict(bytes, &sent)
    })
}

fn hold(
    addr: SocketAddr,
    secs: u64,
    stop_file: Option<&std::path::Path>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("failed to connect to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    println!("connected peer={}", s.peer_addr()?);
    std::io::stdout().flush()?;
    let end = Instant::now() + Duration::from_secs(secs);
    let mut pings = 0u64;
    while Instant::now() < end && !stop_file.is_some_and(std::path::Path::exists) {
        let msg = format!("ping {pings}\n");
        s.write_all(msg.as_bytes())?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back)
            .with_context(|| format!("ping {pings} got no echo within {timeout:?}"))?;
        if back != msg.as_bytes() {
            bail!("ping {pings}: wrong echo");
        }
        pings += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("pings={pings}");
    Ok(())
}

/// One connection of [`rate`]: connect, send, half-close, read the whole echo.
fn one_call(addr: SocketAddr, payload: &[u8], timeout: Duration) -> anyhow::Result<()> {
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(payload).context("write")?;
    s.shutdown(Shutdown::Write).context("shutdown")?;
    let mut back = Vec::with_capacity(payload.len());
    s.read_to_end(&mut back).context("read")?;
    if back != payload {
        bail!(
            "echo of {} bytes came back as {} bytes",
            payload.len(),
            back.len()
        );
    }
    Ok(())
}

fn rate(
    addr: SocketAddr,
    per_sec: u32,
    secs: Duration,
    bytes: usize,
    stop_file: Option<&std::path::Path>,
    timeout: Duration,
) -> anyhow::Result<()> {
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    };
    let interval = Duration::from_secs_f64(1.0 / f64::from(per_sec.max(1)));
    let start = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures: Arc<Mutex<Vec<(f64, String)>>> = Arc::default();
    let failed = Arc::new(AtomicU64::new(0));
    let payload: Arc<Vec<u8>> = Arc::new((0..bytes).map(|i| (i % 251) as u8).collect());
    println!("started");
    std::io::stdout().flush()?;
    // Enough workers that a slow connection does not hold the rate back.
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (next, stop, ok, failed, failures, payload) = (
                next.clone(),
                stop.clone(),
                ok.clone(),
                failed.clone(),
                failures.clone(),
                payload.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let due = start + interval * u32::try_from(i).unwrap_or(u32::MAX);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    match one_call(addr, &payload, timeout) {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::SeqCst);
                            let mut f = failures.lock().unwrap_or_else(|p| p.into_inner());
                            if f.len() < 20 {
                                f.push((start.elapsed().as_secs_f64(), format!("{e:#}")));
                            }
                        }
                    }
                }
            })
        })
        .collect();
    while start.elapsed() < secs && !stop_file.is_some_and(std::path::Path::exists) {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("rate worker panicked"))?;
    }
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    let failures: Vec<serde_json::Value> = failures
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(at, e)| serde_json::json!({ "at_s": at, "error": e }))
        .collect();
    let out = serde_json::json!({
        "attempted": ok + failed,
        "ok": ok,
        "failed": failed,
        "secs": start.elapsed().as_secs_f64(),
        "failures": failures,
    });
    println!("{out}");
    Ok(())
}

fn parallel(addr: SocketAddr, count: usize, secs: u64) -> anyhow::Result<()> {
    let mut conns = Vec::with_capacity(count);
    for i in 0..count {
        conns.push(
            TcpStream::connect(addr).with_context(|| format!("connection {i} to {addr} failed"))?,
        );
    }
    for (i, s) in conns.iter_mut().enumerate() {
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .with_context(|| format!("connection {i}: no echo"))?;
    }
    println!("open={count}");
    std::io::stdout().flush()?;
    std::thread::sleep(Duration::from_secs(secs));
    Ok(())
}

fn many(addr: SocketAddr, count: usize) -> anyhow::Result<()> {
    for i in 0..count {
        let mut s =
            TcpStream::connect(addr).with_context(|| format!("connection {i} to {addr} failed"))?;
        s.write_all(b"x")?;
        s.shutdown(Shutdown::Write)?;
        let mut back = Vec::new();
        s.read_to_end(&mut back)?;
        if back != b"x" {
            bail!("connection {i}: wrong echo {back:?}");
        }
    }
    println!("ok={count}");
    Ok(())
}

fn same_port(addr: SocketAddr, port: u16) -> anyhow::Result<()> {
    let local = SocketAddr::new(
        if addr.is_ipv4() {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        },
        port,
    );
    let connect = || -> std::io::Result<socket2::Socket> {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )?;
        s.set_reuse_address(true)?;
        s.bind(&local.into())?;
        s.connect(&addr.into())?;
        Ok(s)
    };
    let outcome = |r: &std::io::Result<socket2::Socket>| match r {
        Ok(_) => "ok".to_owned(),
        Err(e) => format!("{e}"),
    };
    let first = connect();
    let second = connect();
    println!("first={} second={}", outcome(&first), outcome(&second));
    Ok(())
}

fn rr(addr: SocketAddr, size: usize, secs: Duration, rate: Option<u32>) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("failed to connect to {addr}"))?;
    s.set_nodelay(true)?;
    let msg = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    // Nanoseconds, 1 µs to 10 s at 3 significant digits.
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1_000, 10_000_000_000, 3)?;
    let interval = rate.map(|r| Duration::from_secs_f64(1.0 / f64::from(r.max(1))));
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < secs {
        // At a fixed rate the clock starts at the scheduled time, so a stall counts
        // against every request it delayed (no coordinated omission).
        let t0 = match interval {
            Some(i) => {
                let due = start + i * u32::try_from(n)?;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                due
            }
            None => Instant::now(),
        };
        s.write_all(&msg)?;
        s.read_exact(&mut back)
            .with_context(|| format!("request {n}: no echo"))?;
        hist.saturating_record(u64::try_from(t0.elapsed().as_nanos())?.max(1_000));
        n += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1_000.0;
    let out = serde_json::json!({
        "requests": n,
        "per_sec": n as f64 / elapsed,
        "p50_us": us(0.50),
        "p90_us": us(0.90),
        "p99_us": us(0.99),
        "max_us": hist.max() as f64 / 1_000.0,
    });
    println!("{out}");
    Ok(())
}

/// How long one connection of [`conns`] may take (connect, echo) before the run fails.
const CONN_TIMEOUT: Duration = Duration::from_secs(10);

/// See [`Cmd::Conns`]. One thread: on a small machine the client's own CPU is part of what
/// limits the rate, and an event loop spends the least of it per connection.
fn conns(addr: SocketAddr, secs: Duration, concurrency: usize) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (total, elapsed) = rt.block_on(async move {
        let start = tokio::time::Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..concurrency.max(1) {
            tasks.spawn(async move {
                let mut n = 0u64;
                while start.elapsed() < secs {
                    let one = async {
                        let mut s = tokio::net::TcpStream::connect(addr)
                            .await
                            .with_context(|| format!("connection to {addr} failed"))?;
                        s.write_all(b"x").await.context("write failed")?;
                        let mut b = [0u8; 1];
                        s.read_exact(&mut b).await.context("no echo")?;
                        anyhow::Ok(())
                    };
                    tokio::time::timeout(CONN_TIMEOUT, one)
                        .await
                        .map_err(|_| anyhow::anyhow!("took longer than {CONN_TIMEOUT:?}"))
                        .and_then(|r| r)
                        .with_context(|| format!("connection {n} of a loop"))?;
                    n += 1;
                }
                anyhow::Ok(n)
            });
        }
        let mut total = 0;
        while let Some(done) = tasks.join_next().await {
            total += done.context("connection loop panicked")??;
        }
        anyhow::Ok((total, start.elapsed().as_secs_f64()))
    })?;
    let out = serde_json::json!({ "connections": total, "per_sec": total as f64 / elapsed });
    println!("{out}");
    Ok(())
}

/// The fake upstream's answer to `query` (see [`Cmd::DnsUpstream`]): over UDP (`udp`)
/// no bigger than the query's EDNS payload size (512 without EDNS).
fn dns_answer(query: &[u8], udp: bool) -> Option<Vec<u8>> {
    use hickory_proto::{
        op::{Edns, Message, MessageType, OpCode, ResponseCode},
        rr::{RData, Record, rdata},
    };
    use std::net::Ipv4Addr;
    let req = Message::from_vec(query).ok()?;
    if req.metadata.message_type != MessageType::Query {
        return None;
    }
    let q = req.queries.first()?.clone();
    let mut m = Message::response(req.metadata.id, OpCode::Query);
    m.metadata.recursion_desired = req.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_query(q.clone());
    let limit = match &req.edns {
        Some(e) => {
            m.set_edns(Edns::new());
            usize::from(e.max_payload()).max(512)
        }
        None => 512,
    };
    let a = |ip: Ipv4Addr| Record::from_rdata(q.name.clone(), 60, RData::A(rdata::A(ip)));
    match q.name.to_ascii().to_ascii_lowercase().as_str() {
        "external.example.org." => {
            m.add_answer(a(Ipv4Addr::new(198, 51, 100, 7)));
        }
        "big.example.org." => {
            for i in 1..=60 {
                m.add_answer(a(Ipv4Addr::new(198, 51, 100, i)));
            }
        }
        _ => m.metadata.response_code = ResponseCode::NXDomain,
    }
    let bytes = m.to_vec().ok()?;
    if udp && bytes.len() > limit {
        return m.truncate().to_vec().ok();
    }
    Some(bytes)
}

/// See [`Cmd::DnsUpstream`].
fn dns_upstream(addr: SocketAddr) -> anyhow::Result<()> {
    let udp =
        std::net::UdpSocket::bind(addr).with_context(|| format!("failed to bind udp {addr}"))?;
    let tcp = TcpListener::bind(addr).with_context(|| format!("failed to bind tcp {addr}"))?;
    println!("ready");
    std::io::stdout().flush()?;
    std::thread::spawn(move || {
        for stream in tcp.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || -> std::io::Result<()> {
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                loop {
                    let mut len = [0u8; 2];
                    s.read_exact(&mut len)?;
                    let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    s.read_exact(&mut q)?;
                    let Some(answer) = dns_answer(&q, false) else {
                        return Ok(());
                    };
                    let n = u16::try_from(answer.len()).map_err(std::io::Error::other)?;
                    s.write_all(&n.to_be_bytes())?;
                    s.write_all(&answer)?;
                }
            });
        }
    });
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = udp.recv_from(&mut buf).context("udp recv")?;
        if let Some(answer) = dns_answer(&buf[..n], true) {
            udp.send_to(&answer, peer).context("udp send")?;
        }
    }
}

/// See [`Cmd::DnsQuery`].
fn dns_query(server: SocketAddr, name: &str, tcp: bool, connect: bool) -> anyhow::Result<()> {
    use hickory_proto::{
        op::{Message, Query},
        rr::{Name, RData, RecordType},
    };
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    let query = q.to_vec()?;
    let (answer, from) = if tcp {
        let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(10))
            .with_context(|| format!("failed to connect to {server}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let len = u16::try_from(query.len())?;
        s.write_all(&len.to_be_bytes())?;
        s.write_all(&query)?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).context("no answer")?;
        let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut answer)?;
        (answer, s.peer_addr()?)
    } else {
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse()?
        } else {
            "[::]:0".parse()?
        };
        let s = std::net::UdpSocket::bind(bind)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = vec![0u8; 4096];
        if connect {
            s.connect(server)
                .with_context(|| format!("failed to connect to {server}"))?;
            s.send(&query)
                .with_context(|| format!("failed to send to {server}"))?;
            let n = s.recv(&mut buf).context("no answer")?;
            buf.truncate(n);
            (buf, s.peer_addr()?)
        } else {
            s.send_to(&query, server)
                .with_context(|| format!("failed to send to {server}"))?;
            let (n, from) = s.recv_from(&mut buf).context("no answer")?;
            buf.truncate(n);
            (buf, from)
        }
    };
    let m = Message::from_vec(&answer)?;
    let a: Vec<String> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    println!(
        "from={from} rcode={} a={}",
        m.metadata.response_code,
        a.join(",")
    );
    Ok(())
}

/// See [`Cmd::DnsRr`].
fn dns_rr(server: SocketAddr, name: &str, expect: &str, secs: Duration) -> anyhow::Result<()> {
    use hickory_proto::{
        op::{Message, Query},
        rr::{Name, RData, RecordType},
    };
    let name = Name::from_ascii(name)?;
    let s = std::net::UdpSocket::bind(if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = vec![0u8; 4096];
    let mut lat = hdrhistogram::Histogram::<u64>::new(3)?;
    let (mut queries, mut wrong) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < secs {
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(name.clone(), RecordType::A));
        let id = q.metadata.id;
        let sent = Instant::now();
        s.send_to(&q.to_vec()?, server)?;
        let ok = loop {
            match s.recv_from(&mut buf) {
                Ok((n, _)) => match Message::from_vec(&buf[..n]) {
                    Ok(m) if m.metadata.id == id => {
                        break m
                            .answers
                            .iter()
                            .any(|r| matches!(&r.data, RData::A(a) if a.0.to_string() == expect));
                    }
                    // An answer to an earlier query that timed out: not this one.
                    _ => continue,
                },
                Err(_) => break false,
            }
        };
        lat.record(u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX))?;
        queries += 1;
        if !ok {
            wrong += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "queries": queries,
            "per_sec": queries as f64 / elapsed,
            "p50_us": lat.value_at_quantile(0.5),
            "p99_us": lat.value_at_quantile(0.99),
            "wrong": wrong,
        })
    );
    Ok(())
}
