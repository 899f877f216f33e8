//! Types shared by the kernel programs and the userspace daemon: map keys and values,
//! map and program names, ports and marks. Everything here is `#[repr(C)]` with explicit
//! padding so both sides agree on the layout byte for byte.
#![no_std]

pub mod ports {
    //! ztunnel's well-known ports (the same numbers as Istio's ztunnel).
    pub const OUTBOUND: u16 = 15001;
    /// The port apps send DNS queries to (captured to [`DNS`]).
    pub const DNS_SERVER: u16 = 53;
    pub const INBOUND_PLAINTEXT: u16 = 15006;
    pub const HBONE: u16 = 15008;
    pub const DNS: u16 = 15053;
    pub const ADMIN: u16 = 15000;
    pub const METRICS: u16 = 15020;
    pub const READINESS: u16 = 15021;

    /// The ports ztunnel owns inside an enrolled pod's netns, exactly as Istio's in-pod
    /// rules reserve them: the outbound capture never rewrites a connect to them and
    /// ztunnel never forwards to them (either would loop back into ztunnel). Every
    /// other port is the app's and is captured and tunnelled — 15000, 15020, 15021 and
    /// 15053 included, which ztunnel serves in its own netns, not in the pod's.
    pub const NEVER_CAPTURED: [u16; 3] = [OUTBOUND, INBOUND_PLAINTEXT, HBONE];
}

/// The mark ztunnel puts on its own packets (`SO_MARK`), as Istio's ztunnel does.
pub const ZTUNNEL_MARK: u32 = 0x539;

/// Address families as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

pub mod program {
    //! Program names: the function names in the eBPF object.
    pub const CONNECT4: &str = "connect4_capture";
    pub const CONNECT6: &str = "connect6_capture";
    pub const GETPEERNAME4: &str = "getpeername4_capture";
    pub const GETPEERNAME6: &str = "getpeername6_capture";
    pub const SOCK_RELEASE: &str = "sock_release_capture";
    pub const GETSOCKOPT: &str = "getsockopt_orig_dst";
    pub const SOCKOPS: &str = "sockops_capture";
    pub const SK_MSG: &str = "sk_msg_fast_path";
    pub const TC_INGRESS: &str = "tc_ingress_capture";
    pub const SK_LOOKUP: &str = "sk_lookup_time_wait";
    pub const DNS_SENDMSG4: &str = "sendmsg4_dns";
    pub const DNS_SENDMSG6: &str = "sendmsg6_dns";
    pub const DNS_RECVMSG4: &str = "recvmsg4_dns";
    pub const DNS_RECVMSG6: &str = "recvmsg6_dns";

    /// Every program in the object, in load order.
    pub const ALL: [&str; 14] = [
        CONNECT4,
        CONNECT6,
        GETPEERNAME4,
        GETPEERNAME6,
        SOCK_RELEASE,
        GETSOCKOPT,
        SOCKOPS,
        SK_MSG,
        TC_INGRESS,
        SK_LOOKUP,
        DNS_SENDMSG4,
        DNS_SENDMSG6,
        DNS_RECVMSG4,
        DNS_RECVMSG6,
    ];
}

/// An IPv4 or IPv6 address in network byte order as the kernel hands it out: IPv4 in
/// `addr[0]`, the other words zero. The family says which.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpKey {
    pub addr: [u32; 4],
    pub family: u32,
}
const _: () = assert!(core::mem::size_of::<IpKey>() == 20);

pub mod orig_dst {
    //! Original destinations of captured outbound connections.
    use super::IpKey;

