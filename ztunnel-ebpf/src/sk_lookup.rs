//! `sk_lookup` in each enrolled pod's netns: answers the listener lookup the kernel
//! makes for a SYN that matched a TIME_WAIT socket (`tcp_timewait_state_process` →
//! `TCP_TW_SYN` → listener lookup on the original port) with ztunnel's `:15006`
//! listener, when tc left that very SYN in this CPU's hand-over slot. Every other lookup
//! — loopback traffic, ztunnel's own connections to the app — finds no matching
//! hand-over and is left to the kernel.
use core::ptr::{addr_of_mut, read_volatile};

use aya_ebpf::{
    bindings::{bpf_sk_lookup, sk_action::SK_DROP, sk_action::SK_PASS},
    helpers::bpf_ktime_get_ns,
    macros::sk_lookup,
    programs::SkLookupContext,
};
use ztunnel_common::{
    IpKey,
    events::{reason, source},
    stats,
    time_wait::{self, ListenerKey},
};

use crate::maps::{AF_INET, AF_INET6, POD_ADDRS, TW_LISTENERS, TW_PENDING, count, report};

const IPPROTO_TCP: u32 = 6;

#[sk_lookup]
pub fn sk_lookup_time_wait(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands us a valid bpf_sk_lookup for the program's lifetime.
    unsafe { try_sk_lookup(&ctx) }
}

/// # Safety
/// `ctx` must be the program's context.
unsafe fn try_sk_lookup(ctx: &SkLookupContext) -> u32 {
    let lk: *mut bpf_sk_lookup = ctx.lookup;
    let Some(slot) = TW_PENDING.get_ptr_mut(0) else {
        return SK_PASS;
    };
    // SAFETY: per-CPU slot; the value is copied out at once.
    let pending = unsafe { *slot };
    if pending.ktime_ns == 0 {
        // Nothing handed over on this CPU: the common case, one map lookup.
        return SK_PASS;
    }
    // SAFETY: context reads, one field each, every field on every path (see sockops.rs
    // on merged loads). `remote_port` is read 2 bytes wide at its start: the network-
    // order port on every kernel (a __u32 holding it zero-extended before 5.19).
    let (protocol, family, l4, r4, l6, r6, local_port, remote_port) = unsafe {
        (
            read_volatile(addr_of_mut!((*lk).protocol)),
            read_volatile(addr_of_mut!((*lk).family)),
            read_volatile(addr_of_mut!((*lk).local_ip4)),
            read_volatile(addr_of_mut!((*lk).remote_ip4)),
            [
                read_volatile(addr_of_mut!((*lk).local_ip6[0])),
                read_volatile(addr_of_mut!((*lk).local_ip6[1])),
                read_volatile(addr_of_mut!((*lk).local_ip6[2])),
                read_volatile(addr_of_mut!((*lk).local_ip6[3])),
            ],
            [
                read_volatile(addr_of_mut!((*lk).remote_ip6[0])),
                read_volatile(addr_of_mut!((*lk).remote_ip6[1])),
                read_volatile(addr_of_mut!((*lk).remote_ip6[2])),
                read_volatile(addr_of_mut!((*lk).remote_ip6[3])),
            ],
            read_volatile(addr_of_mut!((*lk).local_port)),
            read_volatile(addr_of_mut!((*lk).remote_port)),
        )
    };
    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let (local, remote) = if family == AF_INET {
        (
            IpKey {
                addr: [l4, 0, 0, 0],
                family: AF_INET,
            },
            IpKey {
                addr: [r4, 0, 0, 0],
                family: AF_INET,
            },
        )
    } else if family == AF_INET6 {
        (
            IpKey {
                addr: l6,
                family: AF_INET6,
            },
            IpKey {
                addr: r6,
                family: AF_INET6,
            },
        )
    } else {
        return SK_PASS;
    };
    if pending.local != local
        || pending.remote != remote
        || u32::from(pending.local_port) != local_port
        || pending.remote_port != u16::from_be(remote_port)
    {
        return SK_PASS;
    }
    // Consumed, whatever happens next.
    // SAFETY: per-CPU slot, only this CPU touches it while the program runs.
    unsafe { (*slot).ktime_ns = 0 };
    // SAFETY: helper valid everywhere.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(pending.ktime_ns) > time_wait::FRESH_NS {
        return SK_PASS;
    }
    // The pod this address belongs to, and its listener of this family. None (an
    // address ztunnel does not know, such as a link-local one, or the listener gone):
    // never fall back to the app's listener. With no listener the TIME_WAIT socket
    // answers the SYN with an ACK, the client resets it and retries, and tc steers the
    // retry to ztunnel, which refuses what is not the pod's.
    // SAFETY: the value is copied out at once.
    let local_at = (&local, pending.local_port);
    let remote_at = (&remote, pending.remote_port);
    let Some(netns_cookie) = (unsafe { POD_ADDRS.get(local) }).map(|p| p.netns_cookie) else {
        count(stats::INBOUND_DROP_TIME_WAIT);
        report(
            source::SK_LOOKUP,
            reason::TIME_WAIT_DROPPED,
            0,
            remote_at,
            local_at,
        );
        return SK_DROP;
    };
    let key = ListenerKey {
        netns_cookie,
        family,
        _pad: 0,
    };
    if TW_LISTENERS.redirect_sk_lookup(ctx, key, 0).is_err() {
        count(stats::INBOUND_DROP_TIME_WAIT);
        report(
            source::SK_LOOKUP,
            reason::TIME_WAIT_DROPPED,
            netns_cookie,
            remote_at,
            local_at,
        );
        return SK_DROP;
    }
    count(stats::INBOUND_TIME_WAIT_STEERED);
    count(stats::INBOUND_STEERED);
    report(
        source::SK_LOOKUP,
        reason::TIME_WAIT_STEERED,
        netns_cookie,
        remote_at,
        local_at,
    );
    SK_PASS
}
