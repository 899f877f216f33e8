//! Inbound capture: tc ingress on an enrolled pod's `eth0`, inside its netns. Every new
//! TCP connection arriving there — any destination address, every port but HBONE's — is
//! handed to ztunnel's in-pod `:15006` listener with `bpf_sk_assign`; the accepted
//! socket's local address is the original destination, and ztunnel refuses the
//! addresses that are not the pod's. Packets of existing sockets are left alone.
//!
//! Fail closed: TCP that tc cannot classify is dropped, each drop counted by reason —
//! truncated or malformed headers, IPv6 extension-header chains longer than the walk,
//! and fragments (the kernel would reassemble a SYN tc never saw whole). Non-TCP passes,
//! fragmented or not.
//!
//! A SYN whose tuple still belongs to a TIME_WAIT socket is handed to `sk_lookup.rs`
//! instead (see `ztunnel_common::time_wait` for why `bpf_sk_assign` cannot take it).
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, BPF_TCP_TIME_WAIT, TC_ACT_OK, bpf_sock, bpf_sock_tuple,
    },
    helpers::{bpf_ktime_get_ns, bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::classifier,
    programs::TcContext,
};
use ztunnel_common::{
    IpKey,
    events::{reason, source},
    ports, stats,
    time_wait::Pending,
};

use crate::maps::{AF_INET, AF_INET6, NO_ADDR, POD_ADDRS, TW_PENDING, count, report, reports};

const TC_ACT_SHOT: i32 = aya_ebpf::bindings::TC_ACT_SHOT;
const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
/// IPv4 "more fragments" flag and fragment offset (RFC 791).
const IP_MF_OFFSET: u16 = 0x3fff;
/// IPv6 fragment offset (RFC 8200 §4.5), the flags masked out.
const IP6_OFFSET: u16 = 0xfff8;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
/// Extension headers walked before giving up on an IPv6 packet (and dropping it if it
/// may be TCP). A constant bound keeps the verifier's loop analysis finite; real
/// traffic carries at most two or three (RFC 8200 §4.1 lists each at most once, the
/// destination options twice).
const MAX_EXT_HEADERS: usize = 8;

/// The fixed IPv4 header (RFC 791), as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Hdr {
    version_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    protocol: u8,
    check: u16,
    saddr: u32,
    daddr: u32,
}
const _: () = assert!(core::mem::size_of::<Ipv4Hdr>() == IPV4_HLEN);

/// The fixed IPv6 header (RFC 8200), as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Hdr {
    version_class_flow: u32,
    payload_len: u16,
    next_header: u8,
    hop_limit: u8,
    saddr: [u32; 4],
    daddr: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<Ipv6Hdr>() == IPV6_HLEN);

/// The TCP header without options (RFC 9293), as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHdr {
    source: u16,
    dest: u16,
    seq: u32,
    ack_seq: u32,
    /// Data offset in the high nibble.
    doff: u8,
    flags: u8,
    window: u16,
    check: u16,
    urg_ptr: u16,
}
const _: () = assert!(core::mem::size_of::<TcpHdr>() == TCP_HLEN);

#[classifier]
pub fn tc_ingress_capture(ctx: TcContext) -> i32 {
    // SAFETY: the kernel hands us a valid __sk_buff for the program's lifetime.
    match unsafe { try_tc(&ctx) } {
        Ok(action) => action,
        Err(slot) => {
            count(slot);
            let why = drop_reason(slot);
            // The addresses are read again only when drops are reported, so the
            // classification path stores nothing for the report.
            if reports(source::TC, why) {
                let (local, remote) = addresses(&ctx);
                report_inbound(why, &local, 0, &remote, 0);
            }
            TC_ACT_SHOT
        }
    }
}

/// The event reason for a drop counted under `slot`.
#[inline(always)]
fn drop_reason(slot: u32) -> u16 {
    match slot {
        stats::INBOUND_NO_LISTENER => reason::INBOUND_DROPPED_NO_LISTENER,
        stats::INBOUND_DROP_FRAGMENT => reason::INBOUND_DROPPED_FRAGMENT,
        stats::INBOUND_DROP_TRUNCATED => reason::INBOUND_DROPPED_TRUNCATED,
        stats::INBOUND_DROP_TIME_WAIT => reason::TIME_WAIT_DROPPED,
        _ => reason::INBOUND_DROPPED_UNPARSEABLE,
    }
}

