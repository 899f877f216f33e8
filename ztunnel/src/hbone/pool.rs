//! Outbound HBONE connections, shared by the streams that may share them.
//!
//! A [`Pool`] keeps HTTP/2 connections per caller-defined key (ztunnel uses: source
//! identity, acceptable destination identities, next hop `ip:15008`, source pod IP) and
//! opens each CONNECT stream on one of them (`HBONE.md`, "Pooling"):
//!
//! - a connection carries at most `max_streams_per_conn` streams at once, and never more
//!   than the peer's `SETTINGS_MAX_CONCURRENT_STREAMS`; another connection is dialled
//!   only when all of a key's connections are full;
//! - dials are single-flight: callers that find no room while a dial for their key is
//!   under way wait for it instead of dialling too, so a burst opens one connection;
//! - a connection without streams for `idle_timeout` is closed (GOAWAY);
//! - a connection that closes, receives GOAWAY or stops answering pings leaves the pool;
//! - [`Pool::drain`] (ztunnel's drain): the connections open then take no new streams and
//!   close (GOAWAY) once their last stream ends, idle ones at once; connections dialled
//!   afterwards (for connections accepted before the drain) close as soon as they are idle.
//!
//! Each connection has one task driving it (h2 I/O, keepalive pings, idle timer).

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::{Connection, SendRequest};
use h2::{PingPong, Reason};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, watch};
use tracing::Instrument;

use super::keepalive;
use super::request::{self, ConnectRequest};
use super::stream::H2Stream;
use crate::limits::{Step, TimedOut, within};

/// Attempts per [`Pool::connect`] when a connection turns out to be going away under
/// the request; such requests were never processed by the peer and are safe to repeat.
const MAX_ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid CONNECT request")]
    Request {
        #[source]
        source: request::Error,
    },
    #[error("failed to connect to the hbone peer for {authority}")]
    Dial {
        authority: String,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("hbone handshake with the peer for {authority} failed")]
    Handshake {
        authority: String,
        #[source]
        source: Arc<h2::Error>,
    },
    #[error("connecting to the hbone peer for {authority} did not finish in time")]
    DialTimeout {
        authority: String,
        #[source]
        source: TimedOut,
    },
    #[error("connecting to the hbone peer for {authority} was abandoned (the dial task ended)")]
    DialAborted { authority: String },
    #[error("CONNECT to {authority} failed")]
    Stream {
        authority: String,
        #[source]
        source: h2::Error,
    },
    #[error("hbone peer did not answer CONNECT {authority} in time")]
    ResponseTimeout {
        authority: String,
        #[source]
        source: TimedOut,
    },
    #[error("hbone peer answered {status} to CONNECT {authority}")]
    Status {
        authority: String,
        status: StatusCode,
    },
}

/// Limits and HTTP/2 settings of a pool's connections; the defaults are Istio's
/// (`HBONE.md`, "HTTP/2" and "Pooling").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// Streams one connection carries at once (further capped by the peer's
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_streams_per_conn: usize,
    /// A connection without streams for this long is closed.
    pub idle_timeout: Duration,
    /// `SETTINGS_INITIAL_WINDOW_SIZE`: per-stream receive window.
    pub initial_stream_window: u32,
    /// Connection-level receive window (WINDOW_UPDATE on stream 0).
    pub connection_window: u32,
    pub max_frame_size: u32,
    pub max_header_list_size: u32,
    pub ping_interval: Duration,
    /// A ping unanswered for this long drops the connection.
    pub ping_timeout: Duration,
    /// A dial (connector and HTTP/2 handshake) that takes longer fails, for every
    /// stream waiting for it.
    pub dial_timeout: Duration,
    /// A CONNECT not answered within this long fails (its stream is reset).
    pub response_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_streams_per_conn: 100,
            idle_timeout: Duration::from_secs(5 * 60),
            initial_stream_window: super::INITIAL_STREAM_WINDOW,
            connection_window: super::CONNECTION_WINDOW,
            max_frame_size: super::MAX_FRAME_SIZE,
            max_header_list_size: super::CLIENT_MAX_HEADER_LIST_SIZE,
            ping_interval: super::PING_INTERVAL,
            ping_timeout: super::PING_TIMEOUT,
            dial_timeout: super::DIAL_TIMEOUT,
            response_timeout: super::RESPONSE_TIMEOUT,
        }
    }
}

impl PoolSettings {
    fn builder(&self) -> h2::client::Builder {
        let mut b = h2::client::Builder::new();
        b.initial_window_size(self.initial_stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_header_list_size(self.max_header_list_size)
            .enable_push(false);
        b
    }
}

/// Numbers for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Open connections, all keys together.
    pub connections: usize,
    /// Streams open on them.
    pub active_streams: usize,
}

/// HTTP/2 connections keyed by `K`, dialled by `C` (`Fn(&K) -> Future<Output =
/// io::Result<IO>>`, which does TCP and TLS). Cloning shares the pool.
pub struct Pool<K, C> {
    inner: Arc<Inner<K, C>>,
}

impl<K, C> Clone for Pool<K, C> {
    fn clone(&self) -> Self {
        Pool {
            inner: self.inner.clone(),
        }
    }
}