    /// socket cookie of the app's socket → [`OrigDst`]; written by `connect4/6`, read by
    /// `getpeername4/6` and `sockops`, deleted when the app closes the socket
    /// (`sock_release`) or the connection closes (`sockops`, TCP_CLOSE), and by
    /// unenrolment for the pod's netns. A plain hash map: when it is full, connects are
    /// refused (EPERM) rather than another connection's entry evicted. One entry per
    /// captured connection the app holds open, so [`MAX_ENTRIES`] bounds the captured
    /// outbound connections open at once on the node.
    pub const BY_COOKIE: &str = "ORIG_DST_COOKIE";
    /// [`TupleKey`] of the app's end → [`OrigDst`]; written by `sockops` once the app's
    /// connection is established (its port is known only then), read by `getsockopt`
    /// on ztunnel's accepted socket, deleted when the connection closes (TCP_CLOSE) and by
    /// unenrolment: one per captured connection until its socket closes (an app's close
    /// ends in TCP_CLOSE after at most the FIN timeout).
    pub const BY_TUPLE: &str = "ORIG_DST_TUPLE";
    pub const MAX_ENTRIES: u32 = 65536;

    /// Where the app wanted to go.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct OrigDst {
        /// The app's network namespace, so unenrolment can purge its entries.
        pub netns_cookie: u64,
        pub ip: IpKey,
        /// Host byte order.
        pub port: u16,
        pub _pad: u16,
    }
    const _: () = assert!(core::mem::size_of::<OrigDst>() == 32);

    /// The app's end of a captured loopback connection, inside its network namespace.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct TupleKey {
        pub netns_cookie: u64,
        pub ip: IpKey,
        /// Host byte order.
        pub port: u16,
        pub _pad: u16,
    }
    const _: () = assert!(core::mem::size_of::<TupleKey>() == 32);

    #[cfg(feature = "user")]
    // SAFETY: plain `repr(C)` data with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for OrigDst {}
    #[cfg(feature = "user")]
    // SAFETY: as above.
    unsafe impl aya::Pod for TupleKey {}
}

pub mod pod_addrs {
    //! The addresses of enrolled pods on this node.

    /// [`IpKey`](super::IpKey) → [`PodAddr`]: the tc program steers traffic to these addresses; the
    /// connect programs leave a pod's connects to its own addresses alone.
    pub const NAME: &str = "POD_ADDRS";
    pub const MAX_ENTRIES: u32 = 16384;

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct PodAddr {
        /// The cookie of the pod's network namespace.
        pub netns_cookie: u64,
    }
    const _: () = assert!(core::mem::size_of::<PodAddr>() == 8);

    /// [`SourceKey`] → [`IpKey`](super::IpKey): the address each enrolled pod's captured
    /// connects are bound to, one per (netns, family): the first of the pod's addresses
    /// of that family, the one ztunnel names as the connection's source. connect4/6
    /// bind the app's socket to it before rewriting the destination to loopback, so
    /// the app's `getsockname` gives the pod's address, as without capture (and as
    /// under Istio's REDIRECT); ztunnel's end sees the pod's address as its peer.
    pub const SOURCES: &str = "POD_SOURCES";
    /// Two per pod (IPv4 and IPv6), as many pods as [`NAME`] holds addresses.
    pub const MAX_SOURCES: u32 = MAX_ENTRIES;

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct SourceKey {
        /// The cookie of the pod's network namespace.
        pub netns_cookie: u64,
        /// `AF_INET` or `AF_INET6`.
        pub family: u32,
        pub _pad: u32,
    }
    const _: () = assert!(core::mem::size_of::<SourceKey>() == 16);

    #[cfg(feature = "user")]
    // SAFETY: plain `repr(C)` data; every bit pattern is valid.
    unsafe impl aya::Pod for PodAddr {}
    #[cfg(feature = "user")]
    // SAFETY: plain `repr(C)` data with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for SourceKey {}
}

#[cfg(feature = "user")]
// SAFETY: plain `repr(C)` data; every bit pattern is valid.
unsafe impl aya::Pod for IpKey {}

pub mod time_wait {
    //! A SYN whose 4-tuple still belongs to a TIME_WAIT socket, handed from tc to
    //! `sk_lookup`. `bpf_sk_assign` cannot steer it: the kernel refuses a second socket
    //! with a TIME_WAIT socket's tuple (`inet_ehash_insert` finds the duplicate and the
    //! SYN is silently dropped). So tc lets the kernel's TIME_WAIT processing run — it
    //! retires the TIME_WAIT socket and then looks up a listener for the original port
    //! — and the `sk_lookup` program answers that lookup with ztunnel's listener. tc and
    //! the lookup run on the same CPU in the same softirq, so a per-CPU slot says which
    //! SYN was handed over; `sockops` puts each of ztunnel's `:15006` listeners into a
    //! SOCKHASH by (netns cookie, family) when it starts listening, and `sk_lookup`
    //! finds the pod's netns cookie through `POD_ADDRS`.
    use super::IpKey;

