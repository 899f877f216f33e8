//! `getsockopt(SO_ORIGINAL_DST)` (and `IP6T_SO_ORIGINAL_DST`) on ztunnel's accepted
//! sockets, answered from the tuple map instead of conntrack: ztunnel asks the same
//! question whether capture is eBPF or iptables.
use core::ptr::{addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _, bindings::bpf_sockopt, helpers::bpf_get_netns_cookie, macros::cgroup_sockopt,
    programs::SockoptContext,
};
use ztunnel_common::{
    events::{reason, source},
    orig_dst::TupleKey,
    stats,
};

use crate::maps::{AF_INET, AF_INET6, NO_ADDR, ORIG_DST_TUPLE, count, ip4, ip6, report};

/// cgroup sockopt programs return 1 to let the syscall's (possibly rewritten) answer through.
const ALLOW: i32 = 1;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h) and `IP6T_SO_ORIGINAL_DST`
/// (linux/netfilter_ipv6/ip6_tables.h) share the number 80.
const SO_ORIGINAL_DST: i32 = 80;
const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;

#[cgroup_sockopt(getsockopt)]
pub fn getsockopt_orig_dst(ctx: SockoptContext) -> i32 {
    // SAFETY: the kernel hands us a valid bpf_sockopt for the program's lifetime.
    unsafe { try_getsockopt(&ctx) };
    ALLOW
}

/// # Safety
/// `ctx` must be the program's context.
unsafe fn try_getsockopt(ctx: &SockoptContext) {
    let so: *mut bpf_sockopt = ctx.sockopt;
    // SAFETY: context reads, one field each.
    let (level, optname) = unsafe {
        (
            read_volatile(addr_of_mut!((*so).level)),
            read_volatile(addr_of_mut!((*so).optname)),
        )
    };
    if optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6) {
        return;
    }
    // SAFETY: `sk` is always set for sockopt programs; field reads of bpf_sock.
    let (peer, peer_port) = unsafe {
        let sk = read_volatile(addr_of_mut!((*so).__bindgen_anon_1.sk));
        let family = read_volatile(addr_of_mut!((*sk).family));
        // dst_port holds the be16 port in its first two bytes; a 4-byte load is the
        // access every kernel accepts (the field was a u32 before 5.17).
        let raw = read_volatile(addr_of_mut!((*sk).dst_port).cast::<u32>());
        let port = u16::from_be(raw as u16);
        // All fields on every path (see sockops.rs on merged loads).
        let d4 = read_volatile(addr_of_mut!((*sk).dst_ip4));
        let d6 = [
            read_volatile(addr_of_mut!((*sk).dst_ip6[0])),
            read_volatile(addr_of_mut!((*sk).dst_ip6[1])),
            read_volatile(addr_of_mut!((*sk).dst_ip6[2])),
            read_volatile(addr_of_mut!((*sk).dst_ip6[3])),
        ];
        let ip = if family == AF_INET {
            ip4(d4)
        } else if family == AF_INET6 {
            ip6(d6)
        } else {
            return;
        };
        (ip, port)
    };
    // SAFETY: helper valid for cgroup sockopt programs (Linux >= 5.15).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = TupleKey {
        netns_cookie: netns,
        ip: peer,
        port: peer_port,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    let Some(orig) = (unsafe { ORIG_DST_TUPLE.get(key) }).copied() else {
        count(stats::ORIG_DST_MISS);
        report(
            source::SOCKOPT,
            reason::ORIG_DST_MISS,
            netns,
            (&peer, peer_port),
            (&NO_ADDR, 0),
        );
        return;
    };
    // SAFETY: optval/optval_end bound the buffer the kernel lets us write; every store
    // below is checked against optval_end first, as the verifier requires.
    unsafe {
        let start = read_volatile(addr_of_mut!((*so).__bindgen_anon_2.optval)) as *mut u8;
        let end = read_volatile(addr_of_mut!((*so).__bindgen_anon_3.optval_end)) as *mut u8;
        let port_be = u16::to_be(orig.port);
        let written = if level == SOL_IP && orig.ip.family == AF_INET {
            // Bounds check for the verifier: the whole sockaddr_in must fit.
            if start.add(SOCKADDR_IN_LEN) > end {
                return;
            }
            let p = start.cast::<u16>();
            write_volatile(p, ztunnel_common::AF_INET);
            write_volatile(p.add(1), port_be);
            write_volatile(start.add(4).cast::<u32>(), orig.ip.addr[0]);
            write_volatile(start.add(8).cast::<u32>(), 0);
            write_volatile(start.add(12).cast::<u32>(), 0);
            SOCKADDR_IN_LEN
        } else if level == SOL_IPV6 {
            // Bounds check for the verifier: the whole sockaddr_in6 must fit.
            if start.add(SOCKADDR_IN6_LEN) > end {
                return;
            }
            let addr = if orig.ip.family == AF_INET {
                [0, 0, u32::to_be(0xffff), orig.ip.addr[0]]
            } else {
                orig.ip.addr
            };
            let p = start.cast::<u16>();
            write_volatile(p, ztunnel_common::AF_INET6);
            write_volatile(p.add(1), port_be);
            write_volatile(start.add(4).cast::<u32>(), 0);
            write_volatile(start.add(8).cast::<u32>(), addr[0]);
            write_volatile(start.add(12).cast::<u32>(), addr[1]);
            write_volatile(start.add(16).cast::<u32>(), addr[2]);
            write_volatile(start.add(20).cast::<u32>(), addr[3]);
            write_volatile(start.add(24).cast::<u32>(), 0);
            SOCKADDR_IN6_LEN
        } else {
            return;
        };
        write_volatile(addr_of_mut!((*so).optlen), written as i32);
        write_volatile(addr_of_mut!((*so).retval), 0);
    }
    count(stats::ORIG_DST_HIT);
    report(
        source::SOCKOPT,
        reason::ORIG_DST_HIT,
        netns,
        (&peer, peer_port),
        (&orig.ip, orig.port),
    );
}
