//! Graceful drain, on SIGTERM, `POST /quitquitquit` or a successor taking over: readiness
//! answers 503 from the first moment, the pods' listeners stop accepting, inbound HBONE
//! connections get GOAWAY, pooled outbound HBONE connections take no new streams and
//! close with their last one, and established connections run until they end or the
//! drain timeout passes; what is left then is shut down with outcome [`OUTCOME`].
//!
//! This module owns the timeout's default and the wait; `app` runs the sequence
//! (`Shared::drain`) and `proxy` implements [`Drainable`].
use std::time::Duration;

use tokio::time::Instant;

/// The drain timeout when neither `--drain-timeout` nor the grace period is given:
/// Istio's ztunnel's `DEFAULT_CONNECTION_TERMINATION_DEADLINE` (istio/ztunnel
/// `src/config.rs`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The outcome in the access log of a connection the drain timeout ended.
pub const OUTCOME: &str = "drain timeout";

/// How long connections whose sockets the timeout shut down get to finish (their copy
/// loops see EOF or EPIPE at once) and write their own access log line; the records
/// still open after it are closed by the drain itself.
const FORCE_GRACE: Duration = Duration::from_secs(1);

/// How often the drain looks at what is left. A drain happens once per process, so a
/// poll costs nothing worth a notification path through every connection's close.
const POLL: Duration = Duration::from_millis(50);

/// The drain timeout: `--drain-timeout` (Istio's `CONNECTION_TERMINATION_DEADLINE`) if
/// given; else derived from the pod's `terminationGracePeriodSeconds` (Istio's
/// `TERMINATION_GRACE_PERIOD_SECONDS`) exactly as Istio's ztunnel does — 5 s less when
/// it is over 10 s, else 1 s less, at least 1 s — so the last seconds before the kubelet's
/// SIGKILL go to closing what is left cleanly; else [`DEFAULT_TIMEOUT`]. (Istio's
/// subtraction underflows for a grace period of 0; here it saturates to the 1 s floor.)
pub fn timeout(explicit: Option<Duration>, grace_period_secs: Option<u64>) -> Duration {
    if let Some(t) = explicit {
        return t;
    }
    match grace_period_secs {
        Some(secs) => {
            let margin = if secs > 10 { 5 } else { 1 };
            Duration::from_secs(secs.saturating_sub(margin).max(1))
        }
        None => DEFAULT_TIMEOUT,
    }
}

/// The longest a drain with `timeout` takes: the timeout, then the grace for what it
/// ended. The pod's grace period must be longer, or the kubelet kills ztunnel mid-drain.
pub fn longest(timeout: Duration) -> Duration {
    timeout + FORCE_GRACE + POLL
}

/// Why a drain started, and whether a successor holds the listeners (then it gets the
/// new connections; without one they fail closed until the next ztunnel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `SIGTERM`, `SIGINT`, `POST /quitquitquit`, or the handover's own words.
    pub cause: String,
    pub successor: bool,
}

/// What a drain waits for and, at its deadline, ends.
pub trait Drainable {
    /// Proxied connections still open (relays and HBONE streams, both directions).
    fn open_connections(&self) -> usize;
    /// Whether work accepted before the drain that is not (yet) a proxied connection
    /// is still under way: a TLS handshake, an HBONE connection sending its GOAWAY.
    fn busy(&self) -> bool;
    /// Ends every open connection (shuts its sockets down) with `outcome`; returns how
    /// many.
    fn force_close(&self, outcome: &str) -> usize;
    /// Closes the records of connections still open (their access log line, with
    /// `outcome` unless they have one); returns how many.
    fn abandon(&self, outcome: &str) -> usize;
}

/// How a drain went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Proxied connections open when it started.
    pub at_start: usize,
    /// Still open when the timeout passed (0 when everything finished in time).
    pub remaining: usize,
    /// Ended by the timeout (shut down, outcome [`OUTCOME`]).
    pub forced: usize,
    pub elapsed: Duration,
}