/// Told about each dial or CONNECT that timed out (once per event, however many streams
/// it fails).
type TimeoutObserver = Box<dyn Fn(Step) + Send + Sync>;

struct Inner<K, C> {
    settings: PoolSettings,
    connector: C,
    on_timeout: Option<TimeoutObserver>,
    keys: Mutex<HashMap<K, KeyConns>>,
    next_id: AtomicU64,
    /// Set by [`Pool::drain`]: connections close as soon as they are idle.
    draining: AtomicBool,
}

struct KeyConns {
    conns: Vec<Conn>,
    /// The dial under way for this key, if any.
    dial: Option<watch::Receiver<DialState>>,
}

/// `None` while dialling; then whether a connection was added.
type DialState = Option<Result<(), DialFailure>>;

/// A dial's failure, shared by everyone who waited for it.
#[derive(Debug, Clone)]
enum DialFailure {
    Io(Arc<io::Error>),
    Handshake(Arc<h2::Error>),
    TimedOut(TimedOut),
}

impl DialFailure {
    fn into_error(self, authority: &str) -> Error {
        let authority = authority.to_owned();
        match self {
            DialFailure::Io(source) => Error::Dial { authority, source },
            DialFailure::Handshake(source) => Error::Handshake { authority, source },
            DialFailure::TimedOut(source) => Error::DialTimeout { authority, source },
        }
    }
}

#[derive(Clone)]
struct Conn {
    id: u64,
    send: SendRequest<Bytes>,
    usage: Arc<Usage>,
}

/// Stream accounting of one connection.
struct Usage {
    state: Mutex<UsageState>,
    /// Woken when the connection becomes idle, to start its idle timer.
    idle: Notify,
}

struct UsageState {
    active: usize,
    last_release: Instant,
    /// Whether a stream was ever checked out: until then the connection is kept for the
    /// callers that waited for its dial, even while draining (it would otherwise be idle,
    /// and released, before they could claim it).
    used: bool,
}

impl Usage {
    fn new() -> Self {
        Usage {
            state: Mutex::new(UsageState {
                active: 0,
                last_release: Instant::now(),
                used: false,
            }),
            idle: Notify::new(),
        }
    }

    /// When the connection, idle now, may go: `idle_timeout` after its last stream, or
    /// `fresh_timeout` after its dial if it never carried one.
    fn idle_deadline(&self, idle_timeout: Duration, fresh_timeout: Duration) -> Option<Instant> {
        let state = lock(&self.state);
        (state.active == 0)
            .then(|| state.last_release + state.idle_timeout(idle_timeout, fresh_timeout))
    }
}

impl UsageState {
    fn idle_timeout(&self, idle_timeout: Duration, fresh_timeout: Duration) -> Duration {
        if self.used {
            idle_timeout
        } else {
            fresh_timeout
        }
    }
}

/// One stream's claim on a connection; released when the [`H2Stream`] is dropped.
struct Slot(Arc<Usage>);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = lock(&self.0.state);
        state.active = state.active.saturating_sub(1);
        if state.active == 0 {
            state.last_release = Instant::now();
            self.0.idle.notify_one();
        }
    }
}

enum Checkout {
    Slot(Conn, Slot),
    Wait(watch::Receiver<DialState>),
}

/// How a single attempt to open a stream failed.
enum Attempt {
    /// The peer cannot have processed the request; another connection may take it.
    Retry(Error),
    Fail(Error),
}

/// The pool's state stays consistent across a panic in another holder (every critical
/// section is a handful of field updates), so a poisoned lock is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<K, C> Pool<K, C> {
    pub fn new(settings: PoolSettings, connector: C) -> Self {
        Pool {
            inner: Arc::new(Inner {
                settings,
                connector,
                on_timeout: None,
                keys: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                draining: AtomicBool::new(false),
            }),
        }
    }

    /// Calls `observe` for each dial or CONNECT that times out (for metrics). Only while
    /// the pool is not shared yet, i.e. right after [`Pool::new`].
    pub fn on_timeout(mut self, observe: impl Fn(Step) + Send + Sync + 'static) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.on_timeout = Some(Box::new(observe)),
            None => tracing::error!(
                "hbone pool: timeout observer set after the pool was shared; timeouts will not be counted"
            ),
        }
        self
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.inner.settings
    }

    /// Drains the pool: every connection open now leaves it (it carries no new stream)
    /// and closes with GOAWAY once its last stream ends, an idle one at once; from now on
    /// every connection closes as soon as it is idle, instead of after `idle_timeout`.
    /// Streams already open run on.
    pub fn drain(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        let conns: Vec<Conn> = {
            let mut keys = lock(&self.inner.keys);
            let conns = keys.values_mut().flat_map(|k| k.conns.drain(..)).collect();
            keys.retain(|_, k| k.dial.is_some());
            conns
        };
        for conn in &conns {
            // Its driver looks again: with the pool's handle (dropped below) gone, an
            // idle connection closes now, a busy one after its last stream.
            conn.usage.idle.notify_one();
        }
    }

    pub fn stats(&self) -> PoolStats {
        let keys = lock(&self.inner.keys);
        let mut stats = PoolStats::default();
        for conn in keys.values().flat_map(|k| &k.conns) {
            stats.connections += 1;
            stats.active_streams += lock(&conn.usage.state).active;
        }
        stats
    }
}

