//! Types shared by the kernel programs and the userspace daemon: map keys and values,
//! map and program names, ports and marks. Everything here is `#[repr(C)]` with explicit
//! padding so both sides agree on the layout byte for byte.
#![no_std]

pub mod ports {
    //! ztunnel's well-known ports (the same numbers as Istio's ztunnel).
    pub const OUTBOUND: u16 = 15001;
    pub const INBOUND_PLAINTEXT: u16 = 15006;
    pub const HBONE: u16 = 15008;
    pub const DNS: u16 = 15053;
    pub const ADMIN: u16 = 15000;
    pub const METRICS: u16 = 15020;
    pub const READINESS: u16 = 15021;

    /// Destination ports the outbound capture never rewrites.
    pub const NEVER_CAPTURED: [u16; 7] = [
        OUTBOUND,
        INBOUND_PLAINTEXT,
        HBONE,
        DNS,
        ADMIN,
        METRICS,
        READINESS,
    ];
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
    pub const GETSOCKOPT: &str = "getsockopt_orig_dst";
    pub const SOCKOPS: &str = "sockops_capture";
    pub const SK_MSG: &str = "sk_msg_fast_path";
    pub const TC_INGRESS: &str = "tc_ingress_capture";

    /// Every program in the object, in load order.
    pub const ALL: [&str; 8] = [
        CONNECT4,
        CONNECT6,
        GETPEERNAME4,
        GETPEERNAME6,
        GETSOCKOPT,
        SOCKOPS,
        SK_MSG,
        TC_INGRESS,
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
    /// `getpeername4/6` and `sockops`, deleted when the socket closes.
    pub const BY_COOKIE: &str = "ORIG_DST_COOKIE";
    /// [`TupleKey`] of the app's end → [`OrigDst`]; written by `sockops` once the app's
    /// connection is established (its port is known only then), read by `getsockopt`
    /// on ztunnel's accepted socket, deleted when the socket closes.
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

    #[cfg(feature = "user")]
    // SAFETY: plain `repr(C)` data; every bit pattern is valid.
    unsafe impl aya::Pod for PodAddr {}
}

#[cfg(feature = "user")]
// SAFETY: plain `repr(C)` data; every bit pattern is valid.
unsafe impl aya::Pod for IpKey {}

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
    pub const SLOTS: u32 = 16;

    /// Names for the metrics module, indexed by slot.
    pub const NAMES: [&str; 9] = [
        "connect_captured",
        "tuple_recorded",
        "orig_dst_hit",
        "orig_dst_miss",
        "fast_path_sockets",
        "fast_path_redirects",
        "fast_path_misses",
        "inbound_steered",
        "inbound_no_listener",
    ];
}
