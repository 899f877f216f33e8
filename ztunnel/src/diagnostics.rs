//! Capture diagnostics (issue 20): the kernel programs' decision events
//! (`ztunnel_common::events`) read from their ring buffer, the pod named from the netns
//! cookie (or, for tc, the pod's address), forwarded into the log for the program groups
//! and levels an operator switched on (`POST /logging?capture=debug`, `ztunnel
//! capture-log on`), and streamed live to `ztunnel capture watch` (`GET /capture/watch`).
//!
//! The kernel level of each program group is the larger of the log's level and, while
//! anyone watches, `debug`; events the log did not ask for go to the watchers only.
use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use ztunnel_common::events::{Event, level, source};

use crate::{app::Shared, ebpf::events as ev};

/// Watchers at once; one more is refused (each costs a task and a queue).
pub const MAX_WATCHERS: usize = 8;
/// Events queued for each watcher; a watcher that falls further behind loses the oldest
/// and is told how many.
const WATCH_QUEUE: usize = 1024;
/// Events taken from the ring at a time.
const BATCH: usize = 256;
/// How often the ring is read while any program group reports: 4,681 events fit, so
/// about 90,000 decisions a second are kept; more are lost and counted (`events_lost`).
const POLL: Duration = Duration::from_millis(50);
/// How often while none does (what is left in the ring after a switch-off).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How often the pod names are read again when an event names an unknown pod.
const REFRESH: Duration = Duration::from_secs(1);

const GROUPS: usize = source::COUNT as usize;

/// One decision, as the log and `capture watch` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaptureEvent {
    /// RFC 3339 with microseconds, when ztunnel read it.
    pub time: String,
    /// The program group: `connect`, `tc`, `sk_lookup`, `sockops`, `sockopt`, `dns`.
    pub program: String,
    /// `captured`, `skipped`, `dropped`, `refused`, `recorded`, `failed`, `answered`,
    /// `miss` (and `lost` for a watcher that read too slowly).
    pub decision: String,
    pub reason: String,
    /// `warn`, `info` or `debug`.
    pub level: String,
    /// `namespace/name`, when the pod is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// 0 when the program could not tell.
    #[serde(default)]
    pub netns_cookie: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<SocketAddr>,
}

impl CaptureEvent {
    fn new(e: &Event, pod: Option<String>) -> Self {
        let (decision, reason) = ev::reason_names(e);
        CaptureEvent {
            time: now(),
            program: ev::source_name(e).to_owned(),
            decision: decision.to_owned(),
            reason: reason.to_owned(),
            level: level::NAMES
                .get(ev::level_of(e) as usize)
                .copied()
                .unwrap_or("debug")
                .to_owned(),
            pod,
            netns_cookie: e.netns_cookie,
            src: ev::socket_addr(&e.src, e.src_port),
            dst: ev::socket_addr(&e.dst, e.dst_port),
        }
    }

    fn lost(n: u64) -> Self {
        CaptureEvent {
            time: now(),
            program: "ztunnel".to_owned(),
            decision: "lost".to_owned(),
            reason: format!("{n} events not shown: this watcher read too slowly"),
            level: "warn".to_owned(),
            pod: None,
            netns_cookie: 0,
            src: None,
            dst: None,
        }
    }
}

/// One line: `<time> <program> <decision> pod=<pod> src=<addr> dst=<addr> reason="…"`.
impl fmt::Display for CaptureEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_dash = |a: &Option<SocketAddr>| a.map_or_else(|| "-".to_owned(), |a| a.to_string());
        write!(
            f,
            "{} {:<9} {:<9} pod={} src={} dst={} reason={:?}",
            self.time,
            self.program,
            self.decision,
            self.pod.as_deref().unwrap_or("-"),
            or_dash(&self.src),
            or_dash(&self.dst),
            self.reason
        )
    }
}

fn now() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

