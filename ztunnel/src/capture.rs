//! The capture backend in use: eBPF (the default) or iptables (the fallback for kernels
//! without the eBPF features, or on request). The rest of ztunnel talks to this facade.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    os::fd::BorrowedFd,
    path::Path,
};

use serde::{Deserialize, Serialize};

use crate::{
    ebpf::{self, Features, Occupancy},
    iptables,
    netns::{self, Netns},
};

/// Which capture to use (`--capture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// eBPF when the kernel has what it needs (Linux >= 5.15), iptables otherwise.
    Auto,
    Ebpf,
    Iptables,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Ebpf(#[from] ebpf::Error),
    #[error(transparent)]
    Netns(#[from] netns::Error),
    #[error("the same-node fast path needs eBPF capture; this ztunnel runs iptables capture")]
    FastPathNeedsEbpf,
    #[error("the pod's capture is not of this ztunnel's kind (eBPF against iptables)")]
    Mismatch,
    #[error(transparent)]
    RunStats(#[from] ebpf::run_stats::Error),
    #[error("BPF program statistics need eBPF capture; this ztunnel runs iptables capture")]
    RunStatsNeedEbpf,
    #[error(
        "capture decision events come from the eBPF programs; this ztunnel runs iptables capture"
    )]
    EventsNeedEbpf,
}

pub enum Capture {
    // Boxed: the loaded object is large and there is one per process.
    Ebpf(Box<ebpf::Capture>),
    /// `dns`: the pods' port-53 traffic goes to the DNS proxy too (`--dns-capture`).
    Iptables {
        features: Features,
        dns: bool,
    },
}

/// What is attached for one pod.
pub enum PodCapture {
    Ebpf(ebpf::PodCapture),
    Iptables(iptables::PodRules),
}

impl PodCapture {
    /// The netns cookie the eBPF maps key this pod by (eBPF capture only).
    pub fn netns_cookie(&self) -> Option<u64> {
        match self {
            PodCapture::Ebpf(p) => Some(p.netns_cookie()),
            PodCapture::Iptables(_) => None,
        }
    }

    pub fn attached(&self) -> Vec<String> {
        match self {
            PodCapture::Ebpf(p) => p.attached.iter().map(|s| (*s).to_owned()).collect(),
            PodCapture::Iptables(r) => r.attached().into_iter().map(str::to_owned).collect(),
        }
    }
}

impl Capture {
    /// Probes the kernel and loads the chosen backend, saying why.
    pub fn load(mode: Mode, opts: &ebpf::Options) -> Result<Self, Error> {
        let features = Features::probe()?;
        let use_ebpf = match mode {
            Mode::Ebpf => true,
            Mode::Iptables => false,
            Mode::Auto => {
                if !features.netns_cookie_in_sockops {
                    tracing::warn!(kernel = %features.kernel, "kernel lacks netns cookies in sockops (Linux >= 5.15): using iptables capture");
                }
                features.netns_cookie_in_sockops
            }
        };
        if use_ebpf {
            Ok(Capture::Ebpf(Box::new(ebpf::Capture::load(opts)?)))
        } else {
            tracing::info!(kernel = %features.kernel, "iptables capture");
            Ok(Capture::Iptables {
                features,
                dns: opts.dns,
            })
        }
    }