/// (local, remote) addresses of the packet, as far as its IP header can be read.
#[inline(always)]
fn addresses(ctx: &TcContext) -> (IpKey, IpKey) {
    match u16::from_be(ctx.skb.protocol() as u16) {
        ETH_P_IP => match ctx.load::<Ipv4Hdr>(ETH_HLEN) {
            Ok(ip) => (
                IpKey {
                    addr: [ip.daddr, 0, 0, 0],
                    family: AF_INET,
                },
                IpKey {
                    addr: [ip.saddr, 0, 0, 0],
                    family: AF_INET,
                },
            ),
            Err(_) => (NO_ADDR, NO_ADDR),
        },
        ETH_P_IPV6 => match ctx.load::<Ipv6Hdr>(ETH_HLEN) {
            Ok(ip) => (
                IpKey {
                    addr: ip.daddr,
                    family: AF_INET6,
                },
                IpKey {
                    addr: ip.saddr,
                    family: AF_INET6,
                },
            ),
            Err(_) => (NO_ADDR, NO_ADDR),
        },
        _ => (NO_ADDR, NO_ADDR),
    }
}

/// Reports an inbound decision, naming the pod by the local address (tc has no netns
/// cookie before Linux 6.15); 0 when the address is not an enrolled pod's.
#[inline(always)]
fn report_inbound(why: u16, local: &IpKey, local_port: u16, remote: &IpKey, remote_port: u16) {
    if reports(source::TC, why) {
        // SAFETY: read-only look-up; the value is copied out at once.
        let netns = unsafe { POD_ADDRS.get(local) }.map_or(0, |p| p.netns_cookie);
        report(
            source::TC,
            why,
            netns,
            (remote, remote_port),
            (local, local_port),
        );
    }
}

/// A TCP segment tc has classified: where its header is, the header itself, and the
/// end of the IP datagram that carries it.
struct Segment {
    tcp: TcpHdr,
    l4: usize,
    /// Offset just past the IP payload; 0 when the IP length field is 0 (a BIG TCP
    /// aggregate, never a SYN).
    end: usize,
}