/// Waits until `target` has nothing open and nothing under way, or `timeout` passes;
/// then ends what is left. `progress` is told the number of open connections as it
/// changes (for the `remaining` gauge). The caller has already stopped new work.
pub async fn run(
    target: &impl Drainable,
    timeout: Duration,
    mut progress: impl FnMut(usize),
) -> Report {
    let started = Instant::now();
    let deadline = started + timeout;
    let at_start = target.open_connections();
    let mut last = at_start;
    progress(at_start);
    loop {
        let open = target.open_connections();
        if open != last {
            progress(open);
            last = open;
        }
        if open == 0 && !target.busy() {
            return Report {
                at_start,
                remaining: 0,
                forced: 0,
                elapsed: started.elapsed(),
            };
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep_until((now + POLL).min(deadline)).await;
    }
    let remaining = target.open_connections();
    let forced = target.force_close(OUTCOME);
    let grace = Instant::now() + FORCE_GRACE;
    while target.open_connections() > 0 && Instant::now() < grace {
        tokio::time::sleep(POLL).await;
    }
    target.abandon(OUTCOME);
    progress(target.open_connections());
    Report {
        at_start,
        remaining,
        forced,
        elapsed: started.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn timeout_follows_istios_derivation() {
        let s = Duration::from_secs;
        // (--drain-timeout, TERMINATION_GRACE_PERIOD_SECONDS) → drain timeout
        let table = [
            (None, None, DEFAULT_TIMEOUT),
            (None, Some(30), s(25)),
            (None, Some(60), s(55)),
            (None, Some(11), s(6)),
            (None, Some(10), s(9)),
            (None, Some(2), s(1)),
            (None, Some(1), s(1)),
            (None, Some(0), s(1)),
            (Some(s(3)), Some(30), s(3)),
            (Some(Duration::ZERO), None, Duration::ZERO),
        ];
        for (explicit, grace, want) in table {
            assert_eq!(timeout(explicit, grace), want, "{explicit:?} {grace:?}");
        }
        assert_eq!(DEFAULT_TIMEOUT, s(5), "Istio's default");
    }

    /// Connections that each end at a given time (`None`: never on their own).
    struct Fake {
        start: Instant,
        ends: Vec<Option<Duration>>,
        busy_until: Duration,
        state: Mutex<FakeState>,
    }

    #[derive(Default)]
    struct FakeState {
        forced_with: Option<String>,
        /// Forced connections that still do not finish (their task is stuck).
        stuck: usize,
        abandoned: usize,
    }

    impl Fake {
        fn new(ends: Vec<Option<Duration>>) -> Self {
            Fake {
                start: Instant::now(),
                ends,
                busy_until: Duration::ZERO,
                state: Mutex::default(),
            }
        }

        fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
            self.state.lock().expect("test lock")
        }
    }

    impl Drainable for Fake {
        fn open_connections(&self) -> usize {
            let st = self.state();
            if st.forced_with.is_some() {
                return st.stuck - st.abandoned.min(st.stuck);
            }
            let now = self.start.elapsed();
            self.ends
                .iter()
                .filter(|e| e.is_none_or(|at| at > now))
                .count()
        }

        fn busy(&self) -> bool {
            self.start.elapsed() < self.busy_until
        }

        fn force_close(&self, outcome: &str) -> usize {
            let open = self.open_connections();
            self.state().forced_with = Some(outcome.to_owned());
            open
        }

        fn abandon(&self, _outcome: &str) -> usize {
            let mut st = self.state();
            let n = st.stuck - st.abandoned;
            st.abandoned = st.stuck;
            n
        }
    }

    #[tokio::test(start_paused = true)]
    async fn finishes_as_soon_as_the_last_connection_ends() {
        let s = Duration::from_secs;
        let fake = Fake::new(vec![Some(s(2)), Some(s(7))]);
        let mut seen = Vec::new();
        let report = run(&fake, s(30), |n| seen.push(n)).await;
        assert_eq!(report.at_start, 2);
        assert_eq!((report.remaining, report.forced), (0, 0));
        assert!(
            report.elapsed >= s(7) && report.elapsed < s(7) + POLL * 2,
            "{report:?}"
        );
        assert_eq!(seen, [2, 1, 0], "the remaining gauge follows each close");
        assert!(fake.state().forced_with.is_none(), "nothing forced");
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_work_under_way_without_a_connection() {
        let s = Duration::from_secs;
        let mut fake = Fake::new(vec![]);
        fake.busy_until = s(3);
        let report = run(&fake, s(30), |_| {}).await;
        assert_eq!(
            (report.at_start, report.remaining, report.forced),
            (0, 0, 0)
        );
        assert!(
            report.elapsed >= s(3) && report.elapsed < s(4),
            "{report:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn forces_what_is_left_at_the_deadline() {
        let s = Duration::from_secs;
        let fake = Fake::new(vec![Some(s(1)), None, None]);
        let mut seen = Vec::new();
        let report = run(&fake, s(10), |n| seen.push(n)).await;
        assert_eq!(report.at_start, 3);
        assert_eq!((report.remaining, report.forced), (2, 2));
        assert_eq!(fake.state().forced_with.as_deref(), Some(OUTCOME));
        // Forced at the deadline; the shut-down connections finished at once.
        assert!(
            report.elapsed >= s(10) && report.elapsed < s(10) + POLL,
            "{report:?}"
        );
        assert_eq!(seen, [3, 2, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn records_of_stuck_connections_are_closed_after_the_grace() {
        let s = Duration::from_secs;
        let fake = Fake::new(vec![None]);
        fake.state().stuck = 1;
        let report = run(&fake, s(2), |_| {}).await;
        assert_eq!((report.remaining, report.forced), (1, 1));
        assert_eq!(fake.state().abandoned, 1, "closed by the drain itself");
        assert!(
            report.elapsed >= s(2) + FORCE_GRACE && report.elapsed <= longest(s(2)),
            "bounded: {report:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_timeout_forces_at_once() {
        let fake = Fake::new(vec![None]);
        let report = run(&fake, Duration::ZERO, |_| {}).await;
        assert_eq!(
            (report.at_start, report.remaining, report.forced),
            (1, 1, 1)
        );
        assert!(report.elapsed < POLL, "{report:?}");
    }
}