/// The log's levels per program group and the watchers; [`Shared`] holds one.
pub struct Hub {
    tx: broadcast::Sender<Arc<CaptureEvent>>,
    log_levels: Mutex<[u32; GROUPS]>,
    watchers: AtomicUsize,
    /// Wakes the reader when reporting is switched on.
    wake: tokio::sync::Notify,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            tx: broadcast::channel(WATCH_QUEUE).0,
            log_levels: Mutex::new([level::OFF; GROUPS]),
            watchers: AtomicUsize::new(0),
            wake: tokio::sync::Notify::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "bad capture log setting {spec:?}: {why} (e.g. capture=debug, capture=tc:warn,connect:info, capture=off)"
    )]
    Spec { spec: String, why: String },
    #[error("{MAX_WATCHERS} capture watchers already; try again when one ends")]
    TooManyWatchers,
    #[error(transparent)]
    Capture(#[from] crate::capture::Error),
}

impl Hub {
    fn levels(&self) -> std::sync::MutexGuard<'_, [u32; GROUPS]> {
        self.log_levels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The log's level per program group, by name (`off` for each group not on).
    pub fn log_levels(&self) -> Vec<(&'static str, &'static str)> {
        let levels = *self.levels();
        source::NAMES
            .iter()
            .zip(levels)
            .map(|(s, l)| (*s, level::NAMES.get(l as usize).copied().unwrap_or("debug")))
            .collect()
    }

    /// `connect=debug tc=warn` for the groups that log, `off` when none does.
    pub fn describe(&self) -> String {
        let on: Vec<String> = self
            .log_levels()
            .into_iter()
            .filter(|(_, l)| *l != "off")
            .map(|(s, l)| format!("{s}={l}"))
            .collect();
        if on.is_empty() {
            "off".to_owned()
        } else {
            on.join(" ")
        }
    }

    pub fn watchers(&self) -> usize {
        self.watchers.load(Ordering::Relaxed)
    }

    /// Whether any program group reports (the log asks, or someone watches).
    fn active(&self) -> bool {
        self.watchers() > 0 || self.levels().iter().any(|l| *l != level::OFF)
    }

