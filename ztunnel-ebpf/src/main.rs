//! ztunnel's kernel programs: outbound capture (`connect.rs`), original-destination
//! bookkeeping and the same-node fast path (`sockops.rs`, `sk_msg.rs`), `SO_ORIGINAL_DST`
//! (`sockopt.rs`) and inbound capture (`tc.rs`, and `sk_lookup.rs` for SYNs that meet a
//! TIME_WAIT socket), DNS capture (`dns.rs`). Maps live here; their names and types
//! come from `ztunnel-common` so userspace cannot drift from them.
#![no_std]
#![no_main]

mod connect;
mod dns;
mod maps;
mod sk_lookup;
mod sk_msg;
mod sockops;
mod sockopt;
mod tc;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
