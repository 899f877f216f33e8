//! Bounds on the data path (ARCHITECTURE.md, "Limits and timeouts"): the timeout of each
//! step a connection goes through, the per-listener connection cap, what a listener does
//! when `accept()` fails for lack of descriptors or memory, and the open-file limit.
//!
//! The values come from [`crate::config::Limits`]; each bound has a metric
//! (`ztunnel_timeouts_total`, `ztunnel_listener_connections`,
//! `ztunnel_listener_saturated_total`, `ztunnel_accept_errors_total`).
use std::{
    fmt,
    future::Future,
    io,
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;

/// A step of the data path with a timeout of its own; [`Step::as_str`] is the `step`
/// label of `ztunnel_timeouts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// A TCP connect from a pod's netns: to a plain destination, to a peer's :15008, or to
    /// the app inside the pod.
    TcpConnect,
    /// From accepting a connection on :15008 to the end of its TLS handshake.
    TlsAccept,
    /// The HTTP/2 handshake of an inbound HBONE connection (the client's preface).
    H2Accept,
    /// The client TLS handshake of an outbound HBONE connection.
    TlsConnect,
    /// A whole outbound HBONE dial: certificate, TCP, TLS and HTTP/2.
    HboneDial,
    /// From sending a CONNECT to its response headers.
    ConnectResponse,
}

impl Step {
    pub const ALL: [Step; 6] = [
        Step::TcpConnect,
        Step::TlsAccept,
        Step::H2Accept,
        Step::TlsConnect,
        Step::HboneDial,
        Step::ConnectResponse,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Step::TcpConnect => "tcp_connect",
            Step::TlsAccept => "tls_accept",
            Step::H2Accept => "h2_accept",
            Step::TlsConnect => "tls_connect",
            Step::HboneDial => "hbone_dial",
            Step::ConnectResponse => "connect_response",
        }
    }

    /// The flag that sets this step's timeout.
    pub fn flag(self) -> &'static str {
        match self {
            Step::TcpConnect => "--tcp-connect-timeout",
            Step::TlsAccept => "--tls-accept-timeout",
            Step::H2Accept => "--h2-accept-timeout",
            Step::TlsConnect => "--tls-connect-timeout",
            Step::HboneDial => "--hbone-dial-timeout",
            Step::ConnectResponse => "--connect-response-timeout",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A step that did not finish within its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{step} timed out after {} ({})", humantime::format_duration(*.after), .step.flag())]
pub struct TimedOut {
    pub step: Step,
    pub after: Duration,
}

impl From<TimedOut> for io::Error {
    fn from(t: TimedOut) -> Self {
        io::Error::new(io::ErrorKind::TimedOut, t)
    }
}

/// Runs `fut` for at most `after`; the error names the step and its flag.
pub async fn within<T>(
    step: Step,
    after: Duration,
    fut: impl Future<Output = T>,
) -> Result<T, TimedOut> {
    tokio::time::timeout(after, fut)
        .await
        .map_err(|_elapsed| TimedOut { step, after })
}

/// What a failed `accept()` says about the listener; [`AcceptError::as_str`] is the
/// `error` label of `ztunnel_accept_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptError {
    /// The process is out of descriptors (`RLIMIT_NOFILE`).
    Emfile,
    /// The system is out of descriptors (`fs.file-max`).
    Enfile,
    Enobufs,
    Enomem,
    /// Only this connection failed (aborted or reset before it was accepted, refused by
    /// a firewall hook): the next accept has nothing to do with it.
    Connection,
    Other,
}

impl AcceptError {
    pub const ALL: [AcceptError; 6] = [
        AcceptError::Emfile,
        AcceptError::Enfile,
        AcceptError::Enobufs,
        AcceptError::Enomem,
        AcceptError::Connection,
        AcceptError::Other,
    ];

    pub fn classify(e: &io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::EMFILE) => AcceptError::Emfile,
            Some(libc::ENFILE) => AcceptError::Enfile,
            Some(libc::ENOBUFS) => AcceptError::Enobufs,
            Some(libc::ENOMEM) => AcceptError::Enomem,
            // accept(2), "Error handling": these are the pending connection's errors.
            Some(libc::ECONNABORTED | libc::EPROTO | libc::EPERM | libc::ECONNRESET) => {
                AcceptError::Connection
            }
            _ => AcceptError::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AcceptError::Emfile => "emfile",
            AcceptError::Enfile => "enfile",
            AcceptError::Enobufs => "enobufs",
            AcceptError::Enomem => "enomem",
            AcceptError::Connection => "connection",
            AcceptError::Other => "other",
        }
    }

    /// Whether the listener must wait before accepting again. Out of descriptors or
    /// memory, the connection stays in the kernel's queue and the listener stays readable,
    /// so retrying at once fails the same way in a hot loop until something is freed. An
    /// error we do not know backs off too: spinning is the worse mistake.
    pub fn backs_off(self) -> bool {
        self != AcceptError::Connection
    }
}