impl<K, C, F, IO> Pool<K, C>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    C: Fn(&K) -> F + Send + Sync + 'static,
    F: Future<Output = io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Opens a tunnel: sends `req` on a connection for `key` (dialling one if needed) and
    /// waits for the answer. Anything but 200 is [`Error::Status`].
    ///
    /// Cancel-safe: dropping the future releases the stream slot and resets a stream that
    /// was already sent; a dial already started completes for the next caller.
    pub async fn connect(&self, key: &K, req: ConnectRequest) -> Result<H2Stream, Error> {
        // Checked before dialling, so a bad request costs no connection.
        let mut http_req = req.to_http().map_err(|source| Error::Request { source })?;
        let authority = req.authority.as_str();
        let mut attempt = 1;
        loop {
            let (conn, slot) = self.inner.checkout(key, authority).await?;
            match self.inner.open(key, conn, slot, http_req, authority).await {
                Ok(stream) => return Ok(stream),
                Err(Attempt::Retry(error)) if attempt < MAX_ATTEMPTS => {
                    tracing::debug!(%authority, %error, attempt, "retrying CONNECT on another connection");
                    attempt += 1;
                    http_req = req.to_http().map_err(|source| Error::Request { source })?;
                }
                Err(Attempt::Retry(error) | Attempt::Fail(error)) => return Err(error),
            }
        }
    }
}

impl<K, C> Inner<K, C>
where
    K: Eq + Hash,
{
    /// Takes the connection out of the pool, e.g. because it is going away.
    fn remove(&self, key: &K, id: u64) {
        let mut keys = lock(&self.keys);
        remove_locked(&mut keys, key, id);
    }

    /// How long a connection without streams stays: `idle_timeout`, or nothing at all
    /// while draining.
    fn idle_timeout(&self) -> Duration {
        if self.draining.load(Ordering::SeqCst) {
            Duration::ZERO
        } else {
            self.settings.idle_timeout
        }
    }

    /// Removes the connection if it has been idle long enough; `true` if it is gone.
    fn release_if_idle(&self, key: &K, id: u64, usage: &Usage) -> bool {
        let mut keys = lock(&self.keys);
        {
            // Checkouts happen under the `keys` lock too, so no stream can claim the
            // connection between this check and its removal.
            let state = lock(&usage.state);
            let timeout = state.idle_timeout(self.idle_timeout(), self.settings.idle_timeout);
            if state.active > 0 || state.last_release.elapsed() < timeout {
                return false;
            }
        }
        remove_locked(&mut keys, key, id);
        true
    }
}

fn remove_locked<K: Eq + Hash>(keys: &mut HashMap<K, KeyConns>, key: &K, id: u64) {
    if let Some(entry) = keys.get_mut(key) {
        entry.conns.retain(|c| c.id != id);
        if entry.conns.is_empty() && entry.dial.is_none() {
            keys.remove(key);
        }
    }
}

