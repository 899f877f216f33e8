//! The kernel's own per-program statistics: how often each capture program ran and for
//! how long (`bpf_prog_info.run_cnt`, `run_time_ns`). The kernel keeps them only while
//! statistics are on node-wide, which costs every BPF program on the node two clock reads
//! per run, so ztunnel turns them on only while an operator asks, for a bounded time:
//! `BPF_ENABLE_STATS` (Linux >= 5.8) hands out a file descriptor and the kernel counts
//! while any such descriptor is open. ztunnel never writes the
//! `kernel.bpf_stats_enabled` sysctl (another tool may own it); it reads it to say
//! whether statistics are on for another reason.
use std::{
    os::fd::OwnedFd,
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

/// How long statistics stay on when the request names no duration.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(10 * 60);
/// The longest one request may keep statistics on; asking again extends it.
pub const MAX_DURATION: Duration = Duration::from_secs(60 * 60);

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "statistics for {requested} asked; the limit is {limit} (ask again to extend)",
        requested = humantime::format_duration(*requested),
        limit = humantime::format_duration(MAX_DURATION)
    )]
    TooLong { requested: Duration },
    #[error("a duration of 0 turns nothing on; use enabled=false to turn statistics off")]
    Zero,
    #[error("the kernel refused to turn BPF statistics on (BPF_ENABLE_STATS needs Linux >= 5.8)")]
    Enable {
        #[source]
        source: std::io::Error,
    },
}

/// Statistics ztunnel holds on, and until when.
struct Held {
    fd: OwnedFd,
    until: Instant,
    until_wall: SystemTime,
}

/// The switch: on while a request's duration runs, off at its end or on request.
#[derive(Default)]
pub struct Switch {
    held: Mutex<Option<Held>>,
}

impl Switch {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Held>> {
        // Plain data behind the lock: a panic while holding it leaves it usable.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Turns statistics on for `duration` from now (a shorter or longer time than a
    /// request already running replaces it). Returns when they go off again.
    pub fn enable(&self, duration: Duration) -> Result<Instant, Error> {
        if duration.is_zero() {
            return Err(Error::Zero);
        }
        if duration > MAX_DURATION {
            return Err(Error::TooLong {
                requested: duration,
            });
        }
        let mut held = self.lock();
        let fd = match held.take() {
            Some(h) => h.fd,
            None => aya::sys::enable_stats(aya::sys::Stats::RunTime)
                .map_err(|e| Error::Enable { source: e.io_error })?,
        };
        let until = Instant::now() + duration;
        *held = Some(Held {
            fd,
            until,
            until_wall: SystemTime::now() + duration,
        });
        Ok(until)
    }

    /// Turns ztunnel's request off (the kernel stops counting unless someone else asks).
    /// Returns whether it was on.
    pub fn disable(&self) -> bool {
        self.lock().take().is_some()
    }

    /// Turns statistics off if their time has run out; the timer set by whoever enabled
    /// them calls this, and so does every reading, so a lost timer cannot keep them on.
    pub fn expire(&self) -> bool {
        let mut held = self.lock();
        if held.as_ref().is_some_and(|h| h.until <= Instant::now()) {
            *held = None;
            return true;
        }
        false
    }

    /// Until when ztunnel holds statistics on, if it does.
    pub fn held_until(&self) -> Option<SystemTime> {
        self.expire();
        self.lock().as_ref().map(|h| h.until_wall)
    }
}

/// Whether `kernel.bpf_stats_enabled` is set (by an operator or another tool; it does not
/// show ztunnel's descriptor). `None` when it cannot be read.
pub fn sysctl_enabled() -> Option<bool> {
    std::fs::read_to_string(SYSCTL)
        .ok()
        .map(|s| s.trim() != "0")
}

/// One program's totals since it was loaded, counted only while statistics were on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgramRuns {
    pub program: String,
    /// The kernel's program id (`bpftool prog show id N`).
    pub id: u32,
    pub runs: u64,
    pub run_time_ns: u64,
    /// `run_time_ns / runs`, 0 before the first counted run.
    pub ns_per_run: u64,
}

impl ProgramRuns {
    pub fn new(program: &str, id: u32, runs: u64, run_time: Duration) -> Self {
        let run_time_ns = u64::try_from(run_time.as_nanos()).unwrap_or(u64::MAX);
        ProgramRuns {
            program: program.to_owned(),
            id,
            runs,
            run_time_ns,
            ns_per_run: run_time_ns.checked_div(runs).unwrap_or(0),
        }
    }
}

/// What `/bpf_stats` and `/config_dump` `capture.bpfStats` show.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// The kernel counts now: ztunnel holds statistics on, or the sysctl is set.
    pub enabled: bool,
    /// ztunnel holds them on until this time (RFC 3339), at most an hour from the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled_until: Option<String>,
    /// `kernel.bpf_stats_enabled` (`None`: unreadable).
    #[serde(default)]
    pub sysctl: Option<bool>,
    /// ztunnel's programs, in load order.
    #[serde(default)]
    pub programs: Vec<ProgramRuns>,
}

impl Status {
    pub fn new(held_until: Option<SystemTime>, programs: Vec<ProgramRuns>) -> Self {
        let sysctl = sysctl_enabled();
        Status {
            enabled: held_until.is_some() || sysctl == Some(true),
            enabled_until: held_until.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            sysctl,
            programs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_over_the_limit_or_zero_are_refused_before_touching_the_kernel() {
        let s = Switch::default();
        let err = s
            .enable(MAX_DURATION + Duration::from_secs(1))
            .expect_err("over the limit");
        let msg = err.to_string();
        assert!(
            msg.contains("1h 1s") && msg.contains("limit is 1h"),
            "{msg}"
        );
        assert!(matches!(s.enable(Duration::ZERO), Err(Error::Zero)));
        assert_eq!(s.held_until(), None);
        assert!(!s.disable());
    }

    #[test]
    fn ns_per_run_divides_and_survives_zero_runs() {
        let r = ProgramRuns::new("p", 7, 4, Duration::from_nanos(1000));
        assert_eq!((r.run_time_ns, r.ns_per_run), (1000, 250));
        assert_eq!(ProgramRuns::new("p", 7, 0, Duration::ZERO).ns_per_run, 0);
    }
}
