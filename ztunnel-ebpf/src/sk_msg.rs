//! Same-node fast path: payload written on one end of an app↔ztunnel loopback
//! connection goes straight into the peer socket's receive queue.
use core::ptr::{addr_of_mut, read_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS, sk_msg_md},
    helpers::bpf_get_netns_cookie,
    macros::sk_msg,
    programs::SkMsgContext,
};
use ztunnel_common::{fast_path::SockKey, stats};

use crate::maps::{AF_INET, AF_INET6, FAST_PATH_SOCKS, count, ip4, ip6};

#[sk_msg]
pub fn sk_msg_fast_path(ctx: SkMsgContext) -> u32 {
    // SAFETY: the kernel hands us a valid sk_msg_md for the program's lifetime.
    unsafe { try_sk_msg(&ctx) };
    // Always pass: on a miss the message simply takes the normal loopback path.
    SK_PASS
}

/// # Safety
/// `ctx` must be the program's context.
unsafe fn try_sk_msg(ctx: &SkMsgContext) {
    let md: *mut sk_msg_md = ctx.msg;
    // SAFETY: context reads, one field each, all on every path (see sockops.rs: LLVM
    // would otherwise merge branch loads into a computed context offset).
    let mut peer = unsafe {
        let family = read_volatile(addr_of_mut!((*md).family));
        let l4 = read_volatile(addr_of_mut!((*md).local_ip4));
        let r4 = read_volatile(addr_of_mut!((*md).remote_ip4));
        let l6 = [
            read_volatile(addr_of_mut!((*md).local_ip6[0])),
            read_volatile(addr_of_mut!((*md).local_ip6[1])),
            read_volatile(addr_of_mut!((*md).local_ip6[2])),
            read_volatile(addr_of_mut!((*md).local_ip6[3])),
        ];
        let r6 = [
            read_volatile(addr_of_mut!((*md).remote_ip6[0])),
            read_volatile(addr_of_mut!((*md).remote_ip6[1])),
            read_volatile(addr_of_mut!((*md).remote_ip6[2])),
            read_volatile(addr_of_mut!((*md).remote_ip6[3])),
        ];
        let (local, remote) = if family == AF_INET {
            (ip4(l4), ip4(r4))
        } else if family == AF_INET6 {
            (ip6(l6), ip6(r6))
        } else {
            return;
        };
        // sk_msg_md: local_port host byte order; remote_port network order shifted into
        // the upper half, as in sock_ops (net/core/filter.c, sk_msg_convert_ctx_access).
        let local_port = read_volatile(addr_of_mut!((*md).local_port));
        let remote_port =
            u32::from(u32::from_be(read_volatile(addr_of_mut!((*md).remote_port))) as u16);
        // Only the app's writes are spliced. Splicing ztunnel's writes into the app's
        // socket makes a blocking app read fail with EAGAIN when the FIN overtakes the
        // spliced tail (seen on 6.18); the app must only ever see plain TCP semantics.
        if local_port == u32::from(ztunnel_common::ports::OUTBOUND) {
            return;
        }
        // The peer socket sees the same connection with the ends swapped.
        SockKey {
            netns_cookie: bpf_get_netns_cookie(ctx.as_ptr()),
            local: remote,
            remote: local,
            local_port: remote_port,
            remote_port: local_port,
        }
    };
    let ret = FAST_PATH_SOCKS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS));
    if ret == i64::from(SK_PASS) {
        count(stats::FAST_PATH_REDIRECTS);
    } else {
        count(stats::FAST_PATH_MISSES);
    }
}
