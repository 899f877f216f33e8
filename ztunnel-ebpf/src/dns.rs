//! DNS capture (issue 18): an enrolled pod's UDP queries to port 53 go to ztunnel's DNS
//! proxy on the pod's loopback `:15053` instead, and its answers come back with the
//! server's address the app asked, so resolvers that check the source accept them.
//! `sendmsg4/6` rewrite unconnected sends, `connect4/6` (in `connect.rs`, through
//! [`redirect`]) connected UDP sockets, `recvmsg4/6` restore the source of what the
//! proxy sends back. The server asked is kept by socket cookie in `ORIG_DST_COOKIE`,
//! like a captured connect's (`sock_release` deletes it with the socket, and a connected
//! socket's `getpeername` answers from it). Nothing happens unless ztunnel switched
//! `config::DNS_CAPTURE` on, and loopback servers (a resolver inside the pod) are left
//! alone. ztunnel's own sockets are in its own cgroup, where these programs are not.
use core::ptr::{addr_of_mut, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use ztunnel_common::{
    IpKey, config,
    events::{reason, source},
    orig_dst::OrigDst,
    ports, stats,
};

use crate::{
    connect::{V4_MAPPED_PREFIX, user_dst},
    maps::{
        AF_INET, AF_INET6, NO_ADDR, ORIG_DST_COOKIE, count, is_loopback, is_unspecified, report,
        switch_on,
    },
};

/// Let the syscall proceed (cgroup sock_addr programs return 1 to allow).
const ALLOW: i32 = 1;
/// Refuse the syscall: the app's send fails with EPERM.
const REFUSE: i32 = 0;

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4_dns(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the program's lifetime.
    verdict(unsafe { redirect(&ctx, false) })
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6_dns(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    verdict(unsafe { redirect(&ctx, true) })
}

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4_dns(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    unsafe { try_recvmsg(&ctx, false) };
    // recvmsg programs must return 1.
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6_dns(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    unsafe { try_recvmsg(&ctx, true) };
    ALLOW
}

/// Fail closed: a query whose server could not be recorded would get an answer from
/// `127.0.0.1:15053` that the resolver drops; the app's send fails with EPERM instead.
#[inline(always)]
fn verdict(r: Result<i32, i32>) -> i32 {
    match r {
        Ok(ALLOW) => ALLOW,
        _ => REFUSE,
    }
}

/// Sends a UDP query for a port-53 server that is not loopback to the pod's `:15053`,
/// recording the server by socket cookie; anything else goes through untouched.
///
/// # Safety
/// `ctx` must be the program's context.
#[inline(always)]
pub unsafe fn redirect(ctx: &SockAddrContext, v6: bool) -> Result<i32, i32> {
    if !switch_on(config::DNS_CAPTURE) {
        return Ok(ALLOW);
    }
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the context.
    let (dst, port) = unsafe { user_dst(sa, v6) };
    if port != ports::DNS_SERVER || is_loopback(&dst) || is_unspecified(&dst) {
        return Ok(ALLOW);
    }
    // SAFETY: helpers valid for cgroup sock_addr programs (Linux >= 5.7).
    let (netns, cookie) = unsafe {
        (
            bpf_get_netns_cookie(ctx.as_ptr()),
            bpf_get_socket_cookie(ctx.as_ptr()),
        )
    };
    let orig = OrigDst {
        netns_cookie: netns,
        ip: dst,
        port,
        _pad: 0,
    };
    if ORIG_DST_COOKIE.insert(cookie, orig, 0).is_err() {
        count(stats::DNS_REFUSED);
        report(
            source::DNS,
            reason::DNS_REFUSED_MAP_FULL,
            netns,
            (&NO_ADDR, 0),
            (&dst, port),
        );
        return Err(REFUSE);
    }
    // SAFETY: `sa` is the context.
    unsafe { to_proxy(sa, v6, &dst) };
    count(stats::DNS_CAPTURED);
    report(
        source::DNS,
        reason::DNS_CAPTURED,
        netns,
        (&NO_ADDR, 0),
        (&dst, port),
    );
    Ok(ALLOW)
}

/// The in-pod listener a captured TCP connect to `port` goes to: the DNS proxy for port
/// 53 while DNS capture is on, else the outbound listener.
#[inline(always)]
pub fn tcp_listener(port: u16) -> u16 {
    if port == ports::DNS_SERVER && switch_on(config::DNS_CAPTURE) {
        count(stats::DNS_CAPTURED);
        ports::DNS
    } else {
        ports::OUTBOUND
    }
}

/// Rewrites the destination to the DNS proxy on loopback: IPv4, IPv6, or IPv4-mapped on
/// a dual-stack socket dialling an IPv4 server.
///
/// # Safety
/// `sa` must be the program's context.
#[inline(always)]
pub unsafe fn to_proxy(sa: *mut bpf_sock_addr, v6: bool, dst: &IpKey) {
    // SAFETY: as this function's.
    unsafe { crate::connect::to_loopback(sa, v6, dst, ports::DNS) }
}

/// An answer from the proxy (`127.0.0.1:15053`, `[::1]:15053`) to a socket whose query
/// was redirected: its source becomes the server the app asked.
///
/// # Safety
/// `ctx` must be the program's context.
#[inline(always)]
unsafe fn try_recvmsg(ctx: &SockAddrContext, v6: bool) {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the context.
    let (src, port) = unsafe { user_dst(sa, v6) };
    if port != ports::DNS || !is_loopback(&src) {
        return;
    }
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let Some(orig) = (unsafe { ORIG_DST_COOKIE.get(cookie) }).copied() else {
        return;
    };
    if orig.port != ports::DNS_SERVER {
        return;
    }
    let port = u32::from(u16::to_be(orig.port));
    // SAFETY: context writes, one field per store.
    unsafe {
        if !v6 {
            if orig.ip.family != AF_INET {
                return;
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
    count(stats::DNS_ANSWER_RESTORED);
}