    /// SOCKHASH of [`ListenerKey`] → ztunnel's `:15006` listener in that netns.
    pub const LISTENERS: &str = "TW_LISTENERS";
    /// Two per pod (IPv4 and IPv6), as many pods as [`POD_ADDRS`](super::pod_addrs)
    /// holds addresses.
    pub const MAX_LISTENERS: u32 = super::pod_addrs::MAX_ENTRIES;
    /// Per-CPU array of one [`Pending`]: the SYN tc handed over.
    pub const PENDING: &str = "TW_PENDING";
    /// How long a hand-over stays valid, in nanoseconds: tc and the lookup run
    /// microseconds apart; anything older is a SYN the kernel did not take that way.
    pub const FRESH_NS: u64 = 100_000_000;

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct ListenerKey {
        pub netns_cookie: u64,
        /// `AF_INET` or `AF_INET6`.
        pub family: u32,
        pub _pad: u32,
    }
    const _: () = assert!(core::mem::size_of::<ListenerKey>() == 16);

    /// The SYN tc handed over, as the `sk_lookup` context shows it.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct Pending {
        pub local: IpKey,
        pub remote: IpKey,
        /// Host byte order.
        pub local_port: u16,
        /// Host byte order.
        pub remote_port: u16,
        pub _pad: u32,
        /// `bpf_ktime_get_ns` when tc handed it over; 0 = nothing pending.
        pub ktime_ns: u64,
    }
    const _: () = assert!(core::mem::size_of::<Pending>() == 56);

    #[cfg(feature = "user")]
    // SAFETY: plain `repr(C)` data with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for ListenerKey {}
    #[cfg(feature = "user")]
    // SAFETY: as above.
    unsafe impl aya::Pod for Pending {}
}

pub mod fast_path {
    //! Same-node fast path: both ends of each app↔ztunnel loopback connection.
    use super::IpKey;

    /// SOCKHASH of [`SockKey`] → socket.
    pub const SOCKHASH: &str = "FAST_PATH_SOCKS";
    pub const MAX_ENTRIES: u32 = 65536;

    /// One end of a connection as seen from its own socket.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct SockKey {
        pub netns_cookie: u64,
        pub local: IpKey,
        pub remote: IpKey,
        /// Host byte order.
        pub local_port: u32,
        /// Host byte order.
        pub remote_port: u32,
    }
    const _: () = assert!(core::mem::size_of::<SockKey>() == 56);

    #[cfg(feature = "user")]
    // SAFETY: plain `repr(C)` data; every bit pattern is valid.
    unsafe impl aya::Pod for SockKey {}
}

pub mod config {
    //! Runtime switches, one `u32` slot each in an array map.
    pub const NAME: &str = "CAPTURE_CONFIG";
    /// 1 = `sockops` puts new app↔ztunnel loopback connections into the SOCKHASH.
    pub const FAST_PATH: u32 = 0;
    /// 1 = an enrolled pod's DNS (UDP and TCP port 53, to anything but loopback) goes to
    /// ztunnel's DNS proxy on the pod's loopback `:15053` (`--dns-capture`).
    pub const DNS_CAPTURE: u32 = 1;
    pub const SLOTS: u32 = 4;
}

