//! The maps every program shares, and small helpers around them.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf, SockHash},
};
use ztunnel_common::{
    IpKey, config,
    events::{self, Event},
    fast_path::{self, SockKey},
    orig_dst::{self, OrigDst, TupleKey},
    pod_addrs::{self, PodAddr, SourceKey},
    stats,
    time_wait::{self, ListenerKey, Pending},
};

// Plain hash maps, not LRU: a full map must refuse the new connection (connect4/6 then
// return EPERM), never evict a live connection's entry. Entries leave with their socket
// (sock_release, sockops at TCP_CLOSE) or their pod (unenrolment); see orig_dst in
// ztunnel-common for the bound.
#[map]
pub static ORIG_DST_COOKIE: HashMap<u64, OrigDst> = HashMap::pinned(orig_dst::MAX_ENTRIES, 0);

#[map]
pub static ORIG_DST_TUPLE: HashMap<TupleKey, OrigDst> = HashMap::pinned(orig_dst::MAX_ENTRIES, 0);

#[map]
pub static POD_ADDRS: HashMap<IpKey, PodAddr> = HashMap::pinned(pod_addrs::MAX_ENTRIES, 0);

#[map]
pub static POD_SOURCES: HashMap<SourceKey, IpKey> = HashMap::pinned(pod_addrs::MAX_SOURCES, 0);

#[map]
pub static FAST_PATH_SOCKS: SockHash<SockKey> = SockHash::pinned(fast_path::MAX_ENTRIES, 0);

#[map]
pub static CAPTURE_CONFIG: Array<u32> = Array::pinned(config::SLOTS, 0);

#[map]
pub static CAPTURE_STATS: PerCpuArray<u64> = PerCpuArray::pinned(stats::SLOTS, 0);

#[map]
pub static TW_LISTENERS: SockHash<ListenerKey> = SockHash::pinned(time_wait::MAX_LISTENERS, 0);

#[map]
pub static TW_PENDING: PerCpuArray<Pending> = PerCpuArray::pinned(1, 0);

// Decision events (issue 20): not pinned, each ztunnel's programs report to its reader.
#[map]
pub static CAPTURE_EVENTS: RingBuf = RingBuf::with_byte_size(events::RING_BYTES, 0);

#[map]
pub static CAPTURE_EVENT_LEVELS: Array<u32> = Array::with_max_entries(events::source::COUNT, 0);

// The names above must equal the shared constants; a mismatch fails the build.
const _: () = {
    assert!(eq(events::RING, "CAPTURE_EVENTS"));
    assert!(eq(events::LEVELS, "CAPTURE_EVENT_LEVELS"));
    assert!(eq(orig_dst::BY_COOKIE, "ORIG_DST_COOKIE"));
    assert!(eq(orig_dst::BY_TUPLE, "ORIG_DST_TUPLE"));
    assert!(eq(pod_addrs::NAME, "POD_ADDRS"));
    assert!(eq(pod_addrs::SOURCES, "POD_SOURCES"));
    assert!(eq(fast_path::SOCKHASH, "FAST_PATH_SOCKS"));
    assert!(eq(config::NAME, "CAPTURE_CONFIG"));
    assert!(eq(stats::NAME, "CAPTURE_STATS"));
    assert!(eq(time_wait::LISTENERS, "TW_LISTENERS"));
    assert!(eq(time_wait::PENDING, "TW_PENDING"));
};

const fn eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[inline(always)]
pub fn count(slot: u32) {
    if let Some(v) = CAPTURE_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *v += 1 };
    }
}

/// Whether `source` reports decisions of `reason`'s level: the one map read a decision
/// point costs while reporting is off.
#[inline(always)]
pub fn reports(source: u32, reason: u16) -> bool {
    matches!(CAPTURE_EVENT_LEVELS.get(source), Some(l) if *l >= events::reason::level_of(reason))
}

/// Reports a decision if `source` is asked to: one array read when not, else one
/// ring-buffer write (a full ring loses the event and counts it; nothing waits).
#[inline(always)]
pub fn report(source: u32, reason: u16, netns_cookie: u64, src: (&IpKey, u16), dst: (&IpKey, u16)) {
    if !reports(source, reason) {
        return;
    }
    let ev = Event {
        netns_cookie,
        src: *src.0,
        dst: *dst.0,
        src_port: src.1,
        dst_port: dst.1,
        source: source as u16,
        reason,
    };
    // No wake-up: ztunnel polls the ring every few milliseconds instead. Waking the
    // reader for each event (an irq_work, a self-IPI) cost connect4 about ten times its
    // own run time (measured with the kernel's statistics).
    if CAPTURE_EVENTS
        .output::<Event>(&ev, u64::from(aya_ebpf::bindings::BPF_RB_NO_WAKEUP))
        .is_err()
    {
        count(stats::EVENTS_LOST);
    }
}

/// An address a program does not know.
pub const NO_ADDR: IpKey = IpKey {
    addr: [0; 4],
    family: 0,
};

#[inline(always)]
pub fn switch_on(slot: u32) -> bool {
    matches!(CAPTURE_CONFIG.get(slot), Some(v) if *v != 0)
}

pub const AF_INET: u32 = ztunnel_common::AF_INET as u32;
pub const AF_INET6: u32 = ztunnel_common::AF_INET6 as u32;

#[inline(always)]
pub fn ip4(addr: u32) -> IpKey {
    IpKey {
        addr: [addr, 0, 0, 0],
        family: AF_INET,
    }
}

/// An IPv6 address as a key; IPv4-mapped addresses (`::ffff:a.b.c.d`) become IPv4 keys so
/// that a dual-stack socket and an IPv4 socket to the same peer agree.
#[inline(always)]
pub fn ip6(addr: [u32; 4]) -> IpKey {
    if is_v4_mapped(&addr) {
        ip4(addr[3])
    } else {
        IpKey {
            addr,
            family: AF_INET6,
        }
    }
}

#[inline(always)]
pub fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == u32::to_be(0xffff)
}

/// 127.0.0.0/8 or ::1 (IPv4 form already normalised by [`ip6`]).
#[inline(always)]
pub fn is_loopback(ip: &IpKey) -> bool {
    if ip.family == AF_INET {
        (u32::from_be(ip.addr[0]) >> 24) == 127
    } else {
        ip.addr[0] == 0 && ip.addr[1] == 0 && ip.addr[2] == 0 && ip.addr[3] == u32::to_be(1)
    }
}

#[inline(always)]
pub fn is_unspecified(ip: &IpKey) -> bool {
    ip.addr[0] == 0 && ip.addr[1] == 0 && ip.addr[2] == 0 && ip.addr[3] == 0
}
