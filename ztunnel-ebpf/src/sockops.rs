//! `sockops` on enrolled pods' cgroups and on ztunnel's own: once an app's captured
//! connection is established its local port is known, so its original destination moves
//! into the tuple map that `SO_ORIGINAL_DST` reads; both ends of each app↔ztunnel
//! loopback connection go into the fast-path SOCKHASH when the switch is on; entries
//! are deleted when the socket closes. ztunnel's `:15006` listeners go into the SOCKHASH
//! `sk_lookup` takes them from (see `ztunnel_common::time_wait`) when they start
//! listening; the kernel takes a socket out of every map when it closes.
use core::ptr::{addr_of_mut, read_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_TCP_CLOSE, bpf_sock_ops,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use ztunnel_common::{
    IpKey, config,
    events::{reason, source},
    fast_path::SockKey,
    orig_dst::TupleKey,
    ports, stats,
    time_wait::ListenerKey,
};

use crate::maps::{
    AF_INET, AF_INET6, FAST_PATH_SOCKS, ORIG_DST_COOKIE, ORIG_DST_TUPLE, TW_LISTENERS, count, ip4,
    ip6, is_loopback, report, switch_on,
};

/// sockops programs return 1; the value is not used for these callbacks.
const DONE: u32 = 1;

// Not named `sockops`: that collides with the section name and fails to link.
#[sock_ops]
pub fn sockops_capture(ctx: SockOpsContext) -> u32 {
    // SAFETY: the kernel hands us a valid bpf_sock_ops for the program's lifetime.
    let _ = unsafe { try_sockops(&ctx) };
    DONE
}

/// One end of the connection as its own socket sees it.
struct Ends {
    local: IpKey,
    remote: IpKey,
    local_port: u16,
    remote_port: u16,
}

/// # Safety
/// `ops` must be the program's context.
unsafe fn ends(ops: *mut bpf_sock_ops) -> Option<Ends> {
    // SAFETY: context reads, one field each. Every field is read on every path: when
    // the loads sit in branches, LLVM merges them into one load at a computed context
    // offset, which the verifier rejects ("dereference of modified ctx ptr").
    unsafe {
        let family = read_volatile(addr_of_mut!((*ops).family));
        let l4 = read_volatile(addr_of_mut!((*ops).local_ip4));
        let r4 = read_volatile(addr_of_mut!((*ops).remote_ip4));
        let l6 = [
            read_volatile(addr_of_mut!((*ops).local_ip6[0])),
            read_volatile(addr_of_mut!((*ops).local_ip6[1])),
            read_volatile(addr_of_mut!((*ops).local_ip6[2])),
            read_volatile(addr_of_mut!((*ops).local_ip6[3])),
        ];
        let r6 = [
            read_volatile(addr_of_mut!((*ops).remote_ip6[0])),
            read_volatile(addr_of_mut!((*ops).remote_ip6[1])),
            read_volatile(addr_of_mut!((*ops).remote_ip6[2])),
            read_volatile(addr_of_mut!((*ops).remote_ip6[3])),
        ];
        let (local, remote) = if family == AF_INET {
            (ip4(l4), ip4(r4))
        } else if family == AF_INET6 {
            (ip6(l6), ip6(r6))
        } else {
            return None;
        };
        // sock_ops: local_port is in host byte order; remote_port is the network-order
        // port shifted into the upper half (net/core/filter.c, sock_ops_convert_ctx_access),
        // so a 32-bit byte swap yields it.
        let local_port = read_volatile(addr_of_mut!((*ops).local_port)) as u16;
        let remote_port = u32::from_be(read_volatile(addr_of_mut!((*ops).remote_port))) as u16;
        Some(Ends {
            local,
            remote,
            local_port,
            remote_port,
        })
    }
}

/// # Safety
/// `ctx` must be the program's context.
unsafe fn try_sockops(ctx: &SockOpsContext) -> Result<(), i32> {
    let op = ctx.op();
    let ops = ctx.ops;
    match op {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // A captured connect: ask for the close callback so the entry goes away even
            // if the connection never establishes (ztunnel down → refused).
            // SAFETY: helper valid for sockops.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            // SAFETY: presence check only.
            if unsafe { ORIG_DST_COOKIE.get(cookie) }.is_some() {
                ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)?;
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // SAFETY: `ops` is the context.
            let Some(e) = (unsafe { ends(ops) }) else {
                return Ok(());
            };
            if e.remote_port != ports::OUTBOUND || !is_loopback(&e.remote) {
                return Ok(());
            }
            // SAFETY: helper valid for sockops.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            // SAFETY: the value is copied out at once.
            let Some(orig) = (unsafe { ORIG_DST_COOKIE.get(cookie) }).copied() else {
                return Ok(());
            };
            // SAFETY: helper valid for sockops (Linux >= 5.15).
            let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
            let key = TupleKey {
                netns_cookie: netns,
                ip: e.local,
                port: e.local_port,
                _pad: 0,
            };
            let at = (&e.local, e.local_port);
            if let Err(err) = ORIG_DST_TUPLE.insert(key, orig, 0) {
                // The map is full: ztunnel will find no original destination and
                // close the connection (fail closed).
                count(stats::TUPLE_RECORD_FAILED);
                report(
                    source::SOCKOPS,
                    reason::TUPLE_MAP_FULL,
                    netns,
                    at,
                    (&orig.ip, orig.port),
                );
                return Err(err);
            }
            count(stats::TUPLE_RECORDED);
            report(
                source::SOCKOPS,
                reason::TUPLE_RECORDED,
                netns,
                at,
                (&orig.ip, orig.port),
            );
            ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)?;
            // SAFETY: `ops` is the context.
            unsafe { fast_path_insert(ctx, &e, netns) };
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            // ztunnel's accepted end of an app's captured connection.
            // SAFETY: `ops` is the context.
            let Some(e) = (unsafe { ends(ops) }) else {
                return Ok(());
            };
            if e.local_port != ports::OUTBOUND || !is_loopback(&e.local) {
                return Ok(());
            }
            // SAFETY: helper valid for sockops (Linux >= 5.15).
            let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
            // SAFETY: `ops` is the context.
            unsafe { fast_path_insert(ctx, &e, netns) };
        }
        BPF_SOCK_OPS_TCP_LISTEN_CB => {
            // Only ztunnel listens on :15006 in an enrolled pod (it holds the wildcard
            // address there), and whatever listens there is where tc steers anyway.
            // SAFETY: `ops` is the context.
            let Some(e) = (unsafe { ends(ops) }) else {
                return Ok(());
            };
            if e.local_port != ports::INBOUND_PLAINTEXT {
                return Ok(());
            }
            // SAFETY: helper valid for sockops (Linux >= 5.15).
            let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
            let mut key = ListenerKey {
                netns_cookie,
                family: e.local.family,
                _pad: 0,
            };
            // SAFETY: `ctx.ops` is the live sock_ops context the helper expects; a
            // listening socket may go into a SOCKHASH at TCP_LISTEN_CB.
            TW_LISTENERS.update(&mut key, unsafe { &mut *ctx.ops }, 0)?;
        }
        BPF_SOCK_OPS_STATE_CB => {
            // args[1] is the new state (include/uapi/linux/bpf.h, BPF_SOCK_OPS_STATE_CB).
            if ctx.arg(1) != BPF_TCP_CLOSE {
                return Ok(());
            }
            // SAFETY: helper valid for sockops.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = ORIG_DST_COOKIE.remove(cookie);
            // SAFETY: `ops` is the context.
            if let Some(e) = unsafe { ends(ops) } {
                // SAFETY: helper valid for sockops (Linux >= 5.15).
                let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
                let key = TupleKey {
                    netns_cookie: netns,
                    ip: e.local,
                    port: e.local_port,
                    _pad: 0,
                };
                let _ = ORIG_DST_TUPLE.remove(key);
            }
        }
        _ => {}
    }
    Ok(())
}

/// # Safety
/// `ctx` must be the program's context.
#[inline(always)]
unsafe fn fast_path_insert(ctx: &SockOpsContext, e: &Ends, netns: u64) {
    if !switch_on(config::FAST_PATH) {
        return;
    }
    let mut key = SockKey {
        netns_cookie: netns,
        local: e.local,
        remote: e.remote,
        local_port: u32::from(e.local_port),
        remote_port: u32::from(e.remote_port),
    };
    // SAFETY: `ctx.ops` is the live sock_ops context the helper expects.
    if FAST_PATH_SOCKS
        .update(&mut key, unsafe { &mut *ctx.ops }, 0)
        .is_ok()
    {
        count(stats::FAST_PATH_SOCKETS);
    }
}