impl<K, C, F, IO> Inner<K, C>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    C: Fn(&K) -> F + Send + Sync + 'static,
    F: Future<Output = io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// A stream slot on a connection for `key`, waiting for (or starting) a dial when
    /// every connection is full.
    async fn checkout(self: &Arc<Self>, key: &K, authority: &str) -> Result<(Conn, Slot), Error> {
        loop {
            let mut dial = match self.try_checkout(key) {
                Checkout::Slot(conn, slot) => return Ok((conn, slot)),
                Checkout::Wait(dial) => dial,
            };
            let outcome = match dial.wait_for(Option::is_some).await {
                Ok(state) => state.clone(),
                Err(_closed) => None,
            };
            match outcome {
                // A connection was added: compete for its slots.
                Some(Ok(())) => {}
                Some(Err(failure)) => return Err(failure.into_error(authority)),
                None => {
                    // The dial task died without an answer; let the next caller dial anew.
                    let mut keys = lock(&self.keys);
                    if let Some(entry) = keys.get_mut(key)
                        && entry.dial.as_ref().is_some_and(|d| d.same_channel(&dial))
                    {
                        entry.dial = None;
                        if entry.conns.is_empty() {
                            keys.remove(key);
                        }
                    }
                    return Err(Error::DialAborted {
                        authority: authority.to_owned(),
                    });
                }
            }
        }
    }

    fn try_checkout(self: &Arc<Self>, key: &K) -> Checkout {
        let mut keys = lock(&self.keys);
        if let Some(entry) = keys.get(key) {
            for conn in &entry.conns {
                // The peer's limit is only known once its SETTINGS arrived; until then
                // h2 reports no limit and ours applies.
                let limit = self
                    .settings
                    .max_streams_per_conn
                    .min(conn.send.current_max_send_streams());
                let mut state = lock(&conn.usage.state);
                if state.active < limit {
                    state.active += 1;
                    state.used = true;
                    return Checkout::Slot(conn.clone(), Slot(conn.usage.clone()));
                }
            }
            if let Some(dial) = &entry.dial {
                return Checkout::Wait(dial.clone());
            }
        }
        let (tx, rx) = watch::channel(None);
        keys.entry(key.clone())
            .or_insert_with(|| KeyConns {
                conns: Vec::new(),
                dial: None,
            })
            .dial = Some(rx.clone());
        tokio::spawn(self.clone().dial(key.clone(), tx).in_current_span());
        Checkout::Wait(rx)
    }

    /// Dials a connection for `key`, adds it to the pool and tells the waiters.
    async fn dial(self: Arc<Self>, key: K, done: watch::Sender<DialState>) {
        let outcome = match self.establish(&key).await {
            Ok((send, conn, ping)) => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let usage = Arc::new(Usage::new());
                {
                    let mut keys = lock(&self.keys);
                    let entry = keys.entry(key.clone()).or_insert_with(|| KeyConns {
                        conns: Vec::new(),
                        dial: None,
                    });
                    entry.conns.push(Conn {
                        id,
                        send,
                        usage: usage.clone(),
                    });
                    entry.dial = None;
                }
                tracing::debug!(conn = id, "hbone connection established");
                let driver = drive(
                    Arc::downgrade(&self),
                    key,
                    id,
                    usage,
                    conn,
                    ping,
                    self.settings,
                );
                tokio::spawn(driver.instrument(tracing::debug_span!("hbone_conn", conn = id)));
                Ok(())
            }
            Err(failure) => {
                tracing::debug!(error = ?failure, "hbone dial failed");
                let mut keys = lock(&self.keys);
                if let Some(entry) = keys.get_mut(&key) {
                    entry.dial = None;
                    if entry.conns.is_empty() {
                        keys.remove(&key);
                    }
                }
                Err(failure)
            }
        };
        // Nobody waiting any more is fine: the connection is in the pool for the next one.
        let _ = done.send(Some(outcome));
    }

    async fn establish(
        &self,
        key: &K,
    ) -> Result<(SendRequest<Bytes>, Connection<IO, Bytes>, Option<PingPong>), DialFailure> {
        let dial = async {
            let io = (self.connector)(key)
                .await
                .map_err(|e| DialFailure::Io(Arc::new(e)))?;
            let (send, mut conn) = self
                .settings
                .builder()
                .handshake::<_, Bytes>(io)
                .await
                .map_err(|e| DialFailure::Handshake(Arc::new(e)))?;
            let ping = conn.ping_pong();
            Ok((send, conn, ping))
        };
        match within(Step::HboneDial, self.settings.dial_timeout, dial).await {
            Ok(dialled) => dialled,
            Err(timed_out) => {
                self.timed_out(timed_out.step);
                Err(DialFailure::TimedOut(timed_out))
            }
        }
    }

    fn timed_out(&self, step: Step) {
        if let Some(observe) = &self.on_timeout {
            observe(step);
        }
    }

    /// Sends the CONNECT on `conn` and waits for the answer.
    async fn open(
        &self,
        key: &K,
        conn: Conn,
        slot: Slot,
        req: http::Request<()>,
        authority: &str,
    ) -> Result<H2Stream, Attempt> {
        let failed = |source| Error::Stream {
            authority: authority.to_owned(),
            source,
        };
        // One deadline for waiting to send and for the answer.
        let limit = self.settings.response_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        let timed_out = |inner: &Self| {
            inner.timed_out(Step::ConnectResponse);
            Attempt::Fail(Error::ResponseTimeout {
                authority: authority.to_owned(),
                source: TimedOut {
                    step: Step::ConnectResponse,
                    after: limit,
                },
            })
        };
        // Errors before the request is on the wire mean the connection is closed or got
        // GOAWAY: it is of no further use, and the request can go elsewhere.
        let ready = tokio::time::timeout_at(deadline, conn.send.clone().ready()).await;
        let mut send = match ready {
            Err(_elapsed) => return Err(timed_out(self)),
            Ok(Ok(send)) => send,
            Ok(Err(e)) => {
                self.remove(key, conn.id);
                return Err(Attempt::Retry(failed(e)));
            }
        };
        let (response, stream) = match send.send_request(req, false) {
            Ok(sent) => sent,
            Err(e) => {
                self.remove(key, conn.id);
                return Err(Attempt::Retry(failed(e)));
            }
        };
        let response = match tokio::time::timeout_at(deadline, response).await {
            // Dropping `stream` and the response future resets the stream.
            Err(_elapsed) => return Err(timed_out(self)),
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                if e.is_go_away() {
                    self.remove(key, conn.id);
                }
                // RFC 9113 §8.7: refused or beyond the GOAWAY's last stream id means
                // unprocessed.
                let unprocessed = e.is_go_away() || e.reason() == Some(Reason::REFUSED_STREAM);
                return Err(if unprocessed {
                    Attempt::Retry(failed(e))
                } else {
                    Attempt::Fail(failed(e))
                });
            }
        };
        if response.status() != StatusCode::OK {
            // Dropping `stream` resets our half, which the server left open.
            return Err(Attempt::Fail(Error::Status {
                authority: authority.to_owned(),
                status: response.status(),
            }));
        }
        Ok(H2Stream::new(stream, response.into_body()).with_guard(Box::new(slot)))
    }
}