pub mod stats {
    //! Per-CPU counters the programs keep and the metrics module reads.
    pub const NAME: &str = "CAPTURE_STATS";
    /// Outbound connects rewritten to ztunnel's listener.
    pub const CONNECT_CAPTURED: u32 = 0;
    /// Original destinations moved into the tuple map on establishment.
    pub const TUPLE_RECORDED: u32 = 1;
    /// `SO_ORIGINAL_DST` answered from the map.
    pub const ORIG_DST_HIT: u32 = 2;
    /// `SO_ORIGINAL_DST` asked for a socket with no entry.
    pub const ORIG_DST_MISS: u32 = 3;
    /// Sockets put into the fast-path SOCKHASH.
    pub const FAST_PATH_SOCKETS: u32 = 4;
    /// Messages redirected by `sk_msg`.
    pub const FAST_PATH_REDIRECTS: u32 = 5;
    /// `sk_msg` found no peer and let the message take the normal path.
    pub const FAST_PATH_MISSES: u32 = 6;
    /// Inbound SYNs steered to ztunnel's :15006 listener.
    pub const INBOUND_STEERED: u32 = 7;
    /// Inbound SYNs dropped because ztunnel's listener is missing (fail closed).
    pub const INBOUND_NO_LISTENER: u32 = 8;
    /// Inbound TCP dropped because it is an IP fragment (IPv4 fragments of a TCP
    /// datagram, IPv6 fragments that carry or may carry TCP): the kernel would
    /// reassemble a segment tc never saw whole.
    pub const INBOUND_DROP_FRAGMENT: u32 = 9;
    /// Inbound TCP dropped because its IP or TCP header is cut short (by the frame or by
    /// the IP length fields).
    pub const INBOUND_DROP_TRUNCATED: u32 = 10;
    /// Inbound IP dropped because tc cannot tell whether it is TCP: bad version or
    /// header length, or an IPv6 extension-header chain longer than tc walks.
    pub const INBOUND_DROP_UNPARSEABLE: u32 = 11;
    /// Inbound SYNs whose 4-tuple still belonged to a TIME_WAIT socket, handed to
    /// ztunnel's listener by `sk_lookup` (see [`time_wait`](super::time_wait)).
    pub const INBOUND_TIME_WAIT_STEERED: u32 = 12;
    /// Outbound connects refused (EPERM to the app) because the original destination
    /// could not be recorded (the map is full).
    pub const CONNECT_REFUSED: u32 = 13;
    /// Established captured connections whose tuple entry could not be written (the
    /// map is full); ztunnel then finds no original destination and closes them.
    pub const TUPLE_RECORD_FAILED: u32 = 14;
    /// Inbound SYNs matching a TIME_WAIT socket that could not be handed to ztunnel's
    /// listener (destination not an address of the pod, listener gone): answered by the
    /// TIME_WAIT socket (an ACK the client resets), never passed to the app's listener.
    pub const INBOUND_DROP_TIME_WAIT: u32 = 15;
    /// Captured connects left with a loopback source address (the app's `getsockname`
    /// then names 127.0.0.1 or ::1, not the pod): the pod has no address of the
    /// socket's family in [`POD_SOURCES`](super::pod_addrs::SOURCES), the app bound
    /// the socket to a port but no address, or the kernel refused the bind (the
    /// address is not, or not yet, configured in the pod). The connection is captured
    /// all the same.
    pub const CONNECT_SOURCE_LOOPBACK: u32 = 16;
    /// DNS queries (UDP connects and sends, TCP connects to port 53) sent to ztunnel's
    /// DNS proxy.
    pub const DNS_CAPTURED: u32 = 17;
    /// UDP DNS connects and sends refused (EPERM) because their server could not be
    /// recorded (the original-destination map is full).
    pub const DNS_REFUSED: u32 = 18;
    /// DNS answers whose source was set back to the server the app asked.
    pub const DNS_ANSWER_RESTORED: u32 = 19;
    /// Decision events a program wanted to report (see [`events`](super::events)) but
    /// the ring buffer was full (nobody reading fast enough): lost, never waited for.
    pub const EVENTS_LOST: u32 = 20;
    /// Room for more counters: a new slot needs no new map, and a map of another size
    /// is replaced at load (see `ebpf::replace_incompatible_pins`).
    pub const SLOTS: u32 = 32;

