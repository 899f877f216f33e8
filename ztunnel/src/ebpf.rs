//! The only module that uses aya. Loads the kernel object once, pins its programs and
//! maps under the pin directory, probes kernel features, and offers typed operations:
//! enrol a pod (attach capture to its cgroup and its `eth0`) and unenrol it.
use std::{
    collections::BTreeMap,
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::BorrowedFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf, SockHash},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, CgroupSockopt, SchedClassifier, SkLookup,
        SkMsg, SockOps, TcAttachType,
        cgroup_sockopt::CgroupSockoptLink,
        links::{FdLink, PinnedLink},
        sk_msg::SkMsgLink,
        sock_ops::SockOpsLink,
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
    util::KernelVersion,
};
use serde::Serialize;
use ztunnel_common::{
    IpKey, config,
    fast_path::{self, SockKey},
    orig_dst::{self, OrigDst, TupleKey},
    pod_addrs::{self, PodAddr, SourceKey},
    program, stats,
    time_wait::{self, ListenerKey, Pending},
};

use crate::netns::{self, Netns};

pub mod events;
pub mod run_stats;

/// The kernel object built by `build.rs` from `ztunnel-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ztunnel"));

/// `statfs` magic of bpffs (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where ztunnel's tc filter sits on a pod's `eth0` with clsact (kernels without TCX):
/// always the same slot, so that a successor replaces its predecessor's program there in
/// one netlink request (no moment without capture, no second filter), and ahead of any
/// filter with an automatic priority (49152 and up), such as an older build's.
const TC_PRIORITY: u16 = 1;
const TC_HANDLE: TcHandle = TcHandle::new(0, 1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("eBPF capture needs Linux >= 5.15 (netns cookies in sockops); this kernel is {kernel}")]
    KernelTooOld { kernel: String },
    #[error("failed to read the kernel version")]
    KernelVersion {
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is not a bpffs mount; mount one there (`cargo xtask setup` does) or pass another --bpf-pin-dir"
    )]
    NotBpffs { path: PathBuf },
    #[error("failed to prepare pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "failed to load the eBPF object (a pinned map under {pin_dir} from an incompatible build? remove it)"
    )]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("eBPF object has no program {name}")]
    MissingProgram { name: &'static str },
    #[error("eBPF object has no map {name}")]
    MissingMap { name: &'static str },
    #[error("failed to load program {name} into the kernel")]
    LoadProgram {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("failed to pin program {name} at {path}")]
    PinProgram {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("failed to pin link of {name} at {path}")]
    PinLink {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("failed to attach {name} to {target}")]
    Attach {
        name: &'static str,
        target: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("failed to add the clsact qdisc to eth0 in {netns}")]
    Clsact {
        netns: PathBuf,
        #[source]
        source: aya::programs::tc::TcError,
    },
    #[error("failed to open cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to use map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(transparent)]
    Netns(#[from] netns::Error),
}

/// What the start-up probe found, and so which paths are in use.
#[derive(Debug, Clone, Serialize)]
pub struct Features {
    pub kernel: String,
    /// tc programs attach through TCX links (Linux >= 6.6); otherwise clsact + netlink.
    pub tcx: bool,
    /// `bpf_get_netns_cookie` in sockops, sk_msg and sockopt programs (Linux >= 5.15).
    pub netns_cookie_in_sockops: bool,
}

impl Features {
    pub fn probe() -> Result<Self, Error> {
        let v = KernelVersion::current().map_err(|e| Error::KernelVersion {
            source: io::Error::other(e.to_string()),
        })?;
        let at_least = |maj, min| v >= KernelVersion::new(maj, min, 0);
        Ok(Self {
            kernel: v.to_string(),
            tcx: at_least(6, 6),
            netns_cookie_in_sockops: at_least(5, 15),
        })
    }
}

/// Options for [`Capture::load`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Where programs and maps are pinned (on a bpffs).
    pub pin_dir: PathBuf,
    /// ztunnel's own cgroup: `sockops` and `getsockopt` attach here.
    pub own_cgroup: PathBuf,
    /// Start with the same-node fast path on.
    pub fast_path: bool,
    /// Send enrolled pods' DNS to ztunnel's DNS proxy (`--dns-capture`).
    pub dns: bool,
}

/// An attachment we hold. Dropping it detaches, except [`Link::Pinned`]: a pinned link
/// stays attached until [`Link::release`] removes its pin, so capture survives a crash
/// or an upgrade of ztunnel (and fails closed meanwhile: nothing listens on the ports the
/// programs redirect to).
enum Link {
    Pinned {
        link: FdLink,
        path: PathBuf,
    },
    SockOps(#[expect(dead_code, reason = "held for its Drop, which detaches")] SockOpsLink),
    Sockopt(#[expect(dead_code, reason = "held for its Drop, which detaches")] CgroupSockoptLink),
    SkMsg(#[expect(dead_code, reason = "held for its Drop, which detaches")] SkMsgLink),
    /// clsact + netlink (kernels without TCX): not pinnable; the filter itself outlives
    /// the process unless detached.
    TcNetlink(SchedClassifierLink),
}

impl Link {
    /// Detaches for good: unpins a pinned link so the kernel lets it go.
    fn release(self) {
        match self {
            Link::Pinned { link, path } => {
                if let Err(e) = std::fs::remove_file(&path)
                    && e.kind() != io::ErrorKind::NotFound
                {
                    tracing::warn!(pin = %path.display(), error = %e, "failed to unpin a link");
                }
                drop(link);
            }
            other => drop(other),
        }
    }
}

/// `bpf(2)` commands aya 0.14 does not wrap (`include/uapi/linux/bpf.h`).
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_DETACH: libc::c_long = 34;

/// Detaches `link` from its hook whoever else holds it (`BPF_LINK_DETACH`: the link
/// stays as an object, attached to nothing, until its last holder closes it). Closing a
/// descriptor only detaches a link nobody else holds; another process's descriptor (a
/// predecessor ztunnel's) would keep it attached. Failures are logged: the link then
/// goes when its last holder exits.
fn detach_for_good(pod: &str, link: &FdLink) {
    if let Err(e) = link_detach(link) {
        tracing::warn!(pod, error = %e, "failed to detach a predecessor's capture link; it stays attached until the predecessor exits");
    }
}

fn link_detach(link: &FdLink) -> io::Result<()> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let id = link.info().map_err(io::Error::other)?.id();
    // `bpf_attr` for BPF_LINK_GET_FD_BY_ID: link_id, next_id, open_flags.
    let fd = bpf(BPF_LINK_GET_FD_BY_ID, &[id, 0, 0])?;
    // SAFETY: the kernel just handed out this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // `bpf_attr` for BPF_LINK_DETACH: link_fd.
    bpf(BPF_LINK_DETACH, &[fd.as_raw_fd() as u32]).map(drop)
}

/// `bpf(cmd, attr)` with `attr` the command's leading `bpf_attr` fields, all `__u32`.
fn bpf(cmd: libc::c_long, attr: &[u32]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a plain array of the size passed; the kernel only reads it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// A link a previous (or still running) ztunnel pinned for a pod.
struct Adopted {
    link: FdLink,
    path: PathBuf,
}

struct Maps {
    pod_addrs: HashMap<MapData, IpKey, PodAddr>,
    pod_sources: HashMap<MapData, SourceKey, IpKey>,
    by_cookie: HashMap<MapData, u64, OrigDst>,
    by_tuple: HashMap<MapData, TupleKey, OrigDst>,
    fast_path: SockHash<MapData, SockKey>,
    tw_listeners: SockHash<MapData, ListenerKey>,
    config: Array<MapData, u32>,
    stats: PerCpuArray<MapData, u64>,
    /// Each program group's decision-event level (`ztunnel_common::events`).
    event_levels: Array<MapData, u32>,
}

struct Inner {
    ebpf: Ebpf,
    maps: Maps,
    _own_links: Vec<Link>,
    /// The decision-event ring buffer (unmapped), until its reader takes it.
    events: Option<MapData>,
    /// Pinned pod links left by a previous ztunnel, by pod key, until re-enrolled or released.
    adopted: BTreeMap<String, Vec<Adopted>>,
    /// While a predecessor still serves (a handover under way), its links of pods this
    /// ztunnel has re-enrolled stay attached next to ours until it stops accepting: the
    /// connections it accepts meanwhile are captured by programs that write the maps it
    /// reads, whatever build it is. Their pins already name this ztunnel's links. By pod.
    superseded: Option<Vec<(String, FdLink)>>,
}

/// The loaded capture programs.
pub struct Capture {
    inner: Mutex<Inner>,
    features: Features,
    pin_dir: PathBuf,
    home: Netns,
    /// The kernel's per-program statistics, on only while asked.
    run_stats: run_stats::Switch,
}

/// Capture attached to one pod; [`Capture::unenrol`] takes it apart.
pub struct PodCapture {
    pub name: String,
    pin_dir: PathBuf,
    netns: Netns,
    netns_cookie: u64,
    addrs: Vec<IpKey>,
    /// What each address's `POD_ADDRS` entry was before this enrolment wrote it, so a
    /// failed one puts back exactly that (another ztunnel may rely on it).
    addrs_before: Vec<(IpKey, Option<PodAddr>)>,
    /// The `POD_SOURCES` entries this enrolment wrote, and what each was before.
    sources_before: Vec<(SourceKey, Option<IpKey>)>,
    links: Vec<Link>,
    /// Attached but not yet pinned (between attach and [`Capture::pin_pod`]).
    new_links: Vec<(&'static str, FdLink)>,
    /// Program names attached for this pod, for the admin port.
    pub attached: Vec<&'static str>,
}

impl PodCapture {
    pub fn netns_cookie(&self) -> u64 {
        self.netns_cookie
    }
}

/// Entries in each map, for metrics and for the bounded-occupancy test.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Occupancy {
    pub orig_dst_by_cookie: usize,
    pub orig_dst_by_tuple: usize,
    pub pod_addrs: usize,
    pub fast_path_sockets: usize,
    /// Absent in a dump from a build without the map.
    #[serde(default)]
    pub pod_sources: usize,
}

fn ip_key(ip: IpAddr) -> IpKey {
    match ip {
        IpAddr::V4(v4) => IpKey {
            addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
            family: u32::from(ztunnel_common::AF_INET),
        },
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => ip_key(IpAddr::V4(v4)),
            None => {
                let o = v6.octets();
                let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                IpKey {
                    addr: [w(0), w(4), w(8), w(12)],
                    family: u32::from(ztunnel_common::AF_INET6),
                }
            }
        },
    }
}

/// The `POD_SOURCES` entries of a pod: its first address of each family (as the
/// workload lists them), keyed by its netns cookie.
fn source_entries(netns_cookie: u64, addrs: &[IpKey]) -> Vec<(SourceKey, IpKey)> {
    let mut out: Vec<(SourceKey, IpKey)> = Vec::new();
    for a in addrs {
        if out.iter().any(|(k, _)| k.family == a.family) {
            continue;
        }
        let key = SourceKey {
            netns_cookie,
            family: a.family,
            _pad: 0,
        };
        out.push((key, *a));
    }
    out
}

/// The address a map key holds (the inverse of [`ip_key`]).
fn key_ip(k: &IpKey) -> IpAddr {
    if k.family == u32::from(ztunnel_common::AF_INET) {
        IpAddr::V4(Ipv4Addr::from(k.addr[0].to_ne_bytes()))
    } else {
        let mut o = [0u8; 16];
        for (i, w) in k.addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(o))
    }
}

/// ztunnel's own reading of `ORIG_DST_TUPLE`, for connections accepted on listening
/// sockets a predecessor created: a socket belongs to the cgroup of the process that
/// created it, and cgroup `getsockopt` programs run for the socket's cgroup, so on those
/// sockets `SO_ORIGINAL_DST` is answered by the predecessor's program while it lives and
/// by nobody once it has exited. The lookup is the one `getsockopt_orig_dst` makes.
pub struct OrigDstTable {
    map: HashMap<MapData, TupleKey, OrigDst>,
}

impl OrigDstTable {
    /// The original destination of the captured connection whose app end is `peer` in
    /// the netns with `netns_cookie`.
    pub fn lookup(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let key = TupleKey {
            netns_cookie,
            ip: ip_key(peer.ip()),
            port: peer.port(),
            _pad: 0,
        };
        let orig = self.map.get(&key, 0).ok()?;
        Some(SocketAddr::new(key_ip(&orig.ip), orig.port))
    }
}

fn map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf.take_map(name).ok_or(Error::MissingMap { name })?;
    T::try_from(m).map_err(|source| Error::Map { name, source })
}

/// A ring buffer map, left unmapped ([`events::Reader`] maps it while it reads). Mapped
/// once here, so that a ring that cannot be read fails the load.
fn ring(ebpf: &mut Ebpf, name: &'static str) -> Result<MapData, Error> {
    let m = ebpf.take_map(name).ok_or(Error::MissingMap { name })?;
    drop(RingBuf::<&MapData>::try_from(&m).map_err(|source| Error::Map { name, source })?);
    match m {
        aya::maps::Map::RingBuf(data) => Ok(data),
        // `try_from` above accepts only a ring buffer.
        _ => Err(Error::MissingMap { name }),
    }
}

fn open_cgroup(path: &Path) -> Result<File, Error> {
    File::open(path).map_err(|source| Error::Cgroup {
        path: path.to_owned(),
        source,
    })
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

impl Capture {
    /// Loads and pins every program, attaches ztunnel's own-cgroup programs, and sets
    /// the fast-path switch.
    pub fn load(opts: &Options) -> Result<Self, Error> {
        let started = std::time::Instant::now();
        let features = Features::probe()?;
        if !features.netns_cookie_in_sockops {
            return Err(Error::KernelTooOld {
                kernel: features.kernel,
            });
        }
        let maps_dir = opts.pin_dir.join("maps");
        let progs_dir = opts.pin_dir.join("progs");
        for dir in [&opts.pin_dir, &maps_dir, &progs_dir] {
            std::fs::create_dir_all(dir).map_err(|source| Error::PinDir {
                path: dir.clone(),
                source,
            })?;
        }
        if !is_bpffs(&opts.pin_dir) {
            return Err(Error::NotBpffs {
                path: opts.pin_dir.clone(),
            });
        }
        replace_incompatible_pins(&maps_dir);
        let adopted = adopt_pod_links(&opts.pin_dir.join("pods"));
        if !adopted.is_empty() {
            tracing::info!(pods = ?adopted.keys().collect::<Vec<_>>(), "found capture pinned by a previous ztunnel; it stays attached until each pod is re-enrolled");
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(OBJECT)
            .map_err(|source| Error::Load {
                pin_dir: opts.pin_dir.clone(),
                source: Box::new(source),
            })?;
        for name in program::ALL {
            let prog = ebpf
                .program_mut(name)
                .ok_or(Error::MissingProgram { name })?;
            load_program(prog).map_err(|source| Error::LoadProgram { name, source })?;
            let path = progs_dir.join(name);
            // A previous ztunnel's pin is replaced: this process now owns the programs.
            let _ = std::fs::remove_file(&path);
            prog.pin(&path)
                .map_err(|source| Error::PinProgram { name, path, source })?;
        }
        let mut maps = Maps {
            pod_addrs: map(&mut ebpf, pod_addrs::NAME)?,
            pod_sources: map(&mut ebpf, pod_addrs::SOURCES)?,
            by_cookie: map(&mut ebpf, orig_dst::BY_COOKIE)?,
            by_tuple: map(&mut ebpf, orig_dst::BY_TUPLE)?,
            fast_path: map(&mut ebpf, fast_path::SOCKHASH)?,
            tw_listeners: map(&mut ebpf, time_wait::LISTENERS)?,
            config: map(&mut ebpf, config::NAME)?,
            stats: map(&mut ebpf, stats::NAME)?,
            event_levels: map(&mut ebpf, ztunnel_common::events::LEVELS)?,
        };
        let events = ring(&mut ebpf, ztunnel_common::events::RING)?;
        maps.config
            .set(config::FAST_PATH, u32::from(opts.fast_path), 0)
            .map_err(|source| Error::Map {
                name: config::NAME,
                source,
            })?;
        maps.config
            .set(config::DNS_CAPTURE, u32::from(opts.dns), 0)
            .map_err(|source| Error::Map {
                name: config::NAME,
                source,
            })?;

        let mut own_links = Vec::new();
        let sk_msg: &mut SkMsg = program_mut(&mut ebpf, program::SK_MSG)?;
        let id = sk_msg
            .attach(maps.fast_path.fd())
            .map_err(|source| attach_err(program::SK_MSG, fast_path::SOCKHASH, source))?;
        own_links.push(Link::SkMsg(sk_msg.take_link(id).map_err(|source| {
            attach_err(program::SK_MSG, fast_path::SOCKHASH, source)
        })?));

        let cgroup = open_cgroup(&opts.own_cgroup)?;
        let target = opts.own_cgroup.display().to_string();
        own_links.push(attach_sockops(&mut ebpf, &cgroup, &target)?);
        let sockopt: &mut CgroupSockopt = program_mut(&mut ebpf, program::GETSOCKOPT)?;
        let id = sockopt
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|source| attach_err(program::GETSOCKOPT, &target, source))?;
        own_links.push(Link::Sockopt(
            sockopt
                .take_link(id)
                .map_err(|source| attach_err(program::GETSOCKOPT, &target, source))?,
        ));

        tracing::info!(
            kernel = %features.kernel,
            tcx = features.tcx,
            tc_mode = if features.tcx { "tcx" } else { "clsact (netlink)" },
            fast_path = opts.fast_path,
            pin_dir = %opts.pin_dir.display(),
            own_cgroup = %opts.own_cgroup.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "eBPF capture loaded"
        );
        Ok(Self {
            inner: Mutex::new(Inner {
                ebpf,
                maps,
                _own_links: own_links,
                events: Some(events),
                adopted,
                superseded: None,
            }),
            features,
            pin_dir: opts.pin_dir.clone(),
            home: Netns::current()?,
            run_stats: run_stats::Switch::default(),
        })
    }

    pub fn features(&self) -> &Features {
        &self.features
    }

    /// A handle of its own on the original-destination map this ztunnel's programs use
    /// (no lock shared with enrolment), for [`OrigDstTable::lookup`].
    pub fn orig_dst_table(&self) -> Result<OrigDstTable, Error> {
        let name = orig_dst::BY_TUPLE;
        let data = MapData::from_pin(self.pin_dir.join("maps").join(name))
            .map_err(|source| Error::Map { name, source })?;
        let map = HashMap::try_from(aya::maps::Map::HashMap(data))
            .map_err(|source| Error::Map { name, source })?;
        Ok(OrigDstTable { map })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep going with it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches capture to a pod: the connect, getpeername and sockops programs to its
    /// cgroup, `sk_lookup` to its netns, tc ingress to `eth0` inside it, its addresses to
    /// the map and its `:15006` listeners (`inbound`) to the TIME_WAIT hand-over map.
    /// ztunnel's listeners in the pod must already be open.
    ///
    /// Capture a predecessor left (pinned, adopted at load) is replaced without a gap:
    /// this ztunnel's links are attached and pinned over the predecessor's pins first.
    /// A failed enrolment takes away only what it added itself.
    pub fn enrol(
        &self,
        name: &str,
        netns_path: &Path,
        cgroup_path: &Path,
        addrs: &[IpAddr],
        inbound: &[(SocketAddr, BorrowedFd<'_>)],
    ) -> Result<PodCapture, Error> {
        self.enrol_with(name, netns_path, cgroup_path, addrs, inbound, true)
    }

    /// [`Self::enrol`]; without `tc`, the tc program is left to the caller (a re-enrolment
    /// in the same netns keeps the one on the pod's `eth0`: the kernel refuses the same
    /// program twice on one TCX hook).
    fn enrol_with(
        &self,
        name: &str,
        netns_path: &Path,
        cgroup_path: &Path,
        addrs: &[IpAddr],
        inbound: &[(SocketAddr, BorrowedFd<'_>)],
        tc: bool,
    ) -> Result<PodCapture, Error> {
        let netns = Netns::open(netns_path)?;
        let netns_cookie = netns.cookie(&self.home)?;
        let cgroup = open_cgroup(cgroup_path)?;
        let target = cgroup_path.display().to_string();
        let mut pod = PodCapture {
            name: name.to_owned(),
            pin_dir: self.pin_dir.join("pods").join(name),
            netns,
            netns_cookie,
            addrs: addrs.iter().map(|a| ip_key(*a)).collect(),
            addrs_before: Vec::new(),
            sources_before: Vec::new(),
            links: Vec::new(),
            new_links: Vec::new(),
            attached: Vec::new(),
        };
        let result = self
            .attach_pod(&mut pod, &cgroup, &target, tc)
            .and_then(|()| self.pin_pod(&mut pod));
        if let Err(e) = result {
            self.abandon(pod);
            return Err(e);
        }
        self.add_tw_listeners(&pod, inbound);
        Ok(pod)
    }

    /// Replaces the capture of a pod whose spec changed in the same netns (addresses,
    /// cgroup) without a moment uncaptured: the new links are attached beside the old
    /// ones (cgroup and sk_lookup links stack; the tc program on the pod's `eth0`, the
    /// same interface, stays and moves to the new capture), pinned over the old pins, and only then are the old links let go and the
    /// address entries only the old spec had deleted. On failure the old capture is
    /// handed back, untouched, with the reason (the new enrolment undoes only its own
    /// steps, as [`Self::enrol`] does).
    pub fn reenrol(
        &self,
        mut old: PodCapture,
        netns_path: &Path,
        cgroup_path: &Path,
        addrs: &[IpAddr],
        inbound: &[(SocketAddr, BorrowedFd<'_>)],
    ) -> Result<PodCapture, Box<(Error, PodCapture)>> {
        // Same netns, same `eth0`: the tc program stays as it is, moved to the new capture.
        let tc_pin = old.pin_dir.join(program::TC_INGRESS);
        let is_tc = |l: &Link| match l {
            Link::TcNetlink(_) => true,
            Link::Pinned { path, .. } => *path == tc_pin,
            _ => false,
        };
        let keeps_tc = old.links.iter().any(is_tc);
        let mut new = match self.enrol_with(
            &old.name,
            netns_path,
            cgroup_path,
            addrs,
            inbound,
            !keeps_tc,
        ) {
            Ok(new) => new,
            Err(e) => return Err(Box::new((e, old))),
        };
        if keeps_tc {
            let (tc, rest): (Vec<Link>, Vec<Link>) = old.links.drain(..).partition(is_tc);
            old.links = rest;
            new.links.extend(tc);
            new.attached.push(program::TC_INGRESS);
        }
        self.supersede(old, &new);
        Ok(new)
    }

    /// Lets a replaced capture go (see [`Self::reenrol`]): its pins are the new links'
    /// now, so its links are only closed, never unpinned.
    fn supersede(&self, mut old: PodCapture, new: &PodCapture) {
        for link in old.links.drain(..) {
            match link {
                // Not moved over: cannot happen (see `reenrol`); leave the filter be.
                Link::TcNetlink(l) => std::mem::forget(l),
                Link::Pinned { link, path } => {
                    let repinned = new
                        .links
                        .iter()
                        .any(|l| matches!(l, Link::Pinned { path: p, .. } if *p == path));
                    if !repinned {
                        let _ = std::fs::remove_file(&path);
                    }
                    drop(link);
                }
                other => drop(other),
            }
        }
        old.new_links.clear();
        let mut inner = self.lock();
        let maps = &mut inner.maps;
        for key in old.addrs.iter().filter(|k| !new.addrs.contains(k)) {
            if maps
                .pod_addrs
                .get(key, 0)
                .is_ok_and(|v| v.netns_cookie == old.netns_cookie)
            {
                let _ = maps.pod_addrs.remove(key);
            }
        }
        for (key, _) in &old.sources_before {
            if !new.sources_before.iter().any(|(k, _)| k == key) {
                let _ = maps.pod_sources.remove(key);
            }
        }
        tracing::info!(pod = %new.name, "capture replaced for the pod's new spec");
    }

    /// Puts the pod's `:15006` listeners into `TW_LISTENERS`. `sockops` does so when a
    /// listener starts listening, but only in this ztunnel's cgroup and map: a listener
    /// handed over by a predecessor started listening in the predecessor's (whose map may
    /// be another, when the builds differ). A failure only costs the TIME_WAIT hand-over
    /// (such a SYN is refused and the client's retry steered), so it is logged.
    fn add_tw_listeners(&self, pod: &PodCapture, inbound: &[(SocketAddr, BorrowedFd<'_>)]) {
        let mut inner = self.lock();
        for (addr, fd) in inbound {
            let family = if addr.is_ipv4() {
                ztunnel_common::AF_INET
            } else {
                ztunnel_common::AF_INET6
            };
            let key = ListenerKey {
                netns_cookie: pod.netns_cookie,
                family: u32::from(family),
                _pad: 0,
            };
            if let Err(e) = inner.maps.tw_listeners.insert(key, *fd, 0) {
                tracing::warn!(pod = %pod.name, %addr, error = %e, "failed to add a :15006 listener to the TIME_WAIT hand-over map; SYNs that meet a TIME_WAIT socket are refused and steered on the client's retry");
            }
        }
    }

    /// Undoes a failed enrolment: detaches the links it attached and has not pinned (its
    /// own), keeps those it pinned (they replaced a predecessor's pins and capture the
    /// pod just as well) and the tc filter (clsact: it replaced the predecessor's
    /// program in place), and puts back the address entries it changed. Nothing another
    /// ztunnel relies on is removed.
    fn abandon(&self, mut pod: PodCapture) {
        for link in pod.links.drain(..) {
            if let Link::TcNetlink(l) = link {
                std::mem::forget(l);
            }
        }
        pod.new_links.clear();
        let mut inner = self.lock();
        for (key, before) in &pod.addrs_before {
            let _ = match before {
                Some(v) => inner.maps.pod_addrs.insert(key, v, 0),
                None => inner.maps.pod_addrs.remove(key),
            };
        }
        for (key, before) in &pod.sources_before {
            let _ = match before {
                Some(v) => inner.maps.pod_sources.insert(key, v, 0),
                None => inner.maps.pod_sources.remove(key),
            };
        }
        tracing::info!(pod = %pod.name, "failed enrolment undone; capture a predecessor left stays");
    }

    fn attach_pod(
        &self,
        pod: &mut PodCapture,
        cgroup: &File,
        target: &str,
        tc: bool,
    ) -> Result<(), Error> {
        let mut inner = self.lock();
        let Inner { ebpf, maps, .. } = &mut *inner;
        for key in &pod.addrs {
            let before = maps.pod_addrs.get(key, 0).ok();
            pod.addrs_before.push((*key, before));
            maps.pod_addrs
                .insert(
                    key,
                    PodAddr {
                        netns_cookie: pod.netns_cookie,
                    },
                    0,
                )
                .map_err(|source| Error::Map {
                    name: pod_addrs::NAME,
                    source,
                })?;
        }
        // The source each family's captured connects are bound to: the pod's first
        // address of the family, the one the proxy names as the connection's source
        // (`PodNet::addr_for`). Written before the connect programs are attached.
        for (key, addr) in source_entries(pod.netns_cookie, &pod.addrs) {
            let before = maps.pod_sources.get(&key, 0).ok();
            pod.sources_before.push((key, before));
            maps.pod_sources
                .insert(key, addr, 0)
                .map_err(|source| Error::Map {
                    name: pod_addrs::SOURCES,
                    source,
                })?;
        }
        for name in [
            program::CONNECT4,
            program::CONNECT6,
            program::GETPEERNAME4,
            program::GETPEERNAME6,
            program::DNS_SENDMSG4,
            program::DNS_SENDMSG6,
            program::DNS_RECVMSG4,
            program::DNS_RECVMSG6,
        ] {
            let prog: &mut CgroupSockAddr = program_mut(ebpf, name)?;
            let id = prog
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(|source| attach_err(name, target, source))?;
            let link = prog
                .take_link(id)
                .map_err(|source| attach_err(name, target, source))?;
            pod.new_links.push((name, fd_link(name, target, link)?));
            pod.attached.push(name);
        }
        let prog: &mut CgroupSock = program_mut(ebpf, program::SOCK_RELEASE)?;
        let id = prog
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(|source| attach_err(program::SOCK_RELEASE, target, source))?;
        let link = prog
            .take_link(id)
            .map_err(|source| attach_err(program::SOCK_RELEASE, target, source))?;
        pod.new_links.push((
            program::SOCK_RELEASE,
            fd_link(program::SOCK_RELEASE, target, link)?,
        ));
        pod.attached.push(program::SOCK_RELEASE);
        let prog: &mut SockOps = program_mut(ebpf, program::SOCKOPS)?;
        let id = prog
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(|source| attach_err(program::SOCKOPS, target, source))?;
        let link = prog
            .take_link(id)
            .map_err(|source| attach_err(program::SOCKOPS, target, source))?;
        pod.new_links
            .push((program::SOCKOPS, fd_link(program::SOCKOPS, target, link)?));
        pod.attached.push(program::SOCKOPS);

        // Answers the listener lookup of a SYN that met a TIME_WAIT socket (tc.rs).
        let target = format!("netns {}", pod.netns.path().display());
        let netns = File::open(pod.netns.path()).map_err(|source| {
            Error::Netns(netns::Error::Open {
                path: pod.netns.path().to_owned(),
                source,
            })
        })?;
        let prog: &mut SkLookup = program_mut(ebpf, program::SK_LOOKUP)?;
        let id = prog
            .attach(&netns)
            .map_err(|source| attach_err(program::SK_LOOKUP, &target, source))?;
        let link = prog
            .take_link(id)
            .map_err(|source| attach_err(program::SK_LOOKUP, &target, source))?;
        pod.new_links.push((program::SK_LOOKUP, FdLink::from(link)));
        pod.attached.push(program::SK_LOOKUP);

        if !tc {
            return Ok(());
        }
        // tc last: with clsact it replaces a predecessor's program in place, which a
        // failure after it could not take back.
        let tc: &mut SchedClassifier = program_mut(ebpf, program::TC_INGRESS)?;
        let tcx = self.features.tcx;
        let netns_path = pod.netns.path().to_owned();
        let link = pod.netns.run_on_thread(|| {
            let target = format!("eth0 in {}", netns_path.display());
            let id = if tcx {
                tc.attach("eth0", TcAttachType::Ingress)
            } else {
                // EEXIST just means the qdisc is there already.
                if let Err(e) = aya::programs::tc::qdisc_add_clsact("eth0") {
                    let exists = matches!(&e, aya::programs::tc::TcError::NetlinkError(n)
                        if n.raw_os_error() == Some(libc::EEXIST));
                    if !exists {
                        return Err(Error::Clsact {
                            netns: netns_path.clone(),
                            source: e,
                        });
                    }
                }
                // Replace whatever runs in ztunnel's slot (a predecessor's program, whose
                // netlink filter outlives its process) in one request; create the slot
                // if there is none.
                let slot = SchedClassifierLink::attached(
                    "eth0",
                    TcAttachType::Ingress,
                    TC_PRIORITY,
                    TC_HANDLE,
                    None,
                )
                .map_err(|e| {
                    attach_err(
                        program::TC_INGRESS,
                        &target,
                        aya::programs::ProgramError::IOError(e),
                    )
                })?;
                tc.attach_to_link(slot).or_else(|_| {
                    tc.attach_with_options(
                        "eth0",
                        TcAttachType::Ingress,
                        TcAttachOptions::Netlink(NlOptions {
                            priority: TC_PRIORITY,
                            handle: TC_HANDLE,
                            classid: None,
                        }),
                    )
                })
            }
            .map_err(|source| attach_err(program::TC_INGRESS, &target, source))?;
            tc.take_link(id)
                .map_err(|source| attach_err(program::TC_INGRESS, &target, source))
        })??;
        if tcx {
            let target = format!("eth0 in {}", pod.netns.path().display());
            pod.new_links.push((
                program::TC_INGRESS,
                fd_link(program::TC_INGRESS, &target, link)?,
            ));
        } else {
            pod.links.push(Link::TcNetlink(link));
        }
        pod.attached.push(program::TC_INGRESS);
        Ok(())
    }

    /// Pins the pod's new links, each under a temporary name renamed over the pin a
    /// predecessor left (bpffs renames atomically: the pod always has a pinned link for
    /// each program), and only then lets the predecessor's links go — at once, or, while
    /// the predecessor still serves, once it has stopped accepting
    /// ([`Self::release_superseded`]).
    fn pin_pod(&self, pod: &mut PodCapture) -> Result<(), Error> {
        std::fs::create_dir_all(&pod.pin_dir).map_err(|source| Error::PinDir {
            path: pod.pin_dir.clone(),
            source,
        })?;
        for (name, link) in pod.new_links.drain(..) {
            let path = pod.pin_dir.join(name);
            // bpffs refuses names with a dot.
            let tmp = pod
                .pin_dir
                .join(format!("{PENDING_PIN}{}-{name}", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            let pinned = link.pin(&tmp).map_err(|source| Error::PinLink {
                name,
                path: tmp.clone(),
                source,
            })?;
            let link = FdLink::from(pinned);
            if let Err(source) = std::fs::rename(&tmp, &path) {
                let _ = std::fs::remove_file(&tmp);
                return Err(Error::PinDir { path, source });
            }
            pod.links.push(Link::Pinned { link, path });
        }
        let mut inner = self.lock();
        let old = inner.adopted.remove(&pod.name).unwrap_or_default();
        for Adopted { link, path } in old {
            // A program this build no longer attaches: its pin goes too.
            if !pod
                .links
                .iter()
                .any(|l| matches!(l, Link::Pinned { path: p, .. } if *p == path))
            {
                let _ = std::fs::remove_file(&path);
            }
            match &mut inner.superseded {
                Some(held) => held.push((pod.name.clone(), link)),
                None => drop(link),
            }
        }
        Ok(())
    }

    /// While a predecessor still serves: keep its links of re-enrolled pods attached
    /// (see `Inner::superseded`) until [`Self::release_superseded`].
    pub fn hold_superseded(&self) {
        let mut inner = self.lock();
        if inner.superseded.is_none() {
            inner.superseded = Some(Vec::new());
        }
    }

    /// The predecessor stopped accepting (or is gone): its links go. Closing our
    /// descriptors is not enough while the predecessor, draining, still holds its own:
    /// each is detached for good (`BPF_LINK_DETACH`), so a pod this ztunnel unenrols
    /// later is not still captured by them (its connects refused) until the predecessor
    /// exits. Its established connections do not need them (the capture programs act on
    /// connects and SYNs only).
    pub fn release_superseded(&self) {
        let held = self.lock().superseded.take().unwrap_or_default();
        if held.is_empty() {
            return;
        }
        let links = held.len();
        for (pod, link) in held {
            detach_for_good(&pod, &link);
        }
        tracing::info!(links, "released the predecessor's capture links");
    }

    /// Detaches pinned capture a previous ztunnel left for pods the source no longer
    /// places here (`wanted` lists those it does, enrolled or not), and deletes address
    /// entries that are neither an enrolled pod's (`live_netns_cookies`) nor a wanted
    /// pod's (`wanted_addrs`): a pod this ztunnel has not managed to enrol yet keeps what
    /// its predecessor left, since the predecessor may still be serving it.
    pub fn release_unclaimed(
        &self,
        wanted: &std::collections::BTreeSet<String>,
        wanted_addrs: &[IpAddr],
        live_netns_cookies: &[u64],
    ) {
        let mut inner = self.lock();
        let unclaimed: Vec<String> = inner
            .adopted
            .keys()
            .filter(|k| !wanted.contains(*k))
            .cloned()
            .collect();
        for pod in unclaimed {
            for Adopted { link, path } in inner.adopted.remove(&pod).unwrap_or_default() {
                Link::Pinned { link, path }.release();
            }
            let _ = std::fs::remove_dir(self.pin_dir.join("pods").join(&pod));
            tracing::info!(pod = %pod, "released capture a previous ztunnel left for a pod no longer in the mesh here");
        }
        let keep: Vec<IpKey> = wanted_addrs.iter().map(|a| ip_key(*a)).collect();
        let stale: Vec<IpKey> = inner
            .maps
            .pod_addrs
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| !live_netns_cookies.contains(&v.netns_cookie) && !keep.contains(k))
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            let _ = inner.maps.pod_addrs.remove(&k);
        }
        let stale: Vec<SourceKey> = inner
            .maps
            .pod_sources
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| !live_netns_cookies.contains(&k.netns_cookie) && !keep.contains(v))
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            let _ = inner.maps.pod_sources.remove(&k);
        }
    }

    /// Detaches everything attached for the pod and deletes its map entries. Connections
    /// already established keep flowing; only new ones take the direct path.
    pub fn unenrol(&self, mut pod: PodCapture) {
        // Netlink tc filters are found by ifindex, which is per netns: detach them from
        // inside the pod's netns, every filter of ztunnel's program (an older build's at
        // another priority too). TCX and cgroup links detach from anywhere.
        let tc_links: Vec<Link> = {
            let (tc, rest): (Vec<_>, Vec<_>) = pod
                .links
                .drain(..)
                .partition(|l| matches!(l, Link::TcNetlink(_)));
            pod.links = rest;
            tc
        };
        if !tc_links.is_empty() {
            for l in tc_links {
                if let Link::TcNetlink(l) = l {
                    std::mem::forget(l);
                }
            }
            let detached = pod.netns.run_on_thread(|| {
                aya::programs::tc::qdisc_detach_program(
                    "eth0",
                    TcAttachType::Ingress,
                    program::TC_INGRESS,
                )
            });
            match detached {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(pod = %pod.name, error = %e, "failed to detach the tc filter");
                }
                // The netns is gone, and its interfaces and filters with it.
                Err(e) => {
                    tracing::debug!(pod = %pod.name, error = %e, "pod netns gone before unenrol")
                }
            }
        }
        for link in pod.links.drain(..) {
            link.release();
        }
        pod.new_links.clear();
        let _ = std::fs::remove_dir(&pod.pin_dir);
        let mut inner = self.lock();
        // A predecessor still draining holds its links of the pod: they go too, or the
        // pod's connects would meet its programs (and a closed listener) until it exits.
        if let Some(held) = &mut inner.superseded {
            let (theirs, rest): (Vec<_>, Vec<_>) =
                held.drain(..).partition(|(p, _)| *p == pod.name);
            *held = rest;
            for (_, link) in theirs {
                detach_for_good(&pod.name, &link);
            }
        }
        let maps = &mut inner.maps;
        for key in &pod.addrs {
            let _ = maps.pod_addrs.remove(key);
        }
        for (key, _) in &pod.sources_before {
            let _ = maps.pod_sources.remove(key);
        }
        let cookie = pod.netns_cookie;
        let stale: Vec<u64> = maps
            .by_cookie
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.netns_cookie == cookie)
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            let _ = maps.by_cookie.remove(&k);
        }
        let stale: Vec<TupleKey> = maps
            .by_tuple
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.netns_cookie == cookie)
            .collect();
        for k in stale {
            let _ = maps.by_tuple.remove(&k);
        }
        tracing::info!(pod = %pod.name, "capture detached");
    }

    /// Leaves the pod captured after ztunnel exits: pinned links stay, netlink tc filters
    /// are not detached. The next ztunnel adopts them; until then the pod fails closed.
    pub fn leave_attached(&self, pod: PodCapture) {
        for link in pod.links {
            if let Link::TcNetlink(l) = link {
                std::mem::forget(l);
            }
        }
    }

    /// Turns the same-node fast path on or off for new connections.
    pub fn set_fast_path(&self, on: bool) -> Result<(), Error> {
        self.lock()
            .maps
            .config
            .set(config::FAST_PATH, u32::from(on), 0)
            .map_err(|source| Error::Map {
                name: config::NAME,
                source,
            })
    }

    pub fn fast_path(&self) -> bool {
        matches!(self.lock().maps.config.get(&config::FAST_PATH, 0), Ok(v) if v != 0)
    }

    pub fn occupancy(&self) -> Occupancy {
        let inner = self.lock();
        let m = &inner.maps;
        Occupancy {
            orig_dst_by_cookie: m.by_cookie.keys().filter(Result::is_ok).count(),
            orig_dst_by_tuple: m.by_tuple.keys().filter(Result::is_ok).count(),
            pod_addrs: m.pod_addrs.keys().filter(Result::is_ok).count(),
            fast_path_sockets: m.fast_path.keys().filter(Result::is_ok).count(),
            pod_sources: m.pod_sources.keys().filter(Result::is_ok).count(),
        }
    }

    /// The programs' counters, summed over CPUs, by name.
    pub fn stats(&self) -> BTreeMap<&'static str, u64> {
        let inner = self.lock();
        stats::NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let total = inner
                    .maps
                    .stats
                    .get(&(i as u32), 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                (*name, total)
            })
            .collect()
    }
}

impl Capture {
    /// The kernel's statistics for this ztunnel's programs (see [`run_stats`]).
    pub fn run_stats(&self) -> run_stats::Status {
        let held_until = self.run_stats.held_until();
        let inner = self.lock();
        let programs = program::ALL
            .iter()
            .filter_map(|name| {
                let info = inner.ebpf.program(name)?.info().ok()?;
                Some(run_stats::ProgramRuns::new(
                    name,
                    info.id(),
                    info.run_count(),
                    info.run_time(),
                ))
            })
            .collect();
        run_stats::Status::new(held_until, programs)
    }

    /// Turns the kernel's statistics on for `duration`; see [`run_stats::Switch::enable`].
    pub fn enable_run_stats(
        &self,
        duration: std::time::Duration,
    ) -> Result<std::time::Instant, run_stats::Error> {
        self.run_stats.enable(duration)
    }

    /// Turns them off; whether ztunnel held them on.
    pub fn disable_run_stats(&self) -> bool {
        self.run_stats.disable()
    }

    /// Turns them off if their time has run out; whether it did.
    pub fn expire_run_stats(&self) -> bool {
        self.run_stats.expire()
    }

    /// The decision-event ring buffer, for its one reader ([`events::Reader`]); `None`
    /// once taken.
    pub fn take_events(&self) -> Option<events::Reader> {
        self.lock().events.take().map(events::Reader::new)
    }

    /// Sets the level at which the programs of `source` report decisions
    /// (`ztunnel_common::events::level`); the next decision sees it.
    pub fn set_event_level(&self, source: u32, level: u32) -> Result<(), Error> {
        self.lock()
            .maps
            .event_levels
            .set(source, level, 0)
            .map_err(|source| Error::Map {
                name: ztunnel_common::events::LEVELS,
                source,
            })
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or(Error::MissingProgram { name })?;
    prog.try_into().map_err(|_| Error::MissingProgram { name })
}

fn load_program(prog: &mut aya::programs::Program) -> Result<(), aya::programs::ProgramError> {
    use aya::programs::Program as P;
    match prog {
        P::CgroupSockAddr(p) => p.load(),
        P::CgroupSock(p) => p.load(),
        P::CgroupSockopt(p) => p.load(),
        P::SockOps(p) => p.load(),
        P::SkMsg(p) => p.load(),
        P::SchedClassifier(p) => p.load(),
        P::SkLookup(p) => p.load(),
        _ => Err(aya::programs::ProgramError::UnexpectedProgramType),
    }
}

fn attach_err(name: &'static str, target: &str, source: aya::programs::ProgramError) -> Error {
    Error::Attach {
        name,
        target: target.to_owned(),
        source,
    }
}

fn fd_link<L>(name: &'static str, target: &str, link: L) -> Result<FdLink, Error>
where
    FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
{
    FdLink::try_from(link).map_err(|e| Error::Attach {
        name,
        target: target.to_owned(),
        source: aya::programs::ProgramError::IOError(io::Error::other(e.to_string())),
    })
}

/// What each map of the object is, as the kernel reports it for a pinned map.
struct MapShape {
    name: &'static str,
    ty: aya::maps::MapType,
    key: usize,
    value: usize,
    max_entries: u32,
}

fn map_shapes() -> [MapShape; 9] {
    use std::mem::size_of;

    use aya::maps::MapType as T;
    let shape = |name, ty, key, value, max_entries| MapShape {
        name,
        ty,
        key,
        value,
        max_entries,
    };
    [
        shape(
            orig_dst::BY_COOKIE,
            T::Hash,
            size_of::<u64>(),
            size_of::<OrigDst>(),
            orig_dst::MAX_ENTRIES,
        ),
        shape(
            orig_dst::BY_TUPLE,
            T::Hash,
            size_of::<TupleKey>(),
            size_of::<OrigDst>(),
            orig_dst::MAX_ENTRIES,
        ),
        shape(
            pod_addrs::NAME,
            T::Hash,
            size_of::<IpKey>(),
            size_of::<PodAddr>(),
            pod_addrs::MAX_ENTRIES,
        ),
        shape(
            pod_addrs::SOURCES,
            T::Hash,
            size_of::<SourceKey>(),
            size_of::<IpKey>(),
            pod_addrs::MAX_SOURCES,
        ),
        shape(
            fast_path::SOCKHASH,
            T::SockHash,
            size_of::<SockKey>(),
            size_of::<u32>(),
            fast_path::MAX_ENTRIES,
        ),
        shape(
            config::NAME,
            T::Array,
            size_of::<u32>(),
            size_of::<u32>(),
            config::SLOTS,
        ),
        shape(
            stats::NAME,
            T::PerCpuArray,
            size_of::<u32>(),
            size_of::<u64>(),
            stats::SLOTS,
        ),
        shape(
            time_wait::LISTENERS,
            T::SockHash,
            size_of::<ListenerKey>(),
            size_of::<u32>(),
            time_wait::MAX_LISTENERS,
        ),
        shape(
            time_wait::PENDING,
            T::PerCpuArray,
            size_of::<u32>(),
            size_of::<Pending>(),
            1,
        ),
    ]
}

/// aya reuses a map pinned under its name whatever its shape; a pin left by a build
/// whose map differs (LRU where this one wants a plain hash, another size) is unpinned
/// so a map of the right shape is created. Programs of the old build still attached keep
/// their map until they are released.
fn replace_incompatible_pins(maps_dir: &Path) {
    for want in map_shapes() {
        let path = maps_dir.join(want.name);
        let Ok(have) = aya::maps::MapInfo::from_pin(&path) else {
            continue;
        };
        let same = have.map_type().ok() == Some(want.ty)
            && have.key_size() as usize == want.key
            && have.value_size() as usize == want.value
            && have.max_entries() == want.max_entries;
        if !same {
            tracing::warn!(
                map = want.name,
                pin = %path.display(),
                have_type = ?have.map_type().ok(),
                have_max_entries = have.max_entries(),
                want_type = ?want.ty,
                want_max_entries = want.max_entries,
                "pinned map left by another build has another shape; replacing it"
            );
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(pin = %path.display(), error = %e, "failed to remove the pin");
            }
        }
    }
}

/// A pod link's temporary pin name, `pending-<pid>-<program>`, until it is renamed
/// over the program's pin.
const PENDING_PIN: &str = "pending-";

/// Pinned pod links under `<pin dir>/pods/<namespace>/<name>/<program>` (temporary
/// names a ztunnel died pinning under, [`PENDING_PIN`], are removed).
/// Whether a `pending-<pid>-<program>` pin was left by a process that is gone (one that
/// died between pinning and renaming); a live ztunnel's (say, the predecessor's, enrolling
/// a pod right now) is not.
fn pending_pin_is_stale(name: &str) -> bool {
    let pid = name
        .strip_prefix(PENDING_PIN)
        .and_then(|rest| rest.split_once('-'))
        .and_then(|(pid, _)| pid.parse::<u32>().ok());
    match pid {
        Some(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
        None => true,
    }
}

fn adopt_pod_links(dir: &Path) -> BTreeMap<String, Vec<Adopted>> {
    let mut out = BTreeMap::new();
    let Ok(namespaces) = std::fs::read_dir(dir) else {
        return out;
    };
    for ns in namespaces.flatten() {
        let Ok(pods) = std::fs::read_dir(ns.path()) else {
            continue;
        };
        for pod in pods.flatten() {
            let key = format!(
                "{}/{}",
                ns.file_name().to_string_lossy(),
                pod.file_name().to_string_lossy()
            );
            let links: Vec<Adopted> = std::fs::read_dir(pod.path())
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|f| {
                    let path = f.path();
                    let name = f.file_name().to_string_lossy().into_owned();
                    if name.starts_with(PENDING_PIN) {
                        // A live ztunnel's is about to be renamed into place: leave it.
                        if pending_pin_is_stale(&name) {
                            let _ = std::fs::remove_file(&path);
                        }
                        return None;
                    }
                    match PinnedLink::from_pin(&path) {
                        Ok(l) => Some(Adopted {
                            link: FdLink::from(l),
                            path,
                        }),
                        Err(e) => {
                            tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable pinned link");
                            None
                        }
                    }
                })
                .collect();
            out.insert(key, links);
        }
    }
    out
}

fn attach_sockops(ebpf: &mut Ebpf, cgroup: &File, target: &str) -> Result<Link, Error> {
    let prog: &mut SockOps = program_mut(ebpf, program::SOCKOPS)?;
    let id = prog
        .attach(cgroup, CgroupAttachMode::Single)
        .map_err(|source| attach_err(program::SOCKOPS, target, source))?;
    Ok(Link::SockOps(prog.take_link(id).map_err(|source| {
        attach_err(program::SOCKOPS, target, source)
    })?))
}

/// Where a filesystem type is mounted, from `/proc/self/mountinfo` (first match).
pub fn mount_point(fstype: &str) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> <source> <super opts>"
        let (left, right) = line.split_once(" - ")?;
        let ty = right.split_whitespace().next()?;
        let point = left.split_whitespace().nth(4)?;
        (ty == fstype).then(|| PathBuf::from(point))
    })
}

/// The cgroup v2 directory of this process.
pub fn own_cgroup() -> Option<PathBuf> {
    let root = mount_point("cgroup2")?;
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = cg.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(root.join(rel.trim_start_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_dead_processs_pending_pin_is_stale() {
        let own = format!("{PENDING_PIN}{}-connect4_capture", std::process::id());
        assert!(!pending_pin_is_stale(&own), "a live process's pin");
        // Above any pid_max (2^22).
        assert!(pending_pin_is_stale("pending-4294967295-connect4_capture"));
        assert!(pending_pin_is_stale("pending-connect4_capture"));
        assert!(pending_pin_is_stale("pending-x-connect4_capture"));
    }

    #[test]
    fn sources_are_the_first_address_of_each_family() {
        let ip = |s: &str| ip_key(s.parse().expect("address"));
        let table: [(&[&str], &[&str]); 5] = [
            (&[], &[]),
            (&["10.0.0.5"], &["10.0.0.5"]),
            (&["10.0.0.5", "10.0.0.6"], &["10.0.0.5"]),
            (
                &["fd00::5", "10.0.0.5", "fd00::6", "10.0.0.6"],
                &["fd00::5", "10.0.0.5"],
            ),
            // A v4-mapped address is the pod's IPv4 address.
            (&["::ffff:10.0.0.7", "10.0.0.5"], &["10.0.0.7"]),
        ];
        for (addrs, want) in table {
            let keys: Vec<IpKey> = addrs.iter().map(|a| ip(a)).collect();
            let got = source_entries(42, &keys);
            let want: Vec<(SourceKey, IpKey)> = want
                .iter()
                .map(|a| {
                    let k = ip(a);
                    let key = SourceKey {
                        netns_cookie: 42,
                        family: k.family,
                        _pad: 0,
                    };
                    (key, k)
                })
                .collect();
            assert_eq!(got, want, "{addrs:?}");
        }
    }

    #[test]
    fn ip_keys_use_network_byte_order_and_fold_v4_mapped() {
        let k = ip_key("10.0.0.1".parse().expect("valid"));
        assert_eq!(k.addr[0].to_ne_bytes(), [10, 0, 0, 1]);
        assert_eq!(k.family, 2);
        assert_eq!(ip_key("::ffff:10.0.0.1".parse().expect("valid")), k);
        let k6 = ip_key("fd00::1".parse().expect("valid"));
        assert_eq!(k6.family, 10);
        assert_eq!(k6.addr[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
        assert_eq!(k6.addr[3].to_ne_bytes(), [0, 0, 0, 1]);
    }

    #[test]
    fn mountinfo_finds_cgroup2() {
        // Every Linux test machine has procfs mounted.
        assert_eq!(mount_point("proc"), Some(PathBuf::from("/proc")));
    }
}
