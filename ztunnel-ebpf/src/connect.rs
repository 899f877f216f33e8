//! Outbound capture: `connect4/6` rewrite an enrolled pod's TCP connects to ztunnel's
//! in-pod listener on loopback and remember the original destination by socket cookie,
//! after binding the app's socket to the pod's own address (so its `getsockname` names
//! the pod, as without capture); `getpeername4/6` give the app back the address it
//! asked for; `sock_release` drops the entry when the app closes its socket.
use core::{
    mem::size_of,
    ptr::{addr_of_mut, read_volatile, write_volatile},
};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{bpf_sock, bpf_sock_addr, sockaddr},
    helpers::{bpf_bind, bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use ztunnel_common::{
    IpKey,
    events::{reason, source},
    orig_dst::OrigDst,
    pod_addrs::SourceKey,
    ports, stats,
};

use crate::maps::{
    AF_INET, AF_INET6, NO_ADDR, ORIG_DST_COOKIE, POD_ADDRS, POD_SOURCES, count, ip4, ip6,
    is_loopback, is_unspecified, report, reports,
};

/// Let the syscall proceed (cgroup sock_addr programs return 1 to allow).
const ALLOW: i32 = 1;
/// Refuse the syscall: the app's connect fails with EPERM.
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
pub(crate) const LOOPBACK4: u32 = u32::to_be(0x7f00_0001);
pub(crate) const V4_MAPPED_PREFIX: u32 = u32::to_be(0xffff);

/// `struct sockaddr_in` (the bindings have only `sockaddr`).
#[repr(C)]
struct SockaddrIn {
    family: u16,
    /// Network byte order; 0 = any port (`bpf_bind` then defers the port to connect).
    port: u16,
    addr: u32,
    zero: [u8; 8],
}
const _: () = assert!(size_of::<SockaddrIn>() == 16);

/// `struct sockaddr_in6`.
#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port: u16,
    flowinfo: u32,
    addr: [u32; 4],
    scope_id: u32,
}
const _: () = assert!(size_of::<SockaddrIn6>() == 28);

#[cgroup_sock_addr(connect4)]
pub fn connect4_capture(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the program's lifetime.
    verdict(unsafe { try_connect(&ctx, false) })
}

#[cgroup_sock_addr(connect6)]
pub fn connect6_capture(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    verdict(unsafe { try_connect(&ctx, true) })
}

/// Fail closed: a connect whose original destination could not be recorded would reach
/// ztunnel with no way to learn where it was going, and must not go direct either; the
/// app gets EPERM. Each branch returns a constant, as the verifier wants 0 or 1.
#[inline(always)]
fn verdict(r: Result<i32, i32>) -> i32 {
    match r {
        Ok(ALLOW) => ALLOW,
        _ => {
            count(stats::CONNECT_REFUSED);
            REFUSE
        }
    }
}