    /// Names for the metrics module, indexed by slot.
    pub const NAMES: [&str; 21] = [
        "connect_captured",
        "tuple_recorded",
        "orig_dst_hit",
        "orig_dst_miss",
        "fast_path_sockets",
        "fast_path_redirects",
        "fast_path_misses",
        "inbound_steered",
        "inbound_no_listener",
        "inbound_drop_fragment",
        "inbound_drop_truncated",
        "inbound_drop_unparseable",
        "inbound_time_wait_steered",
        "connect_refused",
        "tuple_record_failed",
        "inbound_drop_time_wait",
        "connect_source_loopback",
        "dns_captured",
        "dns_refused",
        "dns_answer_restored",
        "events_lost",
    ];
    const _: () = assert!(NAMES.len() as u32 <= SLOTS);
}

pub mod events {
    //! Capture decisions the programs report when asked (`/logging?capture=…`,
    //! `ztunnel capture-log`, `ztunnel capture watch`): each decision point reads its
    //! program's level from [`LEVELS`] first (one array lookup; 0 = off, the default)
    //! and, when the decision's level is within it, writes one [`Event`] to the ring
    //! buffer [`RING`], which ztunnel reads, names the pod by the netns cookie and logs.
    //! Neither map is pinned: each ztunnel's programs report to their own reader.
    use super::IpKey;

    /// Ring buffer of [`Event`]s (Linux >= 5.8).
    pub const RING: &str = "CAPTURE_EVENTS";
    /// 4,681 events of 56 bytes (plus an 8-byte header each); a full ring drops new
    /// events and counts them (`events_lost`), the programs never wait.
    pub const RING_BYTES: u32 = 256 * 1024;
    /// Array of one `u32` level per [`source`]: see [`level`].
    pub const LEVELS: &str = "CAPTURE_EVENT_LEVELS";

    pub mod source {
        //! Which program group reports: the unit the level is switched per.
        pub const CONNECT: u32 = 0;
        pub const TC: u32 = 1;
        pub const SK_LOOKUP: u32 = 2;
        pub const SOCKOPS: u32 = 3;
        pub const SOCKOPT: u32 = 4;
        pub const DNS: u32 = 5;
        pub const COUNT: u32 = 6;
        /// Names on the admin port and in log lines, indexed by source.
        pub const NAMES: [&str; COUNT as usize] =
            ["connect", "tc", "sk_lookup", "sockops", "sockopt", "dns"];
    }

    pub mod level {
        //! A program reports a decision when its level is at least the decision's.
        pub const OFF: u32 = 0;
        /// Dropped, refused, map full, map miss: what fails closed.
        pub const WARN: u32 = 1;
        /// And what was captured or steered.
        pub const INFO: u32 = 2;
        /// And what was left alone, and why.
        pub const DEBUG: u32 = 3;
        pub const NAMES: [&str; 4] = ["off", "warn", "info", "debug"];
    }

    pub mod reason {
        //! Why a program decided what it did. The level of each is [`level_of`].
        use super::level::{DEBUG, INFO, WARN};

        pub const CONNECT_CAPTURED: u16 = 1;
        pub const CONNECT_CAPTURED_SOURCE_LOOPBACK: u16 = 2;
        pub const CONNECT_SKIPPED_LOOPBACK: u16 = 3;
        pub const CONNECT_SKIPPED_UNSPECIFIED: u16 = 4;
        pub const CONNECT_SKIPPED_RESERVED_PORT: u16 = 5;
        pub const CONNECT_SKIPPED_OWN_ADDRESS: u16 = 6;
        pub const CONNECT_REFUSED_MAP_FULL: u16 = 7;
        pub const INBOUND_STEERED: u16 = 8;
        pub const INBOUND_TIME_WAIT_HANDED_OVER: u16 = 9;
        pub const INBOUND_SKIPPED_EXISTING_SOCKET: u16 = 10;
        pub const INBOUND_SKIPPED_HBONE: u16 = 11;
        pub const INBOUND_DROPPED_NO_LISTENER: u16 = 12;
        pub const INBOUND_DROPPED_FRAGMENT: u16 = 13;
        pub const INBOUND_DROPPED_TRUNCATED: u16 = 14;
        pub const INBOUND_DROPPED_UNPARSEABLE: u16 = 15;
        pub const TIME_WAIT_STEERED: u16 = 16;
        pub const TIME_WAIT_DROPPED: u16 = 17;
        pub const TUPLE_RECORDED: u16 = 18;
        pub const TUPLE_MAP_FULL: u16 = 19;
        pub const ORIG_DST_HIT: u16 = 20;
        pub const ORIG_DST_MISS: u16 = 21;
        pub const DNS_CAPTURED: u16 = 22;
        pub const DNS_REFUSED_MAP_FULL: u16 = 23;
        /// One past the last reason.
        pub const COUNT: u16 = 24;