    /// Applies a `capture=` setting: `LEVEL` for every group, or `GROUP:LEVEL,…`; then
    /// sets each group's kernel level. A bad setting changes nothing.
    pub fn set_log(&self, shared: &Shared, spec: &str) -> Result<(), Error> {
        let changes = parse_spec(spec).map_err(|why| Error::Spec {
            spec: spec.to_owned(),
            why,
        })?;
        {
            let mut levels = self.levels();
            let before = *levels;
            for (group, l) in changes {
                levels[group as usize] = l;
            }
            if let Err(e) = self.apply(shared, &levels) {
                *levels = before;
                let _ = self.apply(shared, &levels);
                return Err(e);
            }
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Each group's kernel level: the log's, or `debug` while anyone watches.
    fn apply(&self, shared: &Shared, levels: &[u32; GROUPS]) -> Result<(), Error> {
        let watching = self.watchers() > 0;
        for (group, l) in levels.iter().enumerate() {
            let kernel = if watching { level::DEBUG } else { *l };
            shared.capture.set_event_level(group as u32, kernel)?;
        }
        Ok(())
    }

    fn reapply(&self, shared: &Shared) {
        let levels = *self.levels();
        if let Err(e) = self.apply(shared, &levels) {
            tracing::warn!(error = %crate::proxy::error_chain(&e), "failed to set the capture programs' event levels");
        }
    }
}

/// `debug` | `off` | `tc:debug,connect:info`.
fn parse_spec(spec: &str) -> Result<Vec<(u32, u32)>, String> {
    let level_of = |name: &str| {
        ev::parse_level(name)
            .ok_or_else(|| format!("unknown level {name:?} (off, warn, info, debug)"))
    };
    if !spec.contains(':') {
        let l = level_of(spec)?;
        return Ok((0..source::COUNT).map(|g| (g, l)).collect());
    }
    spec.split(',')
        .map(|part| {
            let (group, l) = part
                .split_once(':')
                .ok_or_else(|| format!("{part:?} is not PROGRAM:LEVEL"))?;
            let g = ev::parse_source(group).ok_or_else(|| {
                format!("unknown program {group:?} ({})", source::NAMES.join(", "))
            })?;
            Ok((g, level_of(l)?))
        })
        .collect()
}

/// A live subscription to every decision (while it lives, the programs report at
/// `debug`); dropping it puts the log's levels back.
pub struct Watch {
    shared: Arc<Shared>,
    rx: broadcast::Receiver<Arc<CaptureEvent>>,
    pod: Option<String>,
}

impl Watch {
    /// The next decision for the watched pod; a `lost` event when this watcher fell
    /// behind.
    pub async fn next(&mut self) -> Option<Arc<CaptureEvent>> {
        loop {
            match self.rx.recv().await {
                Ok(e) if self.pod.is_none() || e.pod == self.pod => return Some(e),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    return Some(Arc::new(CaptureEvent::lost(n)));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let hub = &self.shared.diagnostics;
        if hub.watchers.fetch_sub(1, Ordering::Relaxed) == 1 {
            hub.reapply(&self.shared);
        }
    }
}

/// Starts watching the decisions of `pod` (`namespace/name`), or of every pod.
pub fn watch(shared: &Arc<Shared>, pod: Option<String>) -> Result<Watch, Error> {
    let hub = &shared.diagnostics;
    let n = hub.watchers.fetch_add(1, Ordering::Relaxed);
    let w = Watch {
        shared: Arc::clone(shared),
        rx: hub.tx.subscribe(),
        pod,
    };
    if n >= MAX_WATCHERS {
        // Dropping `w` takes the count back.
        return Err(Error::TooManyWatchers);
    }
    if n == 0 {
        let levels = *hub.levels();
        hub.apply(shared, &levels)?;
    }
    hub.wake.notify_one();
    Ok(w)
}

/// Pod names by netns cookie and by address, read again from the enrolled pods when an
/// event names one not known (at most every [`REFRESH`]).
#[derive(Default)]
struct PodNames {
    by_cookie: HashMap<u64, String>,
    by_addr: HashMap<IpAddr, String>,
    refreshed: Option<Instant>,
}

impl PodNames {
    fn lookup(&self, e: &Event) -> Option<String> {
        if e.netns_cookie != 0 {
            return self.by_cookie.get(&e.netns_cookie).cloned();
        }
        // tc (no netns cookie): the pod whose address the packet is for.
        ev::ip_addr(&e.dst).and_then(|ip| self.by_addr.get(&ip).cloned())
    }

    fn resolve(&mut self, shared: &Shared, e: &Event) -> Option<String> {
        if let Some(p) = self.lookup(e) {
            return Some(p);
        }
        if self.refreshed.is_some_and(|t| t.elapsed() < REFRESH) {
            return None;
        }
        self.refreshed = Some(Instant::now());
        self.by_cookie.clear();
        self.by_addr.clear();
        for p in shared.enrolled_info() {
            for a in &p.addresses {
                self.by_addr.insert(*a, p.name.clone());
            }
            self.by_cookie.insert(p.netns_cookie, p.name);
        }
        self.lookup(e)
    }
}

/// Reads the ring buffer for as long as ztunnel runs (eBPF capture only): each event is
/// logged when its group's log level asks for it and sent to the watchers.
pub fn spawn(shared: Arc<Shared>) {
    let Some(mut reader) = shared.capture.take_events() else {
        return;
    };
    tokio::spawn(async move {
        let mut names = PodNames::default();
        let mut batch = Vec::with_capacity(BATCH);
        let mut unreadable = false;
        loop {
            batch.clear();
            let hub = &shared.diagnostics;
            match reader.drain(&mut batch, BATCH, hub.active()) {
                Ok(()) => unreadable = false,
                // Tried again at each poll; the programs count what the full ring loses.
                Err(e) if !unreadable => {
                    unreadable = true;
                    tracing::warn!(error = %crate::proxy::error_chain(&e), "cannot map the capture decision ring buffer; its events wait in the kernel until it can be");
                }
                Err(_) => {}
            }
            if batch.is_empty() {
                let pause = if hub.active() { POLL } else { IDLE_POLL };
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = hub.wake.notified() => {}
                }
                continue;
            }
            let levels = *hub.levels();
            let watching = hub.watchers() > 0;
            for e in &batch {
                let logged = levels
                    .get(usize::from(e.source))
                    .is_some_and(|l| ev::level_of(e) <= *l);
                if !logged && !watching {
                    continue;
                }
                let pod = names.resolve(&shared, e);
                let event = CaptureEvent::new(e, pod);
                if logged {
                    log(&event);
                }
                if watching {
                    // No receiver (the last watcher just left) is not an error.
                    let _ = hub.tx.send(Arc::new(event));
                }
            }
        }
    });
}

/// One log line per decision, target `capture`: WARN for what fails closed, INFO for
/// the rest (the programs' level is the filter, so the default log filter shows them).
fn log(e: &CaptureEvent) {
    let pod = e.pod.as_deref().unwrap_or("-");
    let or_dash = |a: &Option<SocketAddr>| a.map_or_else(|| "-".to_owned(), |a| a.to_string());
    let (src, dst) = (or_dash(&e.src), or_dash(&e.dst));
    let (program, decision, reason) = (e.program.as_str(), e.decision.as_str(), e.reason.as_str());
    if e.level == "warn" {
        tracing::warn!(target: "capture", program, decision, pod, src, dst, reason, netns_cookie = e.netns_cookie, "capture decision");
    } else {
        tracing::info!(target: "capture", program, decision, pod, src, dst, reason, netns_cookie = e.netns_cookie, "capture decision");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_log_settings_parse_and_bad_ones_say_why() {
        let all = |l| (0..source::COUNT).map(|g| (g, l)).collect::<Vec<_>>();
        assert_eq!(parse_spec("debug"), Ok(all(level::DEBUG)));
        assert_eq!(parse_spec("off"), Ok(all(level::OFF)));
        assert_eq!(
            parse_spec("tc:warn,connect:info"),
            Ok(vec![
                (source::TC, level::WARN),
                (source::CONNECT, level::INFO)
            ])
        );
        for (spec, why) in [
            ("loud", "unknown level \"loud\""),
            ("tcp:debug", "unknown program \"tcp\""),
            ("tc:debug,connect", "\"connect\" is not PROGRAM:LEVEL"),
            ("tc:verbose", "unknown level \"verbose\""),
        ] {
            let err = parse_spec(spec).expect_err(spec);
            assert!(err.contains(why), "{spec}: {err}");
        }
    }

    #[test]
    fn an_event_is_one_line_with_pod_addresses_and_reason() {
        let e = CaptureEvent {
            time: "2026-12-05T08:30:01.123456Z".to_owned(),
            program: "tc".to_owned(),
            decision: "dropped".to_owned(),
            reason: "IP fragment of TCP".to_owned(),
            level: "warn".to_owned(),
            pod: Some("default/a".to_owned()),
            netns_cookie: 4099,
            src: Some("10.1.0.9:40312".parse().expect("addr")),
            dst: None,
        };
        assert_eq!(
            e.to_string(),
            "2026-12-05T08:30:01.123456Z tc        dropped   pod=default/a src=10.1.0.9:40312 dst=- reason=\"IP fragment of TCP\""
        );
        let json = serde_json::to_string(&e).expect("encodes");
        assert_eq!(
            serde_json::from_str::<CaptureEvent>(&json).expect("decodes"),
            e
        );
    }
}