    /// `ebpf` or `iptables`.
    pub fn mode(&self) -> &'static str {
        match self {
            Capture::Ebpf(_) => "ebpf",
            Capture::Iptables { .. } => "iptables",
        }
    }

    /// Whether inbound connections arrive redirected (NAT), so their original
    /// destination must be asked for rather than read from the local address.
    pub fn inbound_is_redirected(&self) -> bool {
        matches!(self, Capture::Iptables { .. })
    }

    /// Attaches capture to a pod whose listeners are open already (`inbound`: its
    /// `:15006` listening sockets). A failure leaves whatever a predecessor attached.
    pub fn enrol(
        &self,
        name: &str,
        netns_path: &Path,
        cgroup_path: &Path,
        addrs: &[IpAddr],
        inbound: &[(SocketAddr, BorrowedFd<'_>)],
    ) -> Result<PodCapture, Error> {
        match self {
            Capture::Ebpf(c) => Ok(PodCapture::Ebpf(c.enrol(
                name,
                netns_path,
                cgroup_path,
                addrs,
                inbound,
            )?)),
            Capture::Iptables { dns, .. } => Ok(PodCapture::Iptables(iptables::install(
                name,
                Netns::open(netns_path)?,
                addrs,
                *dns,
            )?)),
        }
    }

    /// Replaces a pod's capture for its changed spec in the same netns, never leaving
    /// it uncaptured: see [`ebpf::Capture::reenrol`] and [`iptables::reinstall`] (each
    /// family's rules rewritten in one `iptables-restore` commit; `old_addrs` are put
    /// back if a family fails). On failure the old capture comes back with the reason.
    #[allow(clippy::too_many_arguments)]
    pub fn reenrol(
        &self,
        old: PodCapture,
        old_addrs: &[IpAddr],
        netns_path: &Path,
        cgroup_path: &Path,
        addrs: &[IpAddr],
        inbound: &[(SocketAddr, BorrowedFd<'_>)],
    ) -> Result<PodCapture, Box<(Error, PodCapture)>> {
        match (self, old) {
            (Capture::Ebpf(c), PodCapture::Ebpf(p)) => c
                .reenrol(p, netns_path, cgroup_path, addrs, inbound)
                .map(PodCapture::Ebpf)
                .map_err(|b| {
                    let (e, p) = *b;
                    Box::new((e.into(), PodCapture::Ebpf(p)))
                }),
            (Capture::Iptables { .. }, PodCapture::Iptables(p)) => {
                iptables::reinstall(p, old_addrs, addrs)
                    .map(PodCapture::Iptables)
                    .map_err(|b| {
                        let (e, p) = *b;
                        Box::new((e.into(), PodCapture::Iptables(p)))
                    })
            }
            (_, old) => Err(Box::new((Error::Mismatch, old))),
        }
    }

    pub fn unenrol(&self, pod: PodCapture) {
        match (self, pod) {
            (Capture::Ebpf(c), PodCapture::Ebpf(p)) => c.unenrol(p),
            (_, PodCapture::Iptables(r)) => iptables::remove(r),
            // Cannot happen: eBPF pod captures come only from eBPF capture.
            (Capture::Iptables { .. }, PodCapture::Ebpf(p)) => {
                tracing::error!(pod = %p.name, "eBPF pod capture without eBPF capture loaded");
            }
        }
    }

    /// On exit: eBPF capture stays pinned, iptables rules stay in the pod; either way the
    /// pod fails closed until the next ztunnel takes over.
    pub fn leave_attached(&self, pod: PodCapture) {
        if let (Capture::Ebpf(c), PodCapture::Ebpf(p)) = (self, pod) {
            c.leave_attached(p);
        }
    }

    /// See [`ebpf::Capture::release_unclaimed`].
    pub fn release_unclaimed(
        &self,
        wanted: &BTreeSet<String>,
        wanted_addrs: &[IpAddr],
        live_netns_cookies: &[u64],
    ) {
        if let Capture::Ebpf(c) = self {
            c.release_unclaimed(wanted, wanted_addrs, live_netns_cookies);
        }
    }

    /// See [`ebpf::Capture::hold_superseded`].
    pub fn hold_superseded(&self) {
        if let Capture::Ebpf(c) = self {
            c.hold_superseded();
        }
    }

    /// See [`ebpf::Capture::release_superseded`].
    pub fn release_superseded(&self) {
        if let Capture::Ebpf(c) = self {
            c.release_superseded();
        }
    }

    /// ztunnel's own reading of the original-destination map (eBPF capture only).
    pub fn orig_dst_table(&self) -> Result<Option<ebpf::OrigDstTable>, Error> {
        match self {
            Capture::Ebpf(c) => Ok(Some(c.orig_dst_table()?)),
            Capture::Iptables { .. } => Ok(None),
        }
    }

    pub fn features(&self) -> &Features {
        match self {
            Capture::Ebpf(c) => c.features(),
            Capture::Iptables { features, .. } => features,
        }
    }

    pub fn pin_dir(&self) -> Option<&Path> {
        match self {
            Capture::Ebpf(c) => Some(c.pin_dir()),
            Capture::Iptables { .. } => None,
        }
    }

    pub fn fast_path(&self) -> bool {
        match self {
            Capture::Ebpf(c) => c.fast_path(),
            Capture::Iptables { .. } => false,
        }
    }

    pub fn set_fast_path(&self, on: bool) -> Result<(), Error> {
        match self {
            Capture::Ebpf(c) => Ok(c.set_fast_path(on)?),
            Capture::Iptables { .. } if !on => Ok(()),
            Capture::Iptables { .. } => Err(Error::FastPathNeedsEbpf),
        }
    }

    pub fn occupancy(&self) -> Occupancy {
        match self {
            Capture::Ebpf(c) => c.occupancy(),
            Capture::Iptables { .. } => Occupancy::default(),
        }
    }

    pub fn stats(&self) -> BTreeMap<&'static str, u64> {
        match self {
            Capture::Ebpf(c) => c.stats(),
            Capture::Iptables { .. } => BTreeMap::new(),
        }
    }
}

/// The kernel's per-program statistics (eBPF capture only; see [`ebpf::run_stats`]).
impl Capture {
    pub fn run_stats(&self) -> ebpf::run_stats::Status {
        match self {
            Capture::Ebpf(c) => c.run_stats(),
            Capture::Iptables { .. } => ebpf::run_stats::Status::new(None, Vec::new()),
        }
    }

    /// Turns them on for `duration`; returns when they go off.
    pub fn enable_run_stats(
        &self,
        duration: std::time::Duration,
    ) -> Result<std::time::Instant, Error> {
        match self {
            Capture::Ebpf(c) => Ok(c.enable_run_stats(duration)?),
            Capture::Iptables { .. } => Err(Error::RunStatsNeedEbpf),
        }
    }

    /// Turns them off; whether ztunnel held them on.
    pub fn disable_run_stats(&self) -> bool {
        match self {
            Capture::Ebpf(c) => c.disable_run_stats(),
            Capture::Iptables { .. } => false,
        }
    }

    /// Turns them off if their time has run out; whether it did.
    pub fn expire_run_stats(&self) -> bool {
        match self {
            Capture::Ebpf(c) => c.expire_run_stats(),
            Capture::Iptables { .. } => false,
        }
    }
}

/// The programs' decision events (eBPF capture only; see `ztunnel_common::events`).
impl Capture {
    /// The ring buffer's reader, once; `None` under iptables capture.
    pub fn take_events(&self) -> Option<ebpf::events::Reader> {
        match self {
            Capture::Ebpf(c) => c.take_events(),
            Capture::Iptables { .. } => None,
        }
    }

    pub fn set_event_level(&self, source: u32, level: u32) -> Result<(), Error> {
        match self {
            Capture::Ebpf(c) => Ok(c.set_event_level(source, level)?),
            Capture::Iptables { .. } => Err(Error::EventsNeedEbpf),
        }
    }
}