        /// (decision, why) for log lines, indexed by reason; index 0 is unused.
        pub const NAMES: [(&str, &str); COUNT as usize] = [
            ("unknown", "unknown"),
            ("captured", "redirected to ztunnel's :15001"),
            (
                "captured",
                "redirected to :15001; source left loopback (no pod address to bind)",
            ),
            ("skipped", "loopback destination"),
            ("skipped", "unspecified destination"),
            ("skipped", "port reserved by ztunnel"),
            ("skipped", "the pod's own address"),
            ("refused", "original-destination map full (EPERM)"),
            ("captured", "SYN steered to ztunnel's :15006"),
            (
                "captured",
                "SYN meets a TIME_WAIT socket; handed to sk_lookup",
            ),
            ("skipped", "a socket owns the tuple"),
            ("skipped", "HBONE port 15008"),
            ("dropped", "ztunnel's :15006 listener missing"),
            ("dropped", "IP fragment of TCP"),
            ("dropped", "header cut short"),
            ("dropped", "unparseable IP header or extension chain"),
            ("captured", "TIME_WAIT SYN given ztunnel's :15006 listener"),
            ("dropped", "TIME_WAIT hand-over impossible"),
            ("recorded", "original destination keyed by tuple"),
            (
                "failed",
                "tuple map full: ztunnel will close the connection",
            ),
            ("answered", "SO_ORIGINAL_DST from the tuple map"),
            ("miss", "no original destination for this peer"),
            ("captured", "DNS to ztunnel's :15053"),
            ("refused", "original-destination map full (EPERM)"),
        ];

        /// The level a program must run at to report `reason`.
        #[inline(always)]
        pub const fn level_of(reason: u16) -> u32 {
            match reason {
                CONNECT_REFUSED_MAP_FULL
                | INBOUND_DROPPED_NO_LISTENER
                | INBOUND_DROPPED_FRAGMENT
                | INBOUND_DROPPED_TRUNCATED
                | INBOUND_DROPPED_UNPARSEABLE
                | TIME_WAIT_DROPPED
                | TUPLE_MAP_FULL
                | ORIG_DST_MISS
                | DNS_REFUSED_MAP_FULL => WARN,
                CONNECT_CAPTURED
                | CONNECT_CAPTURED_SOURCE_LOOPBACK
                | INBOUND_STEERED
                | INBOUND_TIME_WAIT_HANDED_OVER
                | TIME_WAIT_STEERED
                | DNS_CAPTURED => INFO,
                _ => DEBUG,
            }
        }
    }

    /// One decision. Addresses a program does not know are zero (family 0).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct Event {
        /// The pod's network namespace; 0 when the program cannot tell (tc before
        /// Linux 6.15 has no netns cookie: it names the pod by its address in
        /// `POD_ADDRS`, and ztunnel by the destination address otherwise).
        pub netns_cookie: u64,
        pub src: IpKey,
        pub dst: IpKey,
        /// Host byte order.
        pub src_port: u16,
        /// Host byte order.
        pub dst_port: u16,
        /// [`source`].
        pub source: u16,
        /// [`reason`].
        pub reason: u16,
    }
    const _: () = assert!(core::mem::size_of::<Event>() == 56);

    #[cfg(feature = "user")]
    // SAFETY: plain `repr(C)` data; every bit pattern is valid.
    unsafe impl aya::Pod for Event {}
}