/// The app closed a socket: its original destination is not needed any more (nobody
/// can ask getpeername on a closed descriptor, and a socket closed before it was
/// established never will be). sockops deletes the entry at TCP_CLOSE too, but only for
/// sockets that reached `tcp_connect`; a connect that failed in between (no free port,
/// address in use) would otherwise leave its entry behind for good.
#[cgroup_sock(sock_release)]
pub fn sock_release_capture(ctx: SockContext) -> i32 {
    // SAFETY: helper valid for cgroup sock programs (Linux >= 5.12).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = ORIG_DST_COOKIE.remove(cookie);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4_capture(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let _ = unsafe { try_getpeername(&ctx, false) };
    // Always allow: the verifier wants a constant 0/1 here, and getpeername only reads.
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6_capture(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let _ = unsafe { try_getpeername(&ctx, true) };
    // Always allow: the verifier wants a constant 0/1 here, and getpeername only reads.
    ALLOW
}

/// The destination the syscall names, normalised (v4-mapped → IPv4).
///
/// # Safety
/// `sa` must be the program's context.
pub(crate) unsafe fn user_dst(sa: *mut bpf_sock_addr, v6: bool) -> (IpKey, u16) {
    // SAFETY: reads of context fields; each is a separate 4-byte load the verifier accepts.
    unsafe {
        // user_port holds the port in network byte order in its low 16 bits.
        let port = u16::from_be(read_volatile(addr_of_mut!((*sa).user_port)) as u16);
        let ip = if v6 {
            ip6([
                read_volatile(addr_of_mut!((*sa).user_ip6[0])),
                read_volatile(addr_of_mut!((*sa).user_ip6[1])),
                read_volatile(addr_of_mut!((*sa).user_ip6[2])),
                read_volatile(addr_of_mut!((*sa).user_ip6[3])),
            ])
        } else {
            ip4(read_volatile(addr_of_mut!((*sa).user_ip4)))
        };
        (ip, port)
    }
}

/// # Safety
/// `ctx` must be the program's context.
unsafe fn try_connect(ctx: &SockAddrContext, v6: bool) -> Result<i32, i32> {
    let sa = ctx.sock_addr;
    // SAFETY: context reads.
    let (ty, proto) = unsafe {
        (
            read_volatile(addr_of_mut!((*sa).type_)),
            read_volatile(addr_of_mut!((*sa).protocol)),
        )
    };
    if ty == SOCK_DGRAM {
        // SAFETY: `ctx` is the context.
        return unsafe { crate::dns::redirect(ctx, v6) };
    }
    if ty != SOCK_STREAM || proto != IPPROTO_TCP {
        return Ok(ALLOW);
    }
    // SAFETY: `sa` is the context.
    let (dst, port) = unsafe { user_dst(sa, v6) };
    let skipped = if is_loopback(&dst) {
        reason::CONNECT_SKIPPED_LOOPBACK
    } else if is_unspecified(&dst) {
        reason::CONNECT_SKIPPED_UNSPECIFIED
    } else if ports::NEVER_CAPTURED.contains(&port) {
        reason::CONNECT_SKIPPED_RESERVED_PORT
    } else {
        0
    };
    if skipped != 0 {
        // The netns cookie only when reporting: skipping costs one map read more.
        if reports(source::CONNECT, skipped) {
            // SAFETY: helper valid for cgroup sock_addr programs (Linux >= 5.7).
            let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
            report(source::CONNECT, skipped, netns, (&NO_ADDR, 0), (&dst, port));
        }
        return Ok(ALLOW);
    }
    // SAFETY: helper valid for cgroup sock_addr programs (Linux >= 5.7).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only look-up; the value is copied out at once.
    if let Some(own) = unsafe { POD_ADDRS.get(dst) }
        && own.netns_cookie == netns
    {
        // The pod talking to itself stays local.
        report(
            source::CONNECT,
            reason::CONNECT_SKIPPED_OWN_ADDRESS,
            netns,
            (&NO_ADDR, 0),
            (&dst, port),
        );
        return Ok(ALLOW);
    }
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        netns_cookie: netns,
        ip: dst,
        port,
        _pad: 0,
    };
    // Fails only when the map is full (a plain hash map, never LRU: evicting another
    // connection's entry would break that connection instead); the caller refuses the
    // connect then.
    if let Err(e) = ORIG_DST_COOKIE.insert(cookie, orig, 0) {
        report(
            source::CONNECT,
            reason::CONNECT_REFUSED_MAP_FULL,
            netns,
            (&NO_ADDR, 0),
            (&dst, port),
        );
        return Err(e);
    }

    // SAFETY: `ctx` is the program's context.
    let why = if unsafe { bind_source(ctx, v6, dst.family, netns) } {
        reason::CONNECT_CAPTURED
    } else {
        count(stats::CONNECT_SOURCE_LOOPBACK);
        reason::CONNECT_CAPTURED_SOURCE_LOOPBACK
    };

    // SAFETY: `sa` is the program's context.
    unsafe { to_loopback(sa, v6, &dst, crate::dns::tcp_listener(port)) };
    count(stats::CONNECT_CAPTURED);
    report(source::CONNECT, why, netns, (&NO_ADDR, 0), (&dst, port));
    Ok(ALLOW)
}