/// `Ok(action)` for packets tc lets through or steers, `Err(stats slot)` for packets
/// it drops, counted under that slot.
///
/// # Safety
/// `ctx` must be the program's context.
unsafe fn try_tc(ctx: &TcContext) -> Result<i32, u32> {
    // The protocol the stack dispatches on (set by eth_type_trans, VLAN tags already
    // taken off), not whatever the frame's type field says.
    let proto = u16::from_be(ctx.skb.protocol() as u16);
    let skb_len = ctx.len() as usize;
    // SAFETY: a zeroed tuple is a valid bpf_sock_tuple.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let (seg, tuple_len, local, remote) = match proto {
        ETH_P_IP => {
            let ip: Ipv4Hdr = ctx
                .load(ETH_HLEN)
                .map_err(|_| stats::INBOUND_DROP_TRUNCATED)?;
            if ip.version_ihl >> 4 != 4 {
                return Err(stats::INBOUND_DROP_UNPARSEABLE);
            }
            if ip.protocol != IPPROTO_TCP {
                // UDP, ICMP…, fragmented or not: not ours.
                return Ok(TC_ACT_OK);
            }
            // Every fragment of a TCP datagram carries the protocol, so this catches
            // the first one and the rest (the kernel keys reassembly on it too).
            if u16::from_be(ip.frag_off) & IP_MF_OFFSET != 0 {
                return Err(stats::INBOUND_DROP_FRAGMENT);
            }
            let ihl = usize::from(ip.version_ihl & 0x0f) * 4;
            if ihl < IPV4_HLEN {
                return Err(stats::INBOUND_DROP_UNPARSEABLE);
            }
            let tot_len = usize::from(u16::from_be(ip.tot_len));
            let end = if tot_len == 0 { 0 } else { ETH_HLEN + tot_len };
            let seg = segment(ctx, ETH_HLEN + ihl, end, skb_len)?;
            // SAFETY: writing the ipv4 member of a zeroed union.
            unsafe {
                let t = &mut tuple.__bindgen_anon_1.ipv4;
                t.saddr = ip.saddr;
                t.daddr = ip.daddr;
                t.sport = seg.tcp.source;
                t.dport = seg.tcp.dest;
            }
            let key = |a| IpKey {
                addr: [a, 0, 0, 0],
                family: AF_INET,
            };
            (seg, size_of_ipv4_tuple(), key(ip.daddr), key(ip.saddr))
        }
        ETH_P_IPV6 => {
            let ip: Ipv6Hdr = ctx
                .load(ETH_HLEN)
                .map_err(|_| stats::INBOUND_DROP_TRUNCATED)?;
            if u32::from_be(ip.version_class_flow) >> 28 != 6 {
                return Err(stats::INBOUND_DROP_UNPARSEABLE);
            }
            let Some(l4) = ipv6_tcp_offset(ctx, ip.next_header)? else {
                return Ok(TC_ACT_OK);
            };
            let payload_len = usize::from(u16::from_be(ip.payload_len));
            let end = if payload_len == 0 {
                0
            } else {
                ETH_HLEN + IPV6_HLEN + payload_len
            };
            let seg = segment(ctx, l4, end, skb_len)?;
            // SAFETY: writing the ipv6 member of a zeroed union.
            unsafe {
                let t = &mut tuple.__bindgen_anon_1.ipv6;
                t.saddr = ip.saddr;
                t.daddr = ip.daddr;
                t.sport = seg.tcp.source;
                t.dport = seg.tcp.dest;
            }
            let key = |addr| IpKey {
                addr,
                family: AF_INET6,
            };
            (
                seg,
                core::mem::size_of::<bpf_sock_tuple>() as u32,
                key(ip.daddr),
                key(ip.saddr),
            )
        }
        _ => return Ok(TC_ACT_OK),
    };

    // Only a connection's first packet needs steering: every later packet belongs to
    // the socket the SYN created, which the stack finds by its address.
    if seg.tcp.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN {
        return Ok(TC_ACT_OK);
    }
    // A SYN is never an aggregate: its length fields must hold, and its options must
    // lie inside the datagram (the kernel would drop it anyway; say why).
    let doff = usize::from(seg.tcp.doff >> 4) * 4;
    if seg.end == 0 || doff < TCP_HLEN || seg.l4 + doff > seg.end {
        return Err(stats::INBOUND_DROP_TRUNCATED);
    }
    let (local_port, remote_port) = (u16::from_be(seg.tcp.dest), u16::from_be(seg.tcp.source));
    if local_port == ports::HBONE {
        report_inbound(
            reason::INBOUND_SKIPPED_HBONE,
            &local,
            local_port,
            &remote,
            remote_port,
        );
        return Ok(TC_ACT_OK);
    }

    let skb = ctx.as_ptr();
    // SAFETY: helper valid for tc; the tuple and its length match the family.
    let existing =
        unsafe { bpf_skc_lookup_tcp(skb, &mut tuple, tuple_len, BPF_F_CURRENT_NETNS as u64, 0) };
    let mut time_wait = false;
    if !existing.is_null() {
        // SAFETY: non-null socket from the lookup; released right after.
        let state = unsafe { (*existing).state };
        // SAFETY: every looked-up socket must be released.
        unsafe { bpf_sk_release(existing.cast()) };
        if state == BPF_TCP_TIME_WAIT {
            time_wait = true;
        } else if state != BPF_TCP_LISTEN {
            // A connection owns this tuple (a retransmitted SYN of a handshake under
            // way, a simultaneous open): the stack hands the SYN to it.
            report_inbound(
                reason::INBOUND_SKIPPED_EXISTING_SOCKET,
                &local,
                local_port,
                &remote,
                remote_port,
            );
            return Ok(TC_ACT_OK);
        }
    }
    // Ask for ztunnel's listener: same tuple, destination port 15006.
    // Writing a union field is safe; write the port in the member filled above.
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
        return Err(stats::INBOUND_NO_LISTENER);
    }
    // SAFETY: non-null socket from the lookup.
    let state = unsafe { (*listener).state };
    if state != BPF_TCP_LISTEN {
        // SAFETY: every looked-up socket must be released.
        unsafe { bpf_sk_release(listener.cast()) };
        return Err(stats::INBOUND_NO_LISTENER);
    }
    if time_wait {
        // SAFETY: every looked-up socket must be released.
        unsafe { bpf_sk_release(listener.cast()) };
        // Leave the SYN to the kernel's TIME_WAIT processing; sk_lookup answers its
        // listener lookup with the listener just found.
        let Some(slot) = TW_PENDING.get_ptr_mut(0) else {
            return Err(stats::INBOUND_DROP_TIME_WAIT);
        };
        // SAFETY: per-CPU slot, only this CPU touches it while the program runs; the
        // helper is valid everywhere.
        unsafe {
            *slot = Pending {
                local,
                remote,
                local_port,
                remote_port,
                _pad: 0,
                ktime_ns: bpf_ktime_get_ns(),
            };
        }
        report_inbound(
            reason::INBOUND_TIME_WAIT_HANDED_OVER,
            &local,
            local_port,
            &remote,
            remote_port,
        );
        return Ok(TC_ACT_OK);
    }
    // SAFETY: valid skb and listening socket.
    let ret = unsafe { bpf_sk_assign(skb, listener.cast(), 0) };
    // SAFETY: every looked-up socket must be released.
    unsafe { bpf_sk_release(listener.cast()) };
    if ret != 0 {
        return Err(stats::INBOUND_NO_LISTENER);
    }
    count(stats::INBOUND_STEERED);
    report_inbound(
        reason::INBOUND_STEERED,
        &local,
        local_port,
        &remote,
        remote_port,
    );
    Ok(TC_ACT_OK)
}