enum Event {
    Closed(Result<(), h2::Error>),
    Dead(keepalive::Error),
    IdleChanged,
    IdleTimer,
}

/// Drives one connection until it closes, dies or is released as idle, and takes it out
/// of the pool then.
async fn drive<K, C, IO>(
    pool: Weak<Inner<K, C>>,
    key: K,
    id: u64,
    usage: Arc<Usage>,
    conn: Connection<IO, Bytes>,
    ping: Option<PingPong>,
    settings: PoolSettings,
) where
    K: Eq + Hash,
    IO: AsyncRead + AsyncWrite + Unpin,
{
    tokio::pin!(conn);
    let keepalive = keepalive::run(ping, settings.ping_interval, settings.ping_timeout);
    tokio::pin!(keepalive);
    loop {
        let idle_timeout = pool
            .upgrade()
            .map_or(settings.idle_timeout, |p| p.idle_timeout());
        let deadline = usage.idle_deadline(idle_timeout, settings.idle_timeout);
        let idle_timer = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            closed = &mut conn => Event::Closed(closed),
            dead = &mut keepalive => Event::Dead(dead),
            () = usage.idle.notified() => Event::IdleChanged,
            () = idle_timer => Event::IdleTimer,
        };
        match event {
            Event::Closed(result) => {
                tracing::debug!(conn = id, ?result, "hbone connection closed");
                break;
            }
            Event::Dead(error) => {
                // Dropping the connection closes the socket and fails its streams.
                tracing::warn!(conn = id, %error, "dropping unresponsive hbone connection");
                break;
            }
            Event::IdleChanged => {}
            Event::IdleTimer => {
                let released = pool
                    .upgrade()
                    .is_none_or(|pool| pool.release_if_idle(&key, id, &usage));
                if released {
                    tracing::debug!(conn = id, "releasing idle hbone connection");
                    // With the pool's handle gone and no streams, h2 sends GOAWAY and
                    // closes; the timeout bounds a peer that never reads it.
                    let _ = tokio::time::timeout(settings.ping_timeout, &mut conn).await;
                    return;
                }
            }
        }
    }
    if let Some(pool) = pool.upgrade() {
        pool.remove(&key, id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hbone::request::{Rejection, Target, TargetAddr};
    use crate::hbone::server::{Accepted, ServerSettings, serve};
    use crate::hbone::test_wire::{self, read_frame, window_increment};
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    type Dial = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

    /// A pool whose connector dials the key's address over plain TCP and counts dials.
    fn pool(
        settings: PoolSettings,
    ) -> (
        Pool<SocketAddr, impl Fn(&SocketAddr) -> Dial + Send + Sync + 'static>,
        Arc<AtomicUsize>,
    ) {
        let dials = Arc::new(AtomicUsize::new(0));
        let counter = dials.clone();
        let connector = move |addr: &SocketAddr| -> Dial {
            counter.fetch_add(1, Ordering::SeqCst);
            let addr = *addr;
            Box::pin(async move {
                let io = TcpStream::connect(addr).await?;
                io.set_nodelay(true)?;
                Ok(io)
            })
        };
        (Pool::new(settings, connector), dials)
    }

    fn dialled(dials: &AtomicUsize) -> usize {
        dials.load(Ordering::SeqCst)
    }

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = listener.local_addr().expect("echo addr");
        tokio::spawn(async move {
            while let Ok((io, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = io.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        addr
    }

    struct TestServer {
        /// Where the pool dials (the "15008" listener).
        addr: SocketAddr,
        /// The destination behind it, an echo server.
        echo: SocketAddr,
        drain: watch::Sender<bool>,
    }

    /// An HBONE server over plain TCP in front of an echo server; port 15008 as a
    /// target is refused with 503, as ztunnel does for its own ports.
    async fn hbone_server(settings: ServerSettings) -> TestServer {
        let echo = echo_server().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind hbone");
        let addr = listener.local_addr().expect("hbone addr");
        let (drain, drain_rx) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((io, _)) = listener.accept().await {
                let handler = |target: Target, _peer: ()| async move {
                    match target.addr {
                        TargetAddr::Ip(dst) if dst.port() != 15008 => TcpStream::connect(dst)
                            .await
                            .map(Accepted::new)
                            .map_err(|e| Rejection::unavailable(e.to_string())),
                        _ => Err(Rejection::unavailable("ztunnel port")),
                    }
                };
                let conn = serve(io, settings, addr.ip(), (), drain_rx.clone(), handler);
                tokio::spawn(conn);
            }
        });
        TestServer { addr, echo, drain }
    }

    fn to(dst: SocketAddr) -> ConnectRequest {
        ConnectRequest::new(dst.to_string(), "10.0.0.1:40000".parse().expect("addr"))
    }

    async fn echo_once(tunnel: &mut H2Stream, msg: &[u8]) {
        tunnel.write_all(msg).await.expect("write");
        let mut got = vec![0; msg.len()];
        tunnel.read_exact(&mut got).await.expect("read echo");
        assert_eq!(got, msg);
    }

    /// Waits (briefly) for the pool to reach `want`.
    async fn wait_for_stats<K, C>(pool: &Pool<K, C>, want: PoolStats) {
        for _ in 0..200 {
            if pool.stats() == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(pool.stats(), want);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn eight_mib_each_way_arrive_byte_exact_with_half_close() {
        let server = hbone_server(ServerSettings::default()).await;
        let (pool, _) = pool(PoolSettings::default());
        let mut tunnel = pool
            .connect(&server.addr, to(server.echo))
            .await
            .expect("tunnel");

        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let data: Vec<u8> = (0..8 << 20)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let (recv, send) = tunnel.split_mut();
        let write = async {
            send.write_all(&data).await.expect("write 8 MiB");
            send.shutdown().await.expect("half-close");
        };
        let read = async {
            let mut got = Vec::with_capacity(data.len());
            recv.read_to_end(&mut got)
                .await
                .expect("read until the echo half-closes");
            got
        };
        let ((), got) = tokio::join!(write, read);
        assert_eq!(got.len(), data.len());
        assert!(got == data, "echoed bytes differ");
        assert_eq!(
            pool.stats(),
            PoolStats {
                connections: 1,
                active_streams: 1
            }
        );
        drop(tunnel);
        assert_eq!(pool.stats().active_streams, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rejection_is_a_status_error_and_other_streams_keep_working() {
        let server = hbone_server(ServerSettings::default()).await;
        let (pool, dials) = pool(PoolSettings::default());
        let mut tunnel = pool
            .connect(&server.addr, to(server.echo))
            .await
            .expect("tunnel");
        echo_once(&mut tunnel, b"before").await;

        let ztunnel_port: SocketAddr = "127.0.0.1:15008".parse().expect("addr");
        match pool.connect(&server.addr, to(ztunnel_port)).await {
            Err(Error::Status { status, authority }) => {
                assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
                assert_eq!(authority, "127.0.0.1:15008");
            }
            Err(other) => panic!("expected a 503, got {other}"),
            Ok(_) => panic!("expected a 503, got a tunnel"),
        }

        echo_once(&mut tunnel, b"after").await;
        assert_eq!(dialled(&dials), 1, "the rejection used the same connection");
        assert_eq!(
            pool.stats(),
            PoolStats {
                connections: 1,
                active_streams: 1
            }
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sequential_streams_share_one_connection() {
        let server = hbone_server(ServerSettings::default()).await;
        let (pool, dials) = pool(PoolSettings::default());
        for i in 0..5u8 {
            let mut tunnel = pool
                .connect(&server.addr, to(server.echo))
                .await
                .expect("tunnel");
            echo_once(&mut tunnel, &[i; 100]).await;
        }
        assert_eq!(dialled(&dials), 1);
        assert_eq!(pool.stats().connections, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stream_101_opens_a_second_connection() {
        let server = hbone_server(ServerSettings::default()).await;
        let (pool, dials) = pool(PoolSettings::default());
        let opens = (0..101).map(|_| pool.connect(&server.addr, to(server.echo)));
        let tunnels: Vec<H2Stream> = futures_util::future::join_all(opens)
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .expect("all tunnels open");
        assert_eq!(dialled(&dials), 2);
        assert_eq!(
            pool.stats(),
            PoolStats {
                connections: 2,
                active_streams: 101
            }
        );
        drop(tunnels);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn burst_to_a_new_key_dials_once() {
        let server = hbone_server(ServerSettings::default()).await;
        let (pool, dials) = pool(PoolSettings::default());
        let opens = (0..20).map(|_| pool.connect(&server.addr, to(server.echo)));
        let tunnels: Vec<H2Stream> = futures_util::future::join_all(opens)
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .expect("all tunnels open");
        assert_eq!(tunnels.len(), 20);
        assert_eq!(dialled(&dials), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn burst_shares_a_failed_dial() {
        let dials = Arc::new(AtomicUsize::new(0));
        let counter = dials.clone();
        let connector = move |_: &u8| {
            counter.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Err::<TcpStream, _>(io::Error::from(io::ErrorKind::ConnectionRefused))
            }
        };
        let pool = Pool::new(PoolSettings::default(), connector);
        let dst: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let results =
            futures_util::future::join_all((0..5).map(|_| pool.connect(&7, to(dst)))).await;
        for result in results {
            assert!(
                matches!(result, Err(Error::Dial { .. })),
                "dial error expected"
            );
        }
        assert_eq!(dials.load(Ordering::SeqCst), 1);
        assert_eq!(pool.stats(), PoolStats::default());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dial_that_hangs_fails_every_waiter_at_the_dial_timeout_and_counts_once() {
        let observed = Arc::new(Mutex::new(Vec::new()));
        let seen = observed.clone();
        // A peer that never finishes the dial (think: TLS server that never answers).
        let connector = |_: &u8| std::future::pending::<io::Result<TcpStream>>();
        let pool = Pool::new(
            PoolSettings {
                dial_timeout: Duration::from_millis(100),
                ..PoolSettings::default()
            },
            connector,
        )
        .on_timeout(move |step| lock(&seen).push(step));
        let dst: SocketAddr = "10.0.0.7:80".parse().expect("addr");
        let results = tokio::time::timeout(
            Duration::from_secs(10),
            futures_util::future::join_all((0..3).map(|_| pool.connect(&1, to(dst)))),
        )
        .await
        .expect("the dial timeout ends the wait");
        for result in results {
            match result {
                Err(Error::DialTimeout { source, .. }) => {
                    assert_eq!(source.step, Step::HboneDial);
                }
                Err(other) => panic!("expected a dial timeout, got {other}"),
                Ok(_) => panic!("expected a dial timeout, got a tunnel"),
            }
        }
        assert_eq!(*lock(&observed), [Step::HboneDial], "one dial, one timeout");
        assert_eq!(pool.stats(), PoolStats::default());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connect_that_is_never_answered_fails_at_the_response_timeout() {
        // An HBONE server whose handler never decides: the CONNECT gets no answer.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (_drain, drain_rx) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((io, _)) = listener.accept().await {
                let handler = |_: Target, _: ()| {
                    std::future::pending::<Result<Accepted<TcpStream>, Rejection>>()
                };
                let conn = serve(
                    io,
                    ServerSettings::default(),
                    addr.ip(),
                    (),
                    drain_rx.clone(),
                    handler,
                );
                tokio::spawn(conn);
            }
        });
        let observed = Arc::new(Mutex::new(Vec::new()));
        let seen = observed.clone();
        let (pool, dials) = pool(PoolSettings {
            response_timeout: Duration::from_millis(200),
            ..PoolSettings::default()
        });
        let pool = pool.on_timeout(move |step| lock(&seen).push(step));
        let echo: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let result = tokio::time::timeout(Duration::from_secs(10), pool.connect(&addr, to(echo)))
            .await
            .expect("the response timeout ends the wait");
        match result {
            Err(Error::ResponseTimeout { source, .. }) => {
                assert_eq!(source.step, Step::ConnectResponse);
                assert_eq!(source.after, Duration::from_millis(200));
            }
            Err(other) => panic!("expected a response timeout, got {other}"),
            Ok(_) => panic!("expected a response timeout, got a tunnel"),
        }
        assert_eq!(*lock(&observed), [Step::ConnectResponse]);
        // The connection stays pooled, its stream slot freed.
        assert_eq!(
            pool.stats(),
            PoolStats {
                connections: 1,
                active_streams: 0
            }
        );
        assert_eq!(dialled(&dials), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn peer_max_concurrent_streams_caps_a_connection() {
        let server = hbone_server(ServerSettings {
            max_concurrent_streams: 2,
            ..ServerSettings::default()
        })
        .await;
        let (pool, dials) = pool(PoolSettings::default());
        let mut held = Vec::new();
        // One at a time, so the server's SETTINGS have arrived before the count matters.
        for _ in 0..3 {
            held.push(
                pool.connect(&server.addr, to(server.echo))
                    .await
                    .expect("tunnel"),
            );
        }
        assert_eq!(dialled(&dials), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_are_released_busy_ones_kept() {
        let server = hbone_server(ServerSettings::default()).await;
        let (pool, dials) = pool(PoolSettings {
            idle_timeout: Duration::from_millis(200),
            ..PoolSettings::default()
        });
        let mut tunnel = pool
            .connect(&server.addr, to(server.echo))
            .await
            .expect("tunnel");
        // Busy for longer than the idle timeout: stays.
        tokio::time::sleep(Duration::from_millis(400)).await;
        echo_once(&mut tunnel, b"still open").await;
        assert_eq!(pool.stats().connections, 1);

        drop(tunnel);
        wait_for_stats(&pool, PoolStats::default()).await;
        let mut tunnel = pool
            .connect(&server.addr, to(server.echo))
            .await
            .expect("tunnel after release");
        echo_once(&mut tunnel, b"again").await;
        assert_eq!(dialled(&dials), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn goaway_takes_a_connection_out_of_the_pool() {
        let server = hbone_server(ServerSettings::default()).await;
        let (pool, dials) = pool(PoolSettings::default());
        drop(
            pool.connect(&server.addr, to(server.echo))
                .await
                .expect("tunnel"),
        );
        assert_eq!(pool.stats().connections, 1);

        server.drain.send(true).expect("server running");
        wait_for_stats(&pool, PoolStats::default()).await;
        // Connections accepted from now on are not draining.
        server.drain.send(false).expect("server running");
        let mut tunnel = pool
            .connect(&server.addr, to(server.echo))
            .await
            .expect("tunnel on a new connection");
        echo_once(&mut tunnel, b"new").await;
        assert_eq!(dialled(&dials), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_move_off_a_connection_that_got_goaway() {
        let server = hbone_server(ServerSettings::default()).await;
        let (pool, dials) = pool(PoolSettings::default());
        let mut old = pool
            .connect(&server.addr, to(server.echo))
            .await
            .expect("tunnel");

        server.drain.send(true).expect("server running");
        // Let the GOAWAY arrive; the open stream keeps the connection (and its pool
        // entry) alive.
        tokio::time::sleep(Duration::from_millis(200)).await;
        server.drain.send(false).expect("server running");
        let mut new = pool
            .connect(&server.addr, to(server.echo))
            .await
            .expect("retried on a new connection");
        echo_once(&mut new, b"new").await;
        echo_once(&mut old, b"old").await;
        assert_eq!(dialled(&dials), 2);
        assert_eq!(
            pool.stats(),
            PoolStats {
                connections: 1,
                active_streams: 1
            },
            "the draining connection left the pool"
        );
    }

    /// A TCP connection that counts itself closed when the pool drops it.
    struct Tracked {
        io: TcpStream,
        closed: Arc<AtomicUsize>,
    }

    impl Drop for Tracked {
        fn drop(&mut self) {
            self.closed.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl AsyncRead for Tracked {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Tracked {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            data: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            Pin::new(&mut self.io).poll_write(cx, data)
        }

        fn poll_flush(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    async fn wait_until(what: &str, cond: impl Fn() -> bool) {
        for _ in 0..500 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drained_pool_closes_each_connection_after_its_last_stream() {
        let server = hbone_server(ServerSettings::default()).await;
        let (dials, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (counter, gone) = (dials.clone(), closed.clone());
        let connector = move |addr: &SocketAddr| {
            counter.fetch_add(1, Ordering::SeqCst);
            let (addr, closed) = (*addr, gone.clone());
            async move {
                let io = TcpStream::connect(addr).await?;
                Ok(Tracked { io, closed })
            }
        };
        let pool = Pool::new(PoolSettings::default(), connector);
        let mut first = pool
            .connect(&server.addr, to(server.echo))
            .await
            .expect("tunnel");
        let mut second = pool
            .connect(&server.addr, to(server.echo))
            .await
            .expect("tunnel");
        assert_eq!(dials.load(Ordering::SeqCst), 1, "one shared connection");

        pool.drain();
        assert_eq!(pool.stats().connections, 0, "it left the pool");
        // Its streams run on.
        echo_once(&mut first, b"first").await;
        echo_once(&mut second, b"second").await;
        // A stream opened now does not go on it: a new connection is dialled.
        let mut third = pool
            .connect(&server.addr, to(server.echo))
            .await
            .expect("tunnel on a new connection");
        echo_once(&mut third, b"third").await;
        assert_eq!(dials.load(Ordering::SeqCst), 2);

        drop(first);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(closed.load(Ordering::SeqCst), 0, "one stream still open");
        echo_once(&mut second, b"still").await;
        drop(second);
        wait_until("the drained connection to close", || {
            closed.load(Ordering::SeqCst) == 1
        })
        .await;
        // The connection dialled during the drain closes once idle, not after the
        // five-minute idle timeout.
        drop(third);
        wait_until("the new connection to close", || {
            closed.load(Ordering::SeqCst) == 2
        })
        .await;
        assert_eq!(pool.stats(), PoolStats::default());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn announces_istio_settings_and_drops_a_silent_peer() {
        let (client_io, mut peer) = tokio::io::duplex(1 << 20);
        let client_io = Arc::new(Mutex::new(Some(client_io)));
        let connector = move |_: &u8| {
            let io = lock(&client_io).take();
            async move { io.ok_or_else(|| io::Error::other("only one connection in this test")) }
        };
        let pool = Pool::new(
            PoolSettings {
                ping_interval: Duration::from_millis(50),
                ping_timeout: Duration::from_millis(100),
                ..PoolSettings::default()
            },
            connector,
        );
        let dst: SocketAddr = "10.0.0.7:80".parse().expect("addr");
        let pending = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.connect(&1, to(dst)).await.map(drop) })
        };

        let mut preface = [0u8; 24];
        peer.read_exact(&mut preface).await.expect("preface");
        assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let (kind, _, stream, payload) = read_frame(&mut peer).await;
        assert_eq!((kind, stream), (0x4, 0), "SETTINGS first");
        let params = test_wire::settings(&payload);
        for want in [(0x2, 0), (0x4, 4 << 20), (0x5, 1 << 20), (0x6, 16 << 10)] {
            assert!(params.contains(&want), "{want:?} in {params:?}");
        }
        let (kind, _, stream, payload) = read_frame(&mut peer).await;
        assert_eq!((kind, stream), (0x8, 0), "connection WINDOW_UPDATE");
        let increment = window_increment(&payload);
        assert_eq!(increment, (16 << 20) - 65_535);

        // Never answer anything, pings included, but keep reading.
        let sink = tokio::spawn(async move {
            let mut all = Vec::new();
            let _ = peer.read_to_end(&mut all).await;
        });
        let result = tokio::time::timeout(Duration::from_secs(5), pending)
            .await
            .expect("the stuck CONNECT fails once the connection is dropped")
            .expect("task");
        assert!(matches!(result, Err(Error::Stream { .. })), "{result:?}");
        wait_for_stats(&pool, PoolStats::default()).await;
        sink.abort();
    }
}