/// The wait before a listener retries a failing accept: doubling from [`Backoff::MIN`]
/// to [`Backoff::MAX`], back to the start after an accept succeeds.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Self::MIN }
    }
}

impl Backoff {
    /// Short enough that a descriptor freed by a closing connection is used almost at once.
    pub const MIN: Duration = Duration::from_millis(10);
    /// Long enough that a listener stuck at EMFILE costs nothing (one try a second).
    pub const MAX: Duration = Duration::from_secs(1);

    /// The wait after one more failure.
    pub fn failed(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        wait
    }

    pub fn succeeded(&mut self) {
        self.next = Self::MIN;
    }
}

/// At most one log line per period; counts the lines it held back.
#[derive(Debug, Clone)]
pub struct RateLimit {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(every: Duration) -> Self {
        RateLimit {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(lines held back since the last one)` when a line may be written at `now`.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// How often a listener logs the same kind of trouble (accept errors, a full listener).
pub const LOG_EVERY: Duration = Duration::from_secs(5);

/// What a listener does when `accept()` fails: count the error, log it (rate-limited),
/// and wait before the next try when the error is about resources.
#[derive(Debug)]
pub struct AcceptErrors {
    listener: &'static str,
    /// Who owns the listener (a pod's `namespace/name`, or ztunnel's own), for the log.
    owner: String,
    backoff: Backoff,
    log: RateLimit,
    metrics: Arc<Metrics>,
}

impl AcceptErrors {
    pub fn new(listener: &'static str, owner: impl Into<String>, metrics: Arc<Metrics>) -> Self {
        AcceptErrors {
            listener,
            owner: owner.into(),
            backoff: Backoff::default(),
            log: RateLimit::new(LOG_EVERY),
            metrics,
        }
    }

    /// Handles one failed accept; returns once the listener may try again.
    pub async fn failed(&mut self, e: &io::Error) {
        let kind = AcceptError::classify(e);
        self.metrics.accept_failed(self.listener, kind);
        let wait = kind.backs_off().then(|| self.backoff.failed());
        if let Some(suppressed) = self.log.allow(Instant::now()) {
            tracing::warn!(
                owner = %self.owner,
                listener = self.listener,
                error = %e,
                kind = kind.as_str(),
                retry_in_ms = wait.map_or(0, |w| w.as_millis() as u64),
                suppressed,
                "accept failed"
            );
        }
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
    }

    pub fn accepted(&mut self) {
        self.backoff.succeeded();
    }
}

/// One listener's connection cap. Each accepted connection holds a [`Held`] slot for its
/// whole life; with every slot taken the listener stops calling `accept()`, so new
/// connections wait in the kernel's backlog (and past it, their SYNs are retried by the
/// client) instead of costing ztunnel memory and descriptors.
#[derive(Debug)]
pub struct ListenerCap {
    slots: Arc<Semaphore>,
    listener: &'static str,
    owner: String,
    metrics: Arc<Metrics>,
    gauge: Gauge,
    log: RateLimit,
}

/// A slot reserved for the next accepted connection.
#[derive(Debug)]
pub struct Reserved(OwnedSemaphorePermit);

/// An accepted connection's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Held {
    _permit: OwnedSemaphorePermit,
    gauge: Gauge,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl ListenerCap {
    pub fn new(
        max: usize,
        listener: &'static str,
        owner: impl Into<String>,
        metrics: Arc<Metrics>,
    ) -> Self {
        ListenerCap {
            slots: Arc::new(Semaphore::new(max.clamp(1, Semaphore::MAX_PERMITS))),
            listener,
            owner: owner.into(),
            gauge: metrics.listener_connections(listener),
            metrics,
            log: RateLimit::new(LOG_EVERY),
        }
    }

    /// A slot for the next connection, waiting while the listener is full. Each time the
    /// listener finds itself full counts once in `ztunnel_listener_saturated_total`.
    pub async fn reserve(&mut self) -> Reserved {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Reserved(permit);
        }
        self.metrics.listener_saturated(self.listener);
        if let Some(suppressed) = self.log.allow(Instant::now()) {
            tracing::warn!(
                owner = %self.owner,
                listener = self.listener,
                suppressed,
                "listener at its connection cap (--max-connections-per-listener); new connections wait in the kernel backlog"
            );
        }
        #[expect(
            clippy::expect_used,
            reason = "the semaphore is never closed while the cap exists"
        )]
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("listener cap semaphore is never closed");
        Reserved(permit)
    }

    /// A slot if one is free right now.
    pub fn try_reserve(&self) -> Option<Reserved> {
        self.slots.clone().try_acquire_owned().ok().map(Reserved)
    }

    /// Turns a reserved slot into the accepted connection's.
    pub fn hold(&self, reserved: Reserved) -> Held {
        self.gauge.inc();
        Held {
            _permit: reserved.0,
            gauge: self.gauge.clone(),
        }
    }

    /// Slots not taken.
    pub fn available(&self) -> usize {
        self.slots.available_permits()
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, as Istio's ztunnel does at start-up
/// (`src/main.rs` `increase_open_files_limit`, istio/ztunnel#1585): every proxied
/// connection costs two descriptors, and the common soft default of 1024 would make the
/// listeners hit EMFILE long before any cap. Returns the (old, new) soft limit.
pub fn raise_open_files_limit() -> nix::Result<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok((soft, hard))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_one_second_and_resets_on_success() {
        let mut b = Backoff::default();
        let waits: Vec<u64> = (0..10).map(|_| b.failed().as_millis() as u64).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.failed(), Duration::from_millis(10));
    }

    #[test]
    fn a_listener_out_of_descriptors_tries_at_most_a_few_times_a_second() {
        // What the EMFILE test relies on: in 10 s of failures, a dozen or so tries.
        let mut b = Backoff::default();
        let (mut spent, mut tries) = (Duration::ZERO, 0);
        while spent < Duration::from_secs(10) {
            spent += b.failed();
            tries += 1;
        }
        assert!(tries <= 20, "{tries} tries in 10 s");
    }

    #[test]
    fn accept_errors_are_classified_by_errno() {
        let os = io::Error::from_raw_os_error;
        for (errno, want, backs_off) in [
            (libc::EMFILE, AcceptError::Emfile, true),
            (libc::ENFILE, AcceptError::Enfile, true),
            (libc::ENOBUFS, AcceptError::Enobufs, true),
            (libc::ENOMEM, AcceptError::Enomem, true),
            (libc::ECONNABORTED, AcceptError::Connection, false),
            (libc::EPERM, AcceptError::Connection, false),
            (libc::EINVAL, AcceptError::Other, true),
        ] {
            let kind = AcceptError::classify(&os(errno));
            assert_eq!(kind, want, "errno {errno}");
            assert_eq!(kind.backs_off(), backs_off, "errno {errno}");
        }
        assert_eq!(
            AcceptError::classify(&io::Error::other("no errno")),
            AcceptError::Other
        );
    }

    #[test]
    fn rate_limit_lets_one_line_through_per_period_and_counts_the_rest() {
        let mut r = RateLimit::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(r.allow(t0), Some(0));
        for s in 1..5 {
            assert_eq!(r.allow(t0 + Duration::from_secs(s)), None);
        }
        assert_eq!(r.allow(t0 + Duration::from_secs(5)), Some(4));
        assert_eq!(r.allow(t0 + Duration::from_secs(6)), None);
        assert_eq!(r.allow(t0 + Duration::from_secs(11)), Some(1));
    }

    #[test]
    fn timed_out_names_the_step_and_its_flag() {
        let t = TimedOut {
            step: Step::TlsAccept,
            after: Duration::from_millis(1500),
        };
        assert_eq!(
            t.to_string(),
            "tls_accept timed out after 1s 500ms (--tls-accept-timeout)"
        );
        let io: io::Error = t.into();
        assert_eq!(io.kind(), io::ErrorKind::TimedOut);
        let names: Vec<&str> = Step::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "tcp_connect",
                "tls_accept",
                "h2_accept",
                "tls_connect",
                "hbone_dial",
                "connect_response"
            ]
        );
    }

    #[tokio::test]
    async fn within_ends_a_step_that_takes_too_long() {
        let slow = within(
            Step::ConnectResponse,
            Duration::from_millis(20),
            std::future::pending::<()>(),
        )
        .await;
        assert_eq!(
            slow,
            Err(TimedOut {
                step: Step::ConnectResponse,
                after: Duration::from_millis(20)
            })
        );
        let fast = within(Step::TcpConnect, Duration::from_secs(5), async { 7 }).await;
        assert_eq!(fast, Ok(7));
    }

    #[tokio::test]
    async fn a_full_listener_waits_for_a_slot_and_counts_each_time_it_fills() {
        let metrics = Metrics::new();
        let mut cap = ListenerCap::new(2, "hbone", "default/a", metrics.clone());
        let r = cap.reserve().await;
        let a = cap.hold(r);
        let r = cap.reserve().await;
        let b = cap.hold(r);
        assert_eq!(cap.available(), 0);
        assert_line(
            &metrics,
            r#"ztunnel_listener_connections{listener="hbone"} 2"#,
        );

        // Full: the third reservation waits until a connection closes.
        let third = tokio::time::timeout(Duration::from_millis(50), cap.reserve()).await;
        assert!(third.is_err(), "a full listener must not hand out a slot");
        assert_line(
            &metrics,
            r#"ztunnel_listener_saturated_total{listener="hbone"} 1"#,
        );
        // A waiter gets the slot a closing connection frees.
        let waiter = tokio::spawn(async move {
            let r = cap.reserve().await;
            (cap.hold(r), cap)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "waits while the listener is full");
        drop(a);
        let (c, cap) = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("a freed slot is handed out")
            .expect("waiter task");
        assert_eq!(cap.available(), 0);
        assert_line(
            &metrics,
            r#"ztunnel_listener_connections{listener="hbone"} 2"#,
        );
        assert_line(
            &metrics,
            r#"ztunnel_listener_saturated_total{listener="hbone"} 2"#,
        );
        drop((b, c));
        assert_eq!(cap.available(), 2);
        assert_line(
            &metrics,
            r#"ztunnel_listener_connections{listener="hbone"} 0"#,
        );
    }

    #[tokio::test]
    async fn a_reservation_that_is_not_used_frees_its_slot() {
        let metrics = Metrics::new();
        let mut cap = ListenerCap::new(1, "inbound", "default/a", metrics.clone());
        let r = cap.reserve().await;
        assert_eq!(cap.available(), 0);
        // The accept failed: the slot goes back without counting a connection.
        drop(r);
        assert_eq!(cap.available(), 1);
        assert_line(
            &metrics,
            r#"ztunnel_listener_connections{listener="inbound"} 0"#,
        );
    }

    #[tokio::test(start_paused = true)]
    async fn accept_errors_are_counted_and_back_off_only_for_resources() {
        let metrics = Metrics::new();
        let mut errors = AcceptErrors::new("outbound", "default/a", metrics.clone());
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let start = tokio::time::Instant::now();
        for _ in 0..3 {
            errors.failed(&emfile).await;
        }
        // 10 + 20 + 40 ms of (paused, auto-advanced) time.
        assert_eq!(start.elapsed(), Duration::from_millis(70));
        let before = tokio::time::Instant::now();
        errors
            .failed(&io::Error::from_raw_os_error(libc::ECONNABORTED))
            .await;
        assert_eq!(before.elapsed(), Duration::ZERO, "no wait for one bad peer");
        errors.accepted();
        let before = tokio::time::Instant::now();
        errors.failed(&emfile).await;
        assert_eq!(
            before.elapsed(),
            Duration::from_millis(10),
            "reset by success"
        );
        assert_line(
            &metrics,
            r#"ztunnel_accept_errors_total{listener="outbound",error="emfile"} 4"#,
        );
        assert_line(
            &metrics,
            r#"ztunnel_accept_errors_total{listener="outbound",error="connection"} 1"#,
        );
    }

    #[test]
    fn the_soft_open_files_limit_ends_at_the_hard_one() {
        use nix::sys::resource::{Resource, getrlimit};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        let (_, raised_to) = raise_open_files_limit().expect("raise");
        assert_eq!(raised_to, hard);
        assert_eq!(
            getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit"),
            (hard, hard)
        );
    }

    fn assert_line(metrics: &Metrics, line: &str) {
        let text = metrics.encode();
        assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
    }
}