/// Loads the TCP header at `l4` and checks it lies inside the datagram (`end`, 0 when
/// the IP length field is 0) and the frame.
#[inline(always)]
fn segment(ctx: &TcContext, l4: usize, end: usize, skb_len: usize) -> Result<Segment, u32> {
    if end > skb_len || (end != 0 && l4 + TCP_HLEN > end) {
        return Err(stats::INBOUND_DROP_TRUNCATED);
    }
    let tcp: TcpHdr = ctx.load(l4).map_err(|_| stats::INBOUND_DROP_TRUNCATED)?;
    Ok(Segment { tcp, l4, end })
}

/// Walks the IPv6 extension headers the kernel walks (Hop-by-Hop, Routing, Destination
/// Options, AH, Fragment) to the upper-layer header: `Some(offset)` of a TCP header,
/// `None` for any other upper layer (let through), `Err` for what must be dropped.
#[inline(always)]
fn ipv6_tcp_offset(ctx: &TcContext, first: u8) -> Result<Option<usize>, u32> {
    let mut next = first;
    let mut off = ETH_HLEN + IPV6_HLEN;
    let mut fragmented = false;
    let mut i = 0;
    while i < MAX_EXT_HEADERS {
        match next {
            IPPROTO_TCP => break,
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH => {
                // Next header, then the length: in 8-octet units not counting the
                // first 8 (RFC 8200 §4.3-4.6), in 4-octet units minus 2 for AH
                // (RFC 4302 §2.2).
                let h: [u8; 2] = ctx.load(off).map_err(|_| stats::INBOUND_DROP_TRUNCATED)?;
                let len = if next == IPPROTO_AH {
                    (usize::from(h[1]) + 2) * 4
                } else {
                    (usize::from(h[1]) + 1) * 8
                };
                next = h[0];
                off += len;
            }
            IPPROTO_FRAGMENT => {
                // Next header, reserved, offset and flags (RFC 8200 §4.5).
                let h: [u8; 4] = ctx.load(off).map_err(|_| stats::INBOUND_DROP_TRUNCATED)?;
                next = h[0];
                off += 8;
                if u16::from_be_bytes([h[2], h[3]]) & IP6_OFFSET != 0 {
                    // A later fragment: only its next-header field says what it
                    // belongs to. TCP, or an extension header that may lead to TCP,
                    // cannot be classified.
                    return if is_upper_layer(next) && next != IPPROTO_TCP {
                        Ok(None)
                    } else {
                        Err(stats::INBOUND_DROP_FRAGMENT)
                    };
                }
                // The first fragment holds the whole header chain (RFC 8200 §4.5):
                // keep walking to see whether it is TCP.
                fragmented = true;
            }
            _ => return Ok(None),
        }
        i += 1;
    }
    if next != IPPROTO_TCP {
        // Still in the extension headers after the bound: it may be TCP.
        return Err(stats::INBOUND_DROP_UNPARSEABLE);
    }
    if fragmented {
        return Err(stats::INBOUND_DROP_FRAGMENT);
    }
    Ok(Some(off))
}

/// Not one of the extension headers [`ipv6_tcp_offset`] walks.
#[inline(always)]
fn is_upper_layer(next: u8) -> bool {
    !matches!(
        next,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT
    )
}

/// The IPv4 part of `bpf_sock_tuple`: two addresses and two ports.
const fn size_of_ipv4_tuple() -> u32 {
    (4 + 4 + 2 + 2) as u32
}
