//! Outbound capture: `connect4/6` rewrite an enrolled pod's TCP connects to ztunnel's
//! in-pod listener and remember the original destination by socket cookie;
//! `getpeername4/6` give the app back the address it asked for; `sock_release` drops
//! the entry when the app closes its socket.
use core::ptr::{addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use ztunnel_common::{IpKey, orig_dst::OrigDst, ports, stats};

use crate::maps::{
    AF_INET, AF_INET6, ORIG_DST_COOKIE, POD_ADDRS, count, ip4, ip6, is_loopback, is_unspecified,
};

/// Let the syscall proceed (cgroup sock_addr programs return 1 to allow).
const ALLOW: i32 = 1;
/// Refuse the syscall: the app's connect fails with EPERM.
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const LOOPBACK4: u32 = u32::to_be(0x7f00_0001);
const V4_MAPPED_PREFIX: u32 = u32::to_be(0xffff);

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
    if is_loopback(&dst) || is_unspecified(&dst) || ports::NEVER_CAPTURED.contains(&port) {
        return Ok(ALLOW);
    }
    // SAFETY: helper valid for cgroup sock_addr programs (Linux >= 5.7).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only look-up; the value is copied out at once.
    if let Some(own) = unsafe { POD_ADDRS.get(dst) }
        && own.netns_cookie == netns
    {
        // The pod talking to itself stays local.
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
    ORIG_DST_COOKIE.insert(cookie, orig, 0)?;

    let listener_port = u32::from(u16::to_be(crate::dns::tcp_listener(port)));
    // SAFETY: context writes, one field per store: the verifier rejects merged stores.
    unsafe {
        if !v6 {
            write_volatile(addr_of_mut!((*sa).user_ip4), LOOPBACK4);
        } else if dst.family == AF_INET {
            // A dual-stack socket dialling an IPv4-mapped address: stay on IPv4 loopback.
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
        write_volatile(addr_of_mut!((*sa).user_port), listener_port);
    }
    count(stats::CONNECT_CAPTURED);
    Ok(ALLOW)
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