/// Binds the app's socket to the pod's own address of the destination's family (from
/// `POD_SOURCES`), with no port, before its destination becomes loopback: the kernel
/// then picks only the port at connect, and the app's `getsockname` gives the pod's
/// address as it would without capture, where a loopback destination would have made
/// the source loopback too. ztunnel's listener stays on loopback, where nothing outside
/// the pod can reach it; its accepted end sees the pod's address as its peer, as under
/// Istio's REDIRECT. A socket the app bound to an address keeps it. Returns false when
/// the source stays loopback: no address of that family known for the pod, a socket
/// bound to a port but no address (`bpf_bind` refuses a bound socket), or a bind the
/// kernel refused (the address not configured in the pod). The connect is captured
/// either way: only what `getsockname` shows differs.
///
/// # Safety
/// `ctx` must be the program's context.
unsafe fn bind_source(ctx: &SockAddrContext, v6: bool, family: u32, netns: u64) -> bool {
    let sa = ctx.sock_addr;
    // SAFETY: `ctx->sk` is a socket pointer the kernel guarantees non-null in sock_addr
    // programs (PTR_TO_SOCKET), read with one 8-byte load; its fields are read with one
    // 4-byte load each, all of them on every path (see sockops.rs on merged loads).
    let (src4, src6, src_port) = unsafe {
        let sk: *mut bpf_sock = read_volatile(addr_of_mut!((*sa).__bindgen_anon_1.sk));
        (
            read_volatile(addr_of_mut!((*sk).src_ip4)),
            [
                read_volatile(addr_of_mut!((*sk).src_ip6[0])),
                read_volatile(addr_of_mut!((*sk).src_ip6[1])),
                read_volatile(addr_of_mut!((*sk).src_ip6[2])),
                read_volatile(addr_of_mut!((*sk).src_ip6[3])),
            ],
            read_volatile(addr_of_mut!((*sk).src_port)),
        )
    };
    let app_chose = if v6 {
        (src6[0] | src6[1] | src6[2] | src6[3]) != 0
    } else {
        src4 != 0
    };
    if app_chose {
        return true;
    }
    if src_port != 0 {
        return false;
    }
    let key = SourceKey {
        netns_cookie: netns,
        family,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    let Some(own) = (unsafe { POD_SOURCES.get(key) }).copied() else {
        return false;
    };
    let ret = if !v6 {
        let mut addr = SockaddrIn {
            family: AF_INET as u16,
            port: 0,
            addr: own.addr[0],
            zero: [0; 8],
        };
        // SAFETY: helper valid for cgroup connect programs (Linux >= 4.17); `addr` is an
        // initialised `sockaddr_in` on the stack, its exact size passed with it.
        unsafe {
            bpf_bind(
                sa,
                addr_of_mut!(addr).cast::<sockaddr>(),
                size_of::<SockaddrIn>() as i32,
            )
        }
    } else {
        let a = if own.family == AF_INET {
            // A dual-stack socket dialling an IPv4-mapped address: the pod's IPv4
            // address in the same form.
            [0, 0, V4_MAPPED_PREFIX, own.addr[0]]
        } else {
            own.addr
        };
        let mut addr = SockaddrIn6 {
            family: AF_INET6 as u16,
            port: 0,
            flowinfo: 0,
            addr: a,
            scope_id: 0,
        };
        // SAFETY: as above, a `sockaddr_in6`.
        unsafe {
            bpf_bind(
                sa,
                addr_of_mut!(addr).cast::<sockaddr>(),
                size_of::<SockaddrIn6>() as i32,
            )
        }
    };
    ret == 0
}

/// # Safety
/// `ctx` must be the program's context.
unsafe fn try_getpeername(ctx: &SockAddrContext, v6: bool) -> Result<i32, i32> {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the context.
    let (peer, port) = unsafe { user_dst(sa, v6) };
    if (port != ports::OUTBOUND && port != ports::DNS) || !is_loopback(&peer) {
        return Ok(ALLOW);
    }
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let Some(orig) = (unsafe { ORIG_DST_COOKIE.get(cookie) }).copied() else {
        return Ok(ALLOW);
    };
    let port = u32::from(u16::to_be(orig.port));
    // SAFETY: context writes, one field per store.
    unsafe {
        if !v6 {
            if orig.ip.family != AF_INET {
                return Ok(ALLOW);
            }
            write_volatile(addr_of_mut!((*sa).user_ip4), orig.ip.addr[0]);
        } else if orig.ip.family == AF_INET6 {
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), orig.ip.addr[0]);
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), orig.ip.addr[1]);
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), orig.ip.addr[2]);
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), orig.ip.addr[3]);
        } else {
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), 0);
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), 0);
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), V4_MAPPED_PREFIX);
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), orig.ip.addr[0]);
        }
        write_volatile(addr_of_mut!((*sa).user_port), port);
    }
    Ok(ALLOW)
}

/// Points the connect (or send) at ztunnel's listener on loopback `port`: `127.0.0.1`, or
/// for an IPv6 socket `[::1]`, or `::ffff:127.0.0.1` when it dials an IPv4-mapped address
/// (a dual-stack socket stays on IPv4).
///
/// # Safety
/// `sa` must be the program's context.
#[inline(always)]
pub(crate) unsafe fn to_loopback(sa: *mut bpf_sock_addr, v6: bool, dst: &IpKey, port: u16) {
    let port = u32::from(u16::to_be(port));
    // SAFETY: context writes, one field per store: the verifier rejects merged stores.
    unsafe {
        if !v6 {
            write_volatile(addr_of_mut!((*sa).user_ip4), LOOPBACK4);
        } else if dst.family == AF_INET {
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), 0);
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), 0);
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), V4_MAPPED_PREFIX);
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), LOOPBACK4);
        } else {
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), 0);
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), 0);
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), 0);
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), u32::to_be(1));
        }
        write_volatile(addr_of_mut!((*sa).user_port), port);
    }
}
