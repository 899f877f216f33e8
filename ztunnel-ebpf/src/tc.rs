//! Inbound capture: tc ingress on an enrolled pod's `eth0`, inside its netns. New TCP
//! connections to the pod's own addresses — every port but HBONE's — are handed to
//! ztunnel's in-pod `:15006` listener with `bpf_sk_assign`; the accepted socket's local
//! address is the original destination. Packets of existing sockets are left alone.
use core::mem::size_of;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, TC_ACT_OK, TC_ACT_SHOT, bpf_sock, bpf_sock_tuple,
    },
    helpers::{bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::classifier,
    programs::TcContext,
};
use ztunnel_common::{ports, stats};

use crate::maps::{POD_ADDRS, count, ip4, ip6};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPV6_HLEN: usize = 40;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

#[classifier]
pub fn tc_ingress_capture(ctx: TcContext) -> i32 {
    // SAFETY: the kernel hands us a valid __sk_buff for the program's lifetime.
    match unsafe { try_tc(&ctx) } {
        Ok(action) => action,
        Err(_) => TC_ACT_OK,
    }
}

/// # Safety
/// `ctx` must be the program's context.
unsafe fn try_tc(ctx: &TcContext) -> Result<i32, i64> {
    let proto = u16::from_be(ctx.load::<u16>(12)?);
    // SAFETY: a zeroed tuple is a valid bpf_sock_tuple.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let (l4, tuple_len, dport) = match proto {
        ETH_P_IP => {
            let vihl = ctx.load::<u8>(ETH_HLEN)?;
            if ctx.load::<u8>(ETH_HLEN + 9)? != IPPROTO_TCP {
                return Ok(TC_ACT_OK);
            }
            let daddr = ctx.load::<u32>(ETH_HLEN + 16)?;
            // SAFETY: presence check only.
            if unsafe { POD_ADDRS.get(ip4(daddr)) }.is_none() {
                return Ok(TC_ACT_OK);
            }
            let l4 = ETH_HLEN + usize::from(vihl & 0x0f) * 4;
            // SAFETY: writing the ipv4 member of a zeroed union.
            unsafe {
                let t = &mut tuple.__bindgen_anon_1.ipv4;
                t.saddr = ctx.load::<u32>(ETH_HLEN + 12)?;
                t.daddr = daddr;
                t.sport = ctx.load::<u16>(l4)?;
                t.dport = ctx.load::<u16>(l4 + 2)?;
                (l4, size_of_ipv4_tuple(), t.dport)
            }
        }
        ETH_P_IPV6 => {
            // Extension headers are not followed: pods' TCP does not carry them.
            if ctx.load::<u8>(ETH_HLEN + 6)? != IPPROTO_TCP {
                return Ok(TC_ACT_OK);
            }
            let mut daddr = [0u32; 4];
            let mut saddr = [0u32; 4];
            for i in 0..4 {
                saddr[i] = ctx.load::<u32>(ETH_HLEN + 8 + i * 4)?;
                daddr[i] = ctx.load::<u32>(ETH_HLEN + 24 + i * 4)?;
            }
            // SAFETY: presence check only.
            if unsafe { POD_ADDRS.get(ip6(daddr)) }.is_none() {
                return Ok(TC_ACT_OK);
            }
            let l4 = ETH_HLEN + IPV6_HLEN;
            // SAFETY: writing the ipv6 member of a zeroed union.
            unsafe {
                let t = &mut tuple.__bindgen_anon_1.ipv6;
                t.saddr = saddr;
                t.daddr = daddr;
                t.sport = ctx.load::<u16>(l4)?;
                t.dport = ctx.load::<u16>(l4 + 2)?;
                (l4, size_of::<bpf_sock_tuple>() as u32, t.dport)
            }
        }
        _ => return Ok(TC_ACT_OK),
    };
    if u16::from_be(dport) == ports::HBONE {
        return Ok(TC_ACT_OK);
    }
    // Only a connection's first packet needs steering: every later packet belongs to
    // the socket the SYN created, which the stack finds by its address.
    let flags = ctx.load::<u8>(l4 + 13)?;
    if flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN {
        return Ok(TC_ACT_OK);
    }
    let skb = ctx.as_ptr();
    // SAFETY: helper valid for tc; the tuple and its length match the family.
    let existing =
        unsafe { bpf_skc_lookup_tcp(skb, &mut tuple, tuple_len, BPF_F_CURRENT_NETNS as u64, 0) };
    if !existing.is_null() {
        // SAFETY: non-null socket from the lookup; released right after.
        let state = unsafe { (*existing).state };
        // SAFETY: every looked-up socket must be released.
        unsafe { bpf_sk_release(existing.cast()) };
        if state != BPF_TCP_LISTEN {
            // A socket already owns this tuple (e.g. TIME_WAIT): leave it be.
            return Ok(TC_ACT_OK);
        }
    }
    // Ask for ztunnel's listener: same tuple, destination port 15006.
    // Writing a union field is safe; write the port in the member we filled.
    if proto == ETH_P_IP {
        tuple.__bindgen_anon_1.ipv4.dport = u16::to_be(ports::INBOUND_PLAINTEXT);
    } else {
        tuple.__bindgen_anon_1.ipv6.dport = u16::to_be(ports::INBOUND_PLAINTEXT);
    }
    // SAFETY: as above.
    let listener: *mut bpf_sock =
        unsafe { bpf_skc_lookup_tcp(skb, &mut tuple, tuple_len, BPF_F_CURRENT_NETNS as u64, 0) };
    if listener.is_null() {
        // ztunnel is not listening in this pod: fail closed, never leak plaintext.
        count(stats::INBOUND_NO_LISTENER);
        return Ok(TC_ACT_SHOT);
    }
    // SAFETY: non-null socket from the lookup.
    let state = unsafe { (*listener).state };
    let ret = if state == BPF_TCP_LISTEN {
        // SAFETY: valid skb and socket.
        unsafe { bpf_sk_assign(skb, listener.cast(), 0) }
    } else {
        -1
    };
    // SAFETY: every looked-up socket must be released.
    unsafe { bpf_sk_release(listener.cast()) };
    if ret != 0 {
        count(stats::INBOUND_NO_LISTENER);
        return Ok(TC_ACT_SHOT);
    }
    count(stats::INBOUND_STEERED);
    Ok(TC_ACT_OK)
}

/// The IPv4 part of `bpf_sock_tuple`: two addresses and two ports.
const fn size_of_ipv4_tuple() -> u32 {
    (4 + 4 + 2 + 2) as u32
}
